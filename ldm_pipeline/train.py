"""Training: `accelerate launch train.py --config train_configs/x.yaml [--set key=value] [--dry-run]`.

`train(config)` reads top to bottom: Accelerator -> output directory -> data -> components ->
the stages ("vae", then "unet"). Each stage builds its model, optimizer, LR schedule and loss and
hands them to `fit`, the one optimisation loop (accumulation, non-finite guard, EMA, logging,
validation, checkpoints, exact resume).

Randomness that shapes a step (noise, timesteps, caption dropout) is drawn for the whole global
batch from a generator keyed by (seed, micro-step), and each process takes its slice. A run
therefore gives the same result at any process count and after a resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoints import (
    check_checkpoint_config,
    check_output_dir,
    checkpoint_steps,
    find_resume_checkpoint,
    output_dir_lock,
    prepare_output_dir,
    save_checkpoint,
)
from .config import Config, ConfigError, add_run_arguments, load_config, os_error_message, to_yaml
from .losses import diffusion_loss, diffusion_target, vae_loss
from .models import (
    build_noise_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    count_parameters,
    load_tokenizer,
    make_sampler,
    resolve_source,
    vae_scale_factor,
)
from .pipeline import check_process_group, generate, image_grid, replace_directory, save_pipeline


class TrainingError(RuntimeError):
    """Training had to stop; the message says why and what was kept."""


# --- the optimisation loop ----------------------------------------------------------------------------


@dataclass
class Stage:
    name: str  # "vae" or "unet"
    models: list[torch.nn.Module]  # prepared, trainable
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataloader: torch.utils.data.DataLoader
    compute_loss: Callable[[dict, torch.Generator], torch.Tensor]
    max_train_steps: int
    max_grad_norm: float
    checkpointing_steps: int
    checkpoint_prefix: str
    batch_size: int  # per process, per micro-batch
    ema: EMAModel | None = None
    validate: Callable[[int], dict] | None = None  # runs on every process
    validation_steps: int = 0


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 2**32 + micro_step)


def my_slice(accelerator: Accelerator, tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's rows of a tensor drawn for the global batch."""
    start = accelerator.process_index * batch_size
    return tensor[start:start + batch_size]


def log_metrics(accelerator: Accelerator, config: Config, metrics: dict) -> None:
    if accelerator.is_main_process:
        with open(Path(config.output_dir) / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])


def fit(accelerator: Accelerator, config: Config, stage: Stage) -> int:
    """Run `stage` to `max_train_steps` optimizer steps, resuming from a checkpoint if asked."""
    accum = accelerator.gradient_accumulation_steps
    global_step = 0
    checkpoint = find_resume_checkpoint(config, stage.checkpoint_prefix)
    if checkpoint is not None:
        check_checkpoint_config(checkpoint, config)
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name.rsplit("-", 1)[1])
        accelerator.print(f"[{stage.name}] resumed from {checkpoint} at step {global_step}")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"[{stage.name}] no checkpoint to resume from yet: starting at step 0")

    steps_per_epoch = len(stage.dataloader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has fewer than one optimizer step of samples: {len(stage.dataloader)} "
                          f"batches for gradient_accumulation_steps={accum}; lower the batch size or add data")
    global_batch = stage.batch_size * accelerator.num_processes * accum
    progress = tqdm(total=stage.max_train_steps, initial=global_step, desc=stage.name,
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    bad_in_a_row, skipped, loss_sum, loss_count = 0, 0, 0.0, 0
    started, steps_timed = time.perf_counter(), 0
    for model in stage.models:
        model.train()

    while global_step < stage.max_train_steps:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        stage.dataloader.set_epoch(epoch)
        batches = stage.dataloader
        if done_in_epoch:
            batches = accelerator.skip_first_batches(stage.dataloader, done_in_epoch * accum)
        windows_left = steps_per_epoch - done_in_epoch  # an epoch is whole accumulation windows
        micro, window_bad = 0, torch.zeros((), device=accelerator.device)
        for batch in batches:
            generator = step_generator(config.seed, global_step * accum + micro)
            micro += 1
            with accelerator.accumulate(*stage.models):
                loss = stage.compute_loss(batch, generator)
                window_bad += (~torch.isfinite(loss.detach())).float()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # Every process joins this reduce, so all of them agree whether to skip.
                    bad = accelerator.reduce(window_bad, "sum").item() > 0
                    if not bad:
                        params = [p for group in stage.optimizer.param_groups for p in group["params"]]
                        accelerator.clip_grad_norm_(params, stage.max_grad_norm)
                        stage.optimizer.step()
                        stage.lr_scheduler.step()  # ours, not Accelerate's: one step per optimizer step
                    stage.optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            if not accelerator.sync_gradients:
                continue
            micro, window_bad, windows_left = 0, torch.zeros((), device=accelerator.device), windows_left - 1
            if bad:
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                accelerator.print(f"[{stage.name}] step {global_step + 1}: non-finite loss, step skipped "
                                  f"({bad_in_a_row} in a row, {skipped} in all)")
                if bad_in_a_row >= config.max_consecutive_bad_steps:
                    kept = checkpoint_steps(config, stage.checkpoint_prefix)
                    raise TrainingError(
                        f"[{stage.name}] stopped at step {global_step}: the loss was not finite for "
                        f"{bad_in_a_row} optimizer steps in a row (max_consecutive_bad_steps). "
                        + (f"The last good checkpoint, {kept[-1][1]}, is intact. " if kept else "")
                        + "Lower learning_rate, check the data, or try mixed_precision: 'no', then resume.")
            else:
                bad_in_a_row = 0
                if stage.ema is not None:
                    stage.ema.step(accelerator.unwrap_model(stage.models[0]).parameters())
                global_step += 1
                steps_timed += 1
                progress.update(1)
                after_step(accelerator, config, stage, global_step, progress, loss_sum, loss_count,
                           steps_timed * global_batch / (time.perf_counter() - started), skipped)
                if global_step % config.logging_steps == 0:
                    loss_sum, loss_count = 0.0, 0
            if global_step >= stage.max_train_steps or windows_left == 0:
                break
    progress.close()
    return global_step


def after_step(accelerator, config: Config, stage: Stage, step: int, progress, loss_sum: float, loss_count: int,
               samples_per_s: float, skipped: int) -> None:
    """Log, validate and checkpoint on schedule; every process calls this, so collectives match."""
    if step % config.logging_steps == 0 or step == stage.max_train_steps:
        local = torch.tensor(loss_sum / max(loss_count, 1), device=accelerator.device)
        loss = accelerator.reduce(local, "mean").item()
        lr = stage.lr_scheduler.get_last_lr()[0]
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        log_metrics(accelerator, config, {"stage": stage.name, "step": step, "loss": loss, "lr": lr,
                                          "samples_per_s": samples_per_s, "skipped_steps": skipped})
    if stage.validate and stage.validation_steps and step % stage.validation_steps == 0 \
            and step < stage.max_train_steps:
        log_metrics(accelerator, config, {"stage": stage.name, "step": step, **stage.validate(step)})
        for model in stage.models:
            model.train()
    every = stage.checkpointing_steps
    if every and (step % every == 0 or step == stage.max_train_steps):
        save_checkpoint(accelerator, config, stage.checkpoint_prefix, step)


def make_optimizer(config: Config, param_groups, learning_rate: float, lr_scheduler: str, warmup: int,
                   max_steps: int):
    optimizer = torch.optim.AdamW(param_groups, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    schedule = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    return optimizer, schedule


def check_sizes(config: Config, vae: AutoencoderKL, num_examples: int, num_processes: int) -> None:
    """What would otherwise fail only after the VAE stage, checked before anything is written (and by
    --dry-run): the VAE's downsampling must divide the resolution, and every stage needs the examples
    for one optimizer step."""
    factor = vae_scale_factor(vae)
    if config.resolution % factor:
        raise ConfigError(f"resolution: {config.resolution} is not divisible by the VAE's downsampling "
                          f"factor {factor}; use a multiple of {factor}")
    stages = {"vae": ("vae_training.train_batch_size", config.vae_training.train_batch_size, 1,
                      config.vae_training.psnr_samples),
              "unet": ("train_batch_size", config.train_batch_size, config.gradient_accumulation_steps,
                       config.validation.num_heldout)}
    for stage in config.stages:
        key, batch, accumulation, heldout = stages[stage]
        rows = len(data_lib.split_heldout(num_examples, heldout, config.seed)[0])
        if rows < batch * num_processes * accumulation:
            raise ConfigError(
                f"{key}: one optimizer step of the {stage} stage takes {batch * num_processes * accumulation} "
                f"examples ({batch} per process x {num_processes} processes x {accumulation} accumulation), "
                f"but it trains on {rows} ({num_examples} minus {num_examples - rows} held out); lower {key} "
                "or add data")


def make_loader(config: Config, dataset, batch_size: int):
    if len(dataset) < batch_size:
        raise ConfigError(f"the training set has {len(dataset)} examples, fewer than one batch of {batch_size}; "
                          "add data or lower the batch size")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=config.data.dataloader_num_workers)


# --- stage "vae" --------------------------------------------------------------------------------------


class VAEForTraining(torch.nn.Module):
    """Routes encode + decode through forward(), where DDP synchronises gradients."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels, posterior_noise):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * posterior_noise
        return self.vae.decode(latents).sample, posterior


@torch.no_grad()
def calibrate_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> dict:
    """Center the latents and measure `scaling_factor` so the UNet sees zero-mean, unit-variance input.

    The per-channel mean is folded into the biases of `quant_conv` (which makes the latent mean) and
    `post_quant_conv` (which reads it): z' = z - mu, and W z + b = W z' + (W mu + b). The VAE's
    reconstructions are unchanged and the pipeline stays plain Stable Diffusion, which only divides
    by `scaling_factor` before decoding.
    """
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])  # (N, C, h, w)
    channels = vae.config.latent_channels
    mu = means.mean(dim=(0, 2, 3))  # (C,)
    vae.quant_conv.bias[:channels] -= mu
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mu
    std = (means - mu[None, :, None, None]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"latent_channel_means": [round(v, 4) for v in mu.tolist()], "latent_std": std,
            "scaling_factor": 1.0 / std}


def load_trained_vae(folder: Path) -> AutoencoderKL:
    """The VAE stage's result (<output_dir>/vae); a damaged one is named with the way out."""
    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise ConfigError(f"{folder} holds a damaged VAE ({' '.join(str(error).split())}). Delete that folder "
                          "to train the VAE again (stage vae), or restore it") from error


def train_vae_stage(accelerator: Accelerator, config: Config, train: data_lib.TrainData, vae: AutoencoderKL):
    """Train the autoencoder, calibrate its latents, save it to <output_dir>/vae; skip if done."""
    from .evaluate import psnr

    out = Path(config.output_dir) / "vae"
    if (out / "config.json").is_file():
        accelerator.print(f"[vae] using the finished VAE in {out}")
        return load_trained_vae(out)
    settings = config.vae_training
    rows, heldout = data_lib.split_heldout(len(train.dataset), settings.psnr_samples, config.seed)
    input_ids = torch.zeros(len(train.dataset), 1, dtype=torch.long)  # captions are not used here
    dataset = data_lib.ImageTextDataset(train.dataset, input_ids, config.data, config.resolution, rows)
    heldout_set = data_lib.ImageTextDataset(train.dataset, input_ids, config.data, config.resolution, heldout)

    accelerator.gradient_accumulation_steps = 1
    model = VAEForTraining(vae)
    optimizer, lr_scheduler = make_optimizer(config, model.parameters(), settings.learning_rate,
                                             settings.lr_scheduler, settings.lr_warmup_steps,
                                             settings.max_train_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer,
                                                   make_loader(config, dataset, settings.train_batch_size))
    accelerator.register_for_checkpointing(lr_scheduler)
    latent_shape = (vae.config.latent_channels,) + (config.resolution // vae_scale_factor(vae),) * 2
    batch_size = settings.train_batch_size

    def compute_loss(batch, generator):
        shape = (batch_size * accelerator.num_processes, *latent_shape)
        noise = my_slice(accelerator, torch.randn(shape, generator=generator), batch_size)
        pixels = batch["pixel_values"]
        reconstruction, posterior = model(pixels, noise.to(pixels.device))
        return vae_loss(reconstruction, pixels, posterior, settings.kl_weight, settings.foreground_weight)[0]

    stage = Stage(name="vae", models=[model], optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=loader,
                  compute_loss=compute_loss, max_train_steps=settings.max_train_steps,
                  max_grad_norm=settings.max_grad_norm, checkpointing_steps=settings.checkpointing_steps,
                  checkpoint_prefix="vae-", batch_size=batch_size)
    fit(accelerator, config, stage)

    vae = accelerator.unwrap_model(model).vae.eval()
    calibration_rows = [dataset[i]["pixel_values"] for i in range(min(settings.scaling_samples, len(dataset)))]
    stats = calibrate_latents(vae, torch.stack(calibration_rows).to(accelerator.device))
    with torch.no_grad():
        pixels = torch.stack([heldout_set[i]["pixel_values"] for i in range(len(heldout_set))]).to(accelerator.device)
        reconstruction = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample
                                    for chunk in pixels.split(64)])
        stats["heldout_psnr_db"] = psnr(pixels, reconstruction) if len(pixels) else None
    accelerator.print(f"[vae] held-out PSNR {stats['heldout_psnr_db']:.2f} dB, "
                      f"scaling_factor {stats['scaling_factor']:.4f}")
    if accelerator.is_main_process:
        partial = out.with_name("vae.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        vae.save_pretrained(partial, safe_serialization=True)
        (partial / "calibration.json").write_text(json.dumps(stats, indent=2))
        replace_directory(partial, out)
        log_metrics(accelerator, config, {"stage": "vae", "step": settings.max_train_steps, **stats})
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # forget the VAE's optimizer and schedule before the next stage
    # free_memory keeps objects registered for checkpointing, and Accelerate has no public way to
    # drop them; UNet checkpoints must not carry the VAE's LR schedule.
    accelerator._custom_objects.clear()
    return AutoencoderKL.from_pretrained(out, use_safetensors=True)


# --- stage "unet" -------------------------------------------------------------------------------------


@torch.no_grad()
def make_validator(accelerator, config, pipeline_parts, heldout_loss):
    """Validation: held-out loss + a grid of fixed prompts x seeds, split across processes."""
    samples = Path(config.output_dir) / "samples"

    def validate(step, name=None):
        metrics = {"val_loss": heldout_loss()}
        prompts = config.validation.prompts or [""]
        jobs = [(p, s) for s in config.validation.seeds for p in prompts]
        pipe = StableDiffusionPipeline(**pipeline_parts(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images = generate(
            pipe, [p for p, _ in jobs], [s for _, s in jobs], show_progress=False, state=accelerator,
            num_inference_steps=config.sampling.num_inference_steps, guidance_scale=config.sampling.guidance_scale,
            check_finite=False)
        if accelerator.is_main_process:
            samples.mkdir(parents=True, exist_ok=True)
            path = samples / f"{name or f'step-{step:06d}'}.png"
            image_grid(images, rows=len(config.validation.seeds)).save(path)
            path.with_suffix(".txt").write_text("columns: " + " | ".join(prompts) + "\n")
        accelerator.print(f"[unet] step {step}: val_loss {metrics['val_loss']:.4f}, samples in {samples}")
        return metrics

    return validate


def train_unet_stage(accelerator, config: Config, train: data_lib.TrainData, tokenizer, text_encoder, vae) -> Path:
    noise_scheduler = build_noise_scheduler(config.model, config.prediction_type)
    set_seed(config.seed)  # the UNet's init does not depend on what was built before it
    unet = build_unet(config.model, config.resolution, vae, text_encoder)
    accelerator.print(f"[unet] {count_parameters(unet) / 1e6:.2f}M parameters")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    text_encoder.requires_grad_(config.train_text_encoder)
    if not config.train_text_encoder:
        text_encoder.eval().to(accelerator.device, weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    input_ids = data_lib.tokenize(tokenizer, train.captions)
    empty_ids = data_lib.tokenize(tokenizer, [""])[0]
    rows, heldout = data_lib.split_heldout(len(train.dataset), config.validation.num_heldout, config.seed)
    if config.data.cache_latents:
        frozen_text = None if config.train_text_encoder else text_encoder
        tensors = data_lib.build_latent_cache(accelerator, config, train, input_ids, vae, frozen_text, tokenizer)
        dataset = data_lib.LatentDataset(tensors, input_ids, rows, config.data.random_flip)
        heldout_set = data_lib.LatentDataset(tensors, input_ids, heldout, random_flip=False)
        empty_embeds = tensors.get("empty_prompt_embeds")
    else:
        dataset = data_lib.ImageTextDataset(train.dataset, input_ids, config.data, config.resolution, rows)
        heldout_config = type(config.data)(**{**vars(config.data), "random_flip": False})
        heldout_set = data_lib.ImageTextDataset(train.dataset, input_ids, heldout_config, config.resolution, heldout)
        empty_embeds = None
    accelerator.print(f"[unet] {len(dataset)} training examples, {len(heldout_set)} held out for val_loss")

    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad]}]
    if config.train_text_encoder:
        param_groups.append({"params": list(text_encoder.parameters()),
                             "lr": config.text_encoder_learning_rate or config.learning_rate})
    optimizer, lr_scheduler = make_optimizer(config, param_groups, config.learning_rate, config.lr_scheduler,
                                             config.lr_warmup_steps, config.max_train_steps)
    loader = make_loader(config, dataset, config.train_batch_size)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if config.train_text_encoder:
        unet, text_encoder, optimizer, loader = accelerator.prepare(unet, text_encoder, optimizer, loader)
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if config.use_ema:
        plain = accelerator.unwrap_model(unet)
        ema = EMAModel(plain.parameters(), decay=config.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=plain.config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    scaling = vae.config.scaling_factor
    latent_shape = (vae.config.latent_channels,) + (config.resolution // vae_scale_factor(vae),) * 2
    num_timesteps = noise_scheduler.config.num_train_timesteps
    batch_size = config.train_batch_size

    def encode(batch):
        """(latent mean, latent std) of the batch: from the cache, or by running the frozen VAE."""
        if "latent_mean" in batch:
            return batch["latent_mean"], batch["latent_std"]
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def text_features(batch, dropped):
        if "prompt_embeds" in batch:
            embeds = batch["prompt_embeds"].clone()
            embeds[dropped] = empty_embeds.to(embeds)
            return embeds
        ids = batch["input_ids"].clone()
        ids[dropped] = empty_ids.to(ids.device)
        if config.train_text_encoder and torch.is_grad_enabled():
            return text_encoder(ids)[0]
        with torch.no_grad():  # unwrapped: a DDP forward outside training could sync buffers
            return accelerator.unwrap_model(text_encoder)(ids)[0]

    def model_loss(batch, latent_noise, noise, timesteps, dropped, denoiser=None):
        mean, std = encode(batch)
        latents = (mean + std * latent_noise) * scaling  # (B, C, h, w), unit variance
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = (denoiser or unet)(noisy, timesteps, text_features(batch, dropped)).sample
        target = diffusion_target(noise_scheduler, latents, noise, timesteps)
        return diffusion_loss(prediction, target, timesteps, noise_scheduler, config.snr_gamma)

    def compute_loss(batch, generator):
        n = batch_size * accelerator.num_processes
        draws = {
            "latent_noise": torch.randn((n, *latent_shape), generator=generator),
            "noise": torch.randn((n, *latent_shape), generator=generator),
            "offset": torch.randn((n, latent_shape[0], 1, 1), generator=generator),
            "timesteps": torch.randint(0, num_timesteps, (n,), generator=generator),
            "dropped": torch.rand(n, generator=generator) < config.data.caption_dropout,
        }
        mine = {k: my_slice(accelerator, v, batch_size).to(accelerator.device) for k, v in draws.items()}
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness.
        noise = mine["noise"] + config.noise_offset * mine["offset"]
        return model_loss(batch, mine["latent_noise"], noise, mine["timesteps"], mine["dropped"])

    @torch.no_grad()
    def heldout_loss() -> float:
        """Same fixed (example, timestep, noise) triples every time, split across processes."""
        if len(heldout_set) == 0:
            return float("nan")
        generator = torch.Generator().manual_seed(config.seed + 12345)
        noise = torch.randn((len(heldout_set), *latent_shape), generator=generator)
        timesteps = (torch.arange(len(heldout_set)) * num_timesteps // len(heldout_set)).flip(0)
        total = torch.zeros(2, device=accelerator.device)
        # Unwrapped: processes may hold different numbers of examples, and a DDP forward can sync.
        denoiser = accelerator.unwrap_model(unet).eval()
        with accelerator.split_between_processes(list(range(len(heldout_set)))) as mine:
            for i in mine:
                item = {k: v.unsqueeze(0).to(accelerator.device) for k, v in heldout_set[i].items()}
                zero = torch.zeros((1, *latent_shape), device=accelerator.device)
                total[0] += model_loss(item, zero, noise[i:i + 1].to(accelerator.device),
                                       timesteps[i:i + 1].to(accelerator.device),
                                       torch.zeros(1, dtype=torch.bool, device=accelerator.device), denoiser)
                total[1] += 1
        total = accelerator.reduce(total, "sum")
        return (total[0] / total[1]).item()

    def pipeline_parts():
        return dict(vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer,
                    unet=accelerator.unwrap_model(unet),
                    scheduler=make_sampler(config.sampling.scheduler, noise_scheduler.config))

    validator = make_validator(accelerator, config, pipeline_parts, heldout_loss)

    def validate(step, name=None):
        if ema is not None:  # validate what will be saved: the EMA weights
            ema.store(accelerator.unwrap_model(unet).parameters())
            ema.copy_to(accelerator.unwrap_model(unet).parameters())
        try:
            accelerator.unwrap_model(unet).eval()
            return validator(step, name)
        finally:
            if ema is not None:
                ema.restore(accelerator.unwrap_model(unet).parameters())

    models = [unet, text_encoder] if config.train_text_encoder else [unet]
    stage = Stage(name="unet", models=models, optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=loader,
                  compute_loss=compute_loss, max_train_steps=config.max_train_steps,
                  max_grad_norm=config.max_grad_norm, checkpointing_steps=config.checkpointing_steps,
                  checkpoint_prefix="", batch_size=batch_size, ema=ema, validate=validate,
                  validation_steps=config.validation.validation_steps)
    fit(accelerator, config, stage)

    accelerator.wait_for_everyone()
    final_metrics = validate(config.max_train_steps, name="final")
    log_metrics(accelerator, config, {"stage": "unet", "step": config.max_train_steps, **final_metrics})
    pipeline_dir = Path(config.output_dir) / "pipeline"
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(unet.parameters())
        full = {m: m if m.dtype == torch.float32 else m.to(torch.float32)
                for m in (vae, accelerator.unwrap_model(text_encoder), unet)}
        save_pipeline(pipeline_dir, vae=full[vae], text_encoder=full[accelerator.unwrap_model(text_encoder)],
                      tokenizer=tokenizer, unet=full[unet], noise_scheduler=noise_scheduler,
                      sampling=config.sampling, extra={"resolution": config.resolution})
        print(f"saved the pipeline to {pipeline_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipeline_dir


# --- entry point ----------------------------------------------------------------------------------------


def build_accelerator(config: Config) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=str(Path(config.output_dir) / "logs")),
        # One seeded permutation per epoch, the same at any process count (and after a resume).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    check_process_group(accelerator.num_processes)
    return accelerator


def ensure_shapes_data(accelerator: Accelerator, config: Config) -> None:
    shapes, root = config.data.make_shapes, config.data.train_data_dir
    if shapes is None or Path(root).exists():
        return
    if accelerator.is_main_process:
        from .shapes import make_shapes

        print(f"making {shapes.num_images} synthetic shapes images in {root}")
        make_shapes(root, shapes.num_images, config.resolution, shapes.seed, shapes.holdout)
    accelerator.wait_for_everyone()


def describe_run(config: Config, accelerator: Accelerator, components: dict, num_examples: int | None) -> str:
    global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    lines = [f"{name}: {count_parameters(module) / 1e6:.2f}M parameters" for name, module in components.items()]
    lines.append(f"effective batch size: {global_batch} = {config.train_batch_size} per process x "
                 f"{accelerator.num_processes} processes x {config.gradient_accumulation_steps} accumulation")
    if "unet" in config.stages:
        lines.append(f"unet stage: {config.max_train_steps} optimizer steps")
        if num_examples:
            lines[-1] += f" (~{config.max_train_steps * global_batch / num_examples:.1f} epochs of {num_examples})"
    if "vae" in config.stages:
        lines.append(f"vae stage: {config.vae_training.max_train_steps} steps of batch "
                     f"{config.vae_training.train_batch_size * accelerator.num_processes}")
    return "\n".join(lines)


def train(config: Config, dry_run: bool = False) -> Path | None:
    """Run every configured stage; returns <output_dir>/pipeline (None for a dry run)."""
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    if dry_run:  # everything a run checks before writing, without writing
        if config.data.train_data_dir and Path(config.data.train_data_dir).is_dir() or config.data.dataset_name:
            train_data = data_lib.load_train_data(config)
            captions_source, num_examples = train_data.captions, len(train_data.dataset)
        else:  # validation allows only the shapes data to be absent: it is made on the first run
            from .shapes import all_captions

            captions_source = all_captions()
            num_examples = min(config.data.make_shapes.num_images, config.data.max_train_samples or math.inf)
        tokenizer = load_tokenizer(config.model, lambda: captions_source)
        text_encoder = build_text_encoder(config.model, tokenizer)
        vae = build_vae(config.model)
        components = {"text_encoder": text_encoder, "vae": vae,
                      "unet": build_unet(config.model, config.resolution, vae, text_encoder)}
        accelerator.print(to_yaml(config))
        accelerator.print(describe_run(config, accelerator, components, num_examples))
        check_sizes(config, vae, num_examples, accelerator.num_processes)
        return None
    with output_dir_lock(config.output_dir, hold=accelerator.is_main_process):  # one run per output_dir
        return train_stages(accelerator, config)


def train_stages(accelerator: Accelerator, config: Config) -> Path | None:
    """`train` after the dry-run branch, holding the output_dir lock."""
    # Every input is checked before output_dir is written, so a refused run leaves nothing behind.
    check_output_dir(config)
    ensure_shapes_data(accelerator, config)
    with accelerator.main_process_first():  # the first load writes datasets' cache; others reuse it
        train_data = data_lib.load_train_data(config)
    tokenizer = load_tokenizer(config.model, lambda: train_data.captions)
    text_encoder = build_text_encoder(config.model, tokenizer)
    for component in ("vae", "unet"):  # a missing or pickle-only model directory fails here, not mid-run
        resolve_source(config.model, component)
    vae = build_vae(config.model)
    check_sizes(config, vae, len(train_data.dataset), accelerator.num_processes)
    prepare_output_dir(accelerator, config)  # after the checks; overwrite_output_dir clears vae/ here
    if config.report_to:
        accelerator.init_trackers("ldm_pipeline")
    vae_dir = Path(config.output_dir) / "vae"
    if (vae_dir / "config.json").is_file():  # the VAE stage of this run is done (the same model config)
        vae = load_trained_vae(vae_dir)
    accelerator.print(f"text_encoder: {count_parameters(text_encoder) / 1e6:.2f}M parameters, "
                      f"vae: {count_parameters(vae) / 1e6:.2f}M parameters, "
                      f"{len(train_data.dataset)} training images")
    accelerator.print(describe_run(config, accelerator, {}, len(train_data.dataset)))

    if "vae" in config.stages:
        vae = train_vae_stage(accelerator, config, train_data, vae)
    if "unet" not in config.stages:
        accelerator.end_training()
        return None
    return train_unet_stage(accelerator, config, train_data, tokenizer, text_encoder, vae)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a latent diffusion text-to-image model.")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def set_cpu_threads(config: Config) -> None:
    """Give a CPU run the machine's cores: `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise,
    which halves the speed of the embedded default on 2 cores. On GPUs the host threads barely matter.

    Cores that other programs keep busy (over a quarter second measured now) are left out: torch's threads
    wait for each other at every operation, so a thread that has to share its core holds up all of them
    (issue 13: all cores of a busy 2-core machine ran 6x slower than 1 thread)."""
    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
        return
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    busy = round(psutil.cpu_percent(interval=0.25) / 100 * cores)  # in cores; this process sleeps meanwhile
    threads = max(1, (cores - busy) // local_processes)
    torch.set_num_threads(threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"cpu_threads: {threads} per process ({cores} physical cores, ~{busy} busy with other work, "
              f"{local_processes} local process(es)); set cpu_threads to choose")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        set_cpu_threads(config)
        train(config, dry_run=args.dry_run)
    except (ConfigError, data_lib.DataError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as error:  # a full or read-only disk: what failed, and the way out
        print(f"error: {os_error_message(error)}; a run resumes from its last complete checkpoint with "
              "resume_from_checkpoint: latest", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
