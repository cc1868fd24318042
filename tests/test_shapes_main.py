"""A miniature of the README's main command: `train_configs/shapes.yaml` from an empty data directory,
shrunk by `--set` overrides (fewer images, tiny models, a few steps) so it runs in well under 90 seconds."""

import json

import torch
import yaml
from diffusers import StableDiffusionPipeline
from test_launch import ROOT, accelerate_launch

SHRINK = [
    "data.make_shapes.num_images=96", "model.vae=tiny", "model.unet=tiny", "model.text_encoder=tiny",
    "vae_training.max_train_steps=4", "vae_training.train_batch_size=8", "vae_training.scaling_samples=32",
    "vae_training.psnr_samples=8", "train_batch_size=8", "max_train_steps=4", "checkpointing_steps=2",
    "validation.num_heldout=8", "validation.seeds=[0]", "sampling.num_inference_steps=2",
    "vae_training.validation_steps=2", "vae_training.on_check_failure=warn",  # 4 steps cannot pass the check
]


def test_main_command_in_miniature_ends_in_a_loadable_pipeline(tmp_path):
    data_dir, output_dir = tmp_path / "data" / "shapes", tmp_path / "outputs" / "shapes"
    overrides = [f"data.train_data_dir={data_dir}", f"output_dir={output_dir}", *SHRINK]
    args = ["train.py", "--config", str(ROOT / "train_configs" / "shapes.yaml")]
    for override in overrides:
        args += ["--set", override]
    result = accelerate_launch(*args, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    # The first screen says what the run will do, without library noise.
    for line in ("making 96 synthetic shapes images", "vae stage: 4 steps of batch 8", "unet stage: 4 optimizer steps",
                 f"writes: {output_dir / 'pipeline'}"):
        assert line in result.stdout, line
    for noise in ("requires torchvision", "Downloading data", "should be kept in float32", "Generating train split"):
        assert noise not in result.stdout + result.stderr, noise

    captions = [json.loads(line)["text"] for line in (data_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(captions) == 96 and len(list(data_dir.glob("*.png"))) == 96  # the data was made
    assert list((output_dir / "latent_cache").iterdir())  # encoded once, for the next run
    calibration = json.loads((output_dir / "vae" / "calibration.json").read_text())
    assert calibration["scaling_factor"] > 0 and "heldout_psnr_db" in calibration
    assert "recon_color_accuracy" in calibration  # the shapes checker ran on the VAE's reconstructions
    assert list((output_dir / "samples").glob("*.png"))  # the grid of fixed prompts
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["resolution"] == 64

    pipe = StableDiffusionPipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.vae.config.scaling_factor == calibration["scaling_factor"]
    assert pipe.tokenizer.model_max_length == 16  # chosen for the shapes captions
    ids = pipe.tokenizer(captions[0]).input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == captions[0]
    image = pipe(captions[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
