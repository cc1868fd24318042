"""The real command users run: `accelerate launch train.py --config ...` as a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_config_dict
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]


def accelerate_launch(*args, processes: int = 1, config_file=None, cwd=ROOT, timeout=300):
    """`accelerate launch` on CPU with `processes` workers, set by flags or by an Accelerate `config_file`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, 2 // processes))}
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file), "--num_cpu_threads_per_process", env["OMP_NUM_THREADS"]]
    else:
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no"] + (["--multi_gpu"] if processes > 1 else [])
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_accelerate_launch_train_py(tmp_path, caption_folder):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", caption_folder)))
    result = accelerate_launch("train.py", "--config", str(config), "--set", "max_train_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved the pipeline" in result.stdout
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "pipeline")
    assert pipe.unet.config.sample_size == 4
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["max_train_steps"] == 3


def test_launch_reports_config_errors_in_one_line(tmp_path, caption_folder):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny_config_dict(tmp_path / "out", caption_folder), "learnin_rate": 1}))
    result = accelerate_launch("train.py", "--config", str(config))
    assert result.returncode != 0
    assert "error: unknown config key 'learnin_rate'" in result.stderr
    assert "Traceback" not in result.stderr.split("error: unknown config key")[0][-500:]
