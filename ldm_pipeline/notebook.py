"""What the notebooks share: fast mode, where they write, the shapes run they train, loss plots.

Two environment variables, read by each notebook's first cell through `notebook_settings()`:

- `LDM_PIPELINE_FAST=1`: tiny models, 200 images at 32 px and a few dozen steps, so a notebook runs
  in well under a minute on two CPU cores (the test suite runs them this way);
- `LDM_PIPELINE_WORKDIR=DIR`: where runs, data and images go (default: the repository's `outputs/`).

matplotlib and IPython are imported inside the functions that draw: they are notebook extras.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config

FAST_ENV, WORKDIR_ENV = "LDM_PIPELINE_FAST", "LDM_PIPELINE_WORKDIR"
REPO = Path(__file__).resolve().parents[1]  # the checkout, when the package runs from one

# The notebook's own shapes run: train_configs/shapes.yaml with these sizes. The full-size model is
# `accelerate launch train.py --config train_configs/shapes.yaml`; the notebooks use it when present.
SIZES = {
    # ~15 s with one CPU thread; the images only show that every part is wired up
    "fast": dict(images=200, resolution=32, preset="tiny", vae_steps=20, unet_steps=30, batch=8,
                 validation_every=15, validation_seeds=[0], sampling_steps=6),
    # ~12 min with one CPU thread (measured ~1 s per VAE step, ~0.45 s per UNet step); sized for a
    # first look, not checked for image quality
    "full": dict(images=2000, resolution=64, preset="small", vae_steps=400, unet_steps=600, batch=32,
                 validation_every=200, validation_seeds=[0, 1, 2, 3], sampling_steps=20),
}


@dataclass(frozen=True)
class NotebookSettings:
    fast: bool
    workdir: Path

    @property
    def sizes(self) -> dict:
        return SIZES["fast" if self.fast else "full"]

    @property
    def sampling_steps(self) -> int:
        return self.sizes["sampling_steps"]


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{name}={value!r}: use 1 to turn fast mode on, or 0 / unset for the full notebooks")


def notebook_settings() -> NotebookSettings:
    """Fast mode and the output folder, from LDM_PIPELINE_FAST and LDM_PIPELINE_WORKDIR."""
    default = REPO / "outputs" if (REPO / "pyproject.toml").is_file() else Path.cwd() / "outputs"
    workdir = Path(os.environ.get(WORKDIR_ENV) or default).expanduser().resolve()
    return NotebookSettings(fast=_flag(FAST_ENV), workdir=workdir)


def shapes_overrides(settings: NotebookSettings, name: str = "notebook-shapes") -> list[str]:
    """`--set`-style overrides that shrink train_configs/shapes.yaml to the notebook's sizes."""
    size = settings.sizes
    suffix = "-fast" if settings.fast else ""
    data_dir = settings.workdir / "data" / f"shapes-{size['resolution']}px-{size['images']}"
    return [
        f"output_dir={json.dumps(str(settings.workdir / (name + suffix)))}",  # quoted: any path is one string
        f"data.train_data_dir={json.dumps(str(data_dir))}",
        f"data.make_shapes={{num_images: {size['images']}, seed: 0}}",
        f"resolution={size['resolution']}",
        f"model.vae={size['preset']}", f"model.unet={size['preset']}", f"model.text_encoder={size['preset']}",
        f"vae_training.max_train_steps={size['vae_steps']}",
        f"vae_training.train_batch_size={size['batch']}",
        f"vae_training.lr_warmup_steps={size['vae_steps'] // 10}",
        f"vae_training.scaling_samples={size['images'] // 2}",
        f"vae_training.psnr_samples={size['images'] // 10}",
        # A notebook-sized VAE trains for a fraction of the recipe's steps: show its check, do not stop on it.
        "vae_training.on_check_failure=warn",
        f"max_train_steps={size['unet_steps']}",
        f"train_batch_size={size['batch']}",
        f"lr_warmup_steps={size['unet_steps'] // 10}",
        f"checkpointing_steps={size['unet_steps'] // 2}",
        "logging_steps=5",
        f"validation.validation_steps={size['validation_every']}",
        f"validation.seeds={size['validation_seeds']}",
        f"validation.num_heldout={size['images'] // 10}",
        f"sampling.num_inference_steps={size['sampling_steps']}",
    ]


def shapes_config(settings: NotebookSettings, name: str = "notebook-shapes", extra: list[str] = ()) -> Config:
    return load_config("shapes", overrides=shapes_overrides(settings, name) + list(extra))


def shapes_pipeline(settings: NotebookSettings) -> Path:
    """A trained shapes pipeline: the full run's (`<workdir>/shapes/pipeline`) if there is one, else
    the notebook-sized run's, trained now if it is missing (a half-finished run is resumed)."""
    full = settings.workdir / "shapes" / "pipeline"
    if (full / "model_index.json").is_file():
        return full
    config = shapes_config(settings)
    pipeline = Path(config.output_dir) / "pipeline"
    if (pipeline / "model_index.json").is_file():
        return pipeline
    from .training import train  # torch and diffusers: only when a run is needed

    return train(config)


def show_images(images, titles=None, rows: int = 1, size: float = 1.7, title: str | None = None) -> None:
    """Show PIL images in a grid with optional per-image titles (nearest-neighbour: tiny images
    stay sharp)."""
    import matplotlib.pyplot as plt

    cols = -(-len(images) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.5 if title else 0.2)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles or [None] * len(images)):
        ax.imshow(image, interpolation="nearest")
        if text:
            ax.set_title(text, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.show()


# --- training curves ---------------------------------------------------------------------------------


def read_metrics(path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a missing file is no rows: the run has not logged yet)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the trainer may be halfway through writing the last line
            break
    return rows


def plot_metrics(rows: list[dict], axes=None):
    """Training loss per stage (VAE and UNet on their own axes) with the UNet's held-out val_loss."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, stage in zip(axes, ("vae", "unet")):
        train = [r for r in rows if r.get("stage") == stage and "loss" in r]
        val = [r for r in rows if r.get("stage") == stage and "val_loss" in r]
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out val_loss")
        ax.set_title(f"{stage} stage")
        ax.set_xlabel("optimizer step")
        if stage == "vae" and train:
            ax.set_yscale("log")
        if train or val:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
    return axes


@contextmanager
def live_metrics_plot(path, every_s: float = 2.0):
    """Redraw the loss curves from `path` (metrics.jsonl) every `every_s` seconds while the body
    runs (training stays in the main thread, where multi-process launchers need it), then once more
    at the end."""
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    lock, stop = threading.Lock(), threading.Event()

    def draw():
        with lock:
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
            plot_metrics(read_metrics(path), axes)
            fig.tight_layout()
            clear_output(wait=True)
            display(fig)
            plt.close(fig)

    def watch():
        seen = None
        while not stop.wait(every_s):
            size = Path(path).stat().st_size if Path(path).is_file() else 0
            if size != seen:
                seen = size
                draw()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        draw()
