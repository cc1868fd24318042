"""Crash-safe checkpoints of a training stage, and the checks a resume makes before it reads one.

A checkpoint is Accelerate's training state (`save_state`: models as safetensors, optimizer and RNG
states read back with `weights_only`), our own state as JSON + safetensors (step counters, LR schedule,
EMA) and the resolved config, written under `checkpoints/.partial-<name>` and renamed to
`checkpoints/<name>` only when complete, so `latest` can only ever pick a complete one and a run killed
mid-save loses nothing but that save.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from pickle import UnpicklingError  # what a weights_only load raises; nothing here unpickles

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import FIXED, Config, ConfigError, StageSettings, fields_with, stage_settings, to_yaml
from .run_dir import give_umask_modes, refuse_changed_settings, replace_directory


def check_resume_checkpoints(config: Config, num_processes: int = 1) -> None:
    """The checkpoints a resume would read: of a stage this run trains, readable, made with the same fixed settings,
    at the same global batch and not past the end. Reads only."""
    out = Path(config.output_dir)
    vae_finished = (out / "vae" / "config.json").is_file()
    for name in ("vae", "unet"):
        stage = stage_settings(config, name)
        checkpoint = find_resume_checkpoint(config, stage.checkpoint_prefix)
        if checkpoint is None:
            continue
        if name not in config.stages or (name == "vae" and vae_finished):
            raise ConfigError(f"resume_from_checkpoint: {checkpoint} is a checkpoint of the {name} stage, which "
                              f"this run does not train; give a checkpoint of the "
                              f"{'unet stage (step-N)' if name == 'vae' else 'vae stage (vae-step-N)'} or 'latest'")
        if name == "unet" and "vae" in config.stages and not vae_finished:
            raise ConfigError(f"resume_from_checkpoint: {checkpoint} is a UNet checkpoint but {out / 'vae'} holds no "
                              "finished VAE; resume a run whose VAE stage is done, or use 'latest'")
        check_checkpoint_files(checkpoint)
        refuse_changed_settings(checkpoint / "config.yaml", config, fields_with(FIXED),
                                f"resume_from_checkpoint: {checkpoint} was written with", "checkpoint")
        _check_position(checkpoint, stage, num_processes)


def _check_position(checkpoint: Path, stage: StageSettings, num_processes: int) -> None:
    """A checkpoint's data position counts global batches: the global batch may not change (the
    process count may, with the per-process batch), and the run may not already be past its end."""
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        return  # refused with its reason when loaded
    state = json.loads(state_file.read_text())
    accumulation, prefix = stage.gradient_accumulation_steps, stage.key_prefix
    global_batch = stage.train_batch_size * num_processes * accumulation
    if state.get("global_batch", global_batch) != global_batch:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was trained with a global batch of "
                          f"{state['global_batch']} samples, this run has {global_batch} ({prefix}train_batch_size "
                          f"{stage.train_batch_size} x {num_processes} processes x {accumulation} accumulation); "
                          f"resume with the same global batch (the process count may change) or start a new "
                          "output_dir")
    if state["step"] > stage.max_train_steps:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} is at step {state['step']}, past "
                          f"{prefix}max_train_steps {stage.max_train_steps}; raise {prefix}max_train_steps, or "
                          "give an earlier checkpoint (resume_from_checkpoint: <output_dir>/checkpoints/step-N)")


def check_checkpoint_files(checkpoint: Path) -> None:
    """Read the header of every file of a checkpoint before resuming from it, so that a damaged one is
    named with the way out instead of failing deep inside `load_state`. (The data of a file is not
    checksummed: bytes flipped inside a tensor go unnoticed here.)"""
    refuse_pickled_state(checkpoint)
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):  # checks the header and that the file holds every tensor
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(path):
                raise ValueError("not a complete torch.save file: damaged, or a plain pickle, which is refused "
                                 "because loading it could run code")
        except (SafetensorError, ValueError, yaml.YAMLError) as error:
            raise ConfigError(
                f"resume_from_checkpoint: {checkpoint} is damaged: {path.name} cannot be read "
                f"({' '.join(str(error).split())}). Delete that folder to resume from the checkpoint before "
                "it, or set resume_from_checkpoint to another checkpoint") from error


def checkpoint_steps(config: Config, prefix: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"^{prefix}step-(\d+)$")
    root = Path(config.output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob(f"{prefix}step-*") if (m := pattern.match(p.name))]
    return sorted(found)


def find_resume_checkpoint(config: Config, prefix: str) -> Path | None:
    """`latest` picks the newest complete checkpoint (partial ones never carry the final name)."""
    choice = config.resume_from_checkpoint
    if choice is None:
        return None
    if choice == "latest":
        found = checkpoint_steps(config, prefix)
        return found[-1][1] if found else None
    path = Path(choice)
    if not path.is_dir() or not re.match(r"^(vae-)?step-\d+$", path.name):
        raise ConfigError(f"resume_from_checkpoint: {choice} is not a checkpoint directory "
                          f"(<output_dir>/checkpoints/step-<N>); use 'latest' or an existing one")
    return path if path.name.startswith(prefix) else None


STATE_FILE = "training_state.json"  # step counters, LR schedule, EMA settings: plain JSON
EMA_FILE = "ema.safetensors"  # the EMA's shadow weights


def save_checkpoint(accelerator: Accelerator, config: Config, stage: StageSettings, step: int, state: dict,
                    ema: EMAModel | None = None) -> None:
    """Full training state under a temporary name, renamed when complete; then prune old ones.

    Accelerate writes the models (safetensors), optimizer and RNG states (read back with
    `weights_only`); everything else goes to JSON and safetensors here, never to a pickle: a
    downloaded or tampered checkpoint cannot run code when resumed."""
    root, prefix = Path(config.output_dir) / "checkpoints", stage.checkpoint_prefix
    # One name every process agrees on (no pid): each writes its own files into it.
    final, partial = root / f"{prefix}step-{step}", root / f".partial-{prefix}step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            shadow = {f"shadow.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(ema.shadow_params)}
            save_file(shadow, str(partial / EMA_FILE))
            state = {**state, "ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        (partial / "config.yaml").write_text(to_yaml(config))
        give_umask_modes(partial)
        replace_directory(partial, final)
        prune_checkpoints(config, stage, step)
    accelerator.wait_for_everyone()


def prune_checkpoints(config: Config, stage: StageSettings, step: int) -> None:
    """Keep at most `checkpoints_total_limit` checkpoints up to the one just written (`step`).

    Only checkpoints older than it are removed, and of those only ones this run wrote or ones older than
    the checkpoint it resumed from; never that checkpoint, never a newer step. A run rolled back to an
    older checkpoint (resume_from_checkpoint: <path>) thus keeps its starting point and the newer
    checkpoints of the line it left, however it ends."""
    limit = config.checkpoints_total_limit
    if limit is None:
        return
    base = None if config.resume_from_checkpoint in (None, "latest") else Path(config.resume_from_checkpoint).resolve()
    prefix, every = stage.checkpoint_prefix, stage.checkpointing_steps
    base_step = int(base.name.rsplit("-", 1)[1]) if base and base.name.startswith(f"{prefix}step-") else None

    def removable(number: int, path: Path) -> bool:
        if number >= step or path.resolve() == base:
            return False
        # Past the base, this run saved (and so replaced) every multiple of `every` up to `step`.
        return base_step is None or number < base_step or (every > 0 and number % every == 0)

    found = checkpoint_steps(config, prefix)
    excess = sum(number <= step for number, _ in found) - limit
    for number, path in found:  # oldest first
        if excess > 0 and removable(number, path):
            shutil.rmtree(path)
            excess -= 1


def checkpoint_trained_weights_only(accelerator: Accelerator) -> None:
    """Make the checkpoints of this run hold only the weights it trains (a LoRA's adapters), not the frozen rest,
    which is read from its pretrained source again on resume: a few MB instead of the whole UNet. A pair of
    Accelerate state hooks: names are those of the unwrapped model, the same at any process count, and a resume
    reads exactly the trainable weights back, or refuses the checkpoint by name."""
    def save_trained(models, weights, output_dir):
        for i, model in enumerate(models):
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            # contiguous: a channels_last convolution's adapter is not, and safetensors stores only packed tensors
            weights[i] = {name.removeprefix("module."): tensor.contiguous() for name, tensor in weights[i].items()
                          if name in trained}

    def load_trained(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            model = accelerator.unwrap_model(model)
            expected = {name for name, p in model.named_parameters() if p.requires_grad}
            saved = load_file(str(path)) if path.is_file() else {}
            if set(saved) != expected:
                raise ConfigError(f"resume_from_checkpoint: {path} holds {len(saved)} weights, not the "
                                  f"{len(expected)} trained ones of this run (its LoRA adapters); it was written by "
                                  "another run. Resume from a checkpoint of this run, or start a new output_dir")
            model.load_state_dict(saved, strict=False)  # the frozen rest stays as loaded from the base
        models.clear()  # loaded here: Accelerate's strict load would miss the frozen weights

    accelerator.register_save_state_pre_hook(save_trained)
    accelerator.register_load_state_pre_hook(load_trained)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, ema: EMAModel | None = None) -> dict:
    """Restore what `save_checkpoint` wrote; returns the saved state (step counters, LR schedule).

    Pickled state is refused, not loaded: Accelerate reads its .bin/.pkl files with
    `weights_only=True` (tensors and plain containers only), and a file it cannot read that way
    stops the resume here with the file's name."""
    refuse_pickled_state(checkpoint)
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} has no {STATE_FILE}; it is incomplete or was "
                          "written by an older ldm_pipeline. Resume from another checkpoint or start a new output_dir")
    for rng_file in checkpoint.glob("random_states_*.pkl"):  # Accelerate skips an unreadable one silently
        _safe_load(rng_file)
    try:
        accelerator.load_state(str(checkpoint))
    except UnpicklingError as error:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} holds a file that is not plain tensor data "
                          f"(refused: loading it could run code): {str(error).splitlines()[0]}") from error
    state = json.loads(state_file.read_text())
    if ema is not None:
        if "ema" not in state or not (checkpoint / EMA_FILE).is_file():
            raise ConfigError(f"resume_from_checkpoint: {checkpoint} has no EMA weights but use_ema is on; resume "
                              "with use_ema: false or start a new output_dir")
        shadow = load_file(str(checkpoint / EMA_FILE))
        if len(shadow) != len(ema.shadow_params):
            raise ConfigError(f"resume_from_checkpoint: {checkpoint / EMA_FILE} holds {len(shadow)} tensors for a "
                              f"model of {len(ema.shadow_params)}; it belongs to another model")
        ema.load_state_dict({**state["ema"], "shadow_params": None})
        with torch.no_grad():  # in place: the EMA stays on the device and in the dtype of its model
            for i, tensor in enumerate(ema.shadow_params):
                tensor.copy_(shadow[f"shadow.{i}"])
    return state


def refuse_pickled_state(checkpoint: Path) -> None:
    pickled = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} holds pickled training state ({', '.join(pickled)}), "
                          "which can run code when loaded; it was written by an older ldm_pipeline or modified. "
                          "Resume from a checkpoint written by this version, or start a new output_dir")


def _safe_load(path: Path):
    try:
        return accelerate_load(path, weights_only=True)
    except UnpicklingError as error:
        raise ConfigError(f"resume_from_checkpoint: {path} is not plain tensor data (refused: loading it could "
                          f"run code): {str(error).splitlines()[0]}") from error
