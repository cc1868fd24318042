"""`ldm-pipeline export`: the original single-file layout, read back by diffusers' `from_single_file`."""

import re

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError, ModelConfig
from ldm_pipeline.export import (
    XL_TEXT_ENCODER_PREFIX,
    check_round_trip,
    export_single_file,
    pipeline_to_original,
    text_encoder_2_to_original,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae
from ldm_pipeline.tokenizer import build_tokenizer

PROMPT = "a red square on the left"
SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def same_image(pipeline_dir, checkpoint, cls=StableDiffusionPipeline):
    """The original pipeline and the one diffusers rebuilds from the single file, same seed."""
    options = dict(safety_checker=None) if cls is StableDiffusionPipeline else {}
    original = cls.from_pretrained(pipeline_dir, **options)
    rebuilt = cls.from_single_file(str(checkpoint), config=str(pipeline_dir), local_files_only=True, **options)
    images = [pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
              for pipe in (original, rebuilt)]
    assert images[0].std() > 0.01  # a real image, not a constant
    np.testing.assert_allclose(images[1], images[0], atol=1e-5)


def test_export_of_a_trained_pipeline_loads_back_in_diffusers(trained_run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert cli(["export", "--model", str(trained_run / "pipeline"), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight").ndim == 4  # 1x1 convolutions
    assert f"{len(keys)} tensors" in summary and " MB" in summary
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.0.0.in_layers.2.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"):
        assert key in keys, key
    assert "scaling_factor" in summary  # our calibrated VAE scale is not SD's: said once
    same_image(trained_run / "pipeline", out)


def test_export_of_sd_structured_components_at_small_width(tmp_path):
    """SD-1.x's block structure (4 levels, 2 layers each, cross-attention up blocks with upsamplers) at
    widths of 8-32; also written in float16."""
    pipeline_dir = save_tiny_pipeline(
        tmp_path / "pipeline", dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=8,
                                    attention_head_dim=2, **SD_BLOCKS), dict(layers_per_block=2))
    summary = export_single_file(pipeline_dir, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in handle.keys()  # SD-1.5's upsampler slot
        assert "model.diffusion_model.input_blocks.11.0.out_layers.3.weight" in handle.keys()
    same_image(pipeline_dir, tmp_path / "model.safetensors")
    half = export_single_file(pipeline_dir, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(tmp_path / "half.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float16}
    assert half["tensors"] == summary["tensors"] and half["bytes"] < 0.6 * summary["bytes"]


def test_export_refuses_what_the_layout_cannot_hold(tmp_path, capsys):
    pipeline_dir = save_tiny_pipeline(tmp_path / "pipeline", dict(mid_block_type="UNetMidBlock2D"))
    out = tmp_path / "model.safetensors"
    assert cli(["export", "--model", str(pipeline_dir), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "cannot be written in the original single-file layout" in errors[0]
    assert "UNetMidBlock2D" in errors[0] and not list(tmp_path.glob("model.safetensors*"))
    out.write_bytes(b"keep me")
    assert cli(["export", "--model", str(pipeline_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli(["export", "--model", str(pipeline_dir), "--out", str(tmp_path / "model.ckpt")]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err


def test_round_trip_guard_refuses_weights_diffusers_would_not_load(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "pipeline"), safety_checker=None)
    checkpoint = {**unet_to_original(pipe.unet), **text_encoder_to_original(pipe.text_encoder)}
    with pytest.raises(ConfigError, match="VAE .* would not load back"):
        check_round_trip(pipe, checkpoint)  # no VAE weights at all


def test_sd15_sized_components_get_the_sd15_layout():
    """At Stable Diffusion 1.x sizes (built on the meta device: shapes, no memory) the file is what
    SD-1.x tools expect: diffusers identifies it as a v1 checkpoint and its converters find every weight."""
    model = ModelConfig(unet="sd15", vae="sd15", text_encoder="sd15")
    with torch.device("meta"):
        text_encoder = build_text_encoder(model, build_tokenizer(["a photo of a cat"]))
        vae = build_vae(model)
        unet = build_unet(model, 512, vae, text_encoder)
    checkpoint = {**unet_to_original(unet), **vae_to_original(vae), **text_encoder_to_original(text_encoder)}
    assert infer_diffusers_model_type(checkpoint) == "v1"
    for module, read_back in ((unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))),
                              (vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))):
        state = module.state_dict()
        assert set(read_back) == set(state)
        assert all(read_back[key].numel() == tensor.numel() for key, tensor in state.items())


def save_tiny_sdxl_pipeline(directory, text_encoder_2_width: int = 16):
    """A tiny StableDiffusionXLPipeline with SDXL's structure: no attention at the first level, two transformer
    blocks per attention at the second, linear projections, the "text_time" embedding; CLIP text encoders of widths
    32 and `text_encoder_2_width` (SDXL's: 768 and 1280), 2 layers each; 32 px images (4x4 latents)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer([PROMPT, "a blue square on the right"])

    def text_config(**kwargs):
        return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=2, **kwargs)

    text_encoder = CLIPTextModel(text_config(hidden_size=32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(hidden_size=text_encoder_2_width, projection_dim=8,
                                                             hidden_act="gelu"))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025)
    unet = UNet2DConditionModel(
        sample_size=4, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=32 + text_encoder_2_width,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 8)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(steps_offset=1))
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def test_sdxl_export_loads_back_in_diffusers(tmp_path, capsys):
    save_tiny_sdxl_pipeline(tmp_path / "pipeline")
    out = tmp_path / "model.safetensors"
    assert cli(["export", "--model", str(tmp_path / "pipeline"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not SDXL's" in printed  # our widths: loadable only with config=
    assert re.search(r"text encoder \d+, text encoder 2 \d+\)", printed)
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "conditioner"}
    assert {key.split(".")[2] for key in keys if key.startswith("conditioner.")} == {"0", "1"}
    unet = "model.diffusion_model."
    for key in ("label_emb.0.0.weight", "label_emb.0.2.bias",  # add_embedding
                "input_blocks.2.0.out_layers.3.weight", "input_blocks.3.0.op.weight",  # level 0: resnets only
                "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight", "input_blocks.5.1.proj_in.weight",
                "middle_block.1.transformer_blocks.1.ff.net.2.weight",
                "output_blocks.2.1.transformer_blocks.1.norm3.weight", "output_blocks.2.2.conv.weight",  # upsampler
                "output_blocks.5.0.skip_connection.weight"):
        assert unet + key in keys, key
    assert not any(key.startswith(unet + "input_blocks.1.1.") for key in keys)  # no attention at level 0
    assert len(shapes[unet + "input_blocks.5.1.proj_in.weight"]) == 2  # use_linear_projection
    assert shapes[unet + "label_emb.0.0.weight"] == (64, 56)  # (4 * 16, 6 * 8 + 8)
    clip_g = "conditioner.embedders.1.model."
    assert shapes[clip_g + "transformer.resblocks.1.attn.in_proj_weight"] == (48, 16)  # q, k, v stacked
    assert shapes[clip_g + "text_projection"] == (16, 8)  # (width, projection_dim): transposed
    for key in ("positional_embedding", "token_embedding.weight", "ln_final.bias", "transformer.resblocks.1.ln_2.bias",
                "transformer.resblocks.1.mlp.c_proj.bias", "transformer.resblocks.0.attn.out_proj.weight"):
        assert clip_g + key in keys, key
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in keys
    same_image(tmp_path / "pipeline", out, StableDiffusionXLPipeline)


def test_sdxl_export_refuses_text_encoders_of_one_width(tmp_path, capsys):
    """diffusers' from_single_file tells SDXL's text encoders apart by width: from a file whose two are equally wide
    it loads the first one's weights into text_encoder_2 (and leaves its projection unloaded), so we refuse."""
    pipe = save_tiny_sdxl_pipeline(tmp_path / "pipeline", text_encoder_2_width=32)
    out = tmp_path / "model.safetensors"
    assert cli(["export", "--model", str(tmp_path / "pipeline"), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "both text encoders are 32 wide" in errors[0]
    assert not list(tmp_path.glob("model.safetensors*"))
    parts = pipeline_to_original(pipe).values()
    save_file({key: tensor.contiguous() for part in parts for key, tensor in part.items()}, str(out))  # unchecked
    rebuilt = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tmp_path / "pipeline"),
                                                         local_files_only=True)
    fc1 = rebuilt.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(fc1, pipe.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"])


def test_sdxl_sized_components_get_the_sdxl_layout():
    """At SDXL 1.0 base sizes (on the meta device) the file has sd_xl_base_1.0's keys and shapes: diffusers
    identifies it as SDXL base, and its converters find every weight."""
    model = ModelConfig(family="sdxl", unet="sdxl", vae="sdxl", text_encoder="sdxl", text_encoder_2="sdxl")
    tokenizer = build_tokenizer(["a photo of a cat"])
    with torch.device("meta"):
        text_encoder = build_text_encoder(model, tokenizer)
        text_encoder_2 = build_text_encoder(model, tokenizer, "text_encoder_2")
        vae = build_vae(model)
        unet = build_unet(model, 1024, vae, text_encoder, text_encoder_2)
    checkpoint = {**unet_to_original(unet), **vae_to_original(vae), **text_encoder_2_to_original(text_encoder_2),
                  **text_encoder_to_original(text_encoder, XL_TEXT_ENCODER_PREFIX)}
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    unet_keys = "model.diffusion_model."
    for key, shape in ((unet_keys + "label_emb.0.0.weight", (1280, 2816)),
                       (unet_keys + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
                       (unet_keys + "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
                       (unet_keys + "output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
                       (unet_keys + "input_blocks.6.0.op.weight", (640, 640, 3, 3)),
                       ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
                       ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
                       ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", (768,))):
        assert tuple(checkpoint[key].shape) == shape, key
    for module, read_back in ((unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))),
                              (vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))):
        state = module.state_dict()
        assert set(read_back) == set(state)
        assert all(read_back[key].numel() == tensor.numel() for key, tensor in state.items())
