"""The saved pipeline directory: `save_pipeline` and `load_pipeline`.

A trained model is a standard diffusers `StableDiffusionPipeline` directory; we add one small
file, `ldm_pipeline.json`, with the sampling defaults the model was validated with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from .card import SAMPLE_GRID, minimal_card
from .config import ConfigError, SamplingConfig
from .lora import check_lora_family, load_lora, read_lora_dir
from .models import make_sampler, pipeline_family, vae_scale_factor
from .run_dir import written_then_renamed
from .tokenizer import save_tokenizer

DEFAULTS_FILE = "ldm_pipeline.json"
# Components of Stable Diffusion 1.x repos we never load (load_pipeline passes None for them), so a copy may lack
# their folders.
NOT_LOADED = ("safety_checker", "feature_extractor")
FALLBACK_DEFAULTS = {"scheduler": "dpmsolver++", "num_inference_steps": 25, "guidance_scale": 7.5}


def save_pipeline(directory, *, vae, text_encoder, tokenizer, unet, noise_scheduler, sampling: SamplingConfig,
                  extra: dict | None = None, card=None, sample_grid: Path | None = None, text_encoder_2=None,
                  tokenizer_2=None) -> Path:
    """Write a plain `StableDiffusionPipeline` directory (safetensors, no safety checker) atomically,
    with a model card (`card`, a huggingface_hub `ModelCard`; a minimal one by default) as README.md
    and the `sample_grid` image it shows. With `text_encoder_2` and `tokenizer_2` (SDXL) a
    `StableDiffusionXLPipeline` directory.

    Its scheduler is the sampler from `sampling`, configured from the training noise schedule, and
    with `extra={"resolution": R}` the UNet's `sample_size` is R / 8, so plain
    `StableDiffusionPipeline.from_pretrained` users get the fast sampler and the trained image size too
    (steps and guidance are arguments of diffusers' `__call__`, which no saved file sets).
    """
    directory = Path(directory)
    resolution = (extra or {}).get("resolution")
    if resolution and unet.config.sample_size != resolution // vae_scale_factor(vae):
        # Plain diffusers sizes its images from the UNet's sample_size: make that the trained resolution.
        unet.register_to_config(sample_size=resolution // vae_scale_factor(vae))
    scheduler = make_sampler(sampling.scheduler, noise_scheduler.config)
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    defaults = {"scheduler": sampling.scheduler, "num_inference_steps": sampling.num_inference_steps,
                "guidance_scale": sampling.guidance_scale, "guidance_rescale": sampling.guidance_rescale,
                **(extra or {})}
    with written_then_renamed(directory) as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
        for name, each in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
            if each is not None:  # adds vocab.json + merges.txt for older transformers
                save_tokenizer(each, partial / name)
        (partial / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))
        (card or minimal_card(directory.name, type(pipe).__name__)).save(partial / "README.md")
        if sample_grid is not None:
            shutil.copyfile(sample_grid, partial / SAMPLE_GRID)
    return directory


def best_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_pipeline(path_or_id: str | os.PathLike | None, device=None, dtype=None, scheduler: str | None = None,
                  lora: str | os.PathLike | None = None, variant: str | None = None):
    """A ready `StableDiffusionPipeline` (`StableDiffusionXLPipeline` for an SDXL directory or hub id): best device
    and dtype, our fast sampler.

    `pipe.generation_defaults` holds the steps, guidance and (for models trained here) image size the
    model was trained to be sampled with; `generate` and the CLI use them, and
    `pipe(prompt, **pipe.generation_defaults)` does the same by hand. A bare `pipe(prompt)` is diffusers'
    own call: our sampler and the UNet's size, but diffusers' 50 steps and guidance 7.5.
    `pipe.example_prompts`: training captions saved with the model (`example_prompts` in ldm_pipeline.json), or [].

    `lora`: a LoRA directory (<output_dir>/lora of a LoRA run), loaded with diffusers' `load_lora_weights`;
    `path_or_id` None then loads the base it names. `variant`: read the base's variant weight files, e.g.
    "fp16" (default: the LoRA's, else the plain files). Safety checker and feature extractor are never loaded.
    """
    if lora is not None:
        reference = read_lora_dir(lora)
        if path_or_id is None and not reference.get("base_model"):
            raise ConfigError(f"--lora {lora} does not name its base model (no base_model.json); give the base "
                              "with --model")
        path_or_id = path_or_id if path_or_id is not None else reference["base_model"]
        variant = variant or reference.get("variant")
    elif path_or_id is None:
        raise ConfigError("give a model: a pipeline directory or hub id (--model), or a LoRA directory (--lora)")
    path = Path(path_or_id).expanduser()
    if not path.exists() and str(path_or_id).startswith((".", "/", "~")):
        raise ConfigError(f"model {path_or_id} does not exist; give a trained pipeline directory "
                          "(e.g. outputs/shapes/pipeline) or a hub id")
    if path.exists() and not (path / "model_index.json").is_file():
        raise ConfigError(f"model {path_or_id} is not a diffusers pipeline directory (no model_index.json); "
                          "give <output_dir>/pipeline of a finished training run")
    if path.exists():
        check_pipeline_folders(path)
    saved = {}  # the sampling defaults and example prompts saved by training, read before any weights
    if (path / DEFAULTS_FILE).is_file():
        try:
            saved = json.loads((path / DEFAULTS_FILE).read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"it holds a {type(saved).__name__}, not a JSON object")
        except ValueError as error:
            raise ConfigError(f"model {path_or_id}: {DEFAULTS_FILE} cannot be read ({error}); copy the pipeline "
                              "directory again, or delete that file for the default sampling settings") from error
    example_prompts = saved.get("example_prompts", [])
    if not (isinstance(example_prompts, list) and all(isinstance(text, str) for text in example_prompts)):
        raise ConfigError(f"model {path_or_id}: {DEFAULTS_FILE} has example_prompts {example_prompts!r}; it must be "
                          "a list of prompts (strings): fix or remove that key")
    device = check_device(device) if device is not None else PartialState().device  # CUDA, MPS, ... else CPU
    dtype = dtype or best_dtype(device)
    family = pipeline_family(str(path_or_id))
    if lora is not None:
        check_lora_family(lora, path_or_id, family)
    # SDXL pipelines carry no safety checker; their invisible watermark is an optional package, left off.
    cls, options = (StableDiffusionXLPipeline, dict(add_watermarker=False)) if family == "sdxl" else \
        (StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False))
    try:
        pipe = cls.from_pretrained(str(path_or_id), dtype=dtype, use_safetensors=True, variant=variant, **options)
    except OSError as error:
        raise ConfigError(f"could not load model {path_or_id}: {' '.join(str(error).split())} Weights are read "
                          "as safetensors only (pickled .bin files are refused).") from error
    defaults = {**FALLBACK_DEFAULTS, **saved}
    defaults["scheduler"] = scheduler or defaults["scheduler"]
    pipe.scheduler = make_sampler(defaults["scheduler"], pipe.scheduler.config)
    pipe.generation_defaults = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}
    if defaults.get("guidance_rescale"):  # a zero-terminal-SNR model's (a pipeline __call__ argument, as the others)
        pipe.generation_defaults["guidance_rescale"] = defaults["guidance_rescale"]
    if defaults.get("resolution"):  # saved by training; without it diffusers' default size is used
        pipe.generation_defaults.update(height=defaults["resolution"], width=defaults["resolution"])
    pipe.scheduler_name = defaults["scheduler"]
    pipe.example_prompts = example_prompts
    pipe.lora_path = None
    if lora is not None:
        load_lora(pipe, lora)
        pipe.lora_path = str(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_pipeline_folders(path: Path) -> None:
    """Every component model_index.json lists must have its folder (a copy that missed tokenizer/ would
    otherwise fail with an unrelated error deep inside transformers)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except ValueError as error:
        raise ConfigError(f"model {path}: model_index.json cannot be read ({error}); copy the pipeline "
                          "directory again") from error
    missing = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
               and value[0] is not None and not (path / name).is_dir() and name not in NOT_LOADED]
    if missing:
        raise ConfigError(f"model {path} is incomplete: model_index.json lists {', '.join(missing)} but there is "
                          f"no {missing[0]}/ folder; copy the whole pipeline directory")


def check_device(device) -> torch.device:
    """A device this torch build can use, or an error saying which ones it can."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device {device!r} is not a device name ({' '.join(str(error).split())}); use cpu, "
                          "cuda, cuda:1, mps ... or leave it out for the best available") from error
    usable = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not usable.get(device.type, True):
        raise ConfigError(f"device {device}: this torch build has no {device.type.upper()} device it can use "
                          f"(torch {torch.__version__}); use --device cpu, or leave --device out for the best "
                          "available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


