"""Shared fixtures: tiny image folders in every accepted layout and a tiny seeded config."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once: no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from PIL import Image, ImageDraw

from ldm_pipeline.config import config_from_dict

# Tiny models are overhead-bound: one thread is as fast as two and does not collapse when other
# processes (subprocess tests, a busy CI box) share the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220)}


@contextlib.contextmanager
def stopped_after_checkpoint(at_step: int):
    """A training run inside the block stops right after it has written checkpoint `at_step`, as a crash
    would; the block expects that stop."""
    import ldm_pipeline.loop as loop_module  # the loop saves its checkpoints: the name is looked up there

    save_checkpoint = loop_module.save_checkpoint

    class Stopped(Exception):
        pass

    def save_then_stop(accelerator, config, prefix, step, *args):
        save_checkpoint(accelerator, config, prefix, step, *args)
        if step == at_step:
            raise Stopped

    loop_module.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stopped):
            yield
    finally:
        loop_module.save_checkpoint = save_checkpoint


def draw_square(color, left: bool, size: int = 32) -> Image.Image:
    """A filled square on white, in the left or right half: easy, caption-dependent content."""
    image = Image.new("RGB", (size, size), "white")
    x0 = size // 8 if left else size // 2 + size // 8
    ImageDraw.Draw(image).rectangle([x0, size // 4, x0 + size // 4, size // 2 + size // 8], fill=color)
    return image


def write_caption_folder(root: Path, count: int = 16, size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as handle:
        for i in range(count):
            name, left = list(COLORS)[i % 2], (i // 2) % 2 == 0
            draw_square(COLORS[name], left, size).save(root / f"{i:03d}.png")
            caption = f"a {name} square on the {'left' if left else 'right'}"
            handle.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return root


def write_class_folder(root: Path, count: int = 8, size: int = 32) -> Path:
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            draw_square(color, i % 2 == 0, size).save(root / name / f"{i:03d}.png")
    return root


def write_flat_folder(root: Path, count: int = 16, size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_square(list(COLORS.values())[i % 2], i % 3 == 0, size).save(root / f"{i:03d}.png")
    return root


@pytest.fixture
def caption_folder(tmp_path) -> Path:
    return write_caption_folder(tmp_path / "captioned")


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return write_class_folder(tmp_path / "classes")


@pytest.fixture
def flat_folder(tmp_path) -> Path:
    return write_flat_folder(tmp_path / "flat")


def tiny_config_dict(output_dir: Path, data_dir: Path, **overrides) -> dict:
    """The smallest run that exercises every part: 32 px images, 4x4 latents, widths of 8-64."""
    config = {
        "output_dir": str(output_dir),
        "resolution": 32,
        "seed": 0,
        "model": {"unet": "tiny", "vae": "tiny", "text_encoder": "tiny"},
        "data": {"train_data_dir": str(data_dir)},
        "train_batch_size": 4,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "checkpointing_steps": 0,
        "logging_steps": 1,
        "cpu_threads": 1,
        "validation": {"prompts": ["a red square on the left"], "seeds": [0], "validation_steps": 0,
                       "num_heldout": 2},
        "sampling": {"num_inference_steps": 2},
        "vae_training": {"train_batch_size": 4, "max_train_steps": 2, "scaling_samples": 8, "psnr_samples": 2},
    }
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def tiny_config(output_dir: Path, data_dir: Path, **overrides):
    """`tiny_config(out, data, max_train_steps=8, data__cache_latents=True)`: `__` nests keys."""
    return config_from_dict(tiny_config_dict(output_dir, data_dir, **overrides))


def save_tiny_pipeline(directory, unet_kwargs=None, vae_kwargs=None, family: str = "sd"):
    """An untrained pipeline of `tiny` components (preset overrides in *_kwargs), 32 px, 2 sampling steps; with
    `family` "sdxl" a StableDiffusionXLPipeline of the tiny SDXL layout."""
    from ldm_pipeline.config import ModelConfig, SamplingConfig
    from ldm_pipeline.models import build_noise_scheduler, build_text_encoder, build_unet, build_vae, load_tokenizer
    from ldm_pipeline.pipeline import save_pipeline

    torch.manual_seed(0)
    model = ModelConfig(unet_kwargs=unet_kwargs or {}, vae_kwargs=vae_kwargs or {}, family=family)
    tokenizer = load_tokenizer(model, lambda: ["a red square on the left", "a blue square on the right"])
    text_encoder = build_text_encoder(model, tokenizer)
    second = {}
    if family == "sdxl":
        second = {"tokenizer_2": tokenizer, "text_encoder_2": build_text_encoder(model, tokenizer, "text_encoder_2")}
    vae = build_vae(model)
    unet = build_unet(model, 32, vae, text_encoder, second.get("text_encoder_2"))
    return save_pipeline(directory, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         noise_scheduler=build_noise_scheduler(model, "epsilon"),
                         sampling=SamplingConfig(num_inference_steps=2), **second)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny two-stage run (VAE then UNet, EMA, checkpoints) shared by the tests that read it."""
    from ldm_pipeline.training import train

    root = tmp_path_factory.mktemp("trained")
    data_dir = write_caption_folder(root / "data")
    config = tiny_config(root / "out", data_dir, stages=["vae", "unet"], max_train_steps=4, checkpointing_steps=2,
                         use_ema=True, ema_decay=0.9, snr_gamma=5.0, validation__validation_steps=2)
    train(config)
    return root / "out"


def save_untrained_pipeline(directory: Path, captions: list[str], resolution: int = 32, sample_size=None) -> Path:
    """A tiny pipeline straight from the presets (no training), with a tokenizer learned from `captions`."""
    from ldm_pipeline.config import ModelConfig, SamplingConfig
    from ldm_pipeline.models import build_noise_scheduler, build_text_encoder, build_unet, build_vae, load_tokenizer
    from ldm_pipeline.pipeline import save_pipeline

    model = ModelConfig(unet="tiny", vae="tiny", text_encoder="tiny",
                        unet_kwargs={"sample_size": sample_size} if sample_size else {})
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model, lambda: captions)
    text_encoder = build_text_encoder(model, tokenizer)
    vae = build_vae(model)
    return save_pipeline(directory, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         unet=build_unet(model, resolution, vae, text_encoder),
                         noise_scheduler=build_noise_scheduler(model, "epsilon"),
                         sampling=SamplingConfig(num_inference_steps=2), extra={"resolution": resolution})
