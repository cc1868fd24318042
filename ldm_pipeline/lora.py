"""LoRA (Hu et al. 2021, arXiv:2106.09685): train a low-rank update W + (alpha / r) B A of chosen layers of a
pretrained pipeline, by default the UNet's attention projections, instead of the whole UNet.

The adapters are peft's, added the diffusers way (`add_adapter`). A run saves them in diffusers' LoRA format,
`<output_dir>/lora/pytorch_lora_weights.safetensors`, which `StableDiffusionPipeline.load_lora_weights` reads,
next to `base_model.json`, which names the pipeline they were trained on (and so belong to).
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import peft
import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from packaging.version import Version

from .card import SAMPLE_GRID
from .config import Config, ConfigError, LoraConfig, ModelConfig
from .models import base_reference, model_family, resolve_source
from .run_dir import written_then_renamed

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a directory
BASE_FILE = "base_model.json"


def adapter_config(settings: LoraConfig, targets: list[str]):
    # "gaussian": A ~ N(0, 1/r), B = 0, so training starts from exactly the base model.
    return peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=settings.dropout,
                           init_lora_weights="gaussian", target_modules=list(targets))


def add_adapters(model: torch.nn.Module, settings: LoraConfig, targets: list[str]) -> None:
    """Freeze `model` and give its `targets` adapters: their weights are then its only trainable ones."""
    model.requires_grad_(False)
    model.add_adapter(adapter_config(settings, targets))


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def text_encoder_peft_problem() -> str | None:
    """Why the installed libraries cannot give the text encoder adapters, or None. transformers adds them (and
    diffusers' load_lora_weights reads them back) through its own peft integration, which refuses a peft older
    than it was written for."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # a transformers without the constant: nothing to check
        return None
    if Version(version("peft")) >= Version(MIN_PEFT_VERSION):
        return None
    return (f"transformers {transformers.__version__} gives the text encoder adapters, and diffusers' "
            f"load_lora_weights reads them back, only with peft >= {MIN_PEFT_VERSION}; peft {version('peft')} is "
            "installed")


def check_targets(model: ModelConfig, settings: LoraConfig) -> None:
    """Refuse `lora.target_modules` the base UNet lacks, before a run writes anything: the UNet is built from its
    config on the meta device (no weights are read). peft matches a target against the end of module names.
    Text-encoder adapters are refused where the installed peft cannot make them."""
    problem = text_encoder_peft_problem() if settings.train_text_encoder else None
    if problem:
        raise ConfigError(f"lora.train_text_encoder: {problem}. Upgrade peft (pip install -U peft), or set "
                          "lora.train_text_encoder: false (UNet adapters only)")

    source = resolve_source(model, "unet")
    try:
        unet_config = UNet2DConditionModel.load_config(source.path, subfolder=source.subfolder)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained_model_name_or_path: could not read the UNet config of "
                          f"{source.describe()}: {' '.join(str(error).split())}") from error
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        layers = sorted({name for module in unet.modules() if type(module).__name__ == "Attention"
                         for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {missing} name no layer of the UNet of {source.describe()}; its "
                          f"attention layers end in {layers} (the default is {LoraConfig().target_modules})")


def save_lora(directory, unet, text_encoder, config: Config, card=None, sample_grid: Path | None = None,
              text_encoder_2=None) -> Path:
    """Write the adapters (diffusers' LoRA format; SDXL's with `text_encoder_2`'s), base_model.json, the model card
    and its sample grid into `directory`, atomically (a temporary name, renamed when complete). `text_encoder` None:
    UNet adapters only."""
    directory = Path(directory)
    layers, metadata = {}, {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            # peft's key names (…to_q.lora_A.weight), which load_lora_weights reads as they are. diffusers' older
            # names (…to_q.lora.down.weight, convert_state_dict_to_diffusers) cover only linear layers: a file
            # mixing them with convolutions' adapters would load without the linear ones.
            state = peft.get_peft_model_state_dict(model)
            layers[f"{name}_lora_layers"] = {key: tensor.contiguous() for key, tensor in state.items()}
            # The adapter's settings (rank, alpha, targets) travel in the file's header; without them a loader
            # would take alpha = rank.
            metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    family = model_family(config.model)
    reference = {"base_model": base_reference(config.model), "variant": config.model.variant, "family": family,
                 "resolution": config.resolution, "lora": vars(config.lora)}
    # SDXL's loader class writes and reads the text_encoder_2 adapters too; both write diffusers' LoRA format.
    saver = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with written_then_renamed(directory) as partial:
        saver.save_lora_weights(partial, **layers, **metadata, weight_name=WEIGHTS_NAME, safe_serialization=True)
        (partial / BASE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
        if card is not None:
            card.save(partial / "README.md")
        if sample_grid is not None:
            shutil.copyfile(sample_grid, partial / SAMPLE_GRID)
    return directory


def read_lora_dir(path) -> dict:
    """base_model.json of a LoRA directory ({} when a LoRA made elsewhere has none), after checking that the
    directory holds LoRA weights we can read."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--lora {path} is not a directory; give the lora/ folder of a LoRA training run "
                          "(<output_dir>/lora) or another folder holding pytorch_lora_weights.safetensors")
    if not (path / WEIGHTS_NAME).is_file():
        pickled = sorted(p.name for p in path.glob("*.bin"))
        found = (f"only pickled weights ({', '.join(pickled)}), which can run code when loaded and are refused"
                 if pickled else "no LoRA weights")
        raise ConfigError(f"--lora {path} holds {found}: no {WEIGHTS_NAME}. Give the lora/ folder of a LoRA training "
                          "run (<output_dir>/lora)")
    reference = path / BASE_FILE
    return json.loads(reference.read_text()) if reference.is_file() else {}


def check_lora_family(path, model: str, family: str) -> None:
    """Refuse, before any weights are read, a LoRA made for the other model family than the `model` it is loaded
    onto (`family`: "sd" or "sdxl"; a LoRA made elsewhere, without base_model.json, is checked as it loads)."""
    reference = read_lora_dir(path)
    if reference.get("family", family) != family:
        names = {"sd": "a Stable Diffusion 1.x/2.x", "sdxl": "an SDXL"}
        base = reference.get("base_model")
        made_for = f" (it was trained on {base})" if base else ""
        raise ConfigError(f"--lora {path} is {names[reference['family']]} LoRA{made_for} and the model {model} is "
                          f"{names[family]} pipeline; load it onto its own base (--model {base or 'its base'}), or "
                          "train a LoRA for this model")


def load_lora(pipe, path) -> None:
    """Load the LoRA in `path` into `pipe` with diffusers' own `load_lora_weights`, refusing one made for another
    base (its layers missing from the base, or of other sizes) by name."""
    path = Path(path).expanduser()
    base = read_lora_dir(path).get("base_model")
    made_for = f" (it was trained on {base})" if base else ""
    try:
        pipe.load_lora_weights(str(path), weight_name=WEIGHTS_NAME)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(f"--lora {path} does not fit the model {pipe.name_or_path}{made_for}: "
                          f"{' '.join(str(error).split())[:300]}") from error
    if not pipe.get_list_adapters():
        raise ConfigError(f"--lora {path}: none of its weights fit a layer of the model {pipe.name_or_path}{made_for}")
