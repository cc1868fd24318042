"""compile: true (the UNet compiled in place with torch.compile): the run trains to the eager run's weights within
the float reordering of compiled kernels, resumes exactly, trains under DDP, saves the UNet under its own parameter
names, and a machine without the C++ compiler Inductor needs is refused before anything is written.

The one-process compiled runs share one per-process batch and shape, so their graph compiles once (a minute or more
on a 2-core CPU with an empty Inductor cache) and later runs load it from Inductor's cache; under DDP dynamo splits
it at the gradient buckets, a second compile. With Inductor's default fusions torch 2.13 computes zero gradients
below the UNet's upsamplers on the CPU, which unet_stage.CPU_COMPILE_OPTIONS avoids;
test_inductor_fusion_zeroes_the_gradient_through_a_resnet_and_upsampler pins that bug.
"""

import copy

import pytest
import torch
from conftest import stopped_after_checkpoint, write_caption_folder
from safetensors.torch import load_file
from test_launch import accelerate_launch
from test_scale import STEPS, assert_same_state, checkpoint_names, logged, scale_config, write_config

from ldm_pipeline.config import config_from_dict
from ldm_pipeline.training import main as train_main
from ldm_pipeline.training import train
from ldm_pipeline.unet_stage import CPU_COMPILE_OPTIONS

# Compiled kernels sum in another order than eager ones. Measured after the 5 steps (2026-12-07, torch 2.13.0+cpu):
# weights at most 7.5e-7 apart in one process, 1.1e-6 at two; a dropped gradient shows as ~1e-3 (AdamW moves each
# weight by about the learning rate per step).
EAGER_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    write_caption_folder(root / "data", size=64)
    return root


def run(root, name: str, **overrides) -> dict:
    """test_scale's run at 64 px and a global batch of 4 in micro-batches of 2: the per-process batch of the
    2-process run, so that one compiled graph serves every run here."""
    settings = {"resolution": 64, "train_batch_size": 2, "gradient_accumulation_steps": 2, **overrides}
    return scale_config(root / name, root / "data", **settings)


@pytest.fixture(scope="module")
def eager(root):
    train(config_from_dict(run(root, "eager")))
    return root / "eager"


@pytest.fixture(scope="module")
def eager_batch_of_4(root):
    """The eager run in one micro-batch of 4 per step: what 2 processes of 2 train (test_scale's reference)."""
    train(config_from_dict(run(root, "eager4", train_batch_size=4, gradient_accumulation_steps=1)))
    return root / "eager4"


@pytest.fixture(scope="module")
def compiled(root):
    """5 steps, EMA, checkpoints at 2, 4 and 5, validation at 2 and 4, with compile: true."""
    train(config_from_dict(run(root, "compiled", compile=True)))
    assert checkpoint_names(root / "compiled") == ["step-2", "step-4", f"step-{STEPS}"]
    return root / "compiled"


def test_a_compiled_run_ends_with_the_weights_of_the_eager_run(eager, compiled):
    last = f"checkpoints/step-{STEPS}"
    assert_same_state(compiled / last, eager / last, atol=EAGER_TOLERANCE)
    saved, expected = (load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
                       for out in (compiled, eager))
    assert saved.keys() == expected.keys()  # the UNet's own names: no _orig_mod. prefix
    assert max((saved[name] - expected[name]).abs().max().item() for name in expected) <= EAGER_TOLERANCE
    for key in ("loss", "grad_norm", "val_loss"):  # validation runs eagerly: it differs only through the weights
        for step, value in logged(eager, key).items():
            assert logged(compiled, key)[step] == pytest.approx(value, rel=1e-4), (key, step)


def test_a_compiled_run_saves_plain_names_in_checkpoints_and_pipeline(compiled):
    files = [compiled / "checkpoints" / f"step-{STEPS}" / "model.safetensors",
             compiled / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"]
    for path in files:
        assert not [name for name in load_file(path) if "_orig_mod" in name], path
    assert (compiled / "pipeline" / "model_index.json").is_file() and (compiled / "samples" / "final.png").is_file()


def test_a_compiled_run_stopped_after_a_checkpoint_resumes_exactly(root, compiled, capsys):
    config = run(root, "stopped", compile=True)
    with stopped_after_checkpoint(2):
        train(config_from_dict(config))
    train(config_from_dict({**config, "resume_from_checkpoint": "latest"}))
    out = root / "stopped"
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().out
    # The same compiled kernels on the same inputs: equal to the uninterrupted compiled run, bit for bit.
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", compiled / "checkpoints" / f"step-{STEPS}")
    assert logged(out, "loss") == logged(compiled, "loss")


@pytest.mark.slow  # 90 s with a filled Inductor cache, 3.5 min without (two processes compiling on 2 cores)
def test_two_compiled_processes_end_with_the_weights_of_one_eager_process(root, eager_batch_of_4):
    """Under DDP the compiled UNet is the module DDP wraps (dynamo splits its graph at DDP's gradient buckets)."""
    config = write_config(root / "two.yaml", run(root, "two", compile=True, gradient_accumulation_steps=1))
    result = accelerate_launch("train.py", "--config", str(config), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    last = f"checkpoints/step-{STEPS}"
    assert_same_state(root / "two" / last, eager_batch_of_4 / last, atol=EAGER_TOLERANCE)


@pytest.mark.parametrize("cxx, looked", [(None, "CXX unset, no g++ on PATH"),
                                         ("/nonexistent/g++", "CXX=/nonexistent/g++ is not an executable")])
def test_compile_without_a_cpp_compiler_is_refused_in_one_line_before_anything_is_written(
        root, tmp_path, monkeypatch, capsys, cxx, looked):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", {**run(root, "unused", compile=True), "output_dir": str(out)})
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler here
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    if cxx is None:
        monkeypatch.delenv("CXX", raising=False)
    else:
        monkeypatch.setenv("CXX", cxx)
    assert train_main(["--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: compile: true needs a C++ compiler for torch.compile on the CPU (none found: {looked}); "
                     "install one (apt-get install g++) or set compile: false")
    assert not out.exists()


ZEROED = pytest.mark.xfail(strict=True, reason="torch 2.13's Inductor (CPU, default fusions) reads the upsampler's "
                           "input gradient before the kernel that accumulates it: zero gradients below the upsampler")


@pytest.mark.parametrize("options", [pytest.param(None, id="inductor defaults", marks=ZEROED),
                                     pytest.param(CPU_COMPILE_OPTIONS, id="CPU_COMPILE_OPTIONS")])
def test_inductor_fusion_zeroes_the_gradient_through_a_resnet_and_upsampler(options):
    """diffusers' ResnetBlock2D then Upsample2D, as the UNet's up blocks have them (here on a 2x2 feature map, where
    two layers suffice to show it): the compiled backward must give eager's input gradient. When the defaults pass,
    torch has fixed the bug: drop the xfail, then CPU_COMPILE_OPTIONS once the whole UNet's gradients agree
    (benchmarks/compile_speed.py checks them), and the note in docs/training.md#compile."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"resnet": ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=128,
                                                         groups=8),
                                 "up": Upsample2D(64, use_conv=True)})
    x, temb = torch.randn(2, 64, 2, 2), torch.randn(2, 128)

    def input_gradient(module: torch.nn.ModuleDict, compiled: bool) -> torch.Tensor:
        inputs = x.clone().requires_grad_()
        forward = lambda h, t: module["up"](module["resnet"](h, t))
        (torch.compile(forward, options=options) if compiled else forward)(inputs, temb).pow(2).sum().backward()
        return inputs.grad

    expected = input_gradient(copy.deepcopy(block), compiled=False)
    torch.testing.assert_close(input_gradient(block, compiled=True), expected, rtol=1e-4, atol=1e-5)
