"""benchmarks/gpu_check.py's CPU-executable parts, with tiny models, for the SD and SDXL layouts: a SIGKILLed bf16 run
with EMA resumes to the uninterrupted run's weights, an fp16 step whose gradient overflows advances nothing but the
data, fp16 generation gives finite images (SDXL's through a force_upcast VAE made to overflow float16, which gives
NaN images once force_upcast is off), and the UNet step tables fill in (SDXL's with 8-bit AdamW when bitsandbytes is
installed). On a GPU the same command checks the same at real size."""

import importlib.util
import json
import sys
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
from sd512_cpu import write_images  # noqa: E402


def test_gpu_check_passes_its_cpu_parts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # main sets it for --device cpu; restored afterwards
    eight_bit = importlib.util.find_spec("bitsandbytes") is not None
    variants = ["eager", "checkpointing+adamw_8bit" if eight_bit else "checkpointing"]  # each step option, in 2 rows
    args = ["--device", "cpu", "--shrink", "--batches", "1", "--steps", "1", "--variants", ",".join(variants),
            "--out", str(tmp_path)]
    assert gpu_check.main(args) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(check["check"].split(":")[0], check["passed"]) for check in report["checks"]] == [
        ("(a) SD bf16 + EMA", True), ("(a) SDXL bf16 + EMA", True), ("(b) SD fp16", True),
        ("(c) SD fp16 generation", True), ("(c) SDXL fp16 generation, VAE force_upcast", True)]
    upcast = report["checks"][-1]["detail"]
    assert "training keeps the VAE in float32" in upcast and "with force_upcast off 0% of the pixels finite" in upcast
    assert {family: [row["variant"] for row in rows] for family, rows in report["unet_step"].items()} == {
        "sd": variants, "sdxl": variants}
    rows = report["unet_step"]["sd"] + report["unet_step"]["sdxl"]
    assert all(row["images_per_s"] > 0 and row["tflops"] > 0 and row["peak_gib"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "PASS  (a) SDXL bf16 + EMA: SIGKILL mid-run, resume" in printed and f"| {variants[1]} | 1 |" in printed
    assert "(d) SDXL: training step of the tiny SDXL preset, 16x16 latents" in printed


def test_the_default_step_variants():
    sdxl = ["eager", "checkpointing"] + (["adamw_8bit", "checkpointing+adamw_8bit"]
                                         if importlib.util.find_spec("bitsandbytes") else [])
    assert gpu_check.default_variants("sd", "cuda") == ["eager", "channels_last", "checkpointing", "compile"]
    assert gpu_check.default_variants("sd", "cpu") == ["eager", "channels_last", "checkpointing"]
    assert gpu_check.default_variants("sdxl", "cuda") == sdxl


def test_the_overflow_check_fails_when_a_skipped_step_is_counted_as_a_step(tmp_path, monkeypatch):
    """The defect of issue 10: the GradScaler skips the update but the loop still steps the LR schedule and EMA."""
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: False))
    data_dir = write_images(tmp_path / "data", count=16, size=32)
    result = gpu_check.check_fp16_overflow(tmp_path, data_dir, "cpu", shrink=True)
    assert not result["passed"] and "skipped [], overflow_steps 0" in result["detail"]
