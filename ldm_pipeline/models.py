"""Component size presets (one registry) and builders for VAE, UNet, text encoder, tokenizer.

A component comes from a preset name, a local directory, or a hub id. Directories and hub ids go
through the same `from_pretrained` call, so what we test with local directories is what runs for
hub ids. Weights are read as safetensors only.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .config import ConfigError, ModelConfig
from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

_CROSS_DOWN, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers' `attention_head_dim` is the number of heads for UNet2DConditionModel (a historical
# naming quirk kept for checkpoint compatibility), so the values below count heads.
UNET_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                 norm_num_groups=8, down_block_types=(_CROSS_DOWN, _DOWN), up_block_types=(_UP, _CROSS_UP)),
    "small": dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=4,
                  norm_num_groups=16, down_block_types=(_CROSS_DOWN, _CROSS_DOWN),
                  up_block_types=(_CROSS_UP, _CROSS_UP)),
    "base": dict(block_out_channels=(128, 256, 512), layers_per_block=2, attention_head_dim=8,
                 down_block_types=(_CROSS_DOWN, _CROSS_DOWN, _DOWN), up_block_types=(_UP, _CROSS_UP, _CROSS_UP)),
    # Stable Diffusion 1.x: 859.5M parameters.
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 down_block_types=(_CROSS_DOWN,) * 3 + (_DOWN,), up_block_types=(_UP,) + (_CROSS_UP,) * 3),
}

# The SDXL family (Podell et al. 2023): no attention at the first level, several transformer blocks per attention
# at the deeper ones, linear projections into attention, and a "text_time" embedding added to the timestep's: the
# pooled text embedding and six numbers of size and crop micro-conditioning, each embedded in
# `addition_time_embed_dim` sinusoids.
UNET_XL_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=8,
                 transformer_layers_per_block=(1, 2), addition_time_embed_dim=8,
                 down_block_types=(_DOWN, _CROSS_DOWN), up_block_types=(_CROSS_UP, _UP)),
    "small": dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(4, 4), norm_num_groups=16,
                  transformer_layers_per_block=(1, 1), addition_time_embed_dim=32,
                  down_block_types=(_CROSS_DOWN, _CROSS_DOWN), up_block_types=(_CROSS_UP, _CROSS_UP)),
    # SDXL 1.0 base: 2567.5M parameters.
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), addition_time_embed_dim=256,
                 down_block_types=(_DOWN, _CROSS_DOWN, _CROSS_DOWN), up_block_types=(_CROSS_UP, _CROSS_UP, _UP)),
}
UNET_XL_COMMON = dict(use_linear_projection=True, addition_embed_type="text_time")

# Four blocks: three downsamplings, the factor 8 of Stable Diffusion's autoencoder.
VAE_PRESETS = {
    "tiny": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
    "small": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    "base": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32),
    # Stable Diffusion 1.x: 83.7M parameters.
    "sd15": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    # SDXL's: SD's layout with another latent scale; its activations overflow float16 (force_upcast: pipelines
    # decode in float32, and fp16 training keeps it in float32).
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 scaling_factor=0.13025, force_upcast=True),
}

# vocab_size / max_position_embeddings of None are taken from the tokenizer.
TEXT_ENCODER_PRESETS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
    # CLIP ViT-L/14's text tower, as used by Stable Diffusion 1.x: 123.1M parameters.
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
}

# SDXL's second text encoder, a CLIPTextModelWithProjection whose projected end-of-text state is the pooled prompt.
# Wider than the first, as SDXL's (1280 against 768): single-file loaders tell the two apart by their width.
TEXT_ENCODER_2_PRESETS = {
    "tiny": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    "small": dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=128),
    # OpenCLIP ViT-bigG/14's text tower, as used by SDXL: 694.7M parameters.
    "sdxl": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280),
}
TEXT_ENCODER_PRESETS["sdxl"] = TEXT_ENCODER_PRESETS["sd15"]  # SDXL's first text encoder is SD-1.x's CLIP ViT-L/14

# Preset names per component; the UNet's layouts per family (sd: UNET_PRESETS, sdxl: UNET_XL_PRESETS).
PRESETS = {"unet": {**UNET_PRESETS, **UNET_XL_PRESETS}, "vae": VAE_PRESETS, "text_encoder": TEXT_ENCODER_PRESETS,
           "text_encoder_2": TEXT_ENCODER_2_PRESETS}
CAPTIONS_TOKENIZER = "captions"
TOKENIZERS = ("tokenizer", "tokenizer_2")


@dataclass
class Source:
    """Where one component comes from: a preset, or `from_pretrained(path, subfolder=...)`."""

    preset: str | None = None
    path: str | None = None
    subfolder: str | None = None

    def describe(self) -> str:
        if self.preset:
            return f"preset {self.preset!r}"
        return self.path + (f" (subfolder {self.subfolder})" if self.subfolder else "")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_source(model: ModelConfig, component: str) -> Source:
    value = getattr(model, component)
    if value is None and model.pretrained_model_name_or_path:
        return _checked_path(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path", component,
                             model.variant)
    if value is None:
        value = CAPTIONS_TOKENIZER if component in TOKENIZERS else "tiny"
    if value in PRESETS.get(component, {}) or (component in TOKENIZERS and value == CAPTIONS_TOKENIZER):
        return Source(preset=value)
    return _checked_path(value, f"model.{component}", None, model.variant)


def _checked_path(value: str, key: str, subfolder: str | None, variant: str | None = None) -> Source:
    """A local directory, or something shaped like a hub id (tried online by from_pretrained)."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}: {value} is a file; give a model directory")
        if subfolder and not (path / subfolder).is_dir():
            index = path / "model_index.json"
            if subfolder in (json.loads(index.read_text()) if index.is_file() else {}):
                raise ConfigError(f"{key}: {value} is incomplete: its model_index.json lists {subfolder} but there is "
                                  f"no {subfolder}/ folder; copy the whole pipeline directory")
            raise ConfigError(f"{key}: {value} has no {subfolder}/ folder; is it a diffusers pipeline directory?")
        check_weight_files(path / (subfolder or ""), key, variant)
        return Source(path=str(path), subfolder=subfolder)
    component = key.split(".")[-1]
    presets = sorted(PRESETS.get(component, {})) + ([CAPTIONS_TOKENIZER] if component in TOKENIZERS else [])
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        hint = f"a preset ({', '.join(presets)}), " if presets else ""
        raise ConfigError(f"{key}: {value} does not exist; give {hint}an existing directory or a hub id")
    if "/" not in value:  # hub ids are owner/name: a bare word is a preset name, likely misspelt
        guess = difflib.get_close_matches(value, presets, n=1)
        raise ConfigError(f"{key}: {value!r} is " + (f"not a preset ({', '.join(presets)}), " if presets else "")
                          + "not an existing directory, and not a hub id (those read owner/name)"
                          + (f"; did you mean {guess[0]!r}?" if guess else ""))
    return Source(path=value, subfolder=subfolder)


def _variant_of(file_name: str) -> str | None:
    """"fp16" for model.fp16.safetensors (and its shards, model.fp16-00001-of-00002.safetensors); None for
    model.safetensors."""
    parts = file_name.split(".")
    return re.sub(r"-\d+-of-\d+$", "", parts[-2]) if len(parts) > 2 else None


def check_weight_files(folder: Path, key: str, variant: str | None) -> None:
    """Weights are read as safetensors only, and only the chosen variant's files: a hub repo such as Stable
    Diffusion 1.x's holds model.safetensors, model.fp16.safetensors and pickled .bin copies side by side.
    A folder without weight files (tokenizer/, scheduler/) passes."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    safetensors = [name for name in files if name.endswith(".safetensors")]
    pickled = [name for name in files if Path(name).suffix in PICKLE_SUFFIXES]
    if any(_variant_of(name) == variant for name in safetensors) or not (safetensors or pickled):
        return
    if not safetensors:
        raise ConfigError(f"{key}: {folder} holds only pickled weights ({', '.join(pickled)}), which can run "
                          "code when loaded; weights are read as safetensors only. Re-save the model with "
                          "save_pretrained(..., safe_serialization=True) from a source you trust")
    others = sorted({_variant_of(name) for name in safetensors}, key=str)
    if variant is None:
        raise ConfigError(f"{key}: {folder} holds only {others[0]} variant weights ({', '.join(safetensors)}); set "
                          f"model.variant: {others[0]} to read them")
    way_out = "remove model.variant to read them" if None in others else f"set model.variant: {others[0]}"
    raise ConfigError(f"{key}: {folder} has no {variant} variant weights (*.{variant}.safetensors; model.variant: "
                      f"{variant}), only {', '.join(safetensors)}; {way_out}")


def _from_pretrained(cls, source: Source, key: str, **kwargs):
    try:
        if source.subfolder:  # transformers rejects subfolder=None
            kwargs["subfolder"] = source.subfolder
        return cls.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{key}: could not load {source.describe()} with {cls.__name__}.from_pretrained: "
            f"{' '.join(str(error).split()).rstrip('.')}. Check the directory holds a saved model with "
            "safetensors weights (or that the hub is reachable for a hub id)."
        ) from error


def _weights(model: ModelConfig) -> dict:
    """Which pretrained weights are read: the configured variant, as float32 (the training copy; a fp16 variant
    is upcast, mixed precision casts the frozen components itself)."""
    return dict(variant=model.variant, dtype=torch.float32)


def _preset(component: str, name: str, overrides: dict) -> dict:
    kwargs = dict(PRESETS[component][name])
    kwargs.update(overrides)
    return kwargs


def pipeline_family(path_or_id: str) -> str:
    """"sdxl" for a pipeline whose model_index.json lists a second text encoder (StableDiffusionXLPipeline and the
    pipelines made from it), else "sd". A hub id's model_index.json is fetched (a file of a few hundred bytes)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        index_file = path / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    else:
        from diffusers import DiffusionPipeline

        try:
            index = DiffusionPipeline.load_config(path_or_id)
        except (OSError, ValueError):  # unreachable: the loading of its components reports it, by name
            index = {}
    return "sdxl" if "text_encoder_2" in index else "sd"


def model_family(model: ModelConfig) -> str:
    """The run's model family ("sd" or "sdxl"): the pretrained pipeline's, else model.family, else "sdxl" when a
    component preset is named "sdxl"."""
    if model.pretrained_model_name_or_path:
        found = pipeline_family(model.pretrained_model_name_or_path)
        if model.family is not None and model.family != found:
            raise ConfigError(f"model.family: {model.family}, but model.pretrained_model_name_or_path "
                              f"{model.pretrained_model_name_or_path} is an {found.upper()} pipeline; remove "
                              "model.family (it is read from the pipeline)")
        return found
    if model.family is not None:
        return model.family
    presets = (model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    return "sdxl" if "sdxl" in presets or model.text_encoder_2 is not None else "sd"


def load_tokenizer(model: ModelConfig, captions: Callable[[], list[str]], component: str = "tokenizer"):
    """The configured tokenizer (`component` "tokenizer_2": SDXL's second one), or one built from the training
    captions (offline default)."""
    source = resolve_source(model, component)
    if source.preset == CAPTIONS_TOKENIZER:
        return build_tokenizer(captions())
    return _from_pretrained(CLIPTokenizer, source, f"model.{component}")


def build_text_encoder(model: ModelConfig, tokenizer: CLIPTokenizer, component: str = "text_encoder"):
    """The configured text encoder: a CLIPTextModel, or (`component` "text_encoder_2") SDXL's second one, a
    CLIPTextModelWithProjection."""
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    source = resolve_source(model, component)
    if source.path:
        encoder = _from_pretrained(cls, source, f"model.{component}", use_safetensors=True, **_weights(model))
    else:
        kwargs = _preset(component, source.preset, model.text_encoder_kwargs if component == "text_encoder" else {})
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.setdefault("max_position_embeddings", tokenizer.model_max_length)
        config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **kwargs,
        )
        encoder = cls(config)
    if encoder.config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.{component} has {encoder.config.vocab_size} token embeddings but the "
                          f"tokenizer has {len(tokenizer)} tokens; use a matching tokenizer")
    if encoder.config.max_position_embeddings < tokenizer.model_max_length:
        raise ConfigError(f"model.{component} handles {encoder.config.max_position_embeddings} tokens but "
                          f"the tokenizer pads to {tokenizer.model_max_length}; use a matching tokenizer")
    return encoder


def encode_prompt(text_encoders: list, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(text states, pooled text embedding or None) of token `ids` (one (B, L) tensor per encoder).

    Stable Diffusion: the encoder's last hidden state (B, L, D), no pooled embedding. SDXL, as
    StableDiffusionXLPipeline.encode_prompt computes them: both encoders' penultimate hidden states side by side
    (B, L, D1 + D2), and the second encoder's projected end-of-text state (B, P)."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids[0])[0], None
    states = [encoder(token_ids, output_hidden_states=True) for encoder, token_ids in zip(text_encoders, ids)]
    return torch.cat([output.hidden_states[-2] for output in states], dim=-1), states[-1].text_embeds


def micro_conditioning(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]):
    """SDXL's six size and crop numbers per image, (B, 6): its original (height, width), the (top, left) of its crop
    in the resized image, and the (height, width) it is trained at. A pipeline samples with the original size and
    the target size both the image's, and no crop."""
    target = torch.tensor(target_size, device=original_size.device).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


def build_vae(model: ModelConfig) -> AutoencoderKL:
    source = resolve_source(model, "vae")
    if source.path:
        return _from_pretrained(AutoencoderKL, source, "model.vae", use_safetensors=True, **_weights(model))
    kwargs = _preset("vae", source.preset, model.vae_kwargs)
    blocks = len(kwargs["block_out_channels"])
    kwargs.setdefault("down_block_types", ("DownEncoderBlock2D",) * blocks)
    kwargs.setdefault("up_block_types", ("UpDecoderBlock2D",) * blocks)
    kwargs.setdefault("latent_channels", 4)
    return AutoencoderKL(**kwargs)


def seeded(seed: int, component: str, build: Callable):
    """Build a component from its own seed: a random init then never depends on what was built or
    loaded before it (a resume loads the text encoder instead of building it, and a VAE stage that
    is already finished is loaded, not built). LoRA adapters draw from the seed of their model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + ("text_encoder", "vae", "unet", "text_encoder_2").index(component))
        return build()


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_unet(model: ModelConfig, resolution: int, vae: AutoencoderKL, text_encoder: CLIPTextModel,
               text_encoder_2: CLIPTextModelWithProjection | None = None):
    """The configured UNet; an SDXL-family one (`text_encoder_2` given) attends to both encoders' states side by side
    and adds their pooled embedding and the six micro-conditioning numbers to its timestep embedding."""
    source = resolve_source(model, "unet")
    text_dim = text_encoder.config.hidden_size + (text_encoder_2.config.hidden_size if text_encoder_2 else 0)
    if source.path:
        unet = _from_pretrained(UNet2DConditionModel, source, "model.unet", use_safetensors=True, **_weights(model))
    else:
        if text_encoder_2 is None and source.preset not in UNET_PRESETS:
            raise ConfigError(f"model.unet: {source.preset!r} is an SDXL layout; set model.family: sdxl, or use an "
                              f"SD preset ({', '.join(UNET_PRESETS)})")
        if text_encoder_2 is not None and source.preset not in UNET_XL_PRESETS:
            raise ConfigError(f"model.unet: {source.preset!r} is an SD layout; an SDXL-family UNet is one of "
                              f"{', '.join(UNET_XL_PRESETS)}")
        kwargs = dict(UNET_XL_PRESETS[source.preset] if text_encoder_2 else UNET_PRESETS[source.preset])
        if text_encoder_2 is not None:
            kwargs.update(UNET_XL_COMMON, projection_class_embeddings_input_dim=(
                6 * kwargs["addition_time_embed_dim"] + text_encoder_2.config.projection_dim))
        kwargs.update(model.unet_kwargs)
        kwargs.setdefault("sample_size", resolution // vae_scale_factor(vae))
        kwargs.setdefault("in_channels", vae.config.latent_channels)
        kwargs.setdefault("out_channels", vae.config.latent_channels)
        kwargs.setdefault("cross_attention_dim", text_dim)
        unet = UNet2DConditionModel(**kwargs)
    sdxl_unet = unet.config.addition_embed_type == "text_time"
    if sdxl_unet != (text_encoder_2 is not None):
        raise ConfigError(f"model.unet is {'an SDXL' if sdxl_unet else 'an SD'}-family UNet but the text encoders are "
                          f"{'SD' if sdxl_unet else 'SDXL'}'s; use components of one family (model.family)")
    if unet.config.cross_attention_dim != text_dim:
        raise ConfigError(f"model.unet attends to {unet.config.cross_attention_dim}-dim text features but the "
                          f"text encoder{'s give' if text_encoder_2 else ' gives'} {text_dim}; use matching components")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ConfigError(f"model.unet takes {unet.config.in_channels} channels but the VAE makes "
                          f"{vae.config.latent_channels}-channel latents; use matching components")
    return unet


def build_noise_scheduler(model: ModelConfig, prediction_type: str | None = None,
                          zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The pretrained pipeline's noise schedule, else Stable Diffusion's (scaled linear, 1000 steps).

    `prediction_type` None keeps the pretrained scheduler's own (fine-tuning a v-prediction model as
    epsilon would silently unlearn it), else epsilon; a given value overrides it, with a note.
    `zero_terminal_snr` rescales it so the last timestep holds no signal (Lin et al. 2024) and makes samplers
    configured from it take trailing timesteps, which start at that last one."""
    rescaled = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    if model.pretrained_model_name_or_path:
        source = _checked_path(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path", "scheduler")
        base = _from_pretrained(DDPMScheduler, source, "model.pretrained_model_name_or_path")
        own = base.config.get("prediction_type", "epsilon")
        if prediction_type is not None and prediction_type != own:
            logger.warning("prediction_type: training %s although %s was trained with %s (as configured)",
                           prediction_type, model.pretrained_model_name_or_path, own)
        return DDPMScheduler.from_config(base.config, prediction_type=prediction_type or own, **rescaled)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type or "epsilon", clip_sample=False,
                         steps_offset=1, **rescaled)


def base_reference(model: ModelConfig) -> str:
    """The base as the LoRA's users will load it: a local directory as an absolute path, else the hub id."""
    path = Path(model.pretrained_model_name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else model.pretrained_model_name_or_path


SAMPLERS = {
    # DPM-Solver++(2M): good images in 15-25 steps (Lu et al. 2022).
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "ddpm": lambda config: DDPMScheduler.from_config(config),
}


def make_sampler(name: str, scheduler_config):
    if name not in SAMPLERS:
        raise ConfigError(f"sampling.scheduler: {name!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](scheduler_config)

