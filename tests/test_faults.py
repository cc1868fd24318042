"""Faults a user runs into around the commands (issue 20): Ctrl+C during generate or cache says in one line what
was kept and how to go on, and that rerun finishes the job; negative guidance and a tracker whose package is
missing are refused like other bad input; every file the commands write gets the user's umask."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_pipeline, tiny_config_dict, write_caption_folder
from PIL import Image
from test_bad_input import assert_one_error_line
from test_cache import cache_config, cache_rows, stream_config, write_config
from test_hub_layout import write_hub_layout
from test_launch import ROOT

from ldm_pipeline import cli as cli_module
from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError
from ldm_pipeline.export import export_single_file
from ldm_pipeline.generation import ImageWriter, check_generation_settings, read_png_metadata, save_progress_gif
from ldm_pipeline.latent_cache import EMPTY_EMBEDS_FILE

PROMPT = "a red square on the left"

# `python -c SLOW_ENCODE cache --config ...`: the cache command with every VAE call 0.3 s slower, so that a cache of
# 80 images (16 shards) takes seconds on any machine and the Ctrl+C lands in the middle of the build.
SLOW_ENCODE = """
import sys, time
import diffusers
from ldm_pipeline.cli import main

encode = diffusers.AutoencoderKL.encode


def slow_encode(self, *args, **kwargs):
    time.sleep(0.3)
    return encode(self, *args, **kwargs)


diffusers.AutoencoderKL.encode = slow_encode
sys.exit(main(sys.argv[1:]))
"""


def interrupted(command: list[str], first: Path, logs: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `command`, press Ctrl+C (SIGINT) as soon as `first` exists, and return how it ended. Its output goes to
    files (a full pipe would stall it); a run that hangs is killed after printing its stacks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        # SIGINT back to its default first: a shell starting the suite in the background (`pytest &`) makes
        # its children ignore SIGINT, and Python then installs no KeyboardInterrupt handler.
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, (f"ended ({process.returncode}) before the Ctrl+C, with {first} "
                                        f"{'written' if first.exists() else 'missing'}: "
                                        f"{(logs / 'stderr').read_text()[-3000:]}")
        assert first.exists(), f"no {first} after {timeout} s"
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints where it hangs
            process.wait(timeout=10)
            pytest.fail(f"still running 60 s after the Ctrl+C: {(logs / 'stderr').read_text()[-6000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def assert_stopped_line(err: str, line: str) -> None:
    """The Ctrl+C is reported as exactly `line`, last, and as nothing else (no traceback)."""
    lines = err.strip().splitlines()  # splitlines also ends a line at a progress bar's \r
    assert lines[-1] == line, err[-3000:]
    assert sum(text.startswith("stopped") for text in lines) == 1, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def seeds_of(folder: Path) -> list[int]:
    """The seed of each PNG in `folder`, in file order; each image is read whole (a partial PNG fails here)."""
    seeds = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            image.load()
            assert image.size == (32, 32)
        seeds.append(int(read_png_metadata(path)["seed"]))
    return seeds


# --- Ctrl+C --------------------------------------------------------------------------------------------------


def test_ctrl_c_during_generate_keeps_whole_images_and_its_suggested_rerun_writes_the_rest(tmp_path):
    model = save_tiny_pipeline(tmp_path / "pipeline")
    out = tmp_path / "images"
    args = ["generate", "--model", str(model), "--prompt", PROMPT, "--batch-size", "1", "--device", "cpu",
            "--out", str(out)]
    result = interrupted([sys.executable, "-m", "ldm_pipeline.cli", *args, "--seed", "100", "--num-images", "200"],
                         out / "00001.png", tmp_path)
    assert result.returncode == 130, result.stderr[-3000:]
    names = sorted(path.name for path in out.iterdir())  # hidden ones too: no partial file is left
    written = len(names)
    assert names == [f"{i:05d}.png" for i in range(written)]
    assert_stopped_line(result.stderr, f"stopped after writing {written} of 200 images to {out} (00000.png .. "
                                       f"{written - 1:05d}.png); run the same command with --seed {100 + written} "
                                       f"--num-images {200 - written} to write the rest")
    assert seeds_of(out) == list(range(100, 100 + written))
    assert cli([*args, "--seed", str(100 + written), "--num-images", str(200 - written)]) == 0
    assert seeds_of(out) == list(range(100, 300))  # every seed once: nothing lost, nothing made twice


@pytest.mark.parametrize("streaming", [False, True], ids=["image_folder", "streamed"])
def test_ctrl_c_during_cache_keeps_the_finished_shards_and_a_rerun_encodes_only_the_rest(tmp_path, streaming):
    if streaming:
        write_hub_layout(tmp_path / "dataset", count=80)
        config, first = stream_config(tmp_path / "out", tmp_path / "dataset"), "stream-p0of1-00000"
    else:
        write_caption_folder(tmp_path / "data", count=80)
        config, first = cache_config(tmp_path / "out", tmp_path / "data"), "shard-00000"
    path = write_config(tmp_path / "cache.yaml", config)
    cache = tmp_path / "out" / "latent_cache"
    result = interrupted([sys.executable, "-c", SLOW_ENCODE, "cache", "--config", path], cache / first, tmp_path)
    assert result.returncode == 130, result.stderr[-3000:]
    assert_stopped_line(result.stderr, "stopped: the finished shards of the latent cache are kept (a shard being "
                                       "written is not); run the same command again to encode only the rest")

    def shard_files():  # each finished shard's Arrow file and when it was written
        arrows = cache.glob(f"{first[:-5]}*/*.arrow")
        return {str(arrow.relative_to(cache)): arrow.stat().st_mtime_ns for arrow in arrows}

    kept = shard_files()
    assert 1 <= len(kept) < 16  # 80 rows in shards of 5
    assert not json.loads((cache / "manifest.json").read_text())["complete"]
    assert cli(["cache", "--config", path]) == 0
    assert not list(cache.glob(".partial-*"))  # what the Ctrl+C cut short is gone
    assert {name: written for name, written in shard_files().items() if name in kept} == kept  # not encoded again
    assert sorted(cache_rows(cache)["row"]) == list(range(80))  # every row once


def test_ctrl_c_in_another_command_is_one_line_and_exit_130(monkeypatch, capsys):
    def pressed_ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_export", pressed_ctrl_c)  # the parser is built when main runs
    assert cli(["export", "--model", "pipeline", "--out", "model.safetensors"]) == 130
    assert capsys.readouterr().err == "stopped (Ctrl+C)\n"


# --- bad settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [-3.0, -0.01])
def test_negative_guidance_is_refused_saying_that_up_to_1_turns_it_off(guidance):
    with pytest.raises(ConfigError, match=rf"guidance_scale \(--guidance\): {guidance} must be a finite number >= 0 "
                                          r"\(values <= 1 turn guidance off"):
        check_generation_settings(guidance_scale=guidance)


def test_guidance_from_0_to_1_is_accepted_as_off(tmp_path):
    model = save_tiny_pipeline(tmp_path / "pipeline")
    for guidance in ("0", "0.5", "1"):
        assert cli(["generate", "--model", str(model), "--prompt", PROMPT, "--guidance", guidance, "--device", "cpu",
                    "--out", str(tmp_path / guidance)]) == 0
        assert read_png_metadata(tmp_path / guidance / "00000.png")["guidance_scale"] == str(float(guidance))
    # diffusers guides only above 1: all three are the unguided image
    pixels = [Image.open(tmp_path / guidance / "00000.png").tobytes() for guidance in ("0", "0.5", "1")]
    assert pixels[0] == pixels[1] == pixels[2]


def _tracker_not_installed() -> str:
    from accelerate.tracking import get_available_trackers

    installed = {tracker.value for tracker in get_available_trackers()}
    missing = [name for name in ("wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive") if name not in installed]
    if not missing:
        pytest.skip("every tracker this test could use is installed")
    return missing[0]


def test_a_tracker_whose_package_is_missing_is_refused_by_the_dry_run(tmp_path, capsys):
    name = _tracker_not_installed()
    data = write_caption_folder(tmp_path / "data", count=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", data, report_to=name)))
    assert cli(["train", "--config", str(config), "--dry-run"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"report_to: {name!r} needs the {name} package: pip install "
                                                   f"{name} (or report_to: none)")
    assert cli(["train", "--config", str(config), "--set", "report_to=tensorboard", "--dry-run"]) == 0  # installed


# --- file modes ----------------------------------------------------------------------------------------------


@pytest.fixture
def umask():
    """`umask(value)` sets the process's umask for the test; the old one comes back after it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_generated_pngs_and_gifs_get_the_umask(tmp_path, umask):
    umask(0o022)
    model = save_tiny_pipeline(tmp_path / "pipeline")
    assert cli(["generate", "--model", str(model), "--prompt", PROMPT, "--save-progress", "--device", "cpu",
                "--out", str(tmp_path / "images")]) == 0
    assert mode(tmp_path / "images" / "00000.png") == 0o644
    assert mode(tmp_path / "images" / "00000.gif") == 0o644
    umask(0o002)  # a group-shared folder
    png = ImageWriter(tmp_path / "shared").save(Image.new("RGB", (8, 8)))
    gif = save_progress_gif([Image.new("RGB", (8, 8))] * 2, tmp_path / "shared" / "progress.gif")
    assert (mode(png), mode(gif)) == (0o664, 0o664)


def test_an_exported_checkpoint_gets_the_umask(tmp_path, umask):
    model = save_tiny_pipeline(tmp_path / "pipeline")
    umask(0o022)
    assert mode(export_single_file(model, tmp_path / "model.safetensors")["path"]) == 0o644
    umask(0o002)
    assert mode(export_single_file(model, tmp_path / "model.safetensors", overwrite=True)["path"]) == 0o664


def test_every_file_of_the_latent_cache_gets_the_umask(tmp_path, umask):
    umask(0o022)
    write_caption_folder(tmp_path / "data", count=8)
    assert cli(["cache", "--config", write_config(tmp_path / "cache.yaml",
                                                   cache_config(tmp_path / "out", tmp_path / "data"))]) == 0
    cache = tmp_path / "out" / "latent_cache"
    assert mode(cache / EMPTY_EMBEDS_FILE) == 0o644
    files = [path for path in cache.rglob("*") if path.is_file()]
    assert len(files) > 3 and {str(path.relative_to(cache)): mode(path) for path in files} == \
        {str(path.relative_to(cache)): 0o644 for path in files}


def test_every_file_of_a_training_run_gets_the_umask(tmp_path, umask, caption_folder):
    """safetensors writes through a 0600 temporary file of its own: the pipeline and the checkpoints are given the
    umask's modes before they are renamed into place."""
    from conftest import tiny_config

    from ldm_pipeline.training import train

    umask(0o022)
    out = tmp_path / "out"
    train(tiny_config(out, caption_folder, max_train_steps=2, checkpointing_steps=2))
    written = [path for folder in ("pipeline", "checkpoints", "text_encoder") for path in (out / folder).rglob("*")]
    assert any(path.suffix == ".safetensors" for path in written)
    assert {str(path.relative_to(out)): mode(path) for path in written} == \
        {str(path.relative_to(out)): 0o755 if path.is_dir() else 0o644 for path in written}
