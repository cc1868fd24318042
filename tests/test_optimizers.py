"""`optimizer: adamw | adamw_8bit | adafactor | prodigy` (issue 22): each trains, checkpoints its own state and
resumes exactly; a missing optional package is refused in one line naming the extra."""

import importlib.util

import pytest
import torch
from conftest import stopped_after_checkpoint, tiny_config
from safetensors.torch import load_file

from ldm_pipeline import train
from ldm_pipeline.config import ConfigError

STEPS = 4
# a state entry only each optimizer keeps for a parameter (AdamW keeps exp_avg / exp_avg_sq; bitsandbytes wraps its
# moments, 8-bit for tensors of 4096 values or more, in an entry of its own)
OWN_STATE = {"adamw": "exp_avg", "adamw_8bit": "__bnb_optimizer_quant_state__", "adafactor": "RMS",
             "prodigy": "p0"}


def config(tmp_path, folder, name: str, optimizer: str, **overrides):
    # prodigy learns its own step size from a learning rate of 1 (its documented setting)
    settings = {"stages": ["unet"], "max_train_steps": STEPS, "checkpointing_steps": 2,
                "learning_rate": 1.0 if optimizer == "prodigy" else 1e-3, **overrides}
    return tiny_config(tmp_path / name, folder, optimizer=optimizer, **settings)


def unet_weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adafactor", "prodigy"])
def test_each_optimizer_trains_checkpoints_its_state_and_resumes_exactly(tmp_path, caption_folder, optimizer):
    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")  # installed with the test extra; a bare install refuses it (below)
    reference = tmp_path / "reference"
    train(config(tmp_path, caption_folder, "reference", optimizer))
    with stopped_after_checkpoint(2):
        train(config(tmp_path, caption_folder, "resumed", optimizer))
    train(config(tmp_path, caption_folder, "resumed", optimizer, resume_from_checkpoint="latest"))
    want = unet_weights(reference / "checkpoints" / f"step-{STEPS}")
    got = unet_weights(tmp_path / "resumed" / "checkpoints" / f"step-{STEPS}")
    assert want.keys() == got.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    # the checkpoint holds this optimizer's own state, and the weights moved
    state = torch.load(reference / "checkpoints" / f"step-{STEPS}" / "optimizer.bin", weights_only=False)["state"]
    assert state and all(OWN_STATE[optimizer] in moments for moments in state.values())
    first = unet_weights(reference / "checkpoints" / "step-2")
    assert any(not torch.equal(first[name], want[name]) for name in want)


def test_adamw_keeps_its_fused_moments(tmp_path, caption_folder):
    train(config(tmp_path, caption_folder, "run", "adamw", checkpointing_steps=STEPS))
    state = torch.load(tmp_path / "run" / "checkpoints" / f"step-{STEPS}" / "optimizer.bin", weights_only=True)["state"]
    assert state and all(OWN_STATE["adamw"] in moments for moments in state.values())


@pytest.mark.parametrize(("optimizer", "package", "extra"),
                         [("adamw_8bit", "bitsandbytes", "8bit"), ("prodigy", "prodigyopt", "prodigy")])
def test_an_optimizer_whose_package_is_missing_is_refused_naming_the_extra(tmp_path, caption_folder, monkeypatch,
                                                                          optimizer, package, extra):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == package else
                        find_spec(name, *args))
    with pytest.raises(ConfigError) as raised:
        config(tmp_path, caption_folder, "run", optimizer)
    assert str(raised.value) == (f'optimizer: {optimizer} needs {package}, an optional extra: pip install '
                                 f'"ldm_pipeline[{extra}]" (or optimizer: adamw)')
    assert not (tmp_path / "run").exists()
