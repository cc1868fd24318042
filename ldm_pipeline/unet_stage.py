"""The "unet" stage: a text-conditioned UNet (or LoRA adapters on a pretrained one) learns to predict the noise
added to latents, and the run ends in a pipeline (or LoRA) directory.

`step_loss` is the loss of one step, a module-level function over `UNetParts`, the few things it reads: encode the
images (or read the cached latents), noise them at a random timestep, predict with the UNet conditioned on the
captions (some dropped to the empty prompt, for classifier-free guidance) and compare with the target.

Randomness that shapes a step (noise, timesteps, caption dropout) is drawn per sample from the generators the
loop hands over, keyed by (seed, micro-step, sample): a run gives the same result at any process count and after
a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params

from . import data as data_lib
from . import dreambooth, latent_cache, losses
from .card import training_card
from .checkpoints import checkpoint_trained_weights_only
from .config import TEXT_ENCODER_LORA_TARGETS, Config, ConfigError, stage_settings
from .generation import captioned_grid, generate
from .loop import Stage, fit, log_image, log_metrics, make_loader, make_optimizer
from .lora import add_adapters, save_lora, trainable
from .models import (
    base_reference,
    build_noise_scheduler,
    build_unet,
    encode_prompt,
    make_sampler,
    micro_conditioning,
    seeded,
    vae_scale_factor,
)
from .pipeline import save_pipeline
from .run_dir import list_skipped_images


@dataclass
class UNetParts:
    """What the loss of one UNet step reads."""

    unet: torch.nn.Module  # as prepared (DDP-wrapped on several processes)
    text_encoder: torch.nn.Module  # as prepared when it trains, else the frozen one
    vae: torch.nn.Module  # frozen, in `weight_dtype`
    noise_scheduler: DDPMScheduler
    latent_shape: tuple[int, int, int]  # (C, h, w)
    empty_ids: torch.Tensor  # (L,) the empty prompt's token ids: what a dropped caption becomes
    empty_embeds: torch.Tensor | None  # (L, D) its text-encoder output, when the cache holds text embeddings
    weight_dtype: torch.dtype  # of the frozen models
    trains_text_encoder: bool
    caption_dropout: float
    noise_offset: float
    snr_gamma: float | None
    device: torch.device
    prior_loss_weight: float = 1.0  # DreamBooth: the weight of the class rows' loss
    unwrap: Callable = lambda model: model  # accelerator.unwrap_model
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (prepared when it trains)

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_encoders(self, training: bool) -> list[torch.nn.Module]:
        """The encoders to run: as prepared while they train, else unwrapped (a DDP forward outside training could
        sync buffers)."""
        encoders = [self.text_encoder] + ([self.text_encoder_2] if self.sdxl else [])
        return encoders if training else [self.unwrap(encoder) for encoder in encoders]


def encode(parts: UNetParts, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent mean, latent std) of the batch: from the cache, or by running the frozen VAE."""
    if "latent_mean" in batch:
        return batch["latent_mean"], batch["latent_std"]
    with torch.no_grad():
        dist = parts.vae.encode(batch["pixel_values"].to(parts.vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def text_features(parts: UNetParts, batch: dict, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((B, L, D) text states, (B, P) pooled text embedding or None) of the captions, the `dropped` ones replaced by
    the unconditional input: Stable Diffusion's is the empty prompt's encoding. SDXL's is zeros, states and pooled
    embedding both, as StableDiffusionXLPipeline's unconditional branch of guidance (force_zeros_for_empty_prompt)."""
    if "prompt_embeds" in batch:
        embeds, pooled = batch["prompt_embeds"].clone(), batch.get("pooled_prompt_embeds")
        if not parts.sdxl:
            embeds[dropped] = parts.empty_embeds.to(embeds)
    else:
        ids = [batch["input_ids"].clone()] + ([batch["input_ids_2"]] if parts.sdxl else [])
        if not parts.sdxl:
            ids[0][dropped] = parts.empty_ids.to(ids[0].device)
        training = parts.trains_text_encoder and torch.is_grad_enabled()
        with torch.set_grad_enabled(training):
            embeds, pooled = encode_prompt(parts.text_encoders(training), ids)
    if not parts.sdxl:
        return embeds, None
    kept = (~dropped).to(embeds.dtype)
    return embeds * kept[:, None, None], pooled * kept[:, None]


def added_conditions(parts: UNetParts, batch: dict, pooled: torch.Tensor | None,
                     latent_size: tuple[int, int]) -> dict | None:
    """SDXL's added conditions: the pooled text embedding and each image's six size and crop numbers, the target
    size being the size it trains at (its latent size times the VAE's factor). None for Stable Diffusion."""
    if pooled is None:
        return None
    factor = vae_scale_factor(parts.vae)
    target = (latent_size[0] * factor, latent_size[1] * factor)
    return {"text_embeds": pooled,
            "time_ids": micro_conditioning(batch["original_size"], batch["crop_top_left"], target)}


def step_loss(parts: UNetParts, batch: dict, latent_noise: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, dropped: torch.Tensor, denoiser=None) -> torch.Tensor:
    """The diffusion loss of a batch at the given draws: latents sampled from their distribution with
    `latent_noise`, noised with `noise` at `timesteps`, predicted by `denoiser` (default: the training UNet)."""
    mean, std = encode(parts, batch)
    scaling = parts.vae.config.scaling_factor
    latents = (mean + std * latent_noise) * scaling  # (B, C, h, w), unit variance
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    states, pooled = text_features(parts, batch, dropped)
    prediction = (denoiser or parts.unet)(noisy, timesteps, states,
                                          added_cond_kwargs=added_conditions(parts, batch, pooled,
                                                                             latents.shape[-2:])).sample
    target = losses.diffusion_target(parts.noise_scheduler, latents, noise, timesteps)
    mask = batch.get("mask")  # (B, 1, H, W) with data.masked_loss: each latent cell weighted by the area it covers
    if mask is not None:
        mask = torch.nn.functional.adaptive_avg_pool2d(mask.float(), latents.shape[-2:])
    prior = batch.get("prior")  # (B,) DreamBooth: True on the class rows
    if prior is None:
        return losses.diffusion_loss(prediction, target, timesteps, parts.noise_scheduler, parts.snr_gamma, mask)

    def loss_of(rows):
        return losses.diffusion_loss(prediction[rows], target[rows], timesteps[rows], parts.noise_scheduler,
                                     parts.snr_gamma, None if mask is None else mask[rows])

    # Prior preservation (Ruiz et al. 2023): the subject's loss plus the weighted loss of the base's own class images.
    return loss_of(~prior) + parts.prior_loss_weight * loss_of(prior)


def latent_shape_of(parts: UNetParts, batch: dict) -> tuple[int, int, int]:
    """(C, h, w) of the batch's latents: its cached ones', or its images' over the VAE's factor (with aspect-ratio
    buckets it changes from batch to batch)."""
    if "latent_mean" in batch:
        return tuple(batch["latent_mean"].shape[1:])
    height, width = batch["pixel_values"].shape[-2:]
    factor = vae_scale_factor(parts.vae)
    return parts.latent_shape[0], height // factor, width // factor


def draw(parts: UNetParts, generator: torch.Generator, shape: tuple[int, int, int]) -> tuple:
    """One sample's random draws, in a fixed order: latent sample, noise, offset, timestep, dropout."""
    return (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
            torch.randn((shape[0], 1, 1), generator=generator),
            torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (), generator=generator),
            torch.rand((), generator=generator) < parts.caption_dropout)


def training_loss(parts: UNetParts, batch: dict, generators: list[torch.Generator]) -> torch.Tensor:
    """The loss of one training micro-batch, each sample drawing from its own generator (a DreamBooth pair: its
    instance row's draws, then its class row's)."""
    shape = latent_shape_of(parts, batch)
    samples = [draw(parts, g, shape) for g in generators]
    if "class_input_ids" in batch:
        batch = dreambooth.with_class_rows(batch)
        samples += [draw(parts, g, shape) for g in generators]
    draws = [torch.stack(column).to(parts.device) for column in zip(*samples)]
    latent_noise, noise, offset, timesteps, dropped = draws  # (B, C, h, w) x 2, (B, C, 1, 1), (B,), (B,)
    # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness.
    return step_loss(parts, batch, latent_noise, noise + parts.noise_offset * offset, timesteps, dropped)


@torch.no_grad()
def heldout_loss(accelerator: Accelerator, parts: UNetParts, heldout_set, seed: int) -> float:
    """Same fixed (example, timestep, noise) triples every time, split across processes: example i's noise comes
    from its own seed, at its own size (aspect-ratio buckets)."""
    if len(heldout_set) == 0:
        return float("nan")
    num_timesteps = parts.noise_scheduler.config.num_train_timesteps
    timesteps = (torch.arange(len(heldout_set)) * num_timesteps // len(heldout_set)).flip(0)
    total = torch.zeros(2, device=accelerator.device)
    # Unwrapped: processes may hold different numbers of examples, and a DDP forward can sync.
    denoiser = parts.unwrap(parts.unet).eval()
    with accelerator.split_between_processes(list(range(len(heldout_set)))) as mine:
        for i in mine:
            item = {k: v.unsqueeze(0).to(accelerator.device) for k, v in heldout_set[i].items()}
            shape = latent_shape_of(parts, item)
            zero = torch.zeros((1, *shape), device=accelerator.device)
            noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + 12345 + i))
            total[0] += step_loss(parts, item, zero, noise.to(accelerator.device),
                                  timesteps[i:i + 1].to(accelerator.device),
                                  torch.zeros(1, dtype=torch.bool, device=accelerator.device), denoiser)
            total[1] += 1
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def trains_text_encoder(config: Config) -> bool:
    """Whether the UNet stage trains the text encoder: whole, or through LoRA adapters."""
    return config.train_text_encoder or (config.lora.rank > 0 and config.lora.train_text_encoder)


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen models run in under the run's mixed precision (float32 without it)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cached_text_encoders(config: Config, text_encoders: list) -> list | None:
    """The text encoders whose outputs the latent cache holds, or None (they train, or are not cached)."""
    return None if trains_text_encoder(config) or not config.data.cache_text_embeddings else text_encoders


def unet_log_offset(config: Config) -> int:
    return stage_settings(config, "unet").log_offset


def add_lora(accelerator: Accelerator, config: Config, unet, text_encoder, weight_dtype,
             text_encoder_2=None) -> None:
    """Adapters on the pretrained UNet (and text encoders), each from its own seed; only they train. Under mixed
    precision the frozen base weights are kept in its dtype (half the memory; autocast computes in it anyway),
    the adapters in float32, the optimizer's master weights. Checkpoints then hold the adapters only."""
    for name, model, targets, wanted in (("unet", unet, config.lora.target_modules, True),
                                         ("text_encoder", text_encoder, TEXT_ENCODER_LORA_TARGETS,
                                          config.lora.train_text_encoder),
                                         ("text_encoder_2", text_encoder_2, TEXT_ENCODER_LORA_TARGETS,
                                          config.lora.train_text_encoder)):
        if not wanted or model is None:
            continue
        if accelerator.native_amp:
            model.to(weight_dtype)
        seeded(config.seed, name, lambda model=model, targets=targets: add_adapters(model, config.lora, targets))
        cast_training_params(model, torch.float32)
        accelerator.print(f"[unet] LoRA rank {config.lora.rank} on the {name}'s {', '.join(targets)}: "
                          f"{sum(p.numel() for p in trainable(model)) / 1e6:.3f}M trainable parameters")
    checkpoint_trained_weights_only(accelerator)


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """The frozen VAE's dtype: the run's, except that a VAE marked `force_upcast` (SDXL's, whose activations overflow
    float16 to inf and NaN) stays float32 under fp16, as diffusers' pipelines decode with it. A fp16-safe VAE
    (model.vae: madebyollin/sdxl-vae-fp16-fix, which has force_upcast false) runs in float16."""
    overflows = weight_dtype == torch.float16 and vae.config.get("force_upcast", False)
    return torch.float32 if overflows else weight_dtype


def set_up_models(accelerator: Accelerator, config: Config, text_encoder, vae, text_encoder_2=None):
    """(UNet, noise scheduler, dtype of the frozen models): the UNet built from its seed (or loaded), LoRA
    adapters added, the frozen models moved and cast, memory options applied."""
    noise_scheduler = build_noise_scheduler(config.model, config.prediction_type,
                                            config.rescale_betas_zero_terminal_snr)
    unet = seeded(config.seed, "unet",
                  lambda: build_unet(config.model, config.resolution, vae, text_encoder, text_encoder_2))
    accelerator.print(f"[unet] {unet.num_parameters() / 1e6:.2f}M parameters")
    weight_dtype = frozen_dtype(accelerator)
    vae.requires_grad_(False).eval().to(accelerator.device, vae_dtype(vae, weight_dtype))
    encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    for encoder in encoders:
        encoder.requires_grad_(config.train_text_encoder)
    if config.lora.rank > 0:
        add_lora(accelerator, config, unet, text_encoder, weight_dtype, text_encoder_2)
    for encoder in encoders:
        if not trains_text_encoder(config):
            encoder.eval().to(accelerator.device, weight_dtype)
        elif config.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.compile:
        # In place (nn.Module.compile), not torch.compile(unet): the module stays the UNet, so unwrap_model,
        # save_state / load_state, the EMA and save_pretrained see its own parameter names (an OptimizedModule
        # would add `_orig_mod.`), and DDP wraps it as any module; inside DDP's forward dynamo splits the graph at
        # DDP's gradient buckets, so the all-reduce still overlaps the backward.
        unet.compile(options=CPU_COMPILE_OPTIONS if accelerator.device.type == "cpu" else None)
    return unet, noise_scheduler, weight_dtype


# torch.compile's Inductor options for the UNet on the CPU. With its fusions, torch 2.13's Inductor computes zero
# gradients for every block below the UNet's first upsampler, silently (a fused kernel reads the upsampler's input
# gradient before the kernel that accumulates it; tests/test_compile.py pins it). Kernels of one operation each give
# eager's gradients. CUDA runs Inductor's defaults, not yet checked against eager gradients.
CPU_COMPILE_OPTIONS = {"max_fusion_size": 1}


def check_compiler(config: Config, device: torch.device) -> None:
    """compile: true on the CPU needs the C++ compiler Inductor builds its kernels with; refused before anything is
    written rather than at the first step. Found as torch finds it (torch._inductor.config.cpp.cxx): $CXX, else
    g++ (clang++ on macOS, cl on Windows). On CUDA Inductor writes triton kernels; torch's CUDA wheels bring
    triton, and torch's own error at the first step names what is missing: not checked here."""
    if not config.compile or "unet" not in config.stages or device.type != "cpu" \
            or os.environ.get("TORCH_INDUCTOR_INSTALL_GXX"):
        return  # TORCH_INDUCTOR_INSTALL_GXX: torch installs g++ through conda itself
    default = {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++")
    compiler = os.environ.get("CXX", default)
    if shutil.which(compiler) is None:
        looked = f"CXX={compiler} is not an executable" if "CXX" in os.environ else f"CXX unset, no {default} on PATH"
        raise ConfigError(f"compile: true needs a C++ compiler for torch.compile on the CPU (none found: {looked}); "
                          f"install one (apt-get install g++) or set compile: false")


def training_sets(accelerator: Accelerator, config: Config, train: data_lib.TrainData, tokenizers: list,
                  text_encoders: list, vae):
    """(training set, held-out set, cached empty-prompt embedding or None): rows of the latent cache, or images
    decoded in the loop. `tokenizers`, `text_encoders`: one each, or SDXL's two."""
    tokenizer = tokenizers[0]
    data_lib.warn_truncated(tokenizer, train.captions)
    if config.data.cache_latents:  # memory-mapped: only the rows of a batch are ever read into RAM
        cache = latent_cache.build_latent_cache(accelerator, config, train, vae,
                                                cached_text_encoders(config, text_encoders), tokenizers)
        found_later = [reason for reason in cache.skipped if reason not in train.skipped]  # by decoding them
        if found_later and accelerator.is_main_process:
            list_skipped_images(config.output_dir, train.skipped + found_later)
        rows, heldout = data_lib.split_heldout(len(cache.rows), config.validation.num_heldout, config.seed)
        dataset = latent_cache.LatentDataset(cache, rows, config.data.random_flip)
        heldout_set = latent_cache.LatentDataset(cache, heldout, random_flip=False)
        return dataset, heldout_set, cache.empty_prompt_embeds
    # tokenized per sample, not held for all rows
    input_ids = [data_lib.TokenIds(each, train.captions) for each in tokenizers] + [None]
    rows, heldout = data_lib.split_heldout(train.num_rows, config.validation.num_heldout, config.seed)
    dataset = data_lib.ImageTextDataset(train.dataset, input_ids[0], config.data, config.resolution, rows,
                                        train.buckets, config.seed, input_ids[1])
    heldout_data = dataclasses.replace(config.data, random_flip=False)
    heldout_set = data_lib.ImageTextDataset(train.dataset, input_ids[0], heldout_data, config.resolution, heldout,
                                            train.buckets, config.seed, input_ids[1])
    if train.prior is not None:  # DreamBooth: each instance picture paired with a class image (whole: no mask)
        class_ids = [data_lib.TokenIds(each, train.prior.captions) for each in tokenizers] + [None]
        classes = data_lib.ImageTextDataset(train.prior.dataset, class_ids[0],
                                            dreambooth.class_data_config(config.data), config.resolution,
                                            seed=config.seed, input_ids_2=class_ids[1])
        dataset = dreambooth.PriorPairs(dataset, classes)
    return dataset, heldout_set, None


def ema_of(accelerator: Accelerator, config: Config, unet) -> EMAModel | None:
    """The EMA of the trained weights (all of a UNet trained whole, the adapters of a LoRA), or None."""
    if not config.use_ema:
        return None
    plain = accelerator.unwrap_model(unet)
    ema = EMAModel(trainable(plain), decay=config.ema_decay, model_cls=UNet2DConditionModel,
                   model_config=plain.config, foreach=True)
    ema.to(accelerator.device)  # a resume copies the saved EMA weights into these tensors, in place
    return ema


def sampling_pipeline(parts: UNetParts, tokenizers: list, sampling):
    """The pipeline validation samples with: a StableDiffusionPipeline, or for SDXL a StableDiffusionXLPipeline."""
    scheduler = make_sampler(sampling.scheduler, parts.noise_scheduler.config)
    text_encoder, unet = parts.unwrap(parts.text_encoder), parts.unwrap(parts.unet)
    if parts.sdxl:
        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=text_encoder, text_encoder_2=parts.unwrap(parts.text_encoder_2),
            tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, add_watermarker=False)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=text_encoder, tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# compile: true compiles the training step only. Validation runs eagerly: its calls (a batch of one, the guidance
# pair, eval mode, no gradients) would each be compiled anew, a minute or more apiece on a CPU.
@torch.compiler.set_stance("force_eager")
@torch.no_grad()
def validate(accelerator: Accelerator, config: Config, parts: UNetParts, tokenizers: list, heldout_set, ema,
             step: int, name: str | None = None) -> dict:
    """Held-out loss and a grid of fixed prompts x seeds (split across processes), with the EMA weights when EMA
    is on: what will be saved."""
    unet = parts.unwrap(parts.unet)
    if ema is not None:
        ema.store(trainable(unet))
        ema.copy_to(trainable(unet))
    try:
        unet.eval()
        metrics = {"val_loss": heldout_loss(accelerator, parts, heldout_set, config.seed)}
        prompts = config.validation.prompts or [""]
        jobs = [(p, s) for s in config.validation.seeds for p in prompts]
        pipe = sampling_pipeline(parts, tokenizers, config.sampling)
        pipe.set_progress_bar_config(disable=True)
        # Under mixed precision the frozen VAE and text encoder hold bf16/fp16 weights while the UNet keeps
        # fp32 ones; autocast runs each layer in one dtype, as in training.
        with accelerator.autocast():
            images = generate(
                pipe, [p for p, _ in jobs], [s for _, s in jobs], show_progress=False, state=accelerator,
                num_inference_steps=config.sampling.num_inference_steps,
                guidance_scale=config.sampling.guidance_scale, guidance_rescale=config.sampling.guidance_rescale,
                check_finite=False)
    finally:
        if ema is not None:
            ema.restore(trainable(unet))
    samples = Path(config.output_dir) / "samples"
    if accelerator.is_main_process:
        samples.mkdir(parents=True, exist_ok=True)
        path = samples / f"{name or f'step-{step:06d}'}.png"
        grid = captioned_grid(images, rows=len(config.validation.seeds), captions=prompts)
        grid.save(path)
        path.with_suffix(".txt").write_text("columns: " + " | ".join(prompts) + "\n")
        log_image(accelerator, "validation", grid, unet_log_offset(config) + step)
    accelerator.print(f"[unet] step {step}: val_loss {metrics['val_loss']:.4f}, samples in {samples}")
    return metrics


def train_unet_stage(accelerator: Accelerator, config: Config, train: data_lib.TrainData, tokenizer, text_encoder,
                     vae, tokenizer_2=None, text_encoder_2=None) -> Path:
    """Train the UNet (or its LoRA adapters); returns <output_dir>/pipeline (<output_dir>/lora). SDXL's second
    tokenizer and text encoder come as `tokenizer_2`, `text_encoder_2`."""
    unet, noise_scheduler, weight_dtype = set_up_models(accelerator, config, text_encoder, vae, text_encoder_2)
    tokenizers = [tokenizer] + ([tokenizer_2] if text_encoder_2 is not None else [])
    text_encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    dataset, heldout_set, empty_embeds = training_sets(accelerator, config, train, tokenizers, text_encoders, vae)
    trained_rows = len(getattr(dataset, "instances", dataset))  # DreamBooth: the instance pictures
    paired = f", each paired with one of {len(dataset.classes)} class images" if train.prior is not None else ""
    accelerator.print(f"[unet] {trained_rows} training examples, {len(heldout_set)} held out for val_loss{paired}")
    train_text = trains_text_encoder(config)
    learning_rates = [config.learning_rate]
    param_groups = [{"params": trainable(unet), "lr": config.learning_rate}]
    if train_text:
        learning_rates.append(config.text_encoder_learning_rate or config.learning_rate)
        param_groups.append({"params": [p for encoder in text_encoders for p in trainable(encoder)],
                             "lr": learning_rates[-1]})
    optimizer, lr_scheduler = make_optimizer(config, param_groups, config.learning_rate, config.lr_scheduler,
                                             config.lr_warmup_steps, config.max_train_steps, config.optimizer)
    loader = make_loader(config, dataset, stage_settings(config, "unet"), accelerator.num_processes)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if train_text:
        unet, *text_encoders, optimizer, loader = accelerator.prepare(unet, *text_encoders, optimizer, loader)
        text_encoder, text_encoder_2 = (text_encoders + [None])[:2]
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema = ema_of(accelerator, config, unet)
    parts = UNetParts(
        unet=unet, text_encoder=text_encoder, vae=vae, noise_scheduler=noise_scheduler,
        latent_shape=(vae.config.latent_channels,) + (config.resolution // vae_scale_factor(vae),) * 2,
        empty_ids=data_lib.tokenize(tokenizer, [""], warn=False)[0], empty_embeds=empty_embeds,
        weight_dtype=weight_dtype, trains_text_encoder=train_text, caption_dropout=config.data.caption_dropout,
        noise_offset=config.noise_offset, snr_gamma=config.snr_gamma, device=accelerator.device,
        unwrap=accelerator.unwrap_model, prior_loss_weight=config.prior_loss_weight, text_encoder_2=text_encoder_2)
    check = functools.partial(validate, accelerator, config, parts, tokenizers, heldout_set, ema)
    models = [unet, *text_encoders] if train_text else [unet]
    stage = Stage(settings=stage_settings(config, "unet"), models=models, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, learning_rates=learning_rates, dataloader=loader,
                  compute_loss=functools.partial(training_loss, parts), ema=ema, validate=check)
    fit(accelerator, config, stage)

    accelerator.wait_for_everyone()
    final_metrics = check(config.max_train_steps, name="final")
    log_metrics(accelerator, config, {"stage": "unet", "step": config.max_train_steps, **final_metrics},
                unet_log_offset(config))
    result_dir = Path(config.output_dir) / ("lora" if config.lora.rank else "pipeline")
    if accelerator.is_main_process:
        save_result(accelerator, config, parts, tokenizers, ema, models, trained_rows + len(heldout_set),
                    len(heldout_set), final_metrics, result_dir, example_prompts(config, train.captions))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result_dir


def example_prompts(config: Config, captions: list[str], count: int = 8) -> list[str]:
    """Up to `count` of the training captions to offer a newcomer (the demo shows them): the validation prompts that
    are training captions first, then the first other distinct ones."""
    known = set(captions)
    chosen = [prompt for prompt in config.validation.prompts if prompt in known]
    for caption in captions:
        if len(chosen) >= count:
            break
        if caption and caption not in chosen:
            chosen.append(caption)
    return chosen[:count]


def save_result(accelerator: Accelerator, config: Config, parts: UNetParts, tokenizers: list, ema, models,
                num_images: int, num_heldout: int, final_metrics: dict, result_dir: Path,
                prompts: list[str]) -> None:
    """The pipeline (or LoRA) directory with its model card and final sample grid; EMA weights when EMA is on."""
    unet, text_encoder, vae = parts.unwrap(parts.unet), parts.unwrap(parts.text_encoder), parts.vae
    text_encoder_2 = parts.unwrap(parts.text_encoder_2) if parts.sdxl else None
    if ema is not None:
        ema.copy_to(trainable(unet))
    grid = Path(config.output_dir) / "samples" / "final.png"
    card = training_card(config, num_images=num_images, num_heldout=num_heldout,
                         num_processes=accelerator.num_processes, metrics=final_metrics, sample_grid=grid.is_file(),
                         parameters={"unet": unet.num_parameters(), "vae": vae.num_parameters(),
                                     "text_encoder": text_encoder.num_parameters(),
                                     **({"text_encoder_2": text_encoder_2.num_parameters()} if parts.sdxl else {}),
                                     "trainable": sum(p.numel() for m in models for p in trainable(m))})
    sample_grid = grid if grid.is_file() else None
    if config.lora.rank:
        with_text = config.lora.train_text_encoder
        save_lora(result_dir, unet, text_encoder if with_text else None, config, card=card, sample_grid=sample_grid,
                  text_encoder_2=text_encoder_2 if with_text else None)
        print(f"saved the LoRA to {result_dir} (base: {base_reference(config.model)})")
        return
    full = {name: model if model.dtype == torch.float32 else model.to(torch.float32)
            for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet),
                                ("text_encoder_2", text_encoder_2)) if model is not None}
    save_pipeline(result_dir, **full, tokenizer=tokenizers[0], noise_scheduler=parts.noise_scheduler,
                  sampling=config.sampling, extra={"resolution": config.resolution, "example_prompts": prompts},
                  card=card, sample_grid=sample_grid, tokenizer_2=tokenizers[1] if parts.sdxl else None)
    print(f"saved the pipeline to {result_dir}")
