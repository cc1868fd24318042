"""The dtype paths users take on GPUs, run on the CPU: bf16 training with EMA through a checkpoint, a resume and
generation, and fine-tuning that keeps the pretrained model's prediction type."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import stopped_after_checkpoint, tiny_config
from safetensors import safe_open

from ldm_pipeline import generate, load_pipeline
from ldm_pipeline.training import train


def test_bf16_trains_with_ema_resumes_and_generates(tmp_path, caption_folder):
    settings = dict(stages=["vae", "unet"], mixed_precision="bf16", use_ema=True, ema_decay=0.9, max_train_steps=4,
                    checkpointing_steps=2, validation__validation_steps=2)

    with stopped_after_checkpoint(2):
        train(tiny_config(tmp_path / "out", caption_folder, **settings))
    pipeline = train(tiny_config(tmp_path / "out", caption_folder, resume_from_checkpoint="latest", **settings))

    assert (tmp_path / "out" / "samples" / "step-000002.png").is_file()  # validation ran in bf16
    with safe_open(pipeline / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}  # saved full precision
    for dtype in (torch.bfloat16, torch.float32):
        pipe = load_pipeline(pipeline, device="cpu", dtype=dtype)
        image = generate(pipe, ["a red square on the left"], seeds=[0], num_inference_steps=2)[0]
        assert image.size == (32, 32) and np.asarray(image).std() > 0  # a real image, not a black one


@pytest.fixture(scope="module")
def v_prediction_pipeline(tmp_path_factory):
    from conftest import write_caption_folder

    root = tmp_path_factory.mktemp("vpred")
    data = write_caption_folder(root / "data")
    pipeline = train(tiny_config(root / "out", data, prediction_type="v_prediction", max_train_steps=1))
    assert json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    return pipeline, data


def test_fine_tuning_keeps_the_pretrained_prediction_type(tmp_path, v_prediction_pipeline):
    pipeline, data = v_prediction_pipeline
    tuned = train(tiny_config(tmp_path / "tuned", data, max_train_steps=1,
                              model={"pretrained_model_name_or_path": str(pipeline)}))
    assert json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"


def test_an_explicit_prediction_type_overrides_the_pretrained_one_with_a_note(tmp_path, v_prediction_pipeline,
                                                                              caplog):
    pipeline, data = v_prediction_pipeline
    with caplog.at_level(logging.WARNING):
        tuned = train(tiny_config(tmp_path / "tuned", data, max_train_steps=1, prediction_type="epsilon",
                                  model={"pretrained_model_name_or_path": str(pipeline)}))
    assert json.loads((tuned / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert "training epsilon although" in caplog.text and "v_prediction" in caplog.text
