"""train_configs/sd_512.yaml, the real-size path (3x512x512 images -> 4x64x64 latents), run on the CPU for two
steps per stage: shrunk only by `--set` (steps, batches, widths, local text components), the resolution,
stages, bf16, EMA and gradient checkpointing stay as the config has them."""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ldm_pipeline import load_config
from ldm_pipeline.config import ModelConfig
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, vae_scale_factor
from ldm_pipeline.tokenizer import build_tokenizer
from ldm_pipeline.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sd512_cpu import CONFIG, shrink_overrides, write_images  # noqa: E402  the run benchmarks/sd512_cpu.py times


def test_sd_512_config_is_the_stable_diffusion_shape():
    config = load_config(CONFIG, [f"data.train_data_dir={Path(__file__).parent}"])  # any existing folder
    assert (config.resolution, config.stages, config.mixed_precision) == (512, ["vae", "unet"], "bf16")
    assert config.use_ema and config.gradient_checkpointing and not config.train_text_encoder
    assert config.model.text_encoder == config.model.tokenizer == "openai/clip-vit-large-patch14"
    with torch.device("meta"):  # shapes only: the hub's CLIP has the sd15 text preset's width (768)
        vae = build_vae(config.model)
        text_encoder = build_text_encoder(ModelConfig(text_encoder="sd15"), build_tokenizer(["a photo"]))
        unet = build_unet(config.model, config.resolution, vae, text_encoder)
    assert (vae_scale_factor(vae), vae.config.latent_channels) == (8, 4)
    assert (unet.config.sample_size, unet.config.cross_attention_dim) == (64, 768)


def test_sd_512_trains_both_stages_at_512_px_in_bf16(tmp_path, monkeypatch):
    data_dir = write_images(tmp_path / "data")
    checkpointed = []  # (stage, block) of every gradient-checkpointed call
    checkpoint = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        checkpointed.append(type(function.__self__).__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    pipeline_dir = train(load_config(CONFIG, shrink_overrides(data_dir, tmp_path / "out", steps=2)))

    assert {"DownEncoderBlock2D", "UpDecoderBlock2D"} <= set(checkpointed)  # the VAE stage checkpointed too
    assert {"ResnetBlock2D", "BasicTransformerBlock"} <= set(checkpointed)
    assert (tmp_path / "out" / "checkpoints" / "vae-step-2").is_dir()
    assert (tmp_path / "out" / "checkpoints" / "step-2" / "ema.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    assert pipe.unet.config.sample_size == 64 and len(pipe.unet.config.down_block_types) == 4
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 512, 512)).latent_dist.mean
    assert latents.shape == (1, 4, 64, 64)
    image = pipe("a red square on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (512, 512)


def test_the_sd15_size_arithmetic_behind_the_per_gpu_batches():
    from sd512_cpu import estimate_sd15

    rows = {row["component"]: row for row in estimate_sd15()}
    vae, unet = rows["sd15 vae"], rows["sd15 unet"]
    assert round(unet["parameters_M"], 1) == 859.5 and round(vae["parameters_M"], 1) == 83.7  # as the README says
    for row in (vae, unet):  # checkpointing keeps block inputs and recomputes one block at a time
        assert 0 < row["activations_checkpointed_gib"] < row["activations_gib"]
    # At 512 px the VAE, whose decoder runs at full resolution, costs more per sample than the UNet at 64x64.
    assert vae["tflop_per_sample"] > unet["tflop_per_sample"] > 0


def test_activation_counts_leave_the_weights_out():
    """A layer saves its weight to compute its input's gradient; that weight is held once, whatever the batch, so
    the count per sample leaves it out (it once took the sd15 UNet's 1.56 GiB of bf16 weights for activations)."""
    from sd512_cpu import count_activation_bytes

    linear = torch.nn.Linear(256, 256, device="meta", dtype=torch.bfloat16)

    def step(batch):
        return lambda: linear(torch.empty(batch, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)).sum()

    # what the backward needs of the input: its bf16 values, 512 bytes a sample
    assert [count_activation_bytes(linear, step(batch), checkpointing=False) for batch in (1, 4)] == [512, 2048]
