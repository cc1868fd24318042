"""Two jobs at once (issue 13): one training run per output_dir (an OS lock that dies with its process),
and generations sharing an --out folder never overwrite each other's images."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import tiny_config, tiny_config_dict
from PIL import Image
from test_bad_input import assert_one_error_line, files_of
from test_launch import ROOT

from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError
from ldm_pipeline.generation import ImageWriter, read_png_metadata
from ldm_pipeline.locks import LOCK_FILE
from ldm_pipeline.run_dir import output_dir_lock
from ldm_pipeline.training import main as train_main
from ldm_pipeline.training import train

# A training run that stops before its UNet stage (the lock held, config.yaml written) until `go` exists.
PAUSED_RUN = """
import sys, time
from pathlib import Path
import ldm_pipeline.training as t
go, real = Path(sys.argv[2]), t.train_unet_stage
def paused(*args, **kwargs):
    print("holding the lock", flush=True)
    while not go.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
t.train_unet_stage = paused
sys.exit(t.main(["--config", sys.argv[1]]))
"""


GENERATE = "import sys\nfrom ldm_pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def start(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            break
    process.kill()
    pytest.fail(f"the subprocess never printed {text!r}: {process.stderr.read()[-3000:]}")


def test_a_second_run_on_a_busy_output_dir_is_refused_and_a_killed_runs_lock_blocks_nothing(
        tmp_path, caption_folder, capsys):
    out, go = tmp_path / "out", tmp_path / "go"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(out, caption_folder, max_train_steps=2,
                                                    validation__num_heldout=0)))
    first = start(PAUSED_RUN, path, go)
    try:
        wait_for_line(first, "holding the lock")
        holder = (out / LOCK_FILE).read_text()
        assert holder.startswith(f"pid {first.pid} on ")
        before = files_of(out)
        second = tiny_config(out, caption_folder, max_train_steps=2, overwrite_output_dir=True)
        with pytest.raises(ConfigError, match=f"output_dir: {out} is in use by another training run "
                                              rf"\(pid {first.pid} on .*lock file {out / LOCK_FILE}\). Wait for"):
            train(second)
        assert train_main(["--config", str(path), "--set", "overwrite_output_dir=true"]) == 2
        assert_one_error_line(capsys.readouterr().err, f"output_dir: {out} is in use by another training run")
        assert files_of(out) == before  # the refused runs wrote nothing, cleared nothing
        assert first.poll() is None  # and the first one runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_FILE).exists()  # left behind by the killed run: a file, no longer a lock
    assert (train(second) / "model_index.json").is_file()
    assert not (out / LOCK_FILE).exists()


def test_a_refused_run_removes_the_folders_it_made_for_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        with output_dir_lock(tmp_path / "a" / "b"):
            raise RuntimeError("refused")
    assert not (tmp_path / "a").exists()


def test_writers_sharing_a_folder_never_overwrite_each_other(tmp_path):
    (tmp_path / "00003.png").write_bytes(b"the user's")
    first, second = ImageWriter(tmp_path), ImageWriter(tmp_path)  # both start at 00004
    for i, writer in enumerate([first, second, first, second, second]):
        writer.save(Image.new("RGB", (8, 8), (i * 40, 0, 0)))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00003.png", "00004.png", "00005.png", "00006.png", "00007.png", "00008.png"]
    assert (tmp_path / "00003.png").read_bytes() == b"the user's"
    reds = [Image.open(tmp_path / name).getpixel((0, 0))[0] for name in names[1:]]
    assert reds == [0, 40, 80, 120, 160]  # every image kept, in the order written


def test_generate_writes_as_it_goes_shares_a_folder_and_keeps_its_images_on_sigterm(trained_run, tmp_path):
    out = tmp_path / "shared"
    args = ["generate", "--model", trained_run / "pipeline", "--prompt", "a red square on the left", "--steps", "2",
            "--batch-size", "1", "--device", "cpu", "--out", out]
    other = start(GENERATE, *args, "--num-images", "500", "--seed", "100")
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("*.png")) and time.monotonic() < deadline and other.poll() is None:
            time.sleep(0.05)
        assert list(out.glob("*.png")), other.stderr.read()[-3000:]  # on disk long before its 500 are done
        assert cli(list(map(str, args)) + ["--num-images", "8"]) == 0  # a second generation, meanwhile
        other.send_signal(signal.SIGTERM)
        assert other.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        other.kill()
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"{i:05d}.png" for i in range(len(files))]  # no partial file left
    seeds = []
    for path in files:
        with Image.open(path) as image:
            image.load()
            assert image.size == (32, 32)
        seeds.append(int(read_png_metadata(path)["seed"]))
    written = len(files) - 8
    assert sorted(seeds) == [*range(8), *range(100, 100 + written)]  # every image of both, each complete
    assert f"stopped after writing {written} of 500 images" in other.stderr.read()
