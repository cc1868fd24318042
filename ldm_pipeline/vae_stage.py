"""The "vae" stage: train the autoencoder, check its held-out reconstructions against the configured bars,
calibrate its latents for the UNet, and save it to <output_dir>/vae.

The loop it runs is `loop.fit`. Where a plug-in knows the data (the shapes), its checker also reads the
reconstructions (`plugins.reconstruction_checker`): the UNet can draw no better than its VAE decodes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.utils import make_image_grid
from safetensors import SafetensorError

from . import data as data_lib
from . import plugins
from .config import Config, ConfigError, stage_settings
from .evaluate import IMAGES, reconstruct, reconstruction_sums
from .loop import Stage, TrainingError, fit, log_image, log_metrics, make_loader, make_optimizer
from .losses import vae_loss
from .models import vae_scale_factor
from .run_dir import written_then_renamed


class VAEForTraining(torch.nn.Module):
    """Routes encode + decode through forward(), where DDP synchronises gradients."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels, posterior_noise):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * posterior_noise
        return self.vae.decode(latents).sample, posterior


class DecoderForTraining(torch.nn.Module):
    """The decoder steps (`vae_training.decoder_steps`): the frozen encoder's latent of each image, plus noise of
    `strength` (per image) times the latents' std (measured by the calibration, so it is the same at every batch
    size and process count), decoded. Only the decoder's parameters require gradients, so DDP synchronises those
    alone."""

    def __init__(self, vae: AutoencoderKL, latent_std: float):
        super().__init__()
        self.vae, self.latent_std = vae, latent_std

    def forward(self, pixels, posterior_noise, strength, latent_noise):
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * posterior_noise
            latents = latents + strength[:, None, None, None] * self.latent_std * latent_noise
        return self.vae.decode(latents).sample, posterior


def shares(accelerator: Accelerator, count: int, chunk: int):
    """This process's contiguous share of range(count), in chunks of at most `chunk` indices."""
    with accelerator.split_between_processes(list(range(count))) as mine:
        return [mine[i:i + chunk] for i in range(0, len(mine), chunk)]


def same_size(dataset, rows: list[int]):
    """(rows, (b, 3, H, W) pixels) of `rows`, a stack per image size (aspect-ratio buckets mix sizes)."""
    groups = {}
    for row in rows:
        pixels = dataset[row]["pixel_values"]
        groups.setdefault(tuple(pixels.shape), []).append((row, pixels))
    for members in groups.values():
        yield [row for row, _ in members], torch.stack([pixels for _, pixels in members])


@torch.no_grad()
def calibrate_latents(accelerator: Accelerator, vae: AutoencoderKL, dataset, num_samples: int,
                      batch_size: int) -> dict:
    """Center the latents and measure `scaling_factor` so the UNet sees zero-mean, unit-variance input.

    The per-channel mean is folded into the biases of `quant_conv` (which makes the latent mean) and
    `post_quant_conv` (which reads it): z' = z - mu, and W z + b = W z' + (W mu + b). The VAE's
    reconstructions are unchanged and the pipeline stays plain Stable Diffusion, which only divides
    by `scaling_factor` before decoding. Each process encodes its share of the images in training-size
    batches (a 512 px VAE's activations are large) and only the per-channel sums are reduced.
    """
    channels = vae.config.latent_channels
    sums = torch.zeros(3, channels, dtype=torch.float64, device=accelerator.device)  # count, sum, sum of squares
    for chunk in shares(accelerator, min(num_samples, len(dataset)), batch_size):
        for _, pixels in same_size(dataset, chunk):
            means = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist.mean.double()  # (b, C, h, w)
            sums[0] += means[:, 0].numel()
            sums[1] += means.sum(dim=(0, 2, 3))
            sums[2] += means.pow(2).sum(dim=(0, 2, 3))
    count, total, squares = accelerator.reduce(sums, "sum").cpu()
    mu = total / count  # (C,)
    std = ((squares - count * mu.pow(2)).sum() / count.sum()).sqrt().item()
    mu = mu.to(vae.dtype)
    vae.quant_conv.bias[:channels] -= mu.to(vae.device)
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mu.to(vae.device)
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"latent_channel_means": [round(v, 4) for v in mu.tolist()], "latent_std": std,
            "scaling_factor": 1.0 / std}


@torch.no_grad()
def check_reconstructions(accelerator: Accelerator, vae: AutoencoderKL, heldout_set, captions: list[str] | None,
                          batch_size: int, checker=None) -> dict:
    """Held-out PSNR and, with a plug-in's `checker` for these captions, the fraction of reconstructions it reads
    right in each of its fields (recon_<field>_accuracy). Every process scores its share."""
    fields = checker.fields if checker else ()
    sums = torch.zeros(2 + len(fields))
    for chunk in shares(accelerator, len(heldout_set), batch_size):
        for rows, pixels in same_size(heldout_set, chunk):
            sums += reconstruction_sums(vae, pixels, [captions[i] for i in rows] if checker else None, checker)
    count, psnr_sum, *correct = accelerator.reduce(sums.to(accelerator.device), "sum").tolist()
    if not count:
        return {}
    return {"heldout_psnr_db": psnr_sum / count,
            **{f"recon_{field}_accuracy": value / count for field, value in zip(fields, correct)}}


def vae_check_failures(settings, report: dict) -> list[str]:
    """What the finished VAE misses of the bars set in `vae_training` (empty: it passes)."""
    failures = []
    if settings.min_psnr is not None and report.get("heldout_psnr_db", float("inf")) < settings.min_psnr:
        failures.append(f"held-out PSNR {report['heldout_psnr_db']:.2f} dB < vae_training.min_psnr "
                        f"{settings.min_psnr}")
    for field in ("color", "shape"):
        bar, value = getattr(settings, f"min_recon_{field}"), report.get(f"recon_{field}_accuracy")
        if bar is not None and value is not None and value < bar:
            failures.append(f"reconstruction {field} accuracy {value:.1%} < vae_training.min_recon_{field} {bar:.0%} "
                            f"(the UNet cannot draw a {field} its VAE does not decode)")
    return failures


def report_vae_check(accelerator: Accelerator, config: Config, out: Path, failures: list[str]) -> None:
    """Say loudly when the VAE misses its bars; stop before the UNet stage unless told to go on."""
    if not failures:
        return
    settings = config.vae_training
    advice = (f"To retrain it: delete {out}, then rerun with more steps (vae_training.max_train_steps, now "
              f"{settings.max_train_steps}), or a different vae_training.learning_rate (now {settings.learning_rate}) "
              f"or seed. The VAE and its report are kept in {out} (calibration.json, samples/vae.png).")
    banner = "\n".join(["!" * 100, "[vae] THE VAE FAILED ITS CHECK:", *(f"  - {f}" for f in failures), advice,
                         "!" * 100])
    accelerator.print(banner)
    if settings.on_check_failure == "error":
        raise TrainingError(f"[vae] the VAE failed its check: {'; '.join(failures)}. {advice} Set "
                            "vae_training.on_check_failure: warn to train the UNet on it anyway.")


def save_vae_grid(vae: AutoencoderKL, heldout_set, path: Path, count: int = 8):
    """Held-out originals (top row) above their reconstructions (bottom row), of the first image's size."""
    _, pixels = next(same_size(heldout_set, list(range(min(4 * count, len(heldout_set))))))
    pixels = pixels[:count]
    images = IMAGES.postprocess(torch.cat([pixels, reconstruct(vae, pixels).cpu()]), output_type="pil")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_image_grid(images, rows=2, cols=len(pixels))
    grid.save(path)
    return grid


def load_trained_vae(folder: Path) -> AutoencoderKL:
    """The VAE stage's result (<output_dir>/vae); a damaged one is named with the way out."""
    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise ConfigError(f"{folder} holds a damaged VAE ({' '.join(str(error).split())}). Delete that folder "
                          "to train the VAE again (stage vae), or restore it") from error


def vae_step_loss(model, channels: int, factor: int, settings, batch: dict, generators) -> torch.Tensor:
    """The loss of one VAE step: a posterior sample per image from its own generator, decoded and compared."""
    pixels = batch["pixel_values"]
    latent_shape = (channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor)  # buckets vary it
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(pixels.device)
    reconstruction, posterior = model(pixels, noise)
    return vae_loss(reconstruction, pixels, posterior, settings.kl_weight, settings.foreground_weight)[0]


# The share of the decoder steps' images that keep their exact latent. Trained on noisy latents alone, the shapes
# decoder drew a few exact latents a little lumpy (98.8% of the held-out reconstructions right at seed 0); with half
# of them clean, 99.6% at seed 1; with three quarters, 100% at seeds 0 and 1 and 99.6% at seed 2
# (docs/shapes_recipe.md#decoder-steps-2026-12-08).
CLEAN_FRACTION = 0.75


def noise_strength(decoder_noise: float, generator: torch.Generator) -> torch.Tensor:
    """An image's latent noise strength: 0 for CLEAN_FRACTION of the images, else uniform in [0, decoder_noise]."""
    strength, clean = torch.rand(2, generator=generator)
    return decoder_noise * strength * (clean >= CLEAN_FRACTION)


def decoder_step_loss(model, channels: int, factor: int, settings, batch: dict, generators) -> torch.Tensor:
    """The loss of one decoder step: a posterior sample per image and its latent noise, from the image's own
    generator (so a sample sees the same noise at any process count), decoded and compared with the image."""
    pixels = batch["pixel_values"]
    latent_shape = (channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor)
    draws = [(torch.randn(latent_shape, generator=g), noise_strength(settings.decoder_noise, g),
              torch.randn(latent_shape, generator=g)) for g in generators]
    posterior_noise, strength, latent_noise = (torch.stack(parts).to(pixels.device) for parts in zip(*draws))
    reconstruction, posterior = model(pixels, posterior_noise, strength, latent_noise)
    return vae_loss(reconstruction, pixels, posterior, 0.0, settings.foreground_weight)[0]


def train_decoder(accelerator: Accelerator, config: Config, vae: AutoencoderKL, dataset, latent_std: float) -> None:
    """`vae_training.decoder_steps` steps of the decoder alone on noisy latents (DecoderForTraining), through the
    same loop as the VAE's own steps. It comes after the calibration, which only reads the encoder."""
    settings = config.vae_training
    vae.requires_grad_(False)
    trained = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    model = DecoderForTraining(vae, latent_std)
    stage_config = stage_settings(config, "vae-decoder")
    optimizer, lr_scheduler = make_optimizer(config, trained, settings.decoder_learning_rate, "cosine", 0,
                                             settings.decoder_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, make_loader(config, dataset, stage_config,
                                                                                 accelerator.num_processes))
    fit(accelerator, config, Stage(settings=stage_config, models=[model], optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, learning_rates=[settings.decoder_learning_rate],
                                   dataloader=loader,
                                   compute_loss=functools.partial(decoder_step_loss, model, vae.config.latent_channels,
                                                                  vae_scale_factor(vae), settings)))


def validate_vae(accelerator: Accelerator, model, heldout_set, captions, checker, batch_size: int, step: int) -> dict:
    report = check_reconstructions(accelerator, accelerator.unwrap_model(model).vae.eval(), heldout_set, captions,
                                   batch_size, checker)
    accelerator.print(f"[vae] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    return report


def train_vae_stage(accelerator: Accelerator, config: Config, train: data_lib.TrainData, vae: AutoencoderKL):
    """Train the autoencoder, check and calibrate it, save it to <output_dir>/vae; skip if done."""
    out = Path(config.output_dir) / "vae"
    settings = config.vae_training
    if (out / "config.json").is_file():
        accelerator.print(f"[vae] using the finished VAE in {out}")
        calibration = out / "calibration.json"
        report = json.loads(calibration.read_text()) if calibration.is_file() else {}
        report_vae_check(accelerator, config, out, vae_check_failures(settings, report))
        return load_trained_vae(out)
    rows, heldout = data_lib.split_heldout(len(train.dataset), settings.psnr_samples, config.seed)
    input_ids = torch.zeros(len(train.dataset), 1, dtype=torch.long)  # captions are not used here
    dataset = data_lib.ImageTextDataset(train.dataset, input_ids, config.data, config.resolution, rows, train.buckets,
                                        config.seed)
    heldout_data = dataclasses.replace(config.data, random_flip=False)
    heldout_set = data_lib.ImageTextDataset(train.dataset, input_ids, heldout_data, config.resolution, heldout,
                                            train.buckets, config.seed)
    heldout_captions = [train.captions[row] for row in heldout]
    checker = plugins.reconstruction_checker(heldout_captions) if heldout else None
    if not heldout:
        accelerator.print(f"[vae] no held-out images (vae_training.psnr_samples: {settings.psnr_samples}, "
                          f"{len(train.dataset)} images; at most a fifth is held out): the VAE is not checked")

    accelerator.gradient_accumulation_steps = 1
    if config.gradient_checkpointing:  # at 512 px the decoder's full-size activations dominate memory
        vae.enable_gradient_checkpointing()
    model = VAEForTraining(vae)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, lr_scheduler = make_optimizer(config, list(model.parameters()), settings.learning_rate,
                                             settings.lr_scheduler, settings.lr_warmup_steps,
                                             settings.max_train_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer,
                                                   make_loader(config, dataset, stage_settings(config, "vae"),
                                                               accelerator.num_processes))
    batch_size = settings.train_batch_size
    stage = Stage(settings=stage_settings(config, "vae"), models=[model], optimizer=optimizer,
                  lr_scheduler=lr_scheduler, learning_rates=[settings.learning_rate], dataloader=loader,
                  compute_loss=functools.partial(vae_step_loss, model, vae.config.latent_channels,
                                                 vae_scale_factor(vae), settings),
                  validate=functools.partial(validate_vae, accelerator, model, heldout_set, heldout_captions,
                                             checker, batch_size) if heldout else None)
    fit(accelerator, config, stage)

    vae = accelerator.unwrap_model(model).vae.eval()
    stats = calibrate_latents(accelerator, vae, dataset, settings.scaling_samples, batch_size)
    if settings.decoder_steps:
        train_decoder(accelerator, config, vae, dataset, stats["latent_std"])
        vae.eval()
    stats.update(check_reconstructions(accelerator, vae, heldout_set, heldout_captions, batch_size, checker))
    failures = vae_check_failures(settings, stats)
    stats["check"] = {"passed": not failures, "failures": failures,
                      "min_psnr": settings.min_psnr, "min_recon_color": settings.min_recon_color,
                      "min_recon_shape": settings.min_recon_shape}
    checks = [f"held-out PSNR {stats['heldout_psnr_db']:.2f} dB"] if "heldout_psnr_db" in stats else []
    checks += [f"reconstructions' {key[6:-9]} {value:.1%}" for key, value in stats.items()
               if key.startswith("recon_") and key.endswith("_accuracy")]
    verdict = "passed" if not failures else "FAILED"
    accelerator.print(f"[vae] check {verdict}: {', '.join(checks) or 'nothing held out'}; "
                      f"latent scaling_factor {stats['scaling_factor']:.3f}")
    last_step = settings.max_train_steps + settings.decoder_steps  # tracker steps only grow
    if accelerator.is_main_process:
        with written_then_renamed(out) as partial:
            vae.save_pretrained(partial, safe_serialization=True)
            (partial / "calibration.json").write_text(json.dumps(stats, indent=2))
        if heldout:
            grid = save_vae_grid(vae, heldout_set, Path(config.output_dir) / "samples" / "vae.png")
            log_image(accelerator, "vae_reconstructions", grid, last_step)
        log_metrics(accelerator, config, {"stage": "vae", "step": last_step,
                                          **{k: v for k, v in stats.items() if k != "check"}})
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # forget the VAE's optimizer before the next stage
    report_vae_check(accelerator, config, out, failures)
    return AutoencoderKL.from_pretrained(out, use_safetensors=True)
