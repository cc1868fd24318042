"""The real command users run: `accelerate launch train.py --config ...` as a subprocess."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
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
    return run_watched(command + list(args), cwd=cwd, env=env, timeout=timeout)


def run_watched(command: list[str], timeout: float, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` for a command that might hang: past `timeout`
    seconds every process it started (torchrun's workers included) prints each thread's Python stack and is
    killed, and the test fails showing those stacks, so a hang in CI says where it hung."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = stop_with_stacks(process)
        pytest.fail(f"{' '.join(map(str, command))} did not finish in {timeout} s. Its processes' stacks "
                    f"(stderr):\n{stderr[-12000:]}\n--- stdout:\n{stdout[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stop_with_stacks(process: subprocess.Popen) -> tuple[str, str]:
    """SIGABRT to `process` and its descendants (PYTHONFAULTHANDLER prints a Python process's stacks on it),
    then SIGKILL to whatever is left; their output so far."""
    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    send(reversed(family), signal.SIGABRT)  # workers first: a launcher that dies may take them with it
    try:
        return process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        send(family, signal.SIGKILL)
        return process.communicate()


def send(pids, signal_number: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            pass


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


def test_a_hung_command_fails_with_the_stacks_of_all_its_processes():
    # A launcher whose worker runs in a session of its own, as torchrun starts them
    worker = "import time; time.sleep(600)"
    launcher = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}], "
                "start_new_session=True); time.sleep(600)")
    with pytest.raises(pytest.fail.Exception, match="did not finish in 3 s") as failure:
        run_watched([sys.executable, "-c", launcher], timeout=3)
    assert str(failure.value).count("most recent call first") == 2, str(failure.value)
