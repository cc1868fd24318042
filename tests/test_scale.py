"""Scale and crash safety: a run ends with the same model at 1 and 2 processes, after an exact resume
(at the same or another process count), after a SIGKILL mid-step or mid-save, and it skips
non-finite steps; generation and the held-out loss give the same results at 1 and 2 processes.

Every run here is one tiny config: 13 training images (3 held out), a global batch of 4, so an
epoch is 3 optimizer steps and the checkpoint at step 2 lies mid-epoch; 5 steps of a linear LR
schedule (a different LR at every step), EMA on.
"""

import json
import os
import shlex
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import stopped_after_checkpoint, tiny_config_dict, write_caption_folder
from PIL import Image
from safetensors.torch import load_file
from test_launch import ROOT, accelerate_launch, run_watched

import ldm_pipeline.losses as losses
import ldm_pipeline.unet_stage as unet_stage
from ldm_pipeline.checkpoints import find_resume_checkpoint
from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import config_from_dict
from ldm_pipeline.generation import read_png_metadata
from ldm_pipeline.training import main as train_main
from ldm_pipeline.training import train

STEPS = 5


def scale_config(out, data_dir, **overrides) -> dict:
    settings = dict(max_train_steps=STEPS, checkpointing_steps=2, use_ema=True, ema_decay=0.9,
                    lr_scheduler="linear", lr_warmup_steps=1, validation__num_heldout=3,
                    validation__validation_steps=2)
    return tiny_config_dict(out, data_dir, **{**settings, **overrides})


def write_config(path, config: dict):
    path.write_text(yaml.safe_dump(config))
    return path


def training_state(checkpoint) -> dict:
    """What a checkpoint resumes: weights, EMA, optimizer moments and the LR schedule's position."""
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    state = json.loads((checkpoint / "training_state.json").read_text())
    shadow = load_file(checkpoint / "ema.safetensors")
    return {
        "weights": load_file(checkpoint / "model.safetensors"),
        "lr_schedule": state["lr_scheduler"],
        "ema": {**state["ema"], "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]},
        "optimizer": optimizer["state"],
        "lr": [group["lr"] for group in optimizer["param_groups"]],
        "progress": {key: state[key] for key in ("step", "windows", "skipped_steps", "overflow_steps")},
    }


def assert_same_state(checkpoint, expected, atol: float = 0.0):
    got, want = training_state(checkpoint), training_state(expected)
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=atol)
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        assert close(got["weights"][name], tensor), name
    assert got["ema"]["optimization_step"] == want["ema"]["optimization_step"] == STEPS
    assert all(close(a, b) for a, b in zip(got["ema"]["shadow_params"], want["ema"]["shadow_params"], strict=True))
    for index, moments in want["optimizer"].items():
        assert torch.equal(got["optimizer"][index]["step"], moments["step"])
        assert close(got["optimizer"][index]["exp_avg"], moments["exp_avg"]), index
        assert close(got["optimizer"][index]["exp_avg_sq"], moments["exp_avg_sq"]), index
    schedule = want["lr_schedule"]
    assert (got["lr_schedule"]["last_epoch"], got["lr"]) == (schedule["last_epoch"], want["lr"])
    assert schedule["last_epoch"] == STEPS


def logged(out, key: str) -> dict:
    """{step: value} of one metric from metrics.jsonl (the last entry wins, as after a resume)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def checkpoint_names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def scale_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_caption_folder(root / "data")
    return root


@pytest.fixture(scope="module")
def reference(scale_root):
    """The uninterrupted one-process run, global batch 4: what every other run must end equal to."""
    out = scale_root / "reference"
    train(config_from_dict(scale_config(out, scale_root / "data")))
    assert checkpoint_names(out) == ["step-2", "step-4", f"step-{STEPS}"]
    return out


@pytest.fixture(scope="module")
def two_process_run(scale_root):
    """The same run with 2 processes of batch 2, through `accelerate launch`."""
    out = scale_root / "two_processes"
    config = write_config(scale_root / "two.yaml", scale_config(out, scale_root / "data", train_batch_size=2))
    result = accelerate_launch("train.py", "--config", str(config), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size: 4 = 2 per process x 2 processes x 1 accumulation" in result.stdout
    return out


def test_two_processes_end_with_the_weights_of_one_process_at_the_same_global_batch(reference, two_process_run):
    assert checkpoint_names(two_process_run) == checkpoint_names(reference)
    assert_same_state(two_process_run / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}",
                      atol=5e-5)
    # The LR schedule counts optimizer steps, not per-process ones: the same LR at every step.
    assert logged(two_process_run, "lr") == logged(reference, "lr")
    assert sorted(logged(reference, "lr")) == list(range(1, STEPS + 1))
    saved, expected = (load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
                       for out in (two_process_run, reference))
    assert all(torch.allclose(saved[name], expected[name], rtol=0, atol=5e-5) for name in expected)


def test_heldout_loss_is_the_same_at_one_and_two_processes(reference, two_process_run):
    # 3 held-out examples split 2 + 1 across the processes: a mean of the two means would differ.
    one, two = logged(reference, "val_loss"), logged(two_process_run, "val_loss")
    assert sorted(one) == [2, 4, STEPS]
    assert two.keys() == one.keys()
    for step, value in one.items():
        assert two[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


def readme_cpu_generate_command() -> list[str]:
    """The README's command for generating on 2 CPU processes, as words."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ACCELERATE_USE_CPU=1 accelerate launch")
               and "ldm_pipeline.cli generate" in line]
    return shlex.split(line)


def test_generate_at_two_processes_writes_every_image_once_as_one_process_does(trained_run, tmp_path):
    prompts = ["a red square on the left", "a blue square on the right", "a red square on the right",
               "a blue square on the left", "a square"]  # 5 jobs: rounds of 2 + 2, then 1
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    settings = ["--seed", "11", "--steps", "2", "--batch-size", "2"]
    assert cli(["generate", "--model", str(trained_run / "pipeline"), "--prompts-file", str(tmp_path / "prompts.txt"),
                *settings, "--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    # The README's command, word for word but for the paths
    words = readme_cpu_generate_command()
    assert words[:3] == ["ACCELERATE_USE_CPU=1", "accelerate", "launch"]
    paths = {"DIR": str(trained_run / "pipeline"), "prompts.txt": str(tmp_path / "prompts.txt"),
             "gen/": str(tmp_path / "two")}
    command = [sys.executable, "-m", "accelerate.commands.launch", *[paths.get(w, w) for w in words[3:]], *settings]
    result = run_watched(command, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generating 5 images on 2 process(es)" in result.stdout
    assert result.stdout.count("wrote 5 images") == 1  # the main process alone writes
    names = [f"{i:05d}.png" for i in range(len(prompts))]
    for folder in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
    for name, prompt in zip(names, prompts):
        for folder in ("one", "two"):
            meta = read_png_metadata(tmp_path / folder / name)
            assert (meta["prompt"], meta["seed"]) == (prompt, "11"), (folder, name)
        with Image.open(tmp_path / "one" / name) as a, Image.open(tmp_path / "two" / name) as b:
            difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
        assert difference <= 1, name


def test_a_run_stopped_after_a_checkpoint_resumes_exactly(reference, scale_root, capsys):
    out = scale_root / "stopped"
    config = scale_config(out, scale_root / "data")
    with stopped_after_checkpoint(2):
        train(config_from_dict(config))
    assert checkpoint_names(out) == ["step-2"]
    train(config_from_dict({**config, "resume_from_checkpoint": "latest"}))
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().out
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")
    # Step 3 finishes the first epoch on its third batch; a restarted epoch would train on the first.
    assert logged(out, "loss") == logged(reference, "loss")


# Run as `python killer.py training|saving STEP --config run.yaml`: trains in this process and SIGKILLs
# it, either at the first micro-batch of optimizer step STEP, or while checkpoint step-STEP is written
# (its model and optimizer files are on disk, the EMA and the step counters not yet).
KILLER = """
import os, signal, sys
from pathlib import Path

import ldm_pipeline.checkpoints as checkpoints
import ldm_pipeline.loop as loop
import ldm_pipeline.training as train

when, step = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if when == "training":
    sample_generators = loop.sample_generators

    def dying_sample_generators(seed, micro_step, indices):
        if micro_step == step - 1:
            die()
        return sample_generators(seed, micro_step, indices)

    loop.sample_generators = dying_sample_generators
else:
    save_file = checkpoints.save_file

    def dying_save_file(tensors, path, *args, **kwargs):
        if Path(path).parent.name == f".partial-step-{step}":
            die()
        return save_file(tensors, path, *args, **kwargs)

    checkpoints.save_file = dying_save_file
sys.exit(train.main(sys.argv[3:]))
"""


def killed_run(root, when: str, step: int, **overrides):
    (root / "killer.py").write_text(KILLER)
    out = root / f"killed_{when}"
    config = write_config(root / f"killed_{when}.yaml", scale_config(out, root / "data", **overrides))
    result = run_watched([sys.executable, str(root / "killer.py"), when, str(step), "--config", str(config)],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # as this process: exact
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_in_training(scale_root):
    """A one-process run SIGKILLed during step 4: checkpoint step-2 is the last one, step 3 is lost."""
    out = killed_run(scale_root, "training", 4)
    assert checkpoint_names(out) == ["step-2"]
    assert logged(out, "loss").keys() == {1, 2, 3}
    return out


def test_a_run_killed_mid_step_resumes_from_its_last_checkpoint(reference, killed_in_training, tmp_path, capsys):
    out = shutil.copytree(killed_in_training, tmp_path / "out")
    train(config_from_dict(scale_config(out, killed_in_training.parent / "data", resume_from_checkpoint="latest")))
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().out
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")
    assert (out / "pipeline" / "model_index.json").is_file()


def test_a_one_process_run_resumes_at_two_processes(reference, killed_in_training, tmp_path):
    out = shutil.copytree(killed_in_training, tmp_path / "out")
    config = write_config(tmp_path / "two.yaml", scale_config(out, killed_in_training.parent / "data",
                                                              train_batch_size=2, resume_from_checkpoint="latest"))
    result = accelerate_launch("train.py", "--config", str(config), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in result.stdout
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}", atol=5e-5)
    assert logged(out, "lr") == logged(reference, "lr")


def test_a_run_killed_while_saving_keeps_its_last_complete_checkpoint(reference, scale_root, capsys):
    out = killed_run(scale_root, "saving", 4, checkpoints_total_limit=1)
    # The newest complete checkpoint survives the half-written one (pruning waits for the rename).
    assert checkpoint_names(out) == [".partial-step-4", "step-2"]
    assert (out / "checkpoints" / ".partial-step-4" / "model.safetensors").is_file()
    config = scale_config(out, scale_root / "data", checkpoints_total_limit=1, resume_from_checkpoint="latest")
    assert find_resume_checkpoint(config_from_dict(config), "") == out / "checkpoints" / "step-2"
    # Saving only at the end now, nothing overwrites .partial-step-4: the resumed run must clear it.
    train(config_from_dict({**config, "checkpointing_steps": STEPS}))
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().out
    assert checkpoint_names(out) == [f"step-{STEPS}"]  # step-2 pruned only once step-5 was complete
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")


def test_non_finite_steps_are_skipped_then_training_stops_at_the_limit(scale_root, tmp_path, monkeypatch, capsys):
    """Training calls 0, 1, 3 are steps 1-3; call 2 is skipped; calls 4 and 5 in a row stop the run."""
    out = tmp_path / "out"
    config = scale_config(out, scale_root / "data", max_train_steps=4, checkpointing_steps=3,
                          max_consecutive_bad_steps=2, validation__validation_steps=0)
    unets, weights, bad_calls = [], [], {2, 4, 5}
    build_unet, diffusion_loss = unet_stage.build_unet, losses.diffusion_loss

    def keep_unet(*args, **kwargs):
        unets.append(build_unet(*args, **kwargs))
        return unets[-1]

    def flaky_loss(*args, **kwargs):
        loss = diffusion_loss(*args, **kwargs)
        if not torch.is_grad_enabled():  # the held-out loss
            return loss
        weights.append(torch.cat([p.detach().flatten() for _, p in sorted(unets[-1].named_parameters())]))
        return loss * float("nan") if len(weights) - 1 in bad_calls else loss

    monkeypatch.setattr(unet_stage, "build_unet", keep_unet)  # where the UNet stage looks it up
    monkeypatch.setattr(losses, "diffusion_loss", flaky_loss)  # the UNet stage calls losses.diffusion_loss
    assert train_main(["--config", str(write_config(tmp_path / "run.yaml", config))]) == 2
    error = capsys.readouterr()
    assert "step 3: non-finite loss or gradient, step skipped (1 in a row, 1 in all)" in error.out
    assert f"error: [unet] stopped at step 3: the loss was not finite for 2 optimizer steps in a row " \
           f"(max_consecutive_bad_steps). The last good checkpoint, {out / 'checkpoints' / 'step-3'}, is intact" \
           in error.err
    assert len(weights) == 6
    assert not torch.equal(weights[1], weights[2]) and not torch.equal(weights[3], weights[4])  # good steps
    assert torch.equal(weights[2], weights[3]) and torch.equal(weights[4], weights[5])  # skipped steps
    assert logged(out, "skipped_steps") == {1: 0, 2: 0, 3: 1}
    assert not (out / "pipeline").exists()

    checkpoint = out / "checkpoints" / "step-3"
    state = training_state(checkpoint)
    assert state["lr_schedule"]["last_epoch"] == state["ema"]["optimization_step"] == 3  # skipped steps not counted
    assert all(int(moments["step"]) == 3 for moments in state["optimizer"].values())
    saved = torch.cat([tensor.flatten() for _, tensor in sorted(state["weights"].items())])
    assert torch.equal(saved, weights[4])  # the weights after step 3
    monkeypatch.undo()
    train(config_from_dict({**config, "resume_from_checkpoint": "latest"}))
    assert f"resumed from {checkpoint} at step 3" in capsys.readouterr().out
    assert checkpoint_names(out) == ["step-3", "step-4"] and (out / "pipeline" / "model_index.json").is_file()


def test_the_vae_with_decoder_steps_ends_equal_at_two_processes(scale_root):
    """The VAE stage, then its decoder steps (a second model and optimizer prepared on the same Accelerator, only the
    decoder's parameters synchronised): 2 processes of batch 2 end with the VAE of 1 process of batch 4."""
    settings = dict(stages=["vae"], vae_training__max_train_steps=2, vae_training__decoder_steps=2)
    one = scale_root / "vae_one"
    train(config_from_dict(scale_config(one, scale_root / "data", **settings)))
    two = scale_root / "vae_two"
    config = write_config(scale_root / "vae_two.yaml", scale_config(two, scale_root / "data",
                                                                    vae_training__train_batch_size=2, **settings))
    result = accelerate_launch("train.py", "--config", str(config), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    saved, expected = (load_file(out / "vae" / "diffusion_pytorch_model.safetensors") for out in (two, one))
    assert saved.keys() == expected.keys()
    assert all(torch.allclose(saved[name], expected[name], rtol=0, atol=5e-5) for name in expected)
    assert [row["step"] for row in map(json.loads, (one / "metrics.jsonl").read_text().splitlines())
            if row["stage"] == "vae-decoder" and "loss" in row] == [1, 2]
