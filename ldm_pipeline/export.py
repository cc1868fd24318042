"""`ldm-pipeline export`: a pipeline directory as one original-layout Stable Diffusion checkpoint.

Tools built on the original CompVis / Stability code (and diffusers' `from_single_file`) read a
single `.safetensors` file whose keys follow the original `LatentDiffusion` module tree:

    model.diffusion_model.*           the UNet      (input_blocks / middle_block / output_blocks)
    first_stage_model.*               the VAE       (encoder.down.N.block.M / decoder.up.N ...)
    cond_stage_model.transformer.*    the CLIP text model (transformers' own key names)

An SDXL pipeline is written in the layout of Stability's `sd_xl_base_1.0.safetensors` (the
generative-models `DiffusionEngine` tree): the same UNet and VAE keys, the UNet's "text_time"
embedding as `label_emb.0`, and the two text encoders under the `conditioner`:

    conditioner.embedders.0.transformer.*   text_encoder, CLIP ViT-L in SDXL (transformers' names)
    conditioner.embedders.1.model.*         text_encoder_2, OpenCLIP ViT-bigG in SDXL (OpenCLIP's names)

The renaming below is derived from each component's config, so it covers any UNet built from
Stable Diffusion's block types at any width and depth, not just SD-1.x / SDXL sizes. Before
anything is written, the result is read back with diffusers' own single-file converters; a model
whose weights would not all come back unchanged (an architecture the original layout cannot
express) is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from .config import ConfigError
from .pipeline import load_pipeline
from .run_dir import written_then_renamed

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
XL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
XL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

# ResnetBlock2D parameter names -> the original UNet's ResBlock (in_layers = norm, SiLU, conv ...).
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                     "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: diffusers' Attention -> the original AttnBlock (1x1 convolutions).
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# A transformers CLIP encoder layer -> OpenCLIP's ResidualAttentionBlock (q, k and v are one in_proj there).
OPEN_CLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

# What tools that do not read the pipeline's configs assume, per family: UNet widths and VAE scaling_factor.
FAMILY_DEFAULTS = {"StableDiffusionPipeline": ("SD-1.x", (320, 640, 1280, 1280), 0.18215),
                   "StableDiffusionXLPipeline": ("SDXL", (320, 640, 1280), 0.13025)}
UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
LAYOUT_HINT = ("the original Stable Diffusion layout holds UNets made of CrossAttnDownBlock2D / DownBlock2D, "
               "a UNetMidBlock2DCrossAttn and CrossAttnUpBlock2D / UpBlock2D with one layers_per_block, "
               "an AutoencoderKL and a CLIPTextModel (SDXL: and a CLIPTextModelWithProjection of another width)")


def _refuse(component: str, reason: str):
    raise ConfigError(f"export: the {component} cannot be written in the original single-file layout: {reason}; "
                      f"{LAYOUT_HINT}")


def unet_module_names(config) -> dict[str, str]:
    """diffusers module path -> original module path, for a UNet2DConditionModel config.

    Input block 0 is conv_in; then each level holds `layers_per_block` (resnet, attention) blocks
    and, except the last level, one downsampler. Output blocks hold `layers_per_block + 1` blocks
    per level; a level's upsampler sits in its last block, after the attention if there is one.
    """
    per_level = config.layers_per_block
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    for level in range(len(config.down_block_types)):
        first = 1 + level * (per_level + 1)
        for j in range(per_level):
            names[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{first + j}.0"
            names[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{first + j}.1"
        names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{first + per_level}.0.op"
    for level, block_type in enumerate(config.up_block_types):
        first = level * (per_level + 1)
        for j in range(per_level + 1):
            names[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{first + j}.0"
            names[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{first + j}.1"
        upsampler_slot = 2 if block_type == "CrossAttnUpBlock2D" else 1
        names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{first + per_level}.{upsampler_slot}.conv"
    if config.addition_embed_type == "text_time":  # SDXL's pooled-text + size/crop embedding, added to the time's
        names.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    return names


def vae_module_names(config) -> dict[str, str]:
    """diffusers module path -> original module path, for an AutoencoderKL config. The original
    decoder numbers its levels from the lowest resolution up: up_blocks.0 is up.<levels - 1>."""
    names = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")}
    levels = len(config.down_block_types)
    for coder in ("encoder", "decoder"):
        names[f"{coder}.conv_norm_out"] = f"{coder}.norm_out"
        names[f"{coder}.mid_block.resnets.0"] = f"{coder}.mid.block_1"
        names[f"{coder}.mid_block.resnets.1"] = f"{coder}.mid.block_2"
        names[f"{coder}.mid_block.attentions.0"] = f"{coder}.mid.attn_1"
    for level in range(levels):
        names[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        names[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - level}.upsample.conv"
        for j in range(config.layers_per_block + 1):
            names[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
            names[f"decoder.up_blocks.{level}.resnets.{j}"] = f"decoder.up.{levels - 1 - level}.block.{j}"
    return names


def _rename(component: str, state: dict, modules: dict[str, str], inner_names) -> dict[str, torch.Tensor]:
    """Rename each key by its module (the longest known prefix) and, inside that module, its
    parameter (`inner_names(module)` maps diffusers names to the original ones)."""
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        module = next((".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1)
                       if ".".join(parts[:cut]) in modules), None)
        if module is None:
            _refuse(component, f"its weight {key} has no place there")
        rest = key[len(module) + 1:]
        for old, new in inner_names(module).items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
        renamed[f"{modules[module]}.{rest}"] = tensor
    return renamed


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    if type(unet).__name__ != "UNet2DConditionModel":
        _refuse("UNet", f"it is a {type(unet).__name__}, not a UNet2DConditionModel")
    if not isinstance(config.layers_per_block, int):
        _refuse("UNet", f"layers_per_block is {config.layers_per_block}, one number per level")
    unknown_blocks = [t for t in config.down_block_types if t not in UNET_DOWN_BLOCKS] + \
        [t for t in config.up_block_types if t not in UNET_UP_BLOCKS]
    if unknown_blocks:
        _refuse("UNet", f"it has {unknown_blocks[0]} blocks")
    if config.mid_block_type != "UNetMidBlock2DCrossAttn":
        _refuse("UNet", f"its mid block is {config.mid_block_type}")
    renamed = _rename("UNet", unet.state_dict(), unet_module_names(config),
                      lambda module: UNET_RESNET_NAMES if ".resnets." in module else {})
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    if type(vae).__name__ != "AutoencoderKL":
        _refuse("VAE", f"it is a {type(vae).__name__}, not an AutoencoderKL")
    blocks = set(vae.config.down_block_types) | set(vae.config.up_block_types)
    if not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        _refuse("VAE", f"it has {sorted(blocks - {'DownEncoderBlock2D', 'UpDecoderBlock2D'})[0]} blocks")
    inner = lambda module: VAE_RESNET_NAMES if ".resnets." in module else \
        VAE_ATTENTION_NAMES if ".attentions." in module else {}
    original = {}
    for key, tensor in _rename("VAE", vae.state_dict(), vae_module_names(vae.config), inner).items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original attention projections are 1x1 convolutions
        original[VAE_PREFIX + key] = tensor
    return original


def text_encoder_to_original(text_encoder, prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """The CLIP text model keeps transformers' names; `prefix` is SD's or, for SDXL, XL_TEXT_ENCODER_PREFIX."""
    if type(text_encoder).__name__ != "CLIPTextModel":
        _refuse("text encoder", f"it is a {type(text_encoder).__name__}, not a CLIPTextModel")
    # transformers >= 5.6 flattened CLIPTextModel; the original layout keeps the `text_model.` level.
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
            for key, tensor in text_encoder.state_dict().items()}


def text_encoder_2_to_original(text_encoder_2) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder in OpenCLIP's names, as `sd_xl_base_1.0` holds its ViT-bigG text tower."""
    if type(text_encoder_2).__name__ != "CLIPTextModelWithProjection":
        _refuse("text encoder 2", f"it is a {type(text_encoder_2).__name__}, not a CLIPTextModelWithProjection")
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder_2.state_dict().items()}
    original = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
                "positional_embedding": state.pop("embeddings.position_embedding.weight"),  # bare (positions, width)
                "ln_final.weight": state.pop("final_layer_norm.weight"),
                "ln_final.bias": state.pop("final_layer_norm.bias"),
                # OpenCLIP computes pooled @ text_projection, a (width, projection_dim) matrix; nn.Linear stores
                # the transpose.
                "text_projection": state.pop("text_projection.weight").T}
    for layer in range(text_encoder_2.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):  # nn.MultiheadAttention's in_proj: q, k, v stacked, (3 * width, width)
            original[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
            for old, new in OPEN_CLIP_LAYER_NAMES.items():
                original[f"{theirs}{new}.{kind}"] = state.pop(f"{ours}{old}.{kind}")
    if state:
        _refuse("text encoder 2", f"its weight {next(iter(state))} has no place there")
    return {XL_TEXT_ENCODER_2_PREFIX + key: tensor for key, tensor in original.items()}


def pipeline_to_original(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's part of the checkpoint, by its pipeline name."""
    kind = type(pipe).__name__
    if kind not in FAMILY_DEFAULTS:
        _refuse("pipeline", f"it is a {kind}")
    parts = {"unet": unet_to_original(pipe.unet), "vae": vae_to_original(pipe.vae)}
    if kind == "StableDiffusionPipeline":
        return {**parts, "text_encoder": text_encoder_to_original(pipe.text_encoder)}
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:  # a refiner-style pipeline: a different layout
        _refuse("pipeline", "it lacks text_encoder or text_encoder_2")
    return {**parts, "text_encoder": text_encoder_to_original(pipe.text_encoder, XL_TEXT_ENCODER_PREFIX),
            "text_encoder_2": text_encoder_2_to_original(pipe.text_encoder_2)}


def check_round_trip(pipe, checkpoint: dict) -> None:
    """Read `checkpoint` back with diffusers' single-file converters (what `from_single_file` runs)
    and refuse the export unless every weight of every component comes back unchanged."""
    def unprefixed(state):  # transformers' CLIPTextModel keys, with or without the `text_model.` level
        return {key.removeprefix("text_model."): tensor for key, tensor in state.items()}

    components = {
        "UNet": (pipe.unet.state_dict(), convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))),
        "VAE": (pipe.vae.state_dict(), convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))),
        "text encoder": (unprefixed(pipe.text_encoder.state_dict()),
                         unprefixed(convert_ldm_clip_checkpoint(checkpoint))),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        # from_single_file picks the converter for text_encoder_2 by width alone: the first text encoder's
        # converter when that one's position embedding is as wide as text_encoder_2 (SDXL's are 768 and 1280).
        widths = [checkpoint[CHECKPOINT_KEY_NAMES[name]].shape[-1] for name in ("clip_sdxl", "open_clip_sdxl")]
        if widths[0] == widths[1]:
            _refuse("text encoder 2", f"both text encoders are {widths[0]} wide, and diffusers' from_single_file "
                    "would then load text_encoder's weights into it; give the two text encoders different "
                    "hidden_size")
        components["text encoder 2"] = (unprefixed(pipe.text_encoder_2.state_dict()), unprefixed(
            convert_open_clip_checkpoint(pipe.text_encoder_2, checkpoint, prefix=XL_TEXT_ENCODER_2_PREFIX)))
    for component, (state, read_back) in components.items():
        for key, tensor in state.items():
            back = read_back.get(key)
            if back is None or back.numel() != tensor.numel() or not torch.equal(back.reshape(tensor.shape), tensor):
                _refuse(component, f"its weight {key} would not load back")
        extra = sorted(set(read_back) - set(state))
        if extra:
            _refuse(component, f"the checkpoint would give it an unknown weight {extra[0]}")


def export_single_file(model, out, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> dict:
    """Write the pipeline at `model` (directory or hub id) to `out` as one original-layout checkpoint:
    Stable Diffusion's for a `StableDiffusionPipeline`, SDXL's for a `StableDiffusionXLPipeline`.

    The file is written under a temporary name and renamed when complete. Returns a summary:
    path, bytes, number of tensors per component.

    diffusers loads the file back with the pipeline directory as its config, which holds the sizes the
    file does not record and needs no download (`original_config` is not needed):
    `StableDiffusionXLPipeline.from_single_file(out, config=model_dir, local_files_only=True)`
    (`StableDiffusionPipeline` for SD). Without `config=`, diffusers guesses the model from the keys and
    fetches the hub repo of that guess: SDXL only when text_encoder_2 has at least 10 layers (it looks
    for `conditioner.embedders.1.model.transformer.resblocks.9.*`), and then with SDXL 1.0's sizes."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the checkpoint is written as safetensors; give a path ending in .safetensors")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; choose another path or pass --overwrite to replace it")
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    parts = pipeline_to_original(pipe)
    checkpoint = {key: tensor for part in parts.values() for key, tensor in part.items()}
    check_round_trip(pipe, checkpoint)
    checkpoint = {key: tensor.to(dtype).contiguous() for key, tensor in checkpoint.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with written_then_renamed(out) as partial:
        save_file(checkpoint, str(partial), metadata={"format": "pt"})
    return {"path": out, "bytes": out.stat().st_size, "tensors": len(checkpoint),
            **{f"{name}_tensors": len(part) for name, part in parts.items()}, "notes": portability_notes(pipe)}


def portability_notes(pipe) -> list[str]:
    """What tools that do not read the pipeline's configs will get wrong: they assume SD-1.x's (or
    SDXL's) sizes and VAE scaling factor, neither of which the file itself records."""
    kind = type(pipe).__name__
    family, widths, scaling_factor = FAMILY_DEFAULTS[kind]
    notes = []
    if tuple(pipe.unet.config.block_out_channels) != widths:
        notes.append(f"the UNet has widths {tuple(pipe.unet.config.block_out_channels)}, not {family}'s; tools "
                     "that guess the architecture from the keys will not load it; diffusers does with "
                     f"{kind}.from_single_file(FILE, config=PIPELINE_DIR)")
    if abs(pipe.vae.config.scaling_factor - scaling_factor) > 1e-6:
        notes.append(f"the VAE's scaling_factor is {pipe.vae.config.scaling_factor:.5f} ({family}'s is "
                     f"{scaling_factor}); tools that assume {family}'s value need it set by hand, "
                     "from_single_file(config=...) reads it")
    return notes
