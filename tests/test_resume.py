"""Resuming is safe and faithful: no code runs from a checkpoint, changed settings are applied or refused by
name, the frozen text encoder travels with the run, skipped steps keep the data position, the EMA stays on its
model's device, and tracker steps only grow."""

import json
import os
import pickle

import pytest
import torch
from conftest import stopped_after_checkpoint, write_caption_folder
from test_scale import STEPS, assert_same_state, checkpoint_names, logged, scale_config, training_state

import ldm_pipeline.loop as loop_module
import ldm_pipeline.losses as losses
import ldm_pipeline.training as train_module
import ldm_pipeline.unet_stage as unet_stage
from ldm_pipeline.checkpoints import load_checkpoint
from ldm_pipeline.config import ConfigError, config_from_dict
from ldm_pipeline.training import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("resume") / "data")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A finished 5-step run with EMA and checkpoints at steps 2, 4 and 5."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train(config_from_dict(scale_config(out, data_dir)))
    return out


def run_copy(finished, tmp_path):
    import shutil

    return shutil.copytree(finished, tmp_path / "out")


class Hostile:
    """Unpickling this runs a shell command that leaves a file behind: what a tampered checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_checkpoint_with_a_hostile_pickle_is_refused_and_runs_nothing(finished, data_dir, tmp_path, name):
    out = run_copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    with open(out / "checkpoints" / "step-4" / name, "wb") as handle:
        pickle.dump(Hostile(marker), handle)
    torch.save({"payload": Hostile(marker)}, tmp_path / "unused.bin")  # the same object via torch.save also works
    config = scale_config(out, data_dir, max_train_steps=STEPS,
                          resume_from_checkpoint=str(out / "checkpoints" / "step-4"))
    with pytest.raises(ConfigError, match="could run code|can run code"):
        train(config_from_dict(config))
    assert not marker.exists()


def test_checkpoints_hold_no_pickle_that_is_read_unsafely(finished):
    checkpoint = finished / "checkpoints" / "step-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "training_state.json" in names and "ema.safetensors" in names
    assert not [name for name in names if name.startswith("custom_checkpoint")]
    for path in checkpoint.glob("*.bin"):  # Accelerate's files must load with weights_only=True
        torch.load(path, weights_only=True)


def test_a_changed_learning_rate_is_applied_from_the_resumed_step(finished, data_dir, tmp_path, capsys):
    out = run_copy(finished, tmp_path)
    config = scale_config(out, data_dir, max_train_steps=7, lr_scheduler="constant", learning_rate=3e-4,
                          resume_from_checkpoint=str(out / "checkpoints" / "step-4"))
    train(config_from_dict(config))
    assert "resuming with changed settings" in capsys.readouterr().out
    lrs = logged(out, "lr")
    assert lrs[5] == lrs[6] == lrs[7] == pytest.approx(3e-4)
    state = training_state(out / "checkpoints" / "step-7")
    assert state["lr"] == [pytest.approx(3e-4)] and state["lr_schedule"]["base_lrs"] == [pytest.approx(3e-4)]


@pytest.mark.parametrize("change, message", [
    ({"max_train_steps": 3}, r"step-5 is at step 5, past max_train_steps 3"),
    ({"train_batch_size": 2}, r"global batch of 4 samples, this run has 2 \(train_batch_size 2"),
    ({"gradient_accumulation_steps": 2}, r"global batch of 4 samples, this run has 8"),
    ({"seed": 1}, r"different settings \(seed: 0 -> 1\)"),
])
def test_a_setting_that_cannot_be_applied_is_refused_by_name(finished, data_dir, change, message):
    before = sorted(p.relative_to(finished).as_posix() for p in finished.rglob("*"))
    config = scale_config(finished, data_dir, resume_from_checkpoint="latest", **change)
    with pytest.raises(ConfigError, match=message):
        train(config_from_dict(config))
    assert sorted(p.relative_to(finished).as_posix() for p in finished.rglob("*")) == before


def test_another_data_folder_is_refused_before_anything_is_written(finished, tmp_path):
    other = write_caption_folder(tmp_path / "other", count=12)
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*")}
    with pytest.raises(ConfigError, match=r"data.train_data_dir: '.*data' -> '.*other'"):
        train(config_from_dict(scale_config(finished, other, resume_from_checkpoint="latest")))
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*")} == before


def test_the_frozen_text_encoder_and_tokenizer_travel_with_the_run(finished, data_dir, tmp_path, monkeypatch):
    out = run_copy(finished, tmp_path)
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "tokenizer" / "vocab.json").is_file()
    # A resume must read them back, not rebuild them: a rebuilt encoder would be a different random init.
    sources, build = [], train_module.build_text_encoder
    monkeypatch.setattr(train_module, "build_text_encoder",
                        lambda model, tokenizer: sources.append(model.text_encoder) or build(model, tokenizer))
    train(config_from_dict(scale_config(out, data_dir, max_train_steps=6, resume_from_checkpoint="latest")))
    assert sources == [str(out / "text_encoder")] and "step-6" in checkpoint_names(out)


def test_a_vae_checkpoint_is_refused_for_the_unet_stage(finished, data_dir, tmp_path):
    fake = tmp_path / "checkpoints" / "vae-step-2"
    fake.mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoint of the vae stage, which this run does not train"):
        train(config_from_dict(scale_config(finished, data_dir, resume_from_checkpoint=str(fake))))


def test_ema_weights_are_restored_in_place_on_the_models_device(finished):
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = UNet2DConditionModel.from_pretrained(finished / "pipeline" / "unet")
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(unet)
    ema = EMAModel(model.parameters(), decay=0.9)
    ema.to("meta")  # stands in for a GPU: the restored weights must land where the EMA lives, not on the CPU
    load_checkpoint(accelerator, finished / "checkpoints" / f"step-{STEPS}", ema)
    assert {tensor.device.type for tensor in ema.shadow_params} == {"meta"}
    assert ema.optimization_step == STEPS


def flaky(monkeypatch, bad_windows: set, accumulation: int = 1):
    """Make the loss non-finite on the given data windows (by data position, so a resumed run sees them too)."""
    current = {}
    sample_generators, diffusion_loss = loop_module.sample_generators, losses.diffusion_loss

    def remember(seed, micro_step, indices):
        current["window"] = micro_step // accumulation
        return sample_generators(seed, micro_step, indices)

    def loss(*args, **kwargs):
        value = diffusion_loss(*args, **kwargs)
        bad = torch.is_grad_enabled() and current.get("window") in bad_windows
        return value * float("nan") if bad else value

    monkeypatch.setattr(loop_module, "sample_generators", remember)  # the loop draws; the UNet stage computes
    monkeypatch.setattr(losses, "diffusion_loss", loss)  # the UNet stage calls losses.diffusion_loss


def test_a_resume_after_a_skipped_step_equals_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    # Window 1 is skipped, so step 4 ends after 5 windows: one window into the second epoch (3 windows each).
    flaky(monkeypatch, {1})
    reference = tmp_path / "reference"
    train(config_from_dict(scale_config(reference, data_dir)))
    assert training_state(reference / "checkpoints" / "step-4")["progress"] == {
        "step": 4, "windows": 5, "skipped_steps": 1, "overflow_steps": 0}

    resumed = tmp_path / "resumed"
    with stopped_after_checkpoint(4):
        train(config_from_dict(scale_config(resumed, data_dir)))
    train(config_from_dict(scale_config(resumed, data_dir, resume_from_checkpoint="latest")))
    assert_same_state(resumed / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")
    assert logged(resumed, "loss")[STEPS] == logged(reference, "loss")[STEPS]


def test_an_fp16_overflow_step_advances_nothing_but_the_data(data_dir, tmp_path, monkeypatch):
    """With the GradScaler an overflowing step is skipped inside optimizer.step(); the LR schedule, the EMA and
    the step count must not move, and the run still ends after max_train_steps real updates."""
    from accelerate import Accelerator

    calls = {"n": 0}

    def skipped(self):
        calls["n"] += 1
        return calls["n"] == 2  # the second optimizer step overflows

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    out = tmp_path / "out"
    train(config_from_dict(scale_config(out, data_dir)))
    state = training_state(out / "checkpoints" / f"step-{STEPS}")
    assert state["progress"] == {"step": STEPS, "windows": STEPS + 1, "skipped_steps": 0, "overflow_steps": 1}
    assert state["lr_schedule"]["last_epoch"] == state["ema"]["optimization_step"] == STEPS
    assert logged(out, "overflow_steps")[STEPS] == 1


@pytest.mark.parametrize("decoder_steps", [0, 2])
def test_tracker_steps_only_grow_across_stages(data_dir, tmp_path, monkeypatch, decoder_steps):
    from accelerate import Accelerator

    steps = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kwargs: steps.append(step))
    config = scale_config(tmp_path / "out", data_dir, stages=["vae", "unet"], vae_training__max_train_steps=3,
                          vae_training__validation_steps=1, vae_training__decoder_steps=decoder_steps, logging_steps=1)
    train(config_from_dict(config))
    # the UNet's steps follow the VAE's and its decoder's
    assert steps == sorted(steps) and steps[-1] == 3 + decoder_steps + STEPS


def test_metrics_keep_the_stage_and_its_own_step(tmp_path, data_dir):
    config = scale_config(tmp_path / "out", data_dir, stages=["vae", "unet"], vae_training__max_train_steps=2,
                          max_train_steps=2, logging_steps=1)
    train(config_from_dict(config))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "unet" and "loss" in r] == [1, 2]


def test_an_infinite_gradient_with_a_finite_loss_is_skipped(data_dir, tmp_path, monkeypatch):
    """Without a GradScaler (fp32, bf16) nothing else would catch it: clipping turns inf into NaN weights."""
    build_unet, calls = unet_stage.build_unet, {"n": 0}

    def unet_with_a_bad_gradient(*args, **kwargs):
        unet = build_unet(*args, **kwargs)

        def poison(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] == 2 else grad  # the second backward pass

        unet.conv_in.bias.register_hook(poison)
        return unet

    monkeypatch.setattr(unet_stage, "build_unet", unet_with_a_bad_gradient)  # where the UNet stage looks it up
    out = tmp_path / "out"
    train(config_from_dict(scale_config(out, data_dir)))
    state = training_state(out / "checkpoints" / f"step-{STEPS}")
    assert state["progress"] == {"step": STEPS, "windows": STEPS + 1, "skipped_steps": 1, "overflow_steps": 0}
    assert all(torch.isfinite(tensor).all() for tensor in state["weights"].values())
