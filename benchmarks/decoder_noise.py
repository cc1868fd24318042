"""How well a shapes VAE's decoder draws slightly wrong latents: held-out shapes images are encoded, Gaussian noise of
a few strengths (in units of the latents' std; 1.0 is the UNet's unit-variance scale) is added to each latent, and
the strict checker reads the decoded images.

    python benchmarks/decoder_noise.py outputs/shapes/vae [--images 180] [--resolution 64]
                                        [--strengths 0 0.05 0.1 0.2 0.3]

A UNet's final latents are never exact. A decoder trained only on the encoder's own latents (posterior std ~1% of
the latents' spread) turns small errors into lumpy circles and pinched squares; `vae_training.decoder_steps`
trains it to draw the nearest clean shape instead (docs/shapes_recipe.md#decoder-steps-2026-12-08).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderKL  # noqa: E402

from ldm_pipeline.evaluate import IMAGES  # noqa: E402
from ldm_pipeline.shapes.checker import heldout_images, score_images  # noqa: E402


@torch.no_grad()
def noisy_decoding_scores(vae: AutoencoderKL, strengths: list[float], num_images: int, resolution: int,
                          seed: int = 0) -> list[dict]:
    """One row per strength: the checker's color / shape / clean accuracy on decoded noisy latents."""
    pairs = heldout_images(resolution, num_images)
    pixels = torch.cat([IMAGES.preprocess(image) for image, _ in pairs])
    captions = [caption for _, caption in pairs]
    latents = vae.encode(pixels).latent_dist.mean
    noise = latents.std() * torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for strength in strengths:
        decoded = vae.decode(latents + strength * noise).sample
        report = score_images(IMAGES.postprocess(decoded, output_type="pil"), captions)
        rows.append({"strength": strength, **{field: report[f"{field}_accuracy"] for field in
                                               ("color", "shape", "clean")}})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", nargs="+", help="VAE directories (<output_dir>/vae or <pipeline>/vae)")
    parser.add_argument("--images", type=int, default=180)
    parser.add_argument("--resolution", type=int, default=64, help="the size the VAE was trained at")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    args = parser.parse_args(argv)
    print("| VAE | noise (x latent std) | color | shape | clean |\n|---|---|---|---|---|")
    for folder in args.vae:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
        for row in noisy_decoding_scores(vae, args.strengths, args.images, args.resolution):
            scores = " | ".join(f"{row[field]:.1%}" for field in ("color", "shape", "clean"))
            print(f"| {folder} | {row['strength']:.2f} | {scores} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
