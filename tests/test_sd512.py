"""train_configs/sd_512.yaml, the real-size path (3x512x512 images -> 4x64x64 latents), run on the CPU for two
steps per stage: shrunk only by `--set` (steps, batches, widths, local text components), the resolution,
stages, bf16, EMA and gradient checkpointing stay as the config has them."""

from pathlib import Path

import torch
from conftest import write_caption_folder
from diffusers import StableDiffusionPipeline

from ldm_pipeline import load_config
from ldm_pipeline.config import ModelConfig
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, vae_scale_factor
from ldm_pipeline.tokenizer import build_tokenizer
from ldm_pipeline.train import train

CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "sd_512.yaml"


def shrink(data_dir: Path, output_dir: Path) -> list[str]:
    """The sd15 block layouts (4 VAE blocks, 4 UNet blocks with cross-attention in 3) at dummy widths."""
    return [
        f"data.train_data_dir={data_dir}", f"output_dir={output_dir}", "data.dataloader_num_workers=0",
        "model.text_encoder=tiny", "model.tokenizer=captions",
        "model.vae_kwargs={block_out_channels: [8, 16, 16, 16], layers_per_block: 1, norm_num_groups: 4}",
        "model.unet_kwargs={block_out_channels: [16, 16, 32, 32], layers_per_block: 1, attention_head_dim: 2, "
        "norm_num_groups: 8}",
        "vae_training.train_batch_size=1", "vae_training.max_train_steps=2", "vae_training.scaling_samples=4",
        "vae_training.psnr_samples=1", "train_batch_size=1", "max_train_steps=2", "validation.num_heldout=1",
        "validation.seeds=[0]", "sampling.num_inference_steps=2",
    ]


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
    data_dir = write_caption_folder(tmp_path / "data", count=6, size=512)
    checkpointed = []  # (stage, block) of every gradient-checkpointed call
    checkpoint = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        checkpointed.append(type(function.__self__).__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    pipeline_dir = train(load_config(CONFIG, shrink(data_dir, tmp_path / "out")))

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
