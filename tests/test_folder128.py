"""train_configs/folder128.yaml on 128x128 image folders, shrunk to tiny components: each layout
gives its kind of conditioning and a pipeline that generates 128x128 images with the configured steps."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_caption_folder, write_class_folder, write_flat_folder
from PIL import Image

from ldm_pipeline import data as data_lib
from ldm_pipeline import generate, load_config, load_pipeline, read_png_metadata
from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ModelConfig
from ldm_pipeline.models import build_vae, vae_scale_factor
from ldm_pipeline.training import train

CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "folder128.yaml"
STEPS = 3  # sampling.num_inference_steps of the tiny runs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads
    waiting on each other made these runs 10-20x slower (65 s instead of 4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_overrides(data_dir: Path, output_dir: Path) -> list[str]:
    """Shrink folder128.yaml to seconds on a CPU; everything else (resolution, stages, captions,
    flips, latent cache, EMA, min-SNR) stays as the config has it."""
    return [
        # 'no' quoted: YAML reads a bare no as false
        f"data.train_data_dir={data_dir}", f"output_dir={output_dir}", "mixed_precision='no'",
        "data.dataloader_num_workers=0", "model.vae=tiny", "model.unet=tiny", "model.text_encoder=tiny",
        "vae_training.train_batch_size=4", "vae_training.max_train_steps=2", "vae_training.scaling_samples=8",
        "vae_training.psnr_samples=2", "vae_training.checkpointing_steps=0",
        "train_batch_size=4", "max_train_steps=3", "checkpointing_steps=0", "validation.validation_steps=0",
        "validation.num_heldout=2", "validation.seeds=[0]", f"sampling.num_inference_steps={STEPS}",
    ]


def test_folder128_config_makes_16x16_latents():
    config = load_config(CONFIG, [f"data.train_data_dir={Path(__file__).parent}"])  # any existing folder
    assert config.resolution == 128 and config.stages == ["vae", "unet"]
    with torch.device("meta"):
        vae = build_vae(ModelConfig(vae=config.model.vae))
    assert config.resolution // vae_scale_factor(vae) == 16 and vae.config.latent_channels == 4


def check_pipeline(pipeline_dir: Path, prompt: str) -> None:
    pipe = load_pipeline(pipeline_dir, device="cpu")
    assert pipe.generation_defaults["num_inference_steps"] == STEPS
    assert pipe.unet.config.sample_size == 16
    images, progress = generate(pipe, [prompt], seeds=[0], return_progress=True, show_progress=False)
    assert images[0].size == (128, 128)
    assert len(progress[0]) == STEPS  # one decoded latent per denoising step
    assert images[0].info["parameters"]["num_inference_steps"] == STEPS


def test_class_subfolders_train_a_class_conditional_model(tmp_path):
    data_dir = write_class_folder(tmp_path / "classes", count=8, size=128)
    config = load_config(CONFIG, tiny_overrides(data_dir, tmp_path / "out"))
    captions = data_lib.load_train_data(config).captions
    assert sorted(set(captions)) == ["a photo of a blue", "a photo of a red"]
    pipeline_dir = train(config)
    check_pipeline(pipeline_dir, "a photo of a red")
    assert (tmp_path / "out" / "vae" / "calibration.json").is_file()  # the VAE stage ran at 128 px


def test_flat_folder_trains_an_unconditional_model(tmp_path):
    data_dir = write_flat_folder(tmp_path / "flat", count=16, size=128)
    config = load_config(CONFIG, tiny_overrides(data_dir, tmp_path / "out"))
    assert set(data_lib.load_train_data(config).captions) == {""}
    pipeline_dir = train(config)
    check_pipeline(pipeline_dir, "")

    # The CLI's --steps overrides the configured count; --save-progress writes one GIF frame per step.
    out = tmp_path / "generated"
    assert cli(["generate", "--model", str(pipeline_dir), "--prompt", "", "--steps", "4", "--seed", "1",
                "--device", "cpu", "--save-progress", "--out", str(out)]) == 0
    assert read_png_metadata(out / "00000.png")["num_inference_steps"] == "4"
    with Image.open(out / "00000.gif") as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB"), dtype=int))
    assert gif.size == (128, 128)
    assert len(frames) >= 4  # the 4 steps (GIF merges the identical frames that hold the last one)
    assert np.abs(frames[0] - frames[-1]).mean() > 0  # an animation, not one image repeated
    with Image.open(out / "00000.png") as final:
        assert np.abs(frames[-1] - np.asarray(final.convert("RGB"), dtype=int)).mean() < 8  # ends on the image


def test_captioned_folder_is_text_conditional(tmp_path):
    data_dir = write_caption_folder(tmp_path / "captioned", count=8, size=128)
    config = load_config(CONFIG, tiny_overrides(data_dir, tmp_path / "out"))
    assert data_lib.load_train_data(config).captions[0] == "a red square on the left"
