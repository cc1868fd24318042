"""The optimisation loop: `fit` runs one stage to its step count with gradient accumulation, the non-finite
guard, EMA, logging, validation, checkpoints and exact resume.

A stage (`Stage`) is the models, optimizer, LR schedule, data and loss that `unet_stage.py` or `vae_stage.py`
builds, with its settings from the config (`StageSettings`); the loop around them is this one and never asks
which stage it runs, so both stages log, checkpoint and resume the same way.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .buckets import BucketSampler
from .checkpoints import checkpoint_steps, find_resume_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, StageSettings, get_setting
from .cpu import return_freed_memory
from .distributed import describe_failed_collective, failed_collective
from .lora import trainable


class TrainingError(RuntimeError):
    """Training had to stop; the message says why and what was kept."""


@dataclass
class Stage:
    settings: StageSettings  # name, steps, batch, checkpoint and validation schedule
    models: list[torch.nn.Module]  # prepared, trainable
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    learning_rates: list[float]  # configured base LR of each parameter group
    dataloader: torch.utils.data.DataLoader
    compute_loss: Callable[[dict, list[torch.Generator]], torch.Tensor]
    ema: EMAModel | None = None
    validate: Callable[[int], dict] | None = None  # runs on every process


@dataclass
class Progress:
    """Where a stage stands; saved with every checkpoint. `windows` is the data position (accumulation
    windows consumed, skipped ones included); `step` counts optimizer steps taken."""

    step: int = 0
    windows: int = 0
    skipped_steps: int = 0  # non-finite loss
    overflow_steps: int = 0  # fp16 gradient overflow: the GradScaler skipped the update


def sample_generators(seed: int, micro_step: int, indices) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, micro-step, the sample's index in the global batch):
    a sample's noise is the same at any process count and after a resume, and each process draws
    only for the samples it holds."""
    keys = (hashlib.blake2b(f"{seed}/{micro_step}/{i}".encode(), digest_size=8).digest() for i in indices)
    return [torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1) for key in keys]


def log_metrics(accelerator: Accelerator, config: Config, metrics: dict, log_offset: int = 0) -> None:
    if accelerator.is_main_process:
        with open(Path(config.output_dir) / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                    step=log_offset + metrics["step"])


def log_image(accelerator: Accelerator, name: str, image, step: int) -> None:
    """Send an image (a validation grid, the VAE's reconstructions) to every tracker that takes images."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step)


def restore_hyperparameters(config: Config, stage: Stage, saved_config: dict, accelerator: Accelerator) -> None:
    """After a resume, the optimizer and LR schedule hold the settings they were saved with; apply the
    config's instead, so a changed learning_rate (or Adam setting) takes effect: the LR schedule keeps
    its position and is rescaled to the new base. The stage's reapplied settings that changed are named."""
    for group, base in zip(stage.optimizer.param_groups, stage.learning_rates):
        group.update(**optimizer_settings(config, stage.settings.optimizer), initial_lr=base)
    schedule = stage.lr_scheduler
    schedule.base_lrs = list(stage.learning_rates)
    for group, base, factor in zip(stage.optimizer.param_groups, stage.learning_rates, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)
    changed = []
    for key in stage.settings.reapplied_keys:
        *parents, leaf = key.split(".")
        saved = saved_config
        for part in parents:
            saved = saved.get(part) or {}
        if leaf in saved and saved[leaf] != get_setting(config, key):
            changed.append(f"{key} {saved[leaf]} -> {get_setting(config, key)}")
    if changed:
        accelerator.print(f"[{stage.settings.name}] resuming with changed settings, applied from step "
                          f"{schedule.last_epoch}: {'; '.join(changed)} "
                          f"(LR now {stage.optimizer.param_groups[0]['lr']:.3g})")
    if stage.ema is not None:
        stage.ema.decay = config.ema_decay


def resume_progress(accelerator: Accelerator, config: Config, stage: Stage) -> Progress:
    """Where the stage stands: restored from its checkpoint when the config resumes one, else at the start."""
    checkpoint = find_resume_checkpoint(config, stage.settings.checkpoint_prefix)
    if checkpoint is None:
        if config.resume_from_checkpoint == "latest" and (Path(config.output_dir) / "checkpoints").is_dir():
            accelerator.print(f"[{stage.settings.name}] no checkpoint of this stage to resume from yet: starting "
                              "at step 0")
        return Progress()
    saved = load_checkpoint(accelerator, checkpoint, stage.ema)
    stage.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    progress = Progress(**{k: saved[k] for k in ("step", "windows", "skipped_steps", "overflow_steps")})
    restore_hyperparameters(config, stage, yaml.safe_load((checkpoint / "config.yaml").read_text()), accelerator)
    accelerator.print(f"[{stage.settings.name}] resumed from {checkpoint} at step {progress.step}")
    return progress


def fit(accelerator: Accelerator, config: Config, stage: Stage) -> Progress:
    """Run `stage` to `max_train_steps` optimizer steps, resuming from a checkpoint if asked."""
    return_freed_memory()
    settings, accum = stage.settings, accelerator.gradient_accumulation_steps
    state = resume_progress(accelerator, config, stage)
    steps_per_epoch = len(stage.dataloader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has fewer than one optimizer step of samples: {len(stage.dataloader)} "
                          f"batches for gradient_accumulation_steps={accum}; lower the batch size or add data")
    global_batch = settings.train_batch_size * accelerator.num_processes * accum
    first_sample = accelerator.process_index * settings.train_batch_size
    bar = tqdm(total=settings.max_train_steps, initial=state.step, desc=settings.name,
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    # Loss sums stay on the device: reading a loss every micro-step would stall a GPU at each one.
    bad_in_a_row = 0
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    started, steps_timed = time.perf_counter(), 0
    for model in stage.models:
        model.train()

    try:
        while state.step < settings.max_train_steps:
            epoch, done_in_epoch = divmod(state.windows, steps_per_epoch)
            stage.dataloader.set_epoch(epoch)
            batches = stage.dataloader
            if done_in_epoch:
                batches = accelerator.skip_first_batches(stage.dataloader, done_in_epoch * accum)
            micro, window_bad = 0, torch.zeros((), device=accelerator.device)
            for batch in batches:
                generators = sample_generators(config.seed, state.windows * accum + micro,
                                               range(first_sample, first_sample + settings.train_batch_size))
                # Randomness inside the models (a LoRA's dropout) draws from torch's global generator: seed it from
                # the micro-step too, so a resume repeats it (at the same process count; its masks are per process).
                torch.manual_seed(sample_generators(config.seed, state.windows * accum + micro,
                                                    [f"process{accelerator.process_index}"])[0].initial_seed())
                micro += 1
                with accelerator.accumulate(*stage.models):
                    loss = stage.compute_loss(batch, generators)
                    window_bad += (~torch.isfinite(loss.detach())).float()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        bad, overflow, grad_norm = optimizer_step(accelerator, stage, window_bad)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach().float(), 0.0)
                loss_count += finite.float()
                if not accelerator.sync_gradients:
                    continue
                micro, window_bad, state.windows = 0, torch.zeros((), device=accelerator.device), state.windows + 1
                if bad:
                    bad_in_a_row, state.skipped_steps = bad_in_a_row + 1, state.skipped_steps + 1
                    check_bad_steps(accelerator, config, settings, state, bad_in_a_row)
                elif overflow:
                    state.overflow_steps += 1  # the scaler lowers its scale and the window's data is spent
                else:
                    bad_in_a_row = 0
                    if stage.ema is not None:
                        stage.ema.step(trainable(accelerator.unwrap_model(stage.models[0])))
                    state.step += 1
                    steps_timed += 1
                    bar.update(1)
                    after_step(accelerator, config, stage, state, bar, loss_sum, loss_count,
                               steps_timed * global_batch / (time.perf_counter() - started), grad_norm)
                    if state.step % config.logging_steps == 0:
                        loss_sum.zero_(), loss_count.zero_()
                if state.step >= settings.max_train_steps or state.windows % steps_per_epoch == 0:
                    break
    except RuntimeError as error:
        if failed_collective(error):  # another process died or stopped answering
            where = f"[{settings.name}] after step {state.step} of {settings.max_train_steps}: "
            raise peer_lost(config, error, where) from error
        raise
    finally:
        bar.close()  # before any message, which then starts on a line of its own
    return state


def peer_lost(config: Config, error: BaseException, where: str = "") -> TrainingError:
    """One line for a collective that gave up: where the run stood, which collective, torch's reason, and the last
    complete checkpoint (the UNet's, else the VAE's) to resume from."""
    kept = checkpoint_steps(config, "") or checkpoint_steps(config, "vae-")
    return TrainingError(
        f"{where}{describe_failed_collective(error)}. Another process of the run died or did not answer within "
        f"distributed_timeout ({config.distributed_timeout} s). "
        + (f"The last complete checkpoint is {kept[-1][1]}: " if kept else "No checkpoint was written yet: ")
        + "start the command again on every node with resume_from_checkpoint: latest")


def optimizer_step(accelerator: Accelerator, stage: Stage, window_bad: torch.Tensor):
    """The end of an accumulation window: (skipped as non-finite, skipped by the fp16 GradScaler, gradient norm)."""
    # Every process joins this reduce, so all of them agree whether to skip.
    bad = accelerator.reduce(window_bad, "sum").item() > 0
    overflow, grad_norm = False, None
    if not bad:
        params = [p for group in stage.optimizer.param_groups for p in group["params"]]
        grad_norm = accelerator.clip_grad_norm_(params, stage.settings.max_grad_norm)
        # A finite loss can still give inf gradients (bf16, fp32); clipping would turn them
        # into NaN weights. The norm is of the reduced gradients: every process agrees.
        # Under fp16 the GradScaler handles overflow itself and must see the step.
        bad = accelerator.scaler is None and grad_norm is not None and not torch.isfinite(grad_norm).item()
    if not bad:
        stage.optimizer.step()
        overflow = accelerator.optimizer_step_was_skipped  # fp16: the GradScaler skipped it
        if not overflow:
            stage.lr_scheduler.step()  # ours, not Accelerate's: one step per optimizer step
    stage.optimizer.zero_grad(set_to_none=True)
    return bad, overflow, grad_norm


def check_bad_steps(accelerator: Accelerator, config: Config, settings: StageSettings, state: Progress,
                    bad_in_a_row: int) -> None:
    """Say that a step was skipped; stop after max_consecutive_bad_steps of them in a row."""
    accelerator.print(f"[{settings.name}] step {state.step + 1}: non-finite loss or gradient, step "
                      f"skipped ({bad_in_a_row} in a row, {state.skipped_steps} in all)")
    if bad_in_a_row >= config.max_consecutive_bad_steps:
        kept = checkpoint_steps(config, settings.checkpoint_prefix)
        raise TrainingError(
            f"[{settings.name}] stopped at step {state.step}: the loss was not finite for "
            f"{bad_in_a_row} optimizer steps in a row (max_consecutive_bad_steps). "
            + (f"The last good checkpoint, {kept[-1][1]}, is intact. " if kept else "")
            + "Lower learning_rate, check the data, or try mixed_precision: 'no', then resume.")


def after_step(accelerator, config: Config, stage: Stage, state: Progress, bar, loss_sum: torch.Tensor,
               loss_count: torch.Tensor, samples_per_s: float, grad_norm) -> None:
    """Log, validate and checkpoint on schedule; every process calls this, so collectives match."""
    step, settings = state.step, stage.settings
    if step % config.logging_steps == 0 or step == settings.max_train_steps:
        loss = accelerator.reduce(loss_sum / loss_count.clamp_min(1), "mean").item()
        lr = stage.lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        log_metrics(accelerator, config, {"stage": settings.name, "step": step, "loss": loss, "lr": lr,
                                          "grad_norm": None if grad_norm is None else float(grad_norm),
                                          "samples_per_s": samples_per_s,
                                          "skipped_steps": state.skipped_steps,
                                          "overflow_steps": state.overflow_steps}, settings.log_offset)
    if stage.validate and settings.validation_steps and step % settings.validation_steps == 0 \
            and step < settings.max_train_steps:
        log_metrics(accelerator, config, {"stage": settings.name, "step": step, **stage.validate(step)},
                    settings.log_offset)
        for model in stage.models:
            model.train()
    every = settings.checkpointing_steps
    if every and (step % every == 0 or step == settings.max_train_steps):
        global_batch = settings.train_batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
        saved = {**vars(state), "global_batch": global_batch, "lr_scheduler": stage.lr_scheduler.state_dict()}
        save_checkpoint(accelerator, config, settings, step, saved, stage.ema)


def optimizer_settings(config: Config, kind: str) -> dict:
    """The config's settings as `kind`'s param-group keys: set when it is made and again after a resume."""
    if kind == "adafactor":  # its eps is a pair of its own; no betas
        return {"weight_decay": config.adam_weight_decay}
    return {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon,
            "weight_decay": config.adam_weight_decay}


def make_optimizer(config: Config, param_groups, learning_rate: float, lr_scheduler: str, warmup: int,
                   max_steps: int, kind: str = "adamw"):
    """The `kind` optimizer (config.optimizer) and its LR schedule."""
    settings = optimizer_settings(config, kind)
    if kind == "adamw_8bit":
        import bitsandbytes  # an optional extra, checked when the config is read

        optimizer = bitsandbytes.optim.AdamW8bit(param_groups, lr=learning_rate, **settings)
    elif kind == "adafactor":
        from transformers.optimization import Adafactor

        # At the config's learning rate and schedule: no relative step, no parameter-scale factor.
        optimizer = Adafactor(param_groups, lr=learning_rate, relative_step=False, scale_parameter=False,
                              warmup_init=False, **settings)
    elif kind == "prodigy":
        from prodigyopt import Prodigy  # an optional extra, checked when the config is read

        optimizer = Prodigy(param_groups, lr=learning_rate, **settings)
    else:
        # The fused kernel updates every tensor in one pass: ~10% faster UNet steps on a CPU
        # (benchmarks/step_speed.py); torch has it for CPU and CUDA parameters. Not under fp16: the GradScaler
        # then hands a fused optimizer its overflow flag instead of skipping step(), and Accelerate's
        # optimizer_step_was_skipped, which the loop needs to not count a skipped step, stays False.
        params = [p for group in param_groups for p in (group["params"] if isinstance(group, dict) else [group])]
        fused = config.mixed_precision != "fp16" and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
            for p in params)
        optimizer = torch.optim.AdamW(param_groups, lr=learning_rate, fused=fused, **settings)
    schedule = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    return optimizer, schedule


def make_loader(config: Config, dataset, stage: StageSettings, num_processes: int):
    """Micro-batches of `stage.train_batch_size`: shuffled, or with aspect-ratio buckets (`dataset.bucket_of()`) whole
    global batches of one bucket at a time, so a step never mixes sizes (buckets.BucketSampler)."""
    batch_size = stage.train_batch_size
    if len(dataset) < batch_size:
        raise ConfigError(f"the training set has {len(dataset)} examples, fewer than one batch of {batch_size}; "
                          "add data or lower the batch size")
    buckets = dataset.bucket_of() if hasattr(dataset, "bucket_of") else None
    if buckets is None:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                           num_workers=config.data.dataloader_num_workers)
    window = batch_size * num_processes * stage.gradient_accumulation_steps
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=BucketSampler(buckets, window,
                                                                                               config.seed),
                                       drop_last=True, num_workers=config.data.dataloader_num_workers)
