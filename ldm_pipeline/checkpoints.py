"""The run directory and crash-safe checkpoints.

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
from pathlib import Path
from pickle import UnpicklingError  # what a weights_only load raises; nothing here unpickles

import torch
import yaml
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, to_yaml
from .pipeline import replace_directory

# A run resumes only with the settings it was started with where they shape the model, the data it
# sees or the random draws of its steps. Every other key is read from the config at each (re)start;
# learning-rate and Adam settings are re-applied to the restored optimizer (train.restore_hyperparameters).
RESUME_KEYS = ("model", "resolution", "prediction_type", "stages", "seed", "train_text_encoder", "use_ema",
               "data.train_data_dir", "data.dataset_name", "data.dataset_config_name", "data.image_column",
               "data.caption_column", "data.caption_template", "data.center_crop", "data.random_flip",
               "data.max_train_samples", "data.make_shapes", "data.on_bad_image",
               "validation.num_heldout", "vae_training.psnr_samples")  # these two pick the training rows
# Once <output_dir>/vae holds the finished VAE it is reused as it is: its training settings are fixed.
FINISHED_VAE_KEYS = tuple(f"vae_training.{key}" for key in (
    "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "kl_weight",
    "foreground_weight", "max_grad_norm", "scaling_samples", "psnr_samples"))


def check_output_dir(config: Config, num_processes: int = 1) -> None:
    """Refuse to mix runs: an existing run is continued (resume) or replaced (overwrite), never both,
    and continued only with the settings it was made with. Reads only, so a refused run leaves the old
    one untouched."""
    out = Path(config.output_dir)
    run_config = out / "config.yaml"
    if run_config.is_file() and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {out} already holds a training run. Set resume_from_checkpoint: latest to "
            "continue it, overwrite_output_dir: true to replace it, or choose another output_dir.")
    if run_config.is_file() and config.resume_from_checkpoint:
        keys = RESUME_KEYS + (FINISHED_VAE_KEYS if (out / "vae" / "config.json").is_file() else ())
        _refuse_changes(run_config, config, keys, f"output_dir: {out} holds a run made with", "output_dir")
    vae_finished = (out / "vae" / "config.json").is_file()
    for prefix, stage in (("vae-", "vae"), ("", "unet")):
        checkpoint = find_resume_checkpoint(config, prefix)
        if checkpoint is None:
            continue
        if stage not in config.stages or (stage == "vae" and vae_finished):
            raise ConfigError(f"resume_from_checkpoint: {checkpoint} is a checkpoint of the {stage} stage, which "
                              f"this run does not train; give a checkpoint of the "
                              f"{'unet stage (step-N)' if stage == 'vae' else 'vae stage (vae-step-N)'} or 'latest'")
        if stage == "unet" and "vae" in config.stages and not vae_finished:
            raise ConfigError(f"resume_from_checkpoint: {checkpoint} is a UNet checkpoint but {out / 'vae'} holds no "
                              "finished VAE; resume a run whose VAE stage is done, or use 'latest'")
        _refuse_changes(checkpoint / "config.yaml", config, RESUME_KEYS, f"resume_from_checkpoint: {checkpoint} was "
                        "written with", "checkpoint")
        _check_position(checkpoint, config, stage, num_processes)


def _refuse_changes(saved_file: Path, config: Config, keys, what: str, kind: str) -> None:
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = yaml.safe_load(to_yaml(config))  # the same round trip as the saved one (tuples become lists)
    different = []
    for key in keys:
        *parents, leaf = key.split(".")
        old, new = saved, current
        for part in parents:
            old, new = (old or {}).get(part, {}), new[part]
        different += _differences((old or {}).get(leaf), new[leaf], f"{key}.")
    if different:
        shown = "; ".join(f"{key}: {_value(saved, key)!r} -> {_value(current, key)!r}" for key in different[:4])
        raise ConfigError(f"{what} different settings ({shown}). These decide the model, its data or its random "
                          f"draws, so the run can only continue with its own ({saved_file}); start a new "
                          f"output_dir for the new settings" + (", or set overwrite_output_dir: true to replace "
                                                                  "the run" if kind == "output_dir" else ""))


def _value(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _check_position(checkpoint: Path, config: Config, stage: str, num_processes: int) -> None:
    """A checkpoint's data position counts global batches: the global batch may not change (the
    process count may, with the per-process batch), and the run may not already be past its end."""
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        return  # refused with its reason when loaded
    state = json.loads(state_file.read_text())
    settings = config.vae_training if stage == "vae" else config
    accumulation = 1 if stage == "vae" else config.gradient_accumulation_steps
    global_batch = settings.train_batch_size * num_processes * accumulation
    prefix = "vae_training." if stage == "vae" else ""
    if state.get("global_batch", global_batch) != global_batch:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was trained with a global batch of "
                          f"{state['global_batch']} samples, this run has {global_batch} ({prefix}train_batch_size "
                          f"{settings.train_batch_size} x {num_processes} processes x {accumulation} accumulation); "
                          f"resume with the same global batch (the process count may change) or start a new "
                          "output_dir")
    if state["step"] > settings.max_train_steps:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} is at step {state['step']}, past "
                          f"{prefix}max_train_steps {settings.max_train_steps}; raise {prefix}max_train_steps, or "
                          "give an earlier checkpoint (resume_from_checkpoint: <output_dir>/checkpoints/step-N)")


def prepare_output_dir(accelerator: Accelerator, config: Config) -> None:
    """Clear a replaced run and write the resolved config; call after `check_output_dir`.

    Every process checks first and waits here, so no process reads the config.yaml that the main
    process is about to write as a sign of an earlier run."""
    accelerator.wait_for_everyone()
    out = Path(config.output_dir)
    previous = out / "config.yaml"
    if accelerator.is_main_process:
        if previous.is_file() and config.overwrite_output_dir and not config.resume_from_checkpoint:
            # The latent cache survives (it is keyed by what it was built from), unless this run
            # retrains the VAE that made it: then it would only be refused as stale after that stage.
            names = ["checkpoints", "pipeline", "samples", "vae", "logs", "config.yaml", "metrics.jsonl",
                     "text_encoder", "tokenizer", "run_data.json"]
            if "vae" in config.stages and config.data.latent_cache_dir is None:
                names.append("latent_cache")
            for name in names:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        previous.write_text(to_yaml(config))
        for partial in (out / "checkpoints").glob(".partial-*"):
            shutil.rmtree(partial)  # written by a run killed mid-save: incomplete by construction
    accelerator.wait_for_everyone()


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


def _differences(saved, current, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ["model.unet_kwargs.block_out_channels"]."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [key for name in sorted(set(saved) | set(current), key=str)
                for key in _differences(saved.get(name), current.get(name), f"{prefix}{name}.")]
    return [] if saved == current else [prefix.rstrip(".")]


STATE_FILE = "training_state.json"  # step counters, LR schedule, EMA settings: plain JSON
EMA_FILE = "ema.safetensors"  # the EMA's shadow weights


def save_checkpoint(accelerator: Accelerator, config: Config, prefix: str, step: int, state: dict,
                    ema: EMAModel | None = None) -> None:
    """Full training state under a temporary name, renamed when complete; then prune old ones.

    Accelerate writes the models (safetensors), optimizer and RNG states (read back with
    `weights_only`); everything else goes to JSON and safetensors here, never to a pickle: a
    downloaded or tampered checkpoint cannot run code when resumed."""
    root = Path(config.output_dir) / "checkpoints"
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
        replace_directory(partial, final)
        limit = config.checkpoints_total_limit
        if limit is not None:
            # Only checkpoints older than this one count: after resuming from an older checkpoint
            # (a rollback), the newer ones are someone's work and are never pruned here.
            older = [path for number, path in checkpoint_steps(config, prefix) if number < step]
            for old in older[:max(0, len(older) - (limit - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, ema: EMAModel | None = None) -> dict:
    """Restore what `save_checkpoint` wrote; returns the saved state (step counters, LR schedule).

    Pickled state is refused, not loaded: Accelerate reads its .bin/.pkl files with
    `weights_only=True` (tensors and plain containers only), and a file it cannot read that way
    stops the resume here with the file's name."""
    pickled = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} holds pickled training state ({', '.join(pickled)}), "
                          "which can run code when loaded; it was written by an older ldm_pipeline or modified. "
                          "Resume from a checkpoint written by this version, or start a new output_dir")
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


def _safe_load(path: Path):
    from accelerate.utils import load

    try:
        return load(path, weights_only=True)
    except UnpicklingError as error:
        raise ConfigError(f"resume_from_checkpoint: {path} is not plain tensor data (refused: loading it could "
                          f"run code): {str(error).splitlines()[0]}") from error
