"""The model card (README.md) saved with every pipeline, read with huggingface_hub's own parser."""

import json

from conftest import save_tiny_pipeline, tiny_config_dict
from huggingface_hub import ModelCard

from ldm_pipeline.card import SAMPLE_GRID, training_card
from ldm_pipeline.config import config_from_dict


def test_trained_pipeline_has_a_hub_model_card(trained_run):
    pipeline = trained_run / "pipeline"
    card = ModelCard.load(pipeline / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"ldm_pipeline", "text-to-image", "diffusers", "stable-diffusion-style"} <= set(card.data.tags)
    assert card.data.base_model is None  # trained from scratch (presets)
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [m["val_loss"] for m in metrics if "val_loss" in m][-1]
    psnr = json.loads((trained_run / "vae" / "calibration.json").read_text())["heldout_psnr_db"]
    text = card.text
    assert "- images: 16 (2 of them held out" in text
    assert "| vae | 2 | 4 |" in text and "| unet | 4 | 4 |" in text  # steps and global batch per stage
    assert f"{psnr:.2f} dB" in text and f"{val_loss:.4f}" in text
    assert "`resolution`: 32" in text and "`mixed_precision`: no" in text
    assert f"]({SAMPLE_GRID})" in text
    assert (pipeline / SAMPLE_GRID).read_bytes() == (trained_run / "samples" / "final.png").read_bytes()


def test_card_names_hub_base_model_and_dataset(tmp_path):
    """Hub ids go into the header; local directories only into the body (offline: nothing is fetched)."""
    data = tiny_config_dict(tmp_path / "out", tmp_path)
    data["data"] = {"dataset_name": "someone/shapes-dataset", "caption_column": "caption"}
    data["model"] = {"pretrained_model_name_or_path": "someone/base-model", "vae": str(tmp_path)}
    card = training_card(config_from_dict(data), num_images=10, num_heldout=2, num_processes=2,
                         parameters={"unet": 1e6, "vae": 1e5, "text_encoder": 1e4}, metrics={}, sample_grid=False)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "someone/base-model" and loaded.data.datasets == ["someone/shapes-dataset"]
    assert f"initialised from {tmp_path}" in loaded.text and "| unet | 4 | 8 |" in loaded.text
    assert "## Evaluation" not in loaded.text and SAMPLE_GRID not in loaded.text


def test_every_saved_pipeline_has_a_card(tmp_path):
    card = ModelCard.load(save_tiny_pipeline(tmp_path / "pipeline") / "README.md")
    assert card.data.library_name == "diffusers" and "from_pretrained" in card.text
