"""`compile: true` against eager: the UNet's training step, first step (the compile) and steady speed.

    python benchmarks/compile_speed.py [--config train_configs/shapes.yaml] [--unet base] [--batch 8]
                                       [--modes eager,compile,compile_fused] [--steps 20] [--warmup 3]
                                       [--repeats 3] [--threads N] [--set key=value ...]

Builds the config's UNet (default: the `base` preset at the config's resolution, 64 px: 4x8x8 latents) as a run
does (channels_last from the config, fused AdamW) and times full optimizer steps (forward, backward, AdamW) on
random latents and text states, fp32: the first step, which under compile traces and compiles, then `--steps`
steps after `--warmup` more. Modes: eager; compile, as compile: true does on the CPU (unet_stage.CPU_COMPILE_OPTIONS:
no fusion); compile_fused, Inductor's defaults (on torch 2.13 with wrong gradients: docs/training.md#compile). Each
measurement is a fresh process, the modes alternating, each compiled one with an empty Inductor cache (a cold
compile, as a new machine's first run sees it); one more process of the first compiled mode reuses its last cache,
as a resumed run does. Each compiled process checks its first step's gradients against an eager copy of the UNet on
the same batch. Prints each repeat and the medians, with the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("eager", "compile", "compile_fused")


def measure(args) -> dict:
    """One process's numbers: seconds of the first step, steps/s after the warm-up."""
    import torch

    sys.path.insert(0, str(ROOT))
    from ldm_pipeline.config import load_config
    from ldm_pipeline.cpu import keep_freed_heap
    from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, vae_scale_factor
    from ldm_pipeline.shapes.maker import all_captions
    from ldm_pipeline.tokenizer import build_tokenizer
    from ldm_pipeline.unet_stage import CPU_COMPILE_OPTIONS

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_heap()  # as a CPU run does
    # Only the model settings are used: an empty folder (apart from output_dir) stands in for the data.
    config = load_config(args.config, args.overrides + ["data.make_shapes=null", f"model.unet={args.unet}",
                                                        f"data.train_data_dir={tempfile.mkdtemp()}"])
    torch.manual_seed(0)
    tokenizer = build_tokenizer(all_captions())
    vae, text_encoder = build_vae(config.model), build_text_encoder(config.model, tokenizer)
    unet = build_unet(config.model, config.resolution, vae, text_encoder)
    side = config.resolution // vae_scale_factor(vae)
    latents = torch.randn(args.batch, vae.config.latent_channels, side, side)  # (B, 4, h, w)
    timesteps = torch.randint(0, 1000, (args.batch,))
    with torch.no_grad():
        ids = tokenizer(["a red circle in the top left"] * args.batch, padding="max_length",
                        return_tensors="pt").input_ids
        states = text_encoder(ids)[0]  # (B, L, D)
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    unet.train()
    eager = None
    if args.mode != "eager":
        eager = copy.deepcopy(unet)  # the gradients the compiled step must reproduce
        (eager(latents, timesteps, states).sample - latents).pow(2).mean().backward()
        unet.compile(options=CPU_COMPILE_OPTIONS if args.mode == "compile" else None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    first_grads = []

    def step():
        loss = (unet(latents, timesteps, states).sample - latents).pow(2).mean()
        loss.backward()
        if eager is not None and not first_grads:
            first_grads.extend(p.grad.clone() for p in unet.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    check = {}
    if eager is not None:
        # Relative error of each parameter's gradient, and those the compiled step left at zero where eager's is not.
        errors = [((got - p.grad).norm() / p.grad.norm().clamp_min(1e-30)).item()
                  for got, p in zip(first_grads, eager.parameters(), strict=True)]
        zeroed = sum(bool(got.abs().max() == 0 and p.grad.abs().max() > 0)
                     for got, p in zip(first_grads, eager.parameters(), strict=True))
        check = {"max_grad_error": max(errors), "zeroed_grads": zeroed, "num_params": len(errors)}
        eager, first_grads[:] = None, []  # not held while the steady steps are timed
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    steady = args.steps / (time.perf_counter() - start)
    return {**check, "mode": args.mode, "first_step_s": first, "steps_per_s": steady,
            "threads": torch.get_num_threads(), "parameters_m": unet.num_parameters() / 1e6,
            "latents": list(latents.shape), "torch": torch.__version__}


def child(args, mode: str, cache: str) -> dict:
    command = [sys.executable, __file__, "--measure", mode, "--config", args.config, "--unet", args.unet,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += (["--threads", str(args.threads)] if args.threads else []) + [f"--set={o}" for o in args.overrides]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the {mode} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gradient_check(row: dict) -> str:
    if "max_grad_error" not in row:
        return ""
    return (f"; first-step gradients vs eager: max relative error {row['max_grad_error']:.1e}, "
            f"{row['zeroed_grads']} of {row['num_params']} parameters' gradients zero where eager's are not")


def cpu_description() -> str:
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family')}, model {info.get('model')})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "train_configs" / "shapes.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--unet", default="base", help="a UNet preset (default: base)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--modes", default="eager,compile,compile_fused", help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--measure", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        args.mode = args.measure
        print(json.dumps(measure(args)))
        return 0
    print(f"{cpu_description()}, {datetime.date.today()}; UNet {args.unet}, batch {args.batch}, fp32, "
          f"{args.steps} steps after {args.warmup} + 1")
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    rows = {mode: [] for mode in modes}
    compiled = [mode for mode in modes if mode != "eager"]
    caches = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for mode in modes:
                caches[mode] = tempfile.mkdtemp(dir=scratch)  # empty: a cold compile
                rows[mode].append(child(args, mode, caches[mode]))
                row = rows[mode][-1]
                print(f"repeat {repeat + 1} {mode:>13}: first step {row['first_step_s']:7.1f} s, "
                      f"{row['steps_per_s']:.3f} steps/s ({row['threads']} threads, "
                      f"{row['parameters_m']:.1f}M parameters, latents {row['latents']}){gradient_check(row)}",
                      flush=True)
        if compiled:  # its last cache, filled: a resumed run's first step
            warm = child(args, compiled[0], caches[compiled[0]])
            print(f"{compiled[0]}, warm Inductor cache: first step {warm['first_step_s']:.1f} s, "
                  f"{warm['steps_per_s']:.3f} steps/s{gradient_check(warm)}")
    for mode, found in rows.items():
        first = statistics.median(row["first_step_s"] for row in found)
        speed = statistics.median(row["steps_per_s"] for row in found)
        print(f"median {mode:>13}: first step {first:.1f} s, {speed:.3f} steps/s ({1000 / speed:.0f} ms/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
