"""What only a GPU shows, checked in one command:  python benchmarks/gpu_check.py

    python benchmarks/gpu_check.py [--device cuda|cpu] [--shrink] [--out DIR] [--batches 1,4,8]
                                   [--variants eager,channels_last,checkpointing,compile] [--steps 10]

(a) bf16 training with EMA, SIGKILLed mid-run in a subprocess, resumed: it must end with the weights and
    EMA of an uninterrupted run (on a GPU: as close as two uninterrupted runs are to each other, since
    some CUDA kernels are not deterministic);
(b) fp16 with an overflow injected (one gradient set to inf at one step): the GradScaler skips that step,
    and the LR schedule, the EMA and the step count do not advance; overflow_steps counts it; the run ends;
(c) generation in fp16 from the run of (a): finite, non-black images;
(d) the sd15 UNet's training step at 512 px (64x64x4 latents, 77x768 text states, bf16 autocast, AdamW):
    images/s, peak memory and achieved TFLOP/s (model FLOPs of one step, counted by torch's FlopCounterMode)
    at each batch size, eager and with channels_last, gradient checkpointing or torch.compile.

On a machine without a GPU, `--device cpu --shrink` runs the same checks with tiny models (the suite does, in
tests/test_gpu_check.py). Accelerate gives a CPU run in fp16 no GradScaler, so (b) installs torch's CPU
GradScaler in the Accelerator and accelerate's own fp16 code paths run. Exit status 0 when (a)-(c) pass.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path[:0] = [str(ROOT), str(BENCHMARKS)]

from sd512_cpu import peak_rss_bytes, reset_peak_rss, write_images  # noqa: E402
from step_speed import cpu_model  # noqa: E402

import ldm_pipeline.loop as loop_module  # noqa: E402
import ldm_pipeline.training as train_module  # noqa: E402
import ldm_pipeline.unet_stage as unet_stage  # noqa: E402
from ldm_pipeline import load_pipeline  # noqa: E402
from ldm_pipeline.config import config_from_dict  # noqa: E402
from ldm_pipeline.models import UNET_PRESETS  # noqa: E402

STEPS = {"shrink": 6, "full": 10}  # optimizer steps of the training checks; checkpoints every 2


def run_config(out: Path, data_dir: Path, shrink: bool, **overrides) -> dict:
    """A short UNet run: tiny models at 32 px (--shrink) or the small presets at 64 px; EMA, a linear LR
    schedule (a different LR at every step) and a checkpoint every 2 steps."""
    config = {
        "output_dir": str(out), "seed": 0, "resolution": 32 if shrink else 64, "stages": ["unet"],
        "model": {name: "tiny" if shrink else "small" for name in ("vae", "unet", "text_encoder")},
        "data": {"train_data_dir": str(data_dir)}, "train_batch_size": 2 if shrink else 8,
        "max_train_steps": STEPS["shrink" if shrink else "full"], "learning_rate": 1e-3, "lr_scheduler": "linear",
        "lr_warmup_steps": 1, "use_ema": True, "ema_decay": 0.9, "checkpointing_steps": 2, "logging_steps": 1,
        "cpu_threads": torch.get_num_threads(), "validation": {"seeds": [0], "validation_steps": 0, "num_heldout": 2},
        "sampling": {"num_inference_steps": 2},
    }
    config.update(overrides)
    return config


def final_state(out: Path) -> dict:
    checkpoint = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoint / "training_state.json").read_text())
    return {"weights": load_file(checkpoint / "model.safetensors"), "ema": load_file(checkpoint / "ema.safetensors"),
            "state": state}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_in_subprocess(config: dict, work: Path, device: str, kill_at_step: int) -> subprocess.CompletedProcess:
    """Train `config` in a child process that SIGKILLs itself as optimizer step `kill_at_step` starts."""
    path = work / f"{Path(config['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if device == "cpu" else {})}
    command = [sys.executable, __file__, "--child-config", str(path), "--child-kill-at-step", str(kill_at_step)]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)


def child_main(config_path: str, kill_at_step: int) -> int:
    sample_generators = loop_module.sample_generators

    def dying(seed, micro_step, indices):
        if micro_step == kill_at_step - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # like a preempted machine: no cleanup, no exception
        return sample_generators(seed, micro_step, indices)

    loop_module.sample_generators = dying  # fit draws from it
    return train_module.main(["--config", config_path])


def check_kill_and_resume(work: Path, data_dir: Path, device: str, shrink: bool) -> dict:
    steps = STEPS["shrink" if shrink else "full"]
    settings = dict(mixed_precision="bf16")
    reference = work / "bf16_reference"
    train_module.train(config_from_dict(run_config(reference, data_dir, shrink, **settings)))
    floor = 0.0  # two uninterrupted runs: identical on a CPU; CUDA has non-deterministic kernels
    if device == "cuda":
        again = work / "bf16_reference_again"
        train_module.train(config_from_dict(run_config(again, data_dir, shrink, **settings)))
        floor = max_difference(final_state(again)["weights"], final_state(reference)["weights"])

    killed = work / "bf16_killed"
    child = train_in_subprocess(run_config(killed, data_dir, shrink, **settings), work, device, steps - 1)
    if child.returncode != -signal.SIGKILL:
        return {"check": "(a) bf16 + EMA: SIGKILL mid-run, resume", "passed": False,
                "detail": f"the child was to kill itself at step {steps - 1} but exited {child.returncode}: "
                          f"{child.stderr[-800:]}"}
    survived = sorted(p.name for p in (killed / "checkpoints").glob("step-*"))
    train_module.train(config_from_dict(run_config(killed, data_dir, shrink, resume_from_checkpoint="latest",
                                                   **settings)))
    got, want = final_state(killed), final_state(reference)
    weights, ema = max_difference(got["weights"], want["weights"]), max_difference(got["ema"], want["ema"])
    same_progress = got["state"]["step"] == want["state"]["step"] == steps
    passed = same_progress and max(weights, ema) <= 10 * floor
    return {"check": "(a) bf16 + EMA: SIGKILL mid-run, resume", "passed": passed,
            "detail": f"SIGKILLed at step {steps - 1} with {survived} on disk; after the resume "
                      f"max |weights - uninterrupted| {weights:.3g}, EMA {ema:.3g} (two uninterrupted runs: "
                      f"{floor:.3g}); step {got['state']['step']}/{steps}"}


def with_cpu_grad_scaler(build_accelerator):
    """Accelerate gives fp16 on a CPU neither autocast nor a GradScaler; torch has both."""
    def build(config):
        accelerator = build_accelerator(config)
        if accelerator.device.type == "cpu" and config.mixed_precision == "fp16":
            accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
        return accelerator
    return build


def check_fp16_overflow(work: Path, data_dir: Path, device: str, shrink: bool) -> dict:
    """Every window the GradScaler skips (the injected one, and any natural overflow while the scale settles)
    must leave the step count, the LR schedule and the EMA where they were."""
    from accelerate import Accelerator

    steps, inject_at = STEPS["shrink" if shrink else "full"], 2  # data window 2: meant as the third step
    window, skipped = {}, {}  # window -> did the GradScaler skip its update
    sample_generators, build_unet = loop_module.sample_generators, unet_stage.build_unet
    was_skipped = Accelerator.optimizer_step_was_skipped

    def remember(seed, micro_step, indices):
        window["now"] = micro_step  # gradient_accumulation_steps 1: a micro-step is a window
        return sample_generators(seed, micro_step, indices)

    def unet_with_overflow(*args, **kwargs):
        unet = build_unet(*args, **kwargs)
        inf = lambda grad: torch.full_like(grad, float("inf")) if window.get("now") == inject_at else grad
        next(unet.parameters()).register_hook(inf)
        return unet

    def recorded(accelerator):
        skipped[window["now"]] = was_skipped.fget(accelerator)
        return skipped[window["now"]]

    out = work / "fp16_overflow"
    with ExitStack() as stack:
        for module, name, value in (
                (train_module, "build_accelerator", with_cpu_grad_scaler(train_module.build_accelerator)),
                (loop_module, "sample_generators", remember), (unet_stage, "build_unet", unet_with_overflow)):
            stack.enter_context(mock.patch.object(module, name, value))
        stack.enter_context(mock.patch.object(Accelerator, "optimizer_step_was_skipped", property(recorded)))
        train_module.train(config_from_dict(run_config(out, data_dir, shrink, mixed_precision="fp16")))
    final = final_state(out)
    state, skips = final["state"], sorted(w for w, value in skipped.items() if value)
    counters = (state["step"], state["lr_scheduler"]["last_epoch"], state["ema"]["optimization_step"])
    finite = all(torch.isfinite(t).all() for t in final["weights"].values())
    passed = (inject_at in skips and state["overflow_steps"] == len(skips) and counters == (steps,) * 3
              and state["windows"] == steps + len(skips) and finite
              and (out / "pipeline" / "model_index.json").is_file())
    return {"check": f"(b) fp16: inf gradient injected in data window {inject_at}", "passed": passed,
            "detail": f"windows the GradScaler skipped {skips}, overflow_steps {state['overflow_steps']}; step, LR "
                      f"schedule, EMA steps {counters} of {steps}; data windows {state['windows']}; weights finite: "
                      f"{finite}; pipeline saved"}


def check_fp16_generation(work: Path, device: str) -> dict:
    pipe = load_pipeline(work / "bf16_reference" / "pipeline", device=device, dtype=torch.float16)
    generator = torch.Generator().manual_seed(0)
    images = pipe(["a red square on the left", ""], num_inference_steps=4, generator=generator,
                  output_type="np").images  # (2, H, W, 3) in [0, 1]
    finite = bool(np.isfinite(images).all())
    passed = bool(finite and images.max() > 0.05 and images.std() > 0)
    return {"check": "(c) fp16 generation", "passed": passed,
            "detail": f"{len(images)} images {images.shape[2]}x{images.shape[1]}, finite: {finite}, "
                      f"mean {np.nanmean(images):.3f}, std {np.nanstd(images):.3f}"}


def unet_training_step(device: str, shrink: bool, batch: int, variant: str):
    """(step function, model FLOPs of one step) for the sd15 UNet, or its layout at dummy widths (--shrink)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    kwargs = dict(UNET_PRESETS["sd15"], sample_size=64, cross_attention_dim=768)
    if shrink:  # the layout of sd_512.yaml's shrunk test run, at 32x32 latents
        kwargs.update(block_out_channels=(16, 16, 32, 32), layers_per_block=1, attention_head_dim=2,
                      norm_num_groups=8, sample_size=32, cross_attention_dim=32)
    unet = UNet2DConditionModel(**kwargs).to(device).train()
    side, width = kwargs["sample_size"], kwargs["cross_attention_dim"]
    latents = torch.randn(batch, 4, side, side, device=device)  # (B, 4, 64, 64): a 512 px image's latents
    text = torch.randn(batch, 77, width, device=device)  # (B, 77, 768): CLIP ViT-L/14's text states
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device, dtype=torch.bfloat16):
        unet(latents, timesteps, text).sample.float().pow(2).mean().backward()  # model FLOPs: no recompute
    unet.zero_grad(set_to_none=True)
    if "channels_last" in variant:
        unet, latents = unet.to(memory_format=torch.channels_last), latents.to(memory_format=torch.channels_last)
    if "checkpointing" in variant:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device == "cuda")
    forward = torch.compile(unet) if "compile" in variant else unet

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            prediction = forward(latents, timesteps, text).sample
        torch.nn.functional.mse_loss(prediction.float(), latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, counter.get_total_flops()


def time_unet_step(device: str, shrink: bool, batch: int, variant: str, steps: int) -> dict:
    """One row of (d); the model and optimizer are freed when it returns."""
    row = {"variant": variant, "batch": batch}
    try:
        step, flops = unet_training_step(device, shrink, batch, variant)
        for _ in range(2):  # warm-up: compilation, cuDNN autotuning, allocator growth
            step()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats() if device == "cuda" else reset_peak_rss()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
        row.update(images_per_s=batch / seconds, ms_per_step=seconds * 1000, peak_gib=peak / 2**30,
                   tflops=flops / seconds / 1e12)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    return row


def check_unet_throughput(device: str, shrink: bool, batches: list[int], variants: list[str], steps: int) -> list:
    rows = []
    for variant in variants:
        for batch in batches:
            rows.append(time_unet_step(device, shrink, batch, variant, steps))
            torch.compiler.reset()  # compiled graphs hold on to their model
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", action="store_true", help="tiny models (what a CPU can run in seconds)")
    parser.add_argument("--out", help="work directory (default: a new temporary one)")
    parser.add_argument("--batches", default=None, help="UNet batch sizes for (d) (default 1,4,8; --shrink: 1,2)")
    parser.add_argument("--variants", default=None,
                        help="(d) variants, comma-separated from eager, channels_last, checkpointing, compile and "
                             "joins like compile+channels_last (default: all four; on a CPU without compile)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per (d) row")
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-kill-at-step", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_config:
        return child_main(args.child_config, args.child_kill_at_step)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --device cpu --shrink for the CPU-executable checks")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # accelerate would pick a GPU if there is one
    if args.shrink:  # tiny models gain nothing from more threads, and lose much on a busy machine
        torch.set_num_threads(1)
    batches = [int(b) for b in (args.batches or ("1,2" if args.shrink else "1,4,8")).split(",")]
    variants = (args.variants or ("eager,channels_last,checkpointing" + (",compile" if args.device == "cuda" else "")
                                  )).split(",")

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.out or scratch)
        work.mkdir(parents=True, exist_ok=True)
        data_dir = write_images(work / "data", count=16, size=32 if args.shrink else 64)
        checks = [check_kill_and_resume(work, data_dir, args.device, args.shrink),
                  check_fp16_overflow(work, data_dir, args.device, args.shrink),
                  check_fp16_generation(work, args.device)]
        table = check_unet_throughput(args.device, args.shrink, batches, variants, args.steps)

    print(f"\ngpu_check on {describe(args.device)}" + (" with tiny models (--shrink)" if args.shrink else ""))
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['detail']}")
    unet = "the sd15 UNet's layout at dummy widths, 32x32 latents" if args.shrink else "sd15 UNet, 64x64x4 latents"
    memory = "peak GiB (allocated)" if args.device == "cuda" else "peak RSS GiB"
    print(f"\n(d) training step of {unet}, bf16 autocast, AdamW; {args.steps} timed steps after 2 warm-up steps")
    print(f"| variant | batch | images/s | ms/step | {memory} | TFLOP/s |\n|---|---|---|---|---|---|")
    for row in table:
        if "error" in row:
            print(f"| {row['variant']} | {row['batch']} | {row['error']} | | | |")
        else:
            print(f"| {row['variant']} | {row['batch']} | {row['images_per_s']:.2f} | {row['ms_per_step']:.1f} | "
                  f"{row['peak_gib']:.2f} | {row['tflops']:.3f} |")
    report = {"device": describe(args.device), "shrink": args.shrink, "checks": checks, "unet_step": table}
    if args.out:
        (work / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if all(check["passed"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
