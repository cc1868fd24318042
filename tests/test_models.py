"""Component presets and loading components from saved directories."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm_pipeline.config import ConfigError, ModelConfig
from ldm_pipeline.models import (
    PRESETS,
    build_noise_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    load_tokenizer,
    vae_scale_factor,
)
from ldm_pipeline.tokenizer import build_tokenizer, save_tokenizer


def test_sd15_presets_have_stable_diffusion_shapes():
    """UNet ~860M, VAE ~84M, CLIP ViT-L/14 text encoder ~123M, built on the meta device (no memory)."""
    model = ModelConfig(unet="sd15", vae="sd15", text_encoder="sd15")
    tokenizer = build_tokenizer(["a photo of a cat"])
    with torch.device("meta"):
        text_encoder = build_text_encoder(model, tokenizer)
        vae = build_vae(model)
        unet = build_unet(model, 512, vae, text_encoder)
    assert unet.num_parameters() == pytest.approx(859.52e6, rel=1e-3)
    assert vae.num_parameters() == pytest.approx(83.65e6, rel=1e-3)
    assert text_encoder.num_parameters() == pytest.approx(123.06e6, rel=1e-3)
    assert vae_scale_factor(vae) == 8 and unet.config.sample_size == 64
    assert unet.config.cross_attention_dim == 768 and vae.config.latent_channels == 4


@pytest.mark.parametrize("name", sorted(PRESETS["unet"]))
def test_every_preset_downsamples_by_8(name):
    with torch.device("meta"):
        vae = build_vae(ModelConfig(vae=name))
    assert vae_scale_factor(vae) == 8


def test_tiny_components_fit_together():
    model = ModelConfig()  # all defaults: tiny presets, captions tokenizer
    tokenizer = load_tokenizer(model, lambda: ["a red square", "a blue circle"])
    text_encoder = build_text_encoder(model, tokenizer)
    vae = build_vae(model)
    unet = build_unet(model, 32, vae, text_encoder)
    ids = tokenizer(["a red square"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    states = text_encoder(ids)[0]
    latents = torch.randn(1, 4, 4, 4)
    assert unet(latents, torch.tensor([10]), states).sample.shape == latents.shape
    assert unet.num_parameters() < 1e6


def test_components_load_from_directories(tmp_path):
    """Per-component directories and a pipeline directory go through the same from_pretrained path."""
    model = ModelConfig()
    tokenizer = load_tokenizer(model, lambda: ["a red square"])
    text_encoder = build_text_encoder(model, tokenizer)
    vae = build_vae(model)
    unet = build_unet(model, 32, vae, text_encoder)
    save_tokenizer(tokenizer, tmp_path / "pipe" / "tokenizer")
    text_encoder.save_pretrained(tmp_path / "pipe" / "text_encoder")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    build_noise_scheduler(model, "epsilon").save_pretrained(tmp_path / "pipe" / "scheduler")

    from_pipeline = ModelConfig(pretrained_model_name_or_path=str(tmp_path / "pipe"))
    loaded_unet = build_unet(from_pipeline, 32, vae, text_encoder)
    assert isinstance(loaded_unet, UNet2DConditionModel)
    assert torch.equal(loaded_unet.conv_in.weight, unet.conv_in.weight)
    assert load_tokenizer(from_pipeline, lambda: []).get_vocab() == tokenizer.get_vocab()
    assert build_noise_scheduler(from_pipeline, "v_prediction").config.prediction_type == "v_prediction"

    pipe = tmp_path / "pipe"
    per_component = ModelConfig(vae=str(pipe / "vae"), text_encoder=str(pipe / "text_encoder"))
    assert isinstance(build_vae(per_component), AutoencoderKL)
    loaded_text = build_text_encoder(per_component, tokenizer)
    assert isinstance(loaded_text, CLIPTextModel)
    assert torch.equal(loaded_text.get_input_embeddings().weight, text_encoder.get_input_embeddings().weight)


def test_missing_paths_and_mismatches_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="model.unet: ./no/such/unet does not exist"):
        build_unet(ModelConfig(unet="./no/such/unet"), 32, build_vae(ModelConfig()), None)
    with pytest.raises(ConfigError, match="model.pretrained_model_name_or_path.*no unet/ folder"):
        build_unet(ModelConfig(pretrained_model_name_or_path=str(tmp_path)), 32, build_vae(ModelConfig()), None)
    with pytest.raises(ConfigError, match="model.vae: could not load"):
        build_vae(ModelConfig(vae="someone/not-on-this-machine"))  # hub-id shaped, offline here
    tokenizer = build_tokenizer(["a red square"])
    text_encoder = build_text_encoder(ModelConfig(text_encoder="small"), tokenizer)
    with pytest.raises(ConfigError, match="attends to 64-dim"):
        build_unet(ModelConfig(unet_kwargs={"cross_attention_dim": 64}), 32, build_vae(ModelConfig()), text_encoder)


def test_zero_terminal_snr_leaves_no_signal_at_the_last_timestep_and_samplers_start_there():
    from ldm_pipeline.models import build_noise_scheduler, make_sampler

    plain = build_noise_scheduler(ModelConfig(), "v_prediction")
    rescaled = build_noise_scheduler(ModelConfig(), "v_prediction", zero_terminal_snr=True)
    assert float(plain.alphas_cumprod[-1]) > 1e-3  # Stable Diffusion's schedule keeps some signal at t = 999
    assert float(rescaled.alphas_cumprod[-1]) == 0.0  # Lin et al. 2024: none
    for name in ("dpmsolver++", "ddim", "euler", "ddpm"):
        sampler = make_sampler(name, rescaled.config)
        sampler.set_timesteps(20)
        assert int(sampler.timesteps[0]) == 999 and sampler.config.rescale_betas_zero_snr  # trailing: from pure noise
