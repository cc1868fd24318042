"""The one hook through which a data domain plugs into the core, which never imports it.

A plug-in is an object found by its entry point in the group `ldm_pipeline.plugins` (pyproject.toml); the shapes
of the embedded default (`ldm_pipeline.shapes`) is one, and another package can add its own the same way. It has:

- `prepare_data(config, accelerator)`: write the training data the config asks it to make, if absent (the main
  process writes; every process returns once it is there);
- `planned_captions(config)`: the captions of the data it will make, one per image (`--dry-run` before the data
  exists), or None when the config asks it for nothing;
- `reconstruction_checker(captions)`: for captions of its own data, an object with `fields` (names) and
  `count_correct(images, captions) -> {field: count}` that judges a VAE's reconstructions; else None;
- `add_commands(subparsers)`: its `ldm-pipeline` commands, each with `run(args) -> exit code` as its default.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from .config import Config, ConfigError

GROUP = "ldm_pipeline.plugins"


@cache
def plugins() -> tuple:
    return tuple(point.load() for point in sorted(entry_points(group=GROUP), key=lambda point: point.name))


def prepare_data(config: Config, accelerator) -> None:
    for plugin in plugins():
        plugin.prepare_data(config, accelerator)
    root = config.data.train_data_dir
    if config.data.make_shapes is not None and not Path(root).exists():
        raise ConfigError(f"data.make_shapes: no plug-in wrote the shapes into {root} (none is registered in the "
                          f"'{GROUP}' entry points); install ldm_pipeline with pip install -e . so its shapes "
                          "plug-in is registered, or point data.train_data_dir at an image folder")


def planned_captions(config: Config) -> list[str] | None:
    return next((captions for plugin in plugins() if (captions := plugin.planned_captions(config)) is not None), None)


def reconstruction_checker(captions: list[str]):
    return next((checker for plugin in plugins() if (checker := plugin.reconstruction_checker(captions))), None)


def add_commands(subparsers) -> None:
    for plugin in plugins():
        plugin.add_commands(subparsers)
