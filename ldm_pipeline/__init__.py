"""ldm_pipeline: latent diffusion text-to-image training and generation on Hugging Face Diffusers.

    from ldm_pipeline import load_pipeline, generate
    pipe = load_pipeline("outputs/shapes/pipeline")
    images = generate(pipe, ["a red circle in the top left"], seeds=[0])
"""

import logging


class _DropNoise(logging.Filter):
    """Library messages that say nothing to our users: transformers offering a torchvision image processor
    (we load no image processor: no safety checker), diffusers warning about keeping an empty list of
    modules in float32 when the frozen VAE is cast for mixed precision, and diffusers noting that a LoRA of
    UNet adapters has none for the text encoder."""

    NOISE = ("requires torchvision (not installed); falling back", "should be kept in float32: []",
             "No LoRA keys associated to CLIPTextModel found")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.NOISE)


for _name in ("transformers.utils.import_utils", "diffusers.models.modeling_utils", "diffusers.loaders.lora_base"):
    logging.getLogger(_name).addFilter(_DropNoise())

from .config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Config", "ConfigError", "generate", "generate_batches", "load_config", "load_pipeline",
           "read_png_metadata", "save_images", "train"]


def __getattr__(name):
    # torch and diffusers load in seconds; import them on first use, so that `ldm-pipeline --help` and
    # everything that needs only the config stay fast.
    if name in ("generate", "generate_batches", "load_pipeline", "read_png_metadata", "save_images"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ldm_pipeline' has no attribute {name!r}")


def train(config, dry_run: bool = False):
    """Train from a `Config` (or a YAML path) in this process; returns the pipeline directory."""
    from .train import train as run

    if not isinstance(config, Config):
        config = load_config(config)
    return run(config, dry_run=dry_run)
