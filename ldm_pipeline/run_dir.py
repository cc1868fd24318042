"""The run directory: one run per `output_dir` (a lock), a finished run continued or replaced but never mixed,
and the write-then-rename every saved result goes through (checkpoints, pipeline, LoRA, VAE, latent cache).

Nothing here knows what a stage or a model is; `checkpoints.py` checks the checkpoints a resume would read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml
from accelerate import Accelerator

from .config import FIXED, Config, ConfigError, fields_with, get_setting, safe_yaml, to_yaml
from .locks import directory_lock


def replace_directory(partial: Path, final: Path) -> None:
    """Move a completely written `partial` directory to `final`, never leaving `final` half-written:
    an old `final` is renamed aside first and removed only once the new one is in place."""
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def current_umask() -> int:
    umask = os.umask(0o077)  # read by setting it: a file another thread makes meanwhile is private, never open
    os.umask(umask)
    return umask


def give_umask_modes(path: Path) -> None:
    """Give `path` (and everything under a directory) the modes a file the user writes gets: libraries that write
    through their own temporary file (safetensors, tempfile.mkstemp) leave it 0600 whatever the umask, so other users
    and web servers could not read it."""
    umask = current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def written_then_renamed(final: Path):
    """Yield a hidden temporary path beside `final` (`.partial-<name>-<pid><suffix>`) to write a file or a directory
    into; when the block completes it gets the user's umask modes and takes `final`'s place, so `final` is only
    ever absent, old or whole. A block that fails removes what it wrote and leaves `final` as it was."""
    final = Path(final)
    partial = final.with_name(f".partial-{final.stem}-{os.getpid()}{final.suffix}")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    give_umask_modes(partial)
    if partial.is_dir():
        replace_directory(partial, final)
    else:
        os.replace(partial, final)


def write_json(path: Path, value: dict) -> None:
    with written_then_renamed(path) as partial:
        partial.write_text(json.dumps(value, indent=2))


RUN_DATA_FILE = "run_data.json"  # the data a run started with: for its resume checks and its model card
SKIPPED_IMAGES_FILE = "skipped_images.txt"  # in output_dir: each image skipped (data.skip_bad_images) and why
CHECKPOINT = re.compile(r"(vae-)?step-\d+")  # a complete checkpoint's name (a partial one is .partial-step-N)


def run_started(out: Path) -> bool:
    """Whether `out` holds a run that trained: a checkpoint of either stage, or a finished stage (vae/, pipeline/,
    lora/). A run stopped before its first trained step (bad data found while its latent cache was built, say)
    holds only what it wrote to set itself up; the same command run again starts it over, with or without
    resume_from_checkpoint, rather than refusing it as an existing run whose data changed."""
    if any((out / name).exists() for name in ("vae", "pipeline", "lora")):
        return True
    checkpoints = out / "checkpoints"
    return checkpoints.is_dir() and any(CHECKPOINT.fullmatch(path.name) for path in checkpoints.iterdir())


def output_dir_lock(output_dir, hold: bool = True):
    """One training run per `output_dir`, for the whole run; only the main process takes the lock (`hold`)."""
    return directory_lock(output_dir, "output_dir", "training run", ConfigError, hold)


def check_output_dir(config: Config) -> None:
    """Refuse to mix runs: an existing run is continued (resume) or replaced (overwrite), never both,
    and continued only with the settings it was made with. A run that trained no step is no existing run
    (`run_started`). Reads only, so a refused run leaves the old one untouched."""
    out = Path(config.output_dir)
    run_config = out / "config.yaml"
    if not run_started(out):
        return  # no run, or one that trained no step: it starts over (prepare_output_dir clears what it wrote)
    if run_config.is_file() and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {out} already holds a training run. Set resume_from_checkpoint: latest to "
            "continue it, overwrite_output_dir: true to replace it, or choose another output_dir.")
    if run_config.is_file() and config.resume_from_checkpoint:
        keys = fields_with(FIXED)
        if (out / "vae" / "config.json").is_file():  # the finished VAE is reused as it is
            keys += [key for key in fields_with(vae_result=True) if key not in keys]
        refuse_changed_settings(run_config, config, keys, f"output_dir: {out} holds a run made with", "output_dir")


def refuse_changed_settings(saved_file: Path, config: Config, keys, what: str, kind: str) -> None:
    """Refuse `config` when one of `keys` differs from the config saved in `saved_file`."""
    saved = safe_yaml(saved_file.read_text(), str(saved_file)) or {}  # bounded: a hostile file cannot hang it
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
        shown = "; ".join(f"{key}: {get_setting(saved, key)!r} -> {get_setting(current, key)!r}"
                          for key in different[:4])
        raise ConfigError(f"{what} different settings ({shown}). These decide the model, its data or its random "
                          f"draws, so the run can only continue with its own ({saved_file}); start a new "
                          f"output_dir for the new settings" + (", or set overwrite_output_dir: true to replace "
                                                                  "the run" if kind == "output_dir" else ""))


def _differences(saved, current, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ["model.unet_kwargs.block_out_channels"]."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [key for name in sorted(set(saved) | set(current), key=str)
                for key in _differences(saved.get(name), current.get(name), f"{prefix}{name}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def prepare_output_dir(accelerator: Accelerator, config: Config) -> None:
    """Clear a replaced run and write the resolved config; call after `check_output_dir`.

    Every process checks first and waits here, so no process reads the config.yaml that the main
    process is about to write as a sign of an earlier run."""
    accelerator.wait_for_everyone()
    out = Path(config.output_dir)
    previous = out / "config.yaml"
    if accelerator.is_main_process:
        if previous.is_file() and not run_started(out):
            clear_previous_run(out, config)
            print(f"output_dir: {out} holds a run that stopped before its first trained step (no checkpoint, no "
                  "finished stage): starting it over")
        elif previous.is_file() and config.overwrite_output_dir and not config.resume_from_checkpoint:
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
# of interrupted writes (`.partial-pipeline-<pid>`, `vae.old-<pid>`, and older versions' `pipeline.tmp-<pid>` ...).
RUN_FILES = re.compile(r"config\.yaml|metrics\.jsonl|run_data\.json|skipped_images\.txt"
                       r"|(pipeline|vae|latent_cache|lora|text_encoder|tokenizer)\.(tmp|old)(-\d+)?"
                       r"|\.partial-(pipeline|vae|lora|text_encoder|tokenizer|run_data|skipped_images)-\d+(\.json|\.txt)?"
                       r"|\.(text_encoder|tokenizer)\.tmp")
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
        _remove(target)
    kept = []
    for folder in RUN_ENTRIES:
        if (out / folder).is_dir():
            left = sorted(path.name for path in (out / folder).iterdir())
            kept += [f"{folder}/{name}" for name in left]
            if not left:
                (out / folder).rmdir()
    return sorted(kept)


def list_skipped_images(output_dir: Path, reasons: list[str]) -> None:
    """<output_dir>/skipped_images.txt: one "path: reason" line per image the run left out (none: no file), and
    their count in run_data.json (for the model card)."""
    out = Path(output_dir)
    listed = out / SKIPPED_IMAGES_FILE
    if reasons:
        with written_then_renamed(listed) as partial:
            partial.write_text("".join(f"{reason}\n" for reason in reasons))
    else:
        listed.unlink(missing_ok=True)
    if (out / RUN_DATA_FILE).is_file():
        record = json.loads((out / RUN_DATA_FILE).read_text())
        if record.get("skipped_images") != len(reasons):
            write_json(out / RUN_DATA_FILE, {**record, "skipped_images": len(reasons)})
