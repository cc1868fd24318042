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
import zipfile
from pathlib import Path
from pickle import UnpicklingError  # what a weights_only load raises; nothing here unpickles

import torch
import yaml
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, _safe_yaml, to_yaml
from .locks import directory_lock
from .pipeline import replace_directory

# A run resumes only with the settings it was started with where they shape the model, the data it
# sees or the random draws of its steps. Every other key is read from the config at each (re)start;
# learning-rate and Adam settings are re-applied to the restored optimizer (loop.restore_hyperparameters).
RESUME_KEYS = ("model", "resolution", "prediction_type", "stages", "seed", "train_text_encoder", "use_ema", "lora",
               "data.train_data_dir", "data.dataset_name", "data.dataset_config_name", "data.image_column",
               "data.caption_column", "data.caption_template", "data.center_crop", "data.random_flip",
               "data.max_train_samples", "data.make_shapes", "data.on_bad_image", "data.streaming",
               "validation.num_heldout", "vae_training.psnr_samples")  # these two pick the training rows
# Once <output_dir>/vae holds the finished VAE it is reused as it is: its training settings are fixed.
FINISHED_VAE_KEYS = tuple(f"vae_training.{key}" for key in (
    "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "kl_weight",
    "foreground_weight", "max_grad_norm", "scaling_samples", "psnr_samples"))


def output_dir_lock(output_dir, hold: bool = True):
    """One training run per `output_dir`, for the whole run; only the main process takes the lock (`hold`)."""
    return directory_lock(output_dir, "output_dir", "training run", ConfigError, hold)


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
        check_checkpoint_files(checkpoint)
        _refuse_changes(checkpoint / "config.yaml", config, RESUME_KEYS, f"resume_from_checkpoint: {checkpoint} was "
                        "written with", "checkpoint")
        _check_position(checkpoint, config, stage, num_processes)


def _refuse_changes(saved_file: Path, config: Config, keys, what: str, kind: str) -> None:
    saved = _safe_yaml(saved_file.read_text(), str(saved_file)) or {}  # bounded: a hostile file cannot hang it
    current = yaml.safe_load(to_yaml(config))  # the same round trip as the saved one (tuples become lists)
    defaults = yaml.safe_load(to_yaml(Config()))
    different = []
    for key in keys:
        *parents, leaf = key.split(".")
        old, new, default = saved, current, defaults
        for part in parents:
            old, new, default = (old or {}).get(part, {}), new[part], default[part]
        # A key newer than the saved run (e.g. lora) was not there to set: the run had its default.
        different += _differences((old or {}).get(leaf, default[leaf]), new[leaf], f"{key}.")
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


def prepare_output_dir(accelerator: Accelerator, config: Config) -> None:
    """Clear a replaced run and write the resolved config; call after `check_output_dir`.

    Every process checks first and waits here, so no process reads the config.yaml that the main
    process is about to write as a sign of an earlier run."""
    accelerator.wait_for_everyone()
    out = Path(config.output_dir)
    previous = out / "config.yaml"
    if accelerator.is_main_process:
        if previous.is_file() and config.overwrite_output_dir and not config.resume_from_checkpoint:
            kept = clear_previous_run(out, config)
            if kept:
                print(f"overwrite_output_dir: removed the previous run's files from {out}; kept what it did not "
                      f"write: {', '.join(kept[:10])}" + (f" and {len(kept) - 10} more" if len(kept) > 10 else ""))
        out.mkdir(parents=True, exist_ok=True)
        previous.write_text(to_yaml(config))
        for partial in (out / "checkpoints").glob(".partial-*"):
            shutil.rmtree(partial)  # written by a run killed mid-save: incomplete by construction
    accelerator.wait_for_everyone()


# What a run writes into its output_dir, and so all that overwrite_output_dir removes: its files, the
# folders it writes whole, its own entries in folders a user may add files to, and the temporary names
# of interrupted writes (`pipeline.tmp-<pid>`, `vae.old-<pid>` ...).
RUN_FILES = re.compile(r"config\.yaml|metrics\.jsonl|run_data\.json|(pipeline|vae|latent_cache|lora)\.(tmp|old)(-\d+)?")
RUN_FOLDERS = ("pipeline", "vae", "text_encoder", "tokenizer", "lora")
RUN_ENTRIES = {
    "checkpoints": re.compile(r"(\.partial-)?(vae-)?step-\d+"),
    "samples": re.compile(r"(step-\d+|final)\.(png|txt)|vae\.png"),  # the validation grids, the VAE's
    "logs": re.compile(r"ldm_pipeline"),  # the trackers' folder, named by init_trackers
}


def clear_previous_run(out: Path, config: Config) -> list[str]:
    """Remove what the previous run in `out` wrote (see RUN_FILES ...); returns what was kept."""
    targets = [out / name for name in RUN_FOLDERS]
    # The latent cache survives (it is keyed by what it was built from), unless this run retrains the
    # VAE that made it: then it would only be refused as stale after that stage.
    if "vae" in config.stages and config.data.latent_cache_dir is None:
        targets.append(out / "latent_cache")
    targets += [path for path in out.iterdir() if RUN_FILES.fullmatch(path.name)]
    for folder, pattern in RUN_ENTRIES.items():
        if (out / folder).is_dir():
            targets += [path for path in (out / folder).iterdir() if pattern.fullmatch(path.name)]
    for target in targets:
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    kept = []
    for folder in RUN_ENTRIES:
        if (out / folder).is_dir():
            left = sorted(path.name for path in (out / folder).iterdir())
            kept += [f"{folder}/{name}" for name in left]
            if not left:
                (out / folder).rmdir()
    return sorted(kept)


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
        prune_checkpoints(config, prefix, step)
    accelerator.wait_for_everyone()


def prune_checkpoints(config: Config, prefix: str, step: int) -> None:
    """Keep at most `checkpoints_total_limit` checkpoints up to the one just written (`step`).

    Only checkpoints older than it are removed, and of those only ones this run wrote or ones older than
    the checkpoint it resumed from; never that checkpoint, never a newer step. A run rolled back to an
    older checkpoint (resume_from_checkpoint: <path>) thus keeps its starting point and the newer
    checkpoints of the line it left, however it ends."""
    limit = config.checkpoints_total_limit
    if limit is None:
        return
    base = None if config.resume_from_checkpoint in (None, "latest") else Path(config.resume_from_checkpoint).resolve()
    base_step = int(base.name.rsplit("-", 1)[1]) if base and base.name.startswith(f"{prefix}step-") else None
    every = config.vae_training.checkpointing_steps if prefix == "vae-" else config.checkpointing_steps

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
    which is read from its pretrained source again on resume: a few MB instead of the whole UNet. Names are
    those of the unwrapped model, the same at any process count; `load_checkpoint(..., trained_only=...)` reads
    them back."""
    def keep_trained(models, weights, output_dir):
        for i, model in enumerate(models):
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            # contiguous: a channels_last convolution's adapter is not, and safetensors stores only packed tensors
            weights[i] = {name.removeprefix("module."): tensor.contiguous() for name, tensor in weights[i].items()
                          if name in trained}

    accelerator.register_save_state_pre_hook(keep_trained)


def _load_trained_weights(accelerator: Accelerator, checkpoint: Path, models) -> None:
    """The weights `checkpoint_trained_weights_only` saved, into the unwrapped `models`: exactly their trainable
    ones, or the checkpoint is refused by name."""
    for i, model in enumerate(models):
        path = checkpoint / (f"model_{i}.safetensors" if i else "model.safetensors")
        model = accelerator.unwrap_model(model)
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        saved = load_file(str(path)) if path.is_file() else {}
        if set(saved) != expected:
            raise ConfigError(f"resume_from_checkpoint: {path} holds {len(saved)} weights, not the {len(expected)} "
                              "trained ones of this run (its LoRA adapters); it was written by another run. Resume "
                              "from a checkpoint of this run, or start a new output_dir")
        model.load_state_dict(saved, strict=False)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, ema: EMAModel | None = None,
                    trained_only: list | None = None) -> dict:
    """Restore what `save_checkpoint` wrote; returns the saved state (step counters, LR schedule).
    `trained_only`: the models whose checkpoints hold only their trained weights (`checkpoint_trained_weights_only`).

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
    if trained_only:
        _load_trained_weights(accelerator, checkpoint, trained_only)
    try:
        # Non-strict for trained-only files: they lack the frozen weights, which stay as loaded from the base.
        accelerator.load_state(str(checkpoint), strict=not trained_only)
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
    from accelerate.utils import load

    try:
        return load(path, weights_only=True)
    except UnpicklingError as error:
        raise ConfigError(f"resume_from_checkpoint: {path} is not plain tensor data (refused: loading it could "
                          f"run code): {str(error).splitlines()[0]}") from error
