"""Training: `accelerate launch train.py --config train_configs/x.yaml [--set key=value] [--dry-run]`.

`train(config)` reads top to bottom: Accelerator -> output directory -> data -> components ->
the stages ("vae", then "unet"). Each stage builds its model, optimizer, LR schedule and loss and
hands them to `fit`, the one optimisation loop (accumulation, non-finite guard, EMA, logging,
validation, checkpoints, exact resume). This module holds the UNet stage and the entry point; the
loop lives in `loop.py`, the VAE stage in `vae_training.py`.

Randomness that shapes a step (noise, timesteps, caption dropout) is drawn for the whole global
batch from a generator keyed by (seed, micro-step), and each process takes its slice. A run
therefore gives the same result at any process count and after a resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from safetensors import SafetensorError

from . import data as data_lib
from .card import training_card
from .checkpoints import check_output_dir, checkpoint_trained_weights_only, output_dir_lock, prepare_output_dir
from .config import Config, ConfigError, ModelConfig, add_run_arguments, load_config, os_error_message, to_yaml
from .cpu import set_up_cpu
from .loop import Stage, TrainingError, fit, log_image, log_metrics, make_loader, make_optimizer
from .lora import TEXT_ENCODER_TARGETS, add_adapters, base_reference, check_targets, save_lora, trainable
from .losses import diffusion_loss, diffusion_target
from .models import (
    build_noise_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    load_tokenizer,
    make_sampler,
    resolve_source,
    vae_scale_factor,
)
from .pipeline import check_process_group, generate, replace_directory, save_pipeline
from .tokenizer import save_tokenizer
from .vae_training import load_trained_vae, train_vae_stage

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
        # Under mixed precision the frozen VAE and text encoder hold bf16/fp16 weights while the UNet keeps
        # fp32 ones; autocast runs each layer in one dtype, as in training.
        with accelerator.autocast():
            images = generate(
                pipe, [p for p, _ in jobs], [s for _, s in jobs], show_progress=False, state=accelerator,
                num_inference_steps=config.sampling.num_inference_steps,
                guidance_scale=config.sampling.guidance_scale, check_finite=False)
        if accelerator.is_main_process:
            samples.mkdir(parents=True, exist_ok=True)
            path = samples / f"{name or f'step-{step:06d}'}.png"
            grid = make_image_grid(images, rows=len(config.validation.seeds), cols=len(prompts))
            grid.save(path)
            path.with_suffix(".txt").write_text("columns: " + " | ".join(prompts) + "\n")
            log_image(accelerator, "validation", grid, unet_log_offset(config) + step)
        accelerator.print(f"[unet] step {step}: val_loss {metrics['val_loss']:.4f}, samples in {samples}")
        return metrics

    return validate


def unet_log_offset(config: Config) -> int:
    """Tracker steps of the UNet stage start after the VAE stage's, so a run's steps only ever grow."""
    return config.vae_training.max_train_steps if "vae" in config.stages else 0


def add_lora(accelerator, config: Config, unet, text_encoder, weight_dtype) -> None:
    """Adapters on the pretrained UNet (and text encoder), each from its own seed; only they train. Under mixed
    precision the frozen base weights are kept in its dtype (half the memory; autocast computes in it anyway),
    the adapters in float32, the optimizer's master weights."""
    from diffusers.training_utils import cast_training_params

    for name, model, targets, wanted in (("unet", unet, config.lora.target_modules, True),
                                         ("text_encoder", text_encoder, TEXT_ENCODER_TARGETS,
                                          config.lora.train_text_encoder)):
        if not wanted:
            continue
        if accelerator.native_amp:
            model.to(weight_dtype)
        seeded(config.seed, name, lambda model=model, targets=targets: add_adapters(model, config.lora, targets))
        cast_training_params(model, torch.float32)
        accelerator.print(f"[unet] LoRA rank {config.lora.rank} on the {name}'s {', '.join(targets)}: "
                          f"{sum(p.numel() for p in trainable(model)) / 1e6:.3f}M trainable parameters")


def train_unet_stage(accelerator, config: Config, train: data_lib.TrainData, tokenizer, text_encoder, vae) -> Path:
    lora = config.lora.rank > 0
    train_text = trains_text_encoder(config)
    noise_scheduler = build_noise_scheduler(config.model, config.prediction_type)
    unet = seeded(config.seed, "unet", lambda: build_unet(config.model, config.resolution, vae, text_encoder))
    accelerator.print(f"[unet] {unet.num_parameters() / 1e6:.2f}M parameters")
    weight_dtype = frozen_dtype(accelerator)
    vae.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    text_encoder.requires_grad_(config.train_text_encoder)
    if lora:
        add_lora(accelerator, config, unet, text_encoder, weight_dtype)
        checkpoint_trained_weights_only(accelerator)
    if not train_text:
        text_encoder.eval().to(accelerator.device, weight_dtype)
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            text_encoder.gradient_checkpointing_enable()

    data_lib.warn_truncated(tokenizer, train.captions)
    empty_ids = data_lib.tokenize(tokenizer, [""], warn=False)[0]
    if config.data.cache_latents:  # memory-mapped: only the rows of a batch are ever read into RAM
        cache = data_lib.build_latent_cache(accelerator, config, train, vae, cached_text_encoder(config, text_encoder),
                                            tokenizer)
        rows, heldout = data_lib.split_heldout(len(cache.rows), config.validation.num_heldout, config.seed)
        dataset = data_lib.LatentDataset(cache, rows, config.data.random_flip)
        heldout_set = data_lib.LatentDataset(cache, heldout, random_flip=False)
        empty_embeds = cache.empty_prompt_embeds
    else:
        input_ids = data_lib.TokenIds(tokenizer, train.captions)  # tokenized per sample, not held for all rows
        rows, heldout = data_lib.split_heldout(train.num_rows, config.validation.num_heldout, config.seed)
        dataset = data_lib.ImageTextDataset(train.dataset, input_ids, config.data, config.resolution, rows)
        heldout_config = type(config.data)(**{**vars(config.data), "random_flip": False})
        heldout_set = data_lib.ImageTextDataset(train.dataset, input_ids, heldout_config, config.resolution, heldout)
        empty_embeds = None
    accelerator.print(f"[unet] {len(dataset)} training examples, {len(heldout_set)} held out for val_loss")

    learning_rates = [config.learning_rate]
    param_groups = [{"params": trainable(unet), "lr": config.learning_rate}]
    if train_text:
        learning_rates.append(config.text_encoder_learning_rate or config.learning_rate)
        param_groups.append({"params": trainable(text_encoder), "lr": learning_rates[-1]})
    optimizer, lr_scheduler = make_optimizer(config, param_groups, config.learning_rate, config.lr_scheduler,
                                             config.lr_warmup_steps, config.max_train_steps)
    loader = make_loader(config, dataset, config.train_batch_size)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    if train_text:
        unet, text_encoder, optimizer, loader = accelerator.prepare(unet, text_encoder, optimizer, loader)
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema = None
    if config.use_ema:
        plain = accelerator.unwrap_model(unet)
        # The trained weights: all of a UNet trained whole, the adapters of a LoRA.
        ema = EMAModel(trainable(plain), decay=config.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=plain.config, foreach=True)
        ema.to(accelerator.device)  # a resume copies the saved EMA weights into these tensors, in place

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
        if train_text and torch.is_grad_enabled():
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

    def draw(generator):
        """One sample's random draws, in a fixed order: latent sample, noise, offset, timestep, dropout."""
        return (torch.randn(latent_shape, generator=generator), torch.randn(latent_shape, generator=generator),
                torch.randn((latent_shape[0], 1, 1), generator=generator),
                torch.randint(0, num_timesteps, (), generator=generator),
                torch.rand((), generator=generator) < config.data.caption_dropout)

    def compute_loss(batch, generators):
        draws = [torch.stack(column).to(accelerator.device) for column in zip(*map(draw, generators))]
        latent_noise, noise, offset, timesteps, dropped = draws  # (B, C, h, w) x 2, (B, C, 1, 1), (B,), (B,)
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness.
        return model_loss(batch, latent_noise, noise + config.noise_offset * offset, timesteps, dropped)

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
            ema.store(trainable(accelerator.unwrap_model(unet)))
            ema.copy_to(trainable(accelerator.unwrap_model(unet)))
        try:
            accelerator.unwrap_model(unet).eval()
            return validator(step, name)
        finally:
            if ema is not None:
                ema.restore(trainable(accelerator.unwrap_model(unet)))

    models = [unet, text_encoder] if train_text else [unet]
    stage = Stage(name="unet", models=models, optimizer=optimizer, lr_scheduler=lr_scheduler,
                  learning_rates=learning_rates, dataloader=loader, compute_loss=compute_loss,
                  max_train_steps=config.max_train_steps, max_grad_norm=config.max_grad_norm,
                  checkpointing_steps=config.checkpointing_steps, checkpoint_prefix="", batch_size=batch_size,
                  ema=ema, validate=validate, validation_steps=config.validation.validation_steps,
                  log_offset=unet_log_offset(config), trained_weights_only=lora)
    fit(accelerator, config, stage)

    accelerator.wait_for_everyone()
    final_metrics = validate(config.max_train_steps, name="final")
    log_metrics(accelerator, config, {"stage": "unet", "step": config.max_train_steps, **final_metrics},
                unet_log_offset(config))
    result_dir = Path(config.output_dir) / ("lora" if lora else "pipeline")
    if accelerator.is_main_process:
        unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        if ema is not None:
            ema.copy_to(trainable(unet))
        grid = Path(config.output_dir) / "samples" / "final.png"
        card = training_card(config, num_images=len(dataset) + len(heldout_set), num_heldout=len(heldout_set),
                             num_processes=accelerator.num_processes, metrics=final_metrics, sample_grid=grid.is_file(),
                             parameters={"unet": unet.num_parameters(), "vae": vae.num_parameters(),
                                         "text_encoder": text_encoder.num_parameters(),
                                         "trainable": sum(p.numel() for m in models for p in trainable(m))})
        if lora:
            save_lora(result_dir, unet, text_encoder if config.lora.train_text_encoder else None, config, card=card,
                      sample_grid=grid if grid.is_file() else None)
            print(f"saved the LoRA to {result_dir} (base: {base_reference(config.model)})")
        else:
            full = {m: m if m.dtype == torch.float32 else m.to(torch.float32) for m in (vae, text_encoder, unet)}
            save_pipeline(result_dir, vae=full[vae], text_encoder=full[text_encoder], tokenizer=tokenizer,
                          unet=full[unet], noise_scheduler=noise_scheduler, sampling=config.sampling,
                          extra={"resolution": config.resolution}, card=card,
                          sample_grid=grid if grid.is_file() else None)
            print(f"saved the pipeline to {result_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result_dir


# --- entry point ----------------------------------------------------------------------------------------


def build_accelerator(config: Config) -> Accelerator:
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != config.mixed_precision and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        # Accelerate keeps one state per process; a second train() in the same Python session (a notebook,
        # a test) with another mixed_precision would be refused, so a single process starts afresh.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to in (None, "none") else config.report_to,
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
        make_shapes(root, shapes.num_images, config.resolution, shapes.seed, shapes.holdout, shapes.background)
    accelerator.wait_for_everyone()


def seeded(seed: int, component: str, build: Callable):
    """Build a component from its own seed: a random init then never depends on what was built or
    loaded before it (a resume loads the text encoder instead of building it, and a VAE stage that
    is already finished is loaded, not built)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + ("text_encoder", "vae", "unet").index(component))
        return build()


RUN_DATA_FILE = "run_data.json"  # what the run's text components were made from


def run_text_components(config: Config, train: data_lib.TrainData):
    """(tokenizer, text encoder, newly built?) for this run.

    A tokenizer built from the captions and a randomly initialised text encoder are part of the run:
    they are saved in <output_dir> when it starts and read back on every resume (rebuilding them from
    the seed and captions could give others, which the trained UNet cannot read). A resume whose data
    no longer matches them is refused, before anything is written."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint and (out / "text_encoder" / "config.json").is_file():
        record = json.loads((out / RUN_DATA_FILE).read_text()) if (out / RUN_DATA_FILE).is_file() else {}
        now = run_data_record(train)
        changed = [key for key in ("num_examples", "captions") if key in record and record[key] != now[key]]
        if changed:
            raise ConfigError(f"data: the training data changed since {out} started ({', '.join(changed)} differ: "
                              f"{record['num_examples']} -> {now['num_examples']} examples); its tokenizer and "
                              "text encoder were made for the old data. Start a new output_dir for this data")
        tokenizer = load_tokenizer(ModelConfig(tokenizer=str(out / "tokenizer")), lambda: [])
        text_encoder = build_text_encoder(ModelConfig(text_encoder=str(out / "text_encoder")), tokenizer)
        return tokenizer, text_encoder, False
    tokenizer = load_tokenizer(config.model, lambda: train.captions)
    text_encoder = seeded(config.seed, "text_encoder", lambda: build_text_encoder(config.model, tokenizer))
    from_run = resolve_source(config.model, "tokenizer").preset or resolve_source(config.model, "text_encoder").preset
    return tokenizer, text_encoder, bool(from_run)


def run_data_record(train: data_lib.TrainData) -> dict:
    captions = hashlib.sha256("\n".join(train.captions).encode()).hexdigest()[:16]
    return {"num_examples": train.num_rows, "captions": captions, "fingerprint": train.fingerprint}


def save_run_text_components(config: Config, train: data_lib.TrainData, tokenizer, text_encoder) -> None:
    out = Path(config.output_dir)
    for name, save in (("tokenizer", lambda d: save_tokenizer(tokenizer, d)),
                       ("text_encoder", lambda d: text_encoder.save_pretrained(d, safe_serialization=True))):
        partial = out / f".{name}.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        save(partial)
        replace_directory(partial, out / name)
    (out / RUN_DATA_FILE).write_text(json.dumps(run_data_record(train), indent=2))


def needs_image_check(config: Config) -> bool:
    """Whether images are checked before training: always when they are decoded in the loop (or by the VAE
    stage); with the latent cache alone, the cache build decodes each image once and checks it there."""
    return not config.data.cache_latents or "vae" in config.stages


def trains_text_encoder(config: Config) -> bool:
    """Whether the UNet stage trains the text encoder: whole, or through LoRA adapters."""
    return config.train_text_encoder or (config.lora.rank > 0 and config.lora.train_text_encoder)


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen models run in under the run's mixed precision (float32 without it)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cached_text_encoder(config: Config, text_encoder):
    """The text encoder whose outputs the latent cache holds, or None (it is trained, or not cached)."""
    return None if trains_text_encoder(config) or not config.data.cache_text_embeddings else text_encoder


def build_cache(config: Config) -> Path:
    """`ldm-pipeline cache`: build (or finish) the latent cache a training run with this config would use,
    on every process of `accelerate launch`, and stop. The VAE and text encoder are the ones the run would
    encode with: its finished VAE (<output_dir>/vae), else model.vae; the run's text components."""
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    vae_dir = Path(config.output_dir) / "vae"
    if "vae" in config.stages and not (vae_dir / "config.json").is_file():
        raise ConfigError(f"stages: {config.stages} trains a VAE first, and the cache holds that VAE's latents: "
                          "run the vae stage before caching (or train; with data.cache_latents it builds the "
                          "cache itself), or set model.vae to a finished VAE and stages: [unet]")
    ensure_shapes_data(accelerator, config)
    with accelerator.main_process_first():
        train_data = data_lib.load_train_data(config, check_images=False)
    if "vae" in config.stages:  # the rows the run will cache: it checked its images for the VAE stage
        train_data = data_lib.check_train_images(train_data, config.data, accelerator)
    tokenizer, text_encoder, _ = run_text_components(config, train_data)
    vae = load_trained_vae(vae_dir) if (vae_dir / "config.json").is_file() else \
        seeded(config.seed, "vae", lambda: build_vae(config.model))
    weight_dtype = frozen_dtype(accelerator)
    vae.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    text_encoder.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    data_lib.warn_truncated(tokenizer, train_data.captions)
    cache = data_lib.build_latent_cache(accelerator, config, train_data, vae,
                                        cached_text_encoder(config, text_encoder), tokenizer)
    accelerator.print(f"latent cache ready: {cache.directory} ({len(cache.rows)} images)")
    return cache.directory


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


def describe_run(config: Config, accelerator: Accelerator, components: dict, num_examples: int | None) -> str:
    global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    lines = [f"{name}: {module.num_parameters() / 1e6:.2f}M parameters" for name, module in components.items()]
    lines.append(f"effective batch size: {global_batch} = {config.train_batch_size} per process x "
                 f"{accelerator.num_processes} processes x {config.gradient_accumulation_steps} accumulation")
    if "unet" in config.stages:
        lines.append(f"unet stage: {config.max_train_steps} optimizer steps")
        if num_examples:
            lines[-1] += f" (~{config.max_train_steps * global_batch / num_examples:.1f} epochs of {num_examples})"
    if "vae" in config.stages:
        lines.append(f"vae stage: {config.vae_training.max_train_steps} steps of batch "
                     f"{config.vae_training.train_batch_size * accelerator.num_processes}")
    out = Path(config.output_dir)
    if config.lora.rank:
        lines.append(f"LoRA: rank {config.lora.rank} adapters on the UNet's {', '.join(config.lora.target_modules)}"
                     + (" and the text encoder's attention" if config.lora.train_text_encoder else "")
                     + f"; the rest of {config.model.pretrained_model_name_or_path} stays frozen")
    result = out / ("lora" if config.lora.rank else "pipeline")
    lines.append(f"writes: {result} (the {'LoRA' if config.lora.rank else 'model'}), {out / 'samples'} (image grids), "
                 f"{out / 'metrics.jsonl'}")
    return "\n".join(lines)


def train(config: Config, dry_run: bool = False) -> Path | None:
    """Run every configured stage; returns <output_dir>/pipeline, or <output_dir>/lora for a LoRA run (None for a
    dry run)."""
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    if dry_run:  # everything a run checks before writing, without writing
        if config.data.train_data_dir and Path(config.data.train_data_dir).is_dir() or config.data.dataset_name:
            train_data = data_lib.load_train_data(config)
            captions_source, num_examples = train_data.captions, train_data.num_rows
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
        if config.lora.rank:
            check_targets(config.model, config.lora)
        return None
    with output_dir_lock(config.output_dir, hold=accelerator.is_main_process):  # one run per output_dir
        return train_stages(accelerator, config)


def train_stages(accelerator: Accelerator, config: Config) -> Path | None:
    """`train` after the dry-run branch, holding the output_dir lock."""
    # Every input is checked before output_dir is written, so a refused run leaves nothing behind.
    check_output_dir(config, accelerator.num_processes)
    ensure_shapes_data(accelerator, config)
    with accelerator.main_process_first():  # the first load writes datasets' cache; others reuse it
        train_data = data_lib.load_train_data(config, check_images=False)
    if needs_image_check(config):  # each process decodes its share; else the cache build checks them
        train_data = data_lib.check_train_images(train_data, config.data, accelerator)
    tokenizer, text_encoder, built = run_text_components(config, train_data)
    for component in ("vae", "unet"):  # a missing or pickle-only model directory fails here, not mid-run
        resolve_source(config.model, component)
    if config.lora.rank:
        check_targets(config.model, config.lora)
    vae = seeded(config.seed, "vae", lambda: build_vae(config.model))
    check_sizes(config, vae, train_data.num_rows, accelerator.num_processes)
    prepare_output_dir(accelerator, config)  # after the checks; overwrite_output_dir clears vae/ here
    if built and accelerator.is_main_process:
        save_run_text_components(config, train_data, tokenizer, text_encoder)
    if config.report_to not in (None, "none"):
        accelerator.init_trackers("ldm_pipeline")  # tensorboard: <output_dir>/logs/ldm_pipeline
    vae_dir = Path(config.output_dir) / "vae"
    if (vae_dir / "config.json").is_file():  # the VAE stage of this run is done (the same model config)
        vae = load_trained_vae(vae_dir)
    accelerator.print(f"text_encoder: {text_encoder.num_parameters() / 1e6:.2f}M parameters, "
                      f"vae: {vae.num_parameters() / 1e6:.2f}M parameters, "
                      f"{train_data.num_rows} training images")
    accelerator.print(describe_run(config, accelerator, {}, train_data.num_rows))

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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        set_up_cpu(config)
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
