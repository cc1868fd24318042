"""The run directory and crash-safe checkpoints.

A checkpoint is Accelerate's full training state (`save_state`) plus the resolved config, written
under `checkpoints/.partial-<name>` and renamed to `checkpoints/<name>` only when complete, so
`latest` can only ever pick a complete one and a run killed mid-save loses nothing but that save.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open

from .config import Config, ConfigError, to_yaml
from .pipeline import replace_directory

LOCK_FILE = ".ldm_pipeline.lock"


@contextmanager
def output_dir_lock(output_dir, hold: bool = True):
    """Hold an exclusive lock on `output_dir` for a whole run; only the main process takes it (`hold`).

    The lock is `flock` on `<output_dir>/.ldm_pipeline.lock`: the OS drops it when the holding process
    ends, however it ends (SIGKILL too), so a lock file left behind never blocks the next run. Folders
    made here only to hold the lock are removed again if the run leaves them empty (a refused run
    leaves nothing behind).
    """
    if not hold:
        yield
        return
    out = Path(output_dir)
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    handle = _take_lock(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _take_lock(path: Path):
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its pid yet"
            handle.close()
            raise ConfigError(
                f"output_dir: {path.parent} is in use by another training run ({holder}; lock file {path}). "
                "Wait for that run to finish, or choose another output_dir. The lock ends with its process, "
                "even a killed one, so there is no stale lock to delete.") from None
        # The holder removes the file when it finishes: if that happened between our open and our lock,
        # we locked a file that no longer has this name, so take the lock again on the current one.
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def check_output_dir(config: Config) -> None:
    """Refuse to mix runs: an existing run is continued (resume) or replaced (overwrite), never both.
    Reads only, so a refused run leaves the old one untouched."""
    out = Path(config.output_dir)
    if (out / "config.yaml").is_file() and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {out} already holds a training run. Set resume_from_checkpoint: latest to "
            "continue it, overwrite_output_dir: true to replace it, or choose another output_dir.")
    for prefix in ("vae-", ""):
        checkpoint = find_resume_checkpoint(config, prefix)
        if checkpoint is not None:
            check_checkpoint_files(checkpoint)
            check_checkpoint_config(checkpoint, config)


def check_checkpoint_files(checkpoint: Path) -> None:
    """Read the header of every file of a checkpoint before resuming from it, so that a damaged one is
    named with the way out instead of failing deep inside `load_state`. (The data of a file is not
    checksummed: bytes flipped inside a tensor go unnoticed here.)"""
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
                raise ValueError("not a complete torch.save file")
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
RUN_FILES = re.compile(r"config\.yaml|metrics\.jsonl|(pipeline|vae|latent_cache)\.(tmp|old)(-\d+)?")
RUN_FOLDERS = ("pipeline", "vae")
RUN_ENTRIES = {
    "checkpoints": re.compile(r"(\.partial-)?(vae-)?step-\d+"),
    "samples": re.compile(r"(step-\d+|final)\.(png|txt)"),  # the validation grids
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


def check_checkpoint_config(checkpoint: Path, config: Config) -> None:
    """A checkpoint only resumes the model it was made for."""
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    current = yaml.safe_load(to_yaml(config))  # the same round trip as the saved one (tuples become lists)
    different = [key for name in ("model", "resolution", "prediction_type", "stages")
                 for key in _differences(saved.get(name), current[name], f"{name}.")]
    if different:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was written with a different "
                          f"{', '.join(different)}; resume with the config it was made with "
                          f"({checkpoint / 'config.yaml'}) or start a new output_dir")


def save_checkpoint(accelerator: Accelerator, config: Config, prefix: str, step: int) -> None:
    """Full training state under a temporary name, renamed when complete; then prune old ones."""
    root = Path(config.output_dir) / "checkpoints"
    final, partial = root / f"{prefix}step-{step}", root / f".partial-{prefix}step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
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
