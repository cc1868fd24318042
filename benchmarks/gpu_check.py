"""What only a GPU shows, checked in one command:  python benchmarks/gpu_check.py

    python benchmarks/gpu_check.py [--device cuda|cpu] [--shrink] [--out DIR] [--family sd,sdxl] [--batches 1,4,8]
                                   [--variants eager,channels_last,checkpointing,compile,adamw_8bit] [--steps 10]

For each model family of --family (default both): SD, the sd15 layout; SDXL, SDXL's (`model.family: sdxl`: two
text encoders, a pooled text embedding and six size and crop numbers added to the timestep's embedding):
(a) bf16 training with EMA (the `small` presets at 64 px), SIGKILLed mid-run in a subprocess, resumed: it must end
    with the weights and EMA of an uninterrupted run (on a GPU: as close as two uninterrupted runs are to each
    other, since some CUDA kernels are not deterministic);
(c) generation in fp16 from the run of (a): finite, non-black images. SDXL's run has a VAE marked force_upcast (as
    SDXL 1.0's, whose activations overflow float16): the pipeline must decode in float32, and training would keep
    it in float32 under fp16 (unet_stage.vae_dtype). A small VAE never overflows by itself, so its decoder's first
    activations are scaled past float16's range (the norms after them undo it in float32); with force_upcast
    switched off the same pipeline must then give non-finite images (the overflow is real);
(d) the UNet's training step at its real size, bf16 autocast, AdamW: images/s, peak memory and achieved TFLOP/s
    (model FLOPs of one step, counted on the meta device by torch's FlopCounterMode) at each batch size, eager
    and with channels_last, gradient checkpointing, torch.compile or 8-bit AdamW (bitsandbytes). SD: the sd15
    UNet at 512 px (64x64x4 latents, 77x768 text states; default variants eager, channels_last, checkpointing,
    compile). SDXL: the `sdxl` UNet at 1024 px (128x128x4 latents, 77x2048 text states, a 1280-wide pooled
    embedding and 6 time ids; default variants eager and checkpointing, each also with adamw_8bit when
    bitsandbytes is installed).
And once, with the first family:
(b) fp16 with an overflow injected (one gradient set to inf at one step): the GradScaler skips that step,
    and the LR schedule, the EMA and the step count do not advance; overflow_steps counts it; the run ends.

On a machine without a GPU, `--device cpu --shrink` runs the same checks with tiny models (the `tiny` presets at
32 px; in (d) the sd15 layout at dummy widths, 32x32 latents, and the `tiny` SDXL preset, 16x16 latents; the suite
does, in tests/test_gpu_check.py). Accelerate gives a CPU run in fp16 no GradScaler, so (b) installs torch's CPU
GradScaler in the Accelerator and accelerate's own fp16 code paths run. Exit status 0 when (a)-(c) pass.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
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

from sd512_cpu import meta_components, peak_rss_bytes, reset_peak_rss, write_images  # noqa: E402
from step_speed import cpu_model  # noqa: E402

import ldm_pipeline.loop as loop_module  # noqa: E402
import ldm_pipeline.training as train_module  # noqa: E402
import ldm_pipeline.unet_stage as unet_stage  # noqa: E402
from ldm_pipeline import load_pipeline  # noqa: E402
from ldm_pipeline.config import ModelConfig, config_from_dict  # noqa: E402
from ldm_pipeline.models import UNET_PRESETS, micro_conditioning  # noqa: E402

STEPS = {"shrink": 6, "full": 10}  # optimizer steps of the training checks; checkpoints every 2
FAMILIES = {"sd": "SD", "sdxl": "SDXL"}


def run_config(out: Path, data_dir: Path, shrink: bool, family: str = "sd", **overrides) -> dict:
    """A short UNet run of `family`'s layout: tiny models at 32 px (--shrink) or the small presets at 64 px; EMA,
    a linear LR schedule (a different LR at every step) and a checkpoint every 2 steps."""
    size = "tiny" if shrink else "small"
    model = {name: size for name in ("vae", "unet", "text_encoder")}
    if family == "sdxl":  # and a VAE marked force_upcast, with SDXL's latent scale, as SDXL 1.0's: (c) decodes it
        model.update(family="sdxl", text_encoder_2=size, vae_kwargs={"scaling_factor": 0.13025, "force_upcast": True})
    config = {
        "output_dir": str(out), "seed": 0, "resolution": 32 if shrink else 64, "stages": ["unet"], "model": model,
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


def start_training_subprocess(config: dict, work: Path, device: str, kill_at_step: int) -> subprocess.Popen:
    """Start training `config` in a child process that SIGKILLs itself as optimizer step `kill_at_step` starts; its
    output goes to <work>/<run name>.log (a pipe nobody reads while the parent trains could fill and stall it)."""
    path = work / f"{Path(config['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if device == "cpu" else {})}
    command = [sys.executable, __file__, "--child-config", str(path), "--child-kill-at-step", str(kill_at_step)]
    with open(path.with_suffix(".log"), "w") as log:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def child_main(config_path: str, kill_at_step: int) -> int:
    sample_generators = loop_module.sample_generators

    def dying(seed, micro_step, indices):
        if micro_step == kill_at_step - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # like a preempted machine: no cleanup, no exception
        return sample_generators(seed, micro_step, indices)

    loop_module.sample_generators = dying  # fit draws from it
    return train_module.main(["--config", config_path])


def bf16_run(work: Path, data_dir: Path, shrink: bool, family: str, name: str, **overrides) -> dict:
    return run_config(work / f"{family}_bf16_{name}", data_dir, shrink, family, mixed_precision="bf16", **overrides)


def start_killed_run(work: Path, data_dir: Path, device: str, shrink: bool, family: str) -> subprocess.Popen:
    """(a), first: the run to be SIGKILLed, in a child process that trains while this one goes on."""
    steps = STEPS["shrink" if shrink else "full"]
    return start_training_subprocess(bf16_run(work, data_dir, shrink, family, "killed"), work, device, steps - 1)


def train_references(work: Path, data_dir: Path, device: str, shrink: bool, family: str) -> float:
    """(a), second: the uninterrupted run. Returns how far apart two uninterrupted runs end: nothing on a CPU; CUDA
    has non-deterministic kernels, so there it trains one more."""
    train_module.train(config_from_dict(bf16_run(work, data_dir, shrink, family, "reference")))
    if device != "cuda":
        return 0.0
    train_module.train(config_from_dict(bf16_run(work, data_dir, shrink, family, "reference_again")))
    return max_difference(final_state(work / f"{family}_bf16_reference_again")["weights"],
                          final_state(work / f"{family}_bf16_reference")["weights"])


def check_kill_and_resume(work: Path, data_dir: Path, shrink: bool, family: str, child: subprocess.Popen,
                          floor: float) -> dict:
    """(a), last: the child must have SIGKILLed itself; its run, resumed, must end where the uninterrupted one did."""
    steps, name = STEPS["shrink" if shrink else "full"], f"(a) {FAMILIES[family]} bf16 + EMA: SIGKILL mid-run, resume"
    killed = work / f"{family}_bf16_killed"
    child.wait(timeout=1800)
    if child.returncode != -signal.SIGKILL:
        log = (work / f"{killed.name}.log").read_text()
        return {"check": name, "passed": False,
                "detail": f"the child was to kill itself at step {steps - 1} but exited {child.returncode}: "
                          f"{log[-800:]}"}
    survived = sorted(p.name for p in (killed / "checkpoints").glob("step-*"))
    train_module.train(config_from_dict(bf16_run(work, data_dir, shrink, family, "killed",
                                                 resume_from_checkpoint="latest")))
    got, want = final_state(killed), final_state(work / f"{family}_bf16_reference")
    weights, ema = max_difference(got["weights"], want["weights"]), max_difference(got["ema"], want["ema"])
    same_progress = got["state"]["step"] == want["state"]["step"] == steps
    passed = same_progress and max(weights, ema) <= 10 * floor
    return {"check": name, "passed": passed,
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


def check_fp16_overflow(work: Path, data_dir: Path, device: str, shrink: bool, family: str = "sd") -> dict:
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

    out = work / f"{family}_fp16_overflow"
    with ExitStack() as stack:
        for module, name, value in (
                (train_module, "build_accelerator", with_cpu_grad_scaler(train_module.build_accelerator)),
                (loop_module, "sample_generators", remember), (unet_stage, "build_unet", unet_with_overflow)):
            stack.enter_context(mock.patch.object(module, name, value))
        stack.enter_context(mock.patch.object(Accelerator, "optimizer_step_was_skipped", property(recorded)))
        train_module.train(config_from_dict(run_config(out, data_dir, shrink, family, mixed_precision="fp16")))
    final = final_state(out)
    state, skips = final["state"], sorted(w for w, value in skipped.items() if value)
    counters = (state["step"], state["lr_scheduler"]["last_epoch"], state["ema"]["optimization_step"])
    finite = all(torch.isfinite(t).all() for t in final["weights"].values())
    passed = (inject_at in skips and state["overflow_steps"] == len(skips) and counters == (steps,) * 3
              and state["windows"] == steps + len(skips) and finite
              and (out / "pipeline" / "model_index.json").is_file())
    return {"check": f"(b) {FAMILIES[family]} fp16: inf gradient injected in data window {inject_at}",
            "passed": passed,
            "detail": f"windows the GradScaler skipped {skips}, overflow_steps {state['overflow_steps']}; step, LR "
                      f"schedule, EMA steps {counters} of {steps}; data windows {state['windows']}; weights finite: "
                      f"{finite}; pipeline saved"}


def fp16_images(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(["a red square on the left", ""], num_inference_steps=4, generator=generator,
                output_type="np").images  # (2, H, W, 3) in [0, 1]


def looks_fine(images: np.ndarray) -> bool:
    return bool(np.isfinite(images).all() and images.max() > 0.05 and images.std() > 0)


def describe_images(images: np.ndarray) -> str:
    return (f"{len(images)} images {images.shape[2]}x{images.shape[1]}, finite: {bool(np.isfinite(images).all())}, "
            f"mean {np.nanmean(images):.3f}, std {np.nanstd(images):.3f}")


def check_fp16_generation(work: Path, device: str) -> dict:
    images = fp16_images(load_pipeline(work / "sd_bf16_reference" / "pipeline", device=device, dtype=torch.float16))
    return {"check": "(c) SD fp16 generation", "passed": looks_fine(images), "detail": describe_images(images)}


def check_fp16_upcast_generation(work: Path, device: str) -> dict:
    """SDXL's VAE overflows float16, and so does this one once its decoder's first activations are scaled by 1e6
    (float16 holds up to 65504; the norms that follow undo the scale in float32)."""
    pipe = load_pipeline(work / "sdxl_bf16_reference" / "pipeline", device=device, dtype=torch.float16)
    upcast, trained_in = pipe.vae.config.force_upcast, unet_stage.vae_dtype(pipe.vae, torch.float16)
    pipe.vae.decoder.conv_in.register_forward_hook(lambda module, args, output: output * 1e6)
    images = fp16_images(pipe)
    pipe.vae.register_to_config(force_upcast=False)
    overflowed = fp16_images(pipe)  # decoded in float16: the scaled activations become inf, the images NaN
    passed = (upcast and trained_in == torch.float32 and looks_fine(images) and pipe.vae.dtype == torch.float16
              and not np.isfinite(overflowed).all())
    return {"check": "(c) SDXL fp16 generation, VAE force_upcast", "passed": passed,
            "detail": f"force_upcast {upcast} (fp16 training keeps the VAE in {str(trained_in).split('.')[1]}), its "
                      f"decoder's activations scaled past float16's range: {describe_images(images)}; the VAE back "
                      f"in {str(pipe.vae.dtype).split('.')[1]} after decoding; with force_upcast off "
                      f"{np.isfinite(overflowed).mean():.0%} of the pixels finite"}


def unet_and_inputs(family: str, shrink: bool, batch: int) -> tuple:
    """(d)'s UNet, built from seed 0 on the current default device, and a batch of its inputs: (latents, timesteps,
    text states) and SDXL's added conditions (None for SD)."""
    torch.manual_seed(0)
    if family == "sd":
        from diffusers import UNet2DConditionModel

        kwargs = dict(UNET_PRESETS["sd15"], sample_size=64, cross_attention_dim=768)  # 512 px; CLIP ViT-L/14
        if shrink:  # the layout of sd_512.yaml's shrunk test run, at 32x32 latents
            kwargs.update(block_out_channels=(16, 16, 32, 32), layers_per_block=1, attention_head_dim=2,
                          norm_num_groups=8, sample_size=32, cross_attention_dim=32)
        unet, pooled = UNet2DConditionModel(**kwargs), None
    else:
        preset, resolution = ("tiny", 128) if shrink else ("sdxl", 1024)  # --shrink: 16x16 latents
        model = ModelConfig(family="sdxl", **{name: preset for name in ("vae", "unet", "text_encoder",
                                                                          "text_encoder_2")})
        parts = meta_components(model, resolution, torch.float32)  # the UNet's config, sized from the others'
        unet = type(parts["unet"]).from_config(parts["unet"].config)
        pooled = parts["text_encoder_2"].config.projection_dim
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(batch, 4, side, side)  # (B, 4, 64, 64) for a 512 px image, (B, 4, 128, 128) for 1024
    text = torch.randn(batch, 77, width)  # (B, 77, 768): CLIP ViT-L/14's states; SDXL: both encoders', 2048
    timesteps = torch.randint(0, 1000, (batch,))
    added = None
    if pooled is not None:  # (B, 1280) pooled text embedding; (B, 6) original size, crop, target size
        size = side * 8
        added = {"text_embeds": torch.randn(batch, pooled),
                 "time_ids": micro_conditioning(torch.full((batch, 2), size), torch.zeros(batch, 2), (size, size))}
    return unet.train(), (latents, timesteps, text), added


@functools.cache
def model_flops(family: str, shrink: bool, batch: int) -> int:
    """FLOPs of one training step's forward and backward, recomputation not counted. They depend on shapes only, so
    they are counted on the meta device: no memory, no compute, and attention is the matmuls FlopCounterMode counts
    (it has no formula for a CPU's fused attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet, inputs, added = unet_and_inputs(family, shrink, batch)
        with FlopCounterMode(display=False) as counter:
            unet(*inputs, added_cond_kwargs=added).sample.float().pow(2).mean().backward()
    return counter.get_total_flops()


def unet_training_step(family: str, device: str, shrink: bool, batch: int, variant: str):
    """(step function, model FLOPs of one step) for `family`'s UNet at its real size, or a tiny one (--shrink)."""
    with torch.device(device):
        unet, (latents, timesteps, text), added = unet_and_inputs(family, shrink, batch)
    if "channels_last" in variant:
        unet, latents = unet.to(memory_format=torch.channels_last), latents.to(memory_format=torch.channels_last)
    if "checkpointing" in variant:
        unet.enable_gradient_checkpointing()
    if "adamw_8bit" in variant:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(unet.parameters(), lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device == "cuda")
    forward = torch.compile(unet) if "compile" in variant else unet

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            prediction = forward(latents, timesteps, text, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(prediction.float(), latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model_flops(family, shrink, batch)


def time_unet_step(family: str, device: str, shrink: bool, batch: int, variant: str, steps: int) -> dict:
    """One row of (d); the model and optimizer are freed when it returns."""
    row = {"variant": variant, "batch": batch}
    try:
        step, flops = unet_training_step(family, device, shrink, batch, variant)
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


def check_unet_throughput(family: str, device: str, shrink: bool, batches: list[int], variants: list[str],
                          steps: int) -> list:
    rows = []
    for variant in variants:
        for batch in batches:
            rows.append(time_unet_step(family, device, shrink, batch, variant, steps))
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


UNET_SHAPES = {
    ("sd", False): "the sd15 UNet, 64x64x4 latents (512 px), 77x768 text states",
    ("sd", True): "the sd15 UNet's layout at dummy widths, 32x32 latents",
    ("sdxl", False): "the sdxl UNet, 128x128x4 latents (1024 px), 77x2048 text states, pooled 1280 + 6 time ids",
    ("sdxl", True): "the tiny SDXL preset, 16x16 latents",
}


def default_variants(family: str, device: str) -> list[str]:
    if family == "sd":
        return ["eager", "channels_last", "checkpointing"] + (["compile"] if device == "cuda" else [])
    variants = ["eager", "checkpointing"]
    if importlib.util.find_spec("bitsandbytes"):  # sdxl_finetune.yaml's optimizer: 25.7 GB of state, not 41
        variants += ["adamw_8bit", "checkpointing+adamw_8bit"]
    return variants


def print_table(family: str, device: str, shrink: bool, steps: int, rows: list) -> None:
    memory = "peak GiB (allocated)" if device == "cuda" else "peak RSS GiB"
    print(f"\n(d) {FAMILIES[family]}: training step of {UNET_SHAPES[family, shrink]}, bf16 autocast, AdamW (8-bit: "
          f"adamw_8bit); {steps} timed steps after 2 warm-up steps")
    print(f"| variant | batch | images/s | ms/step | {memory} | TFLOP/s |\n|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | {row['batch']} | {row['error']} | | | |")
        else:
            print(f"| {row['variant']} | {row['batch']} | {row['images_per_s']:.2f} | {row['ms_per_step']:.1f} | "
                  f"{row['peak_gib']:.2f} | {row['tflops']:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", action="store_true", help="tiny models (what a CPU can run in seconds)")
    parser.add_argument("--out", help="work directory (default: a new temporary one)")
    parser.add_argument("--family", default="sd,sdxl", help="model families, comma-separated (default sd,sdxl)")
    parser.add_argument("--batches", default=None, help="UNet batch sizes for (d) (default 1,4,8; --shrink: 1,2)")
    parser.add_argument("--variants", default=None,
                        help="(d) variants, comma-separated from eager, channels_last, checkpointing, compile, "
                             "adamw_8bit and joins like checkpointing+adamw_8bit (default: SD eager, channels_last, "
                             "checkpointing and, on a GPU, compile; SDXL eager and checkpointing, each also with "
                             "adamw_8bit when bitsandbytes is installed)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per (d) row")
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-kill-at-step", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_config:
        return child_main(args.child_config, args.child_kill_at_step)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --device cpu --shrink for the CPU-executable checks")
    families = args.family.split(",")
    for family in families:
        if family not in FAMILIES:
            parser.error(f"--family: {family!r} is not a model family; give some of {', '.join(FAMILIES)}")
    if "adamw_8bit" in (args.variants or "") and not importlib.util.find_spec("bitsandbytes"):
        parser.error("--variants adamw_8bit needs bitsandbytes: pip install \"ldm_pipeline[8bit]\"")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # accelerate would pick a GPU if there is one
    if args.shrink:  # tiny models gain nothing from more threads, and lose much on a busy machine
        torch.set_num_threads(1)
    batches = [int(b) for b in (args.batches or ("1,2" if args.shrink else "1,4,8")).split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.out or scratch)
        work.mkdir(parents=True, exist_ok=True)
        data_dir = write_images(work / "data", count=16, size=32 if args.shrink else 64)
        # (a)'s runs to be killed train in child processes meanwhile; not during (d), whose GPU they would share
        children = {family: start_killed_run(work, data_dir, args.device, args.shrink, family) for family in families}
        floors = {family: train_references(work, data_dir, args.device, args.shrink, family) for family in families}
        others = [check_fp16_overflow(work, data_dir, args.device, args.shrink, families[0])]
        generation = {"sd": check_fp16_generation, "sdxl": check_fp16_upcast_generation}
        others += [generation[family](work, args.device) for family in families]
        checks = [check_kill_and_resume(work, data_dir, args.shrink, family, children[family], floors[family])
                  for family in families] + others
        tables = {family: check_unet_throughput(family, args.device, args.shrink, batches,
                                                args.variants.split(",") if args.variants
                                                else default_variants(family, args.device), args.steps)
                  for family in families}

    print(f"\ngpu_check on {describe(args.device)}" + (" with tiny models (--shrink)" if args.shrink else ""))
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['detail']}")
    for family, rows in tables.items():
        print_table(family, args.device, args.shrink, args.steps, rows)
    report = {"device": describe(args.device), "shrink": args.shrink, "checks": checks, "unet_step": tables}
    if args.out:
        (work / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if all(check["passed"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
