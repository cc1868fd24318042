"""Generic measures of a model's images: the PSNR of VAE reconstructions. What an image should show is a question
for the data's own checker (the shapes plug-in's `ldm_pipeline.shapes.checker`)."""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

PSNR_CAP_DB = 100.0  # identical images would be +inf; cap so batch means and JSON logs stay finite


def psnr_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of (B, 3, H, W) images in [-1, 1], measured on the [0, 1] scale (peak 1).
    The reconstruction is clamped to the valid range first, as it would be when saved as an image.
    Per image the value is capped at PSNR_CAP_DB, so identical images give exactly that, not inf."""
    if reference.shape != reconstruction.shape or reference.ndim != 4:
        raise ValueError(f"psnr needs two (B, C, H, W) tensors of the same shape, got {tuple(reference.shape)} "
                         f"and {tuple(reconstruction.shape)}")
    reference = (reference.float() + 1) / 2
    reconstruction = ((reconstruction.float() + 1) / 2).clamp(0, 1)
    mse = (reference - reconstruction).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return -10 * torch.log10(mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean of `psnr_per_image` over the batch."""
    return float(psnr_per_image(reference, reconstruction).mean())


IMAGES = VaeImageProcessor(do_resize=False)  # [-1, 1] tensors <-> 8-bit images, rounded as a saved PNG is


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction of (B, 3, H, W) pixels in [-1, 1], decoded from the latent distribution's mean (its
    mode: no sampling noise, so the result measures the autoencoder, not the posterior's variance)."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean  # (B, C, H/f, W/f)
    return vae.decode(latents).sample.float()


@torch.no_grad()
def reconstruction_sums(vae, pixels: torch.Tensor, captions: list[str] | None = None, checker=None) -> torch.Tensor:
    """[count, PSNR sum, then one count per field of `checker`] for VAE reconstructions of (B, 3, H, W) `pixels`.

    Sums rather than means, so shares computed on several processes add up to the whole. `checker` is a plug-in's
    reconstruction check for these `captions` (see plugins.reconstruction_checker): its `fields` and
    `count_correct(images, captions)`; without one only the PSNR is measured."""
    reconstruction = reconstruct(vae, pixels)
    sums = torch.zeros(2 + len(checker.fields if checker else ()))
    sums[0], sums[1] = len(pixels), psnr_per_image(pixels.float().cpu(), reconstruction.cpu()).sum()
    if checker:
        correct = checker.count_correct(IMAGES.postprocess(reconstruction.cpu(), output_type="pil"), captions)
        sums[2:] = torch.tensor([float(correct[field]) for field in checker.fields])
    return sums


@torch.no_grad()
def vae_psnr(vae, images: list[Image.Image], batch_size: int = 32) -> float:
    """Mean PSNR (dB) of VAE reconstructions of `images` (`reconstruct`)."""
    if not images:
        raise ValueError("vae_psnr needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"all images must have the same size to be batched, got sizes {sorted(sizes)}")
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = IMAGES.preprocess(images[start:start + batch_size])  # (B, 3, H, W) in [-1, 1]
        total += psnr(batch, reconstruct(vae, batch).cpu()) * len(batch)
    return total / len(images)
