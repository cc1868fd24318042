"""benchmarks/gpu_check.py's CPU-executable parts, with tiny models: a SIGKILLed bf16 run with EMA resumes to the
uninterrupted run's weights, an fp16 step whose gradient overflows advances nothing but the data, fp16 generation
gives finite images, and the UNet step table fills in. On a GPU the same command checks the same at real size."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
from sd512_cpu import write_images  # noqa: E402


def test_gpu_check_passes_its_cpu_parts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # main sets it for --device cpu; restored afterwards
    args = ["--device", "cpu", "--shrink", "--batches", "1", "--steps", "1", "--out", str(tmp_path)]
    assert gpu_check.main(args) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [check["passed"] for check in report["checks"]] == [True, True, True]
    assert [row["variant"] for row in report["unet_step"]] == ["eager", "channels_last", "checkpointing"]
    assert all(row["images_per_s"] > 0 and row["tflops"] > 0 and row["peak_gib"] > 0 for row in report["unet_step"])
    printed = capsys.readouterr().out
    assert "PASS  (a) bf16 + EMA: SIGKILL mid-run, resume" in printed and "| checkpointing | 1 |" in printed


def test_the_overflow_check_fails_when_a_skipped_step_is_counted_as_a_step(tmp_path, monkeypatch):
    """The defect of issue 10: the GradScaler skips the update but the loop still steps the LR schedule and EMA."""
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: False))
    data_dir = write_images(tmp_path / "data", count=16, size=32)
    result = gpu_check.check_fp16_overflow(tmp_path, data_dir, "cpu", shrink=True)
    assert not result["passed"] and "skipped [], overflow_steps 0" in result["detail"]
