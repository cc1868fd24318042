"""What the user's screen shows: library messages and progress bars that say nothing to our users are turned off at
the entry points (the command line, training's `main`), never at import, so importing the package changes no one's
logging."""

from __future__ import annotations

import logging


class _DropNoise(logging.Filter):
    """transformers offering a torchvision image processor (we load no image processor: no safety checker),
    diffusers warning about keeping an empty list of modules in float32 when the frozen VAE is cast for mixed
    precision, and diffusers noting that a LoRA of UNet adapters has none for the text encoder."""

    NOISE = ("requires torchvision (not installed); falling back", "should be kept in float32: []",
             "No LoRA keys associated to CLIPTextModel found")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.NOISE)


NOISY_LOGGERS = ("transformers.utils.import_utils", "diffusers.models.modeling_utils", "diffusers.loaders.lora_base")


def quiet_library_logs() -> None:
    """Install the filter once on each noisy library logger (calling this again adds nothing), and turn off the
    libraries' own progress bars (transformers draws one for every model it saves); ours stay."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(item, _DropNoise) for item in logger.filters):
            logger.addFilter(_DropNoise())
    import diffusers  # here, not above: `ldm-pipeline --help` loads this module and should stay fast
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
