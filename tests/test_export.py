"""`ldm-pipeline export`: the original single-file layout, read back by diffusers' `from_single_file`."""

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open

from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError, ModelConfig
from ldm_pipeline.export import (
    check_round_trip,
    export_single_file,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae
from ldm_pipeline.tokenizer import build_tokenizer

PROMPT = "a red square on the left"
SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def same_image(pipeline_dir, checkpoint):
    """The original pipeline and the one diffusers rebuilds from the single file, same seed."""
    original = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    rebuilt = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(pipeline_dir),
                                                       local_files_only=True, safety_checker=None)
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
