"""Peak memory of a UNet training step on CPU for each memory option: the optimizers, gradient checkpointing and
bf16 autocast.

    python benchmarks/memory.py [--unet base] [--latent 32] [--batch 4] [--steps 3] [--options adamw,adafactor,...]

Each option runs in a fresh Python process: it builds the UNet preset (random weights, the text embedding of the
`base` text encoder's width, 77 tokens), takes `--steps` optimizer steps (forward, backward, optimizer) on random
latents of `--latent` x `--latent`, and reports its resident memory right before the first step (weights and
inputs: the same for every option) and the highest resident memory while stepping, sampled every 2 ms. The
difference is what the option changes: gradients, optimizer state and the activations kept for the backward.
Also printed: the parameter count, the seconds per step, and the machine. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ("adamw", "adamw_8bit", "adafactor", "prodigy", "adamw+gradient_checkpointing", "adamw+bf16_autocast")


def measure(option: str, unet_preset: str, latent: int, batch: int, steps: int) -> dict:
    """Run in the child: one option's step memory."""
    import psutil
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from ldm_pipeline.config import load_config
    from ldm_pipeline.loop import make_optimizer
    from ldm_pipeline.models import UNET_PRESETS

    torch.manual_seed(0)
    optimizer_name, _, variant = option.partition("+")
    config = load_config("shapes", [f"optimizer={optimizer_name}",
                                    "learning_rate=1.0" if optimizer_name == "prodigy" else "learning_rate=1e-4"])
    unet = UNet2DConditionModel(**UNET_PRESETS[unet_preset], sample_size=latent, in_channels=4, out_channels=4,
                                cross_attention_dim=512)
    if variant == "gradient_checkpointing":
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer, _ = make_optimizer(config, [{"params": list(unet.parameters()), "lr": config.learning_rate}],
                                  config.learning_rate, "constant", 0, steps, optimizer_name)
    latents = torch.randn(batch, 4, latent, latent)
    text = torch.randn(batch, 77, 512)
    timesteps = torch.randint(0, 1000, (batch,))
    process = psutil.Process()
    before = process.memory_info().rss
    peak, running = [before], True

    def sample():
        while running:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16_autocast"):
            prediction = unet(latents, timesteps, text).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / steps
    running = False
    sampler.join()
    return {"option": option, "parameters": sum(p.numel() for p in unet.parameters()),
            "before_mb": before / 2**20, "peak_mb": peak[0] / 2**20, "step_mb": (peak[0] - before) / 2**20,
            "s_per_step": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default="base", help="UNet preset (ldm_pipeline/models.py)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px images)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.unet, args.latent, args.batch, args.steps)))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shapes_benchmark import cpu_description

    print(f"machine: {cpu_description()}\nUNet preset {args.unet!r}, latents {args.latent}x{args.latent}, batch "
          f"{args.batch}, {args.steps} steps per option, fp32 weights\n")
    print("| option | before the first step | peak while stepping | added by the step | s/step |")
    print("|---|---|---|---|---|")
    parameters = None
    for option in args.options.split(","):
        command = [sys.executable, __file__, "--child", option, "--unet", args.unet, "--latent", str(args.latent),
                   "--batch", str(args.batch), "--steps", str(args.steps)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            print(f"| {option} | failed: {result.stderr.strip().splitlines()[-1]} | | | |")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        parameters = row["parameters"]
        print(f"| {option} | {row['before_mb']:.0f} MB | {row['peak_mb']:.0f} MB | {row['step_mb']:.0f} MB | "
              f"{row['s_per_step']:.2f} |", flush=True)
    if parameters:
        print(f"\nUNet parameters: {parameters / 1e6:.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
