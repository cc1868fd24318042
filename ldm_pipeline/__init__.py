"""ldm_pipeline: latent diffusion text-to-image training and generation on Hugging Face Diffusers.

    from ldm_pipeline import load_pipeline, generate, train
    pipe = load_pipeline("outputs/shapes/pipeline")
    images = generate(pipe, ["a red circle in the top left"], seeds=[0])

Importing the package has no side effects and loads neither torch nor diffusers: each name below is imported on
first use, so `ldm-pipeline --help` and everything that needs only the config stay fast.
"""

from importlib import import_module

from .config import Config, ConfigError, load_config

_LAZY = {"generate": "generation", "generate_batches": "generation", "read_png_metadata": "generation",
         "save_images": "generation", "load_pipeline": "pipeline"}

__all__ = ["Config", "ConfigError", "generate", "generate_batches", "load_config", "load_pipeline",
           "read_png_metadata", "save_images", "train"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ldm_pipeline' has no attribute {name!r}")


def train(config, dry_run: bool = False):
    """Train from a `Config` (or a YAML path or packaged config name) in this process; returns the pipeline
    directory (<output_dir>/lora for a LoRA run; None for a dry run)."""
    from .training import train as run

    if not isinstance(config, Config):
        config = load_config(config)
    return run(config, dry_run=dry_run)
