"""The run directory and crash-safe checkpoints.

A checkpoint is Accelerate's full training state (`save_state`) plus the resolved config, written
under `checkpoints/.partial-<name>` and renamed to `checkpoints/<name>` only when complete, so
`latest` can only ever pick a complete one and a run killed mid-save loses nothing but that save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml
from accelerate import Accelerator

from .config import Config, ConfigError, to_yaml
from .pipeline import replace_directory


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
            check_checkpoint_config(checkpoint, config)


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
            names = ["checkpoints", "pipeline", "samples", "vae", "logs", "config.yaml", "metrics.jsonl"]
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
        limit = config.checkpoints_total_limit
        if limit is not None:
            for _, old in checkpoint_steps(config, prefix)[:-limit]:  # never the newest
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
