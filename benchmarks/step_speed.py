"""Training-step speed of the embedded default's two models, under the variations worth trying on a CPU.

    python benchmarks/step_speed.py [--config train_configs/shapes.yaml] [--steps 20] [--set key=value ...]
                                    [--only vae|unet] [--variants plain,channels_last,compile,...]
                                    [--heap kept|default]

Builds the VAE and the UNet exactly as the config does, then times full optimizer steps (forward,
backward, AdamW) on random inputs of the config's shapes after a warm-up. Prints one row per variant
with steps/s and ms/step, and the CPU it ran on. Nothing here is asserted: the numbers are for the
README's recipe table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm_pipeline.config import load_config  # noqa: E402
from ldm_pipeline.cpu import keep_freed_heap  # noqa: E402
from ldm_pipeline.losses import vae_loss  # noqa: E402
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, vae_scale_factor  # noqa: E402
from ldm_pipeline.tokenizer import build_tokenizer  # noqa: E402

VARIANTS = ("plain", "channels_last", "foreach_off", "fused", "compile", "bf16_autocast")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_steps(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def make_step(model, forward, variant: str, lr: float):
    """One optimizer step of `forward()` -> loss, with the variant's optimizer / layout / compile settings."""
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    kwargs = {"foreach": False} if variant == "foreach_off" else {"fused": True} if variant == "fused" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, **kwargs)
    run = torch.compile(forward) if variant == "compile" else forward

    def step():
        if variant == "bf16_autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = run()
        else:
            loss = run()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "train_configs" / "shapes.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", choices=["vae", "unet"], default=None)
    parser.add_argument("--variants", default="plain,channels_last,fused")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--heap", choices=["kept", "default"], default="kept",
                        help="kept: the heap settings training uses (ldm_pipeline.cpu.keep_freed_heap); "
                             "default: glibc's own, to measure what they gain (one process each)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heap == "kept":
        keep_freed_heap()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    # Only the model settings are used: any existing folder, apart from output_dir, stands in for the data.
    config = load_config(args.config, args.overrides + ["data.make_shapes=null",
                                                        f"data.train_data_dir={tempfile.mkdtemp()}"])
    from ldm_pipeline.shapes.maker import all_captions

    tokenizer = build_tokenizer(all_captions())
    resolution = config.resolution
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {args.heap} heap")
    for name in ("vae", "unet"):
        if args.only and name != args.only:
            continue
        for variant in variants:
            torch.manual_seed(0)
            vae = build_vae(config.model)
            if name == "vae":
                batch = config.vae_training.train_batch_size
                pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
                latent = (vae.config.latent_channels, resolution // vae_scale_factor(vae), resolution // 8)
                posterior_noise = torch.randn(batch, *latent)
                memory = torch.channels_last if variant == "channels_last" else torch.contiguous_format
                pixels = pixels.contiguous(memory_format=memory)

                def forward(vae=vae, pixels=pixels, noise=posterior_noise):
                    posterior = vae.encode(pixels).latent_dist
                    reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
                    return vae_loss(reconstruction, pixels, posterior, 1e-6, config.vae_training.foreground_weight)[0]

                model, lr = vae, config.vae_training.learning_rate
            else:
                text_encoder = build_text_encoder(config.model, tokenizer)
                unet = build_unet(config.model, resolution, vae, text_encoder)
                batch = config.train_batch_size
                side = resolution // vae_scale_factor(vae)
                latents = torch.randn(batch, vae.config.latent_channels, side, side)
                timesteps = torch.randint(0, 1000, (batch,))
                with torch.no_grad():
                    ids = tokenizer(["a red circle in the top left"] * batch, padding="max_length",
                                    return_tensors="pt").input_ids
                    embeds = text_encoder(ids)[0]
                if variant == "channels_last":
                    latents = latents.contiguous(memory_format=torch.channels_last)

                def forward(unet=unet, latents=latents, timesteps=timesteps, embeds=embeds):
                    return (unet(latents, timesteps, embeds).sample - latents).pow(2).mean()

                model, lr = unet, config.learning_rate
            params = sum(p.numel() for p in model.parameters()) / 1e6
            try:
                seconds = time_steps(make_step(model, forward, variant, lr), args.steps)
            except Exception as error:  # a variant this torch build cannot run is a result, not a crash
                print(f"{name:>5} {variant:>14}: failed: {type(error).__name__}: {str(error)[:120]}")
                continue
            print(f"{name:>5} {variant:>14}: {1 / seconds:7.2f} steps/s  {seconds * 1000:8.1f} ms/step  "
                  f"(batch {batch}, {params:.2f}M parameters)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
