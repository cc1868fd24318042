"""Losses: the denoising objective (epsilon / v-prediction, min-SNR weighting, masks) and the VAE's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def diffusion_target(scheduler: DDPMScheduler, latents, noise, timesteps):
    """What the UNet must predict: the noise (epsilon) or the velocity v (Salimans & Ho 2022)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")


def diffusion_loss(model_pred, target, timesteps, scheduler: DDPMScheduler, snr_gamma: float | None,
                   mask: torch.Tensor | None = None):
    """Mean squared error per sample, optionally min-SNR weighted (Hang et al. 2023) and masked.

    Min-SNR-gamma caps the weight of low-noise timesteps, whose easy targets otherwise dominate the
    gradient; the paper reports ~3x faster convergence with gamma = 5.

    `mask` (B, 1, h, w) in [0, 1] on the latent grid weights each latent cell: a masked-out cell (the background
    around a subject) adds nothing and gets no gradient; each sample's loss is divided by its mask's area, so a
    small subject counts as much as a large one, and an all-ones mask is no mask.
    """
    error = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # (B, C, h, w)
    if mask is None:
        per_sample = error.mean(dim=(1, 2, 3))  # (B,)
    else:
        per_sample = (error * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * error.shape[1])
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(scheduler, timesteps)
    weight = torch.clamp(snr, max=snr_gamma)
    # The weight is stated for the x0 loss; dividing by SNR (epsilon) or SNR + 1 (v) converts it.
    weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
    return (per_sample * weight).mean()


# A pixel is foreground when one of its channels is this far from the image's median color, in the
# [-1, 1] pixel range: 20% of the range, well above VAE noise, well below any shapes color against white.
FOREGROUND_DISTANCE = 0.4


def foreground_mask(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel differs from its image's median color (the background), else 0.0."""
    background = target.flatten(2).median(dim=2).values[:, :, None, None]  # (B, C, 1, 1)
    return ((target - background).abs().amax(dim=1, keepdim=True) > FOREGROUND_DISTANCE).float()


def vae_loss(reconstruction, target, posterior, kl_weight: float, foreground_weight: float = 0.0):
    """L1 + L2 reconstruction plus a small KL term, per pixel.

    L1 drives flat color regions to their exact value (a median), L2 penalises the rare large
    errors at edges. `kl_weight` is relative to the reconstruction summed over pixels, as in
    Rombach et al. 2022 (who use 1e-6), so it means the same at any resolution.

    `foreground_weight` multiplies the error on foreground pixels by 1 + foreground_weight. A small
    object on a plain background is ~10% of the pixels; unweighted, a VAE learns its shape first and
    then sits on long plateaus before it tells similar colors apart (we measured red, orange and
    yellow shapes all decoded orange after 1,200 steps at 31 dB PSNR). Weighted by 4, all six
    colors are right after ~650 steps.
    Returns (total, parts for logging).
    """
    reconstruction, target = reconstruction.float(), target.float()
    weight = 1 + foreground_weight * foreground_mask(target) if foreground_weight else 1.0
    error = reconstruction - target
    l1, l2 = (weight * error.abs()).mean(), (weight * error.pow(2)).mean()
    kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch
    total = l1 + l2 + kl_weight * kl / target[0].numel()
    return total, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}
