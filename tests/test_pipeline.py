"""load_pipeline / generate / the CLI, and the PNG metadata images carry."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import save_untrained_pipeline
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from ldm_pipeline import generate, load_pipeline, read_png_metadata, save_images
from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError
from ldm_pipeline.generation import save_progress_gif


@pytest.fixture(scope="module")
def pipe(trained_run):
    return load_pipeline(trained_run / "pipeline", device="cpu")


def test_load_pipeline_is_ready_with_our_defaults(pipe):
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.generation_defaults == {"num_inference_steps": 2, "guidance_scale": 5.0,  # from training
                                        "height": 32, "width": 32}
    assert pipe.device.type == "cpu"
    image = pipe("a red square on the left", num_inference_steps=2).images[0]  # diffusers' own call
    assert image.size == (32, 32)


def test_generate_depends_only_on_prompt_and_seed(pipe):
    prompts = ["a red square on the left", "a blue square on the right", "a red square on the left"]
    batched = generate(pipe, prompts, seeds=[3, 4, 5], batch_size=3, show_progress=False)
    single = generate(pipe, prompts, seeds=[3, 4, 5], batch_size=1, show_progress=False)
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    again = generate(pipe, prompts[:1], seeds=3, show_progress=False)[0]
    assert np.array_equal(np.asarray(again), np.asarray(single[0]))
    other_seed = generate(pipe, prompts[:1], seeds=9, show_progress=False)[0]
    assert not np.array_equal(np.asarray(other_seed), np.asarray(single[0]))
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(pipe, prompts, seeds=[1, 2])


def test_saved_images_carry_their_settings(pipe, tmp_path):
    image = generate(pipe, "a blue square on the right", seeds=[7], guidance_scale=3.0, show_progress=False)[0]
    image.save(tmp_path / "one.png")  # a plain PIL save keeps the metadata
    meta = read_png_metadata(tmp_path / "one.png")
    assert meta == {"prompt": "a blue square on the right", "negative_prompt": "", "seed": "7",
                    "num_inference_steps": "2", "guidance_scale": "3.0", "scheduler": "dpmsolver++",
                    "model": str(pipe.name_or_path), "width": "32", "height": "32"}  # the keys the README lists
    assert pipe.name_or_path.endswith("pipeline")
    (tmp_path / "many" ).mkdir()
    (tmp_path / "many" / "00000.png").write_bytes(b"existing")
    paths = save_images([image, image], tmp_path / "many")
    assert [p.name for p in paths] == ["00001.png", "00002.png"]  # nothing overwritten
    assert (tmp_path / "many" / "00000.png").read_bytes() == b"existing"


def test_image_size_defaults_to_the_trained_resolution_and_can_be_chosen(pipe):
    default, tall = (generate(pipe, "a red square on the left", seeds=[0], show_progress=False, **size)[0]
                     for size in ({}, {"height": 48, "width": 16}))
    assert default.size == (32, 32) and tall.size == (16, 48)
    assert (tall.info["parameters"]["width"], tall.info["parameters"]["height"]) == (16, 48)


@pytest.mark.parametrize("settings, message", [
    ({"num_inference_steps": 0}, r"num_inference_steps \(--steps\): 0 must be a whole number of at least 1"),
    ({"num_inference_steps": 2.5}, r"num_inference_steps \(--steps\): 2.5 must be a whole number"),
    ({"guidance_scale": float("nan")}, r"guidance_scale \(--guidance\): nan must be a finite number"),
    ({"guidance_scale": float("inf")}, r"guidance_scale \(--guidance\): inf must be a finite number"),
    ({"height": 30}, r"height \(--height\): 30 must be a positive multiple of 8"),
    ({"width": 0}, r"width \(--width\): 0 must be a positive multiple of 8"),
    ({"batch_size": 0}, r"batch_size \(--batch-size\): 0 must be at least 1"),
])
def test_settings_that_would_give_other_images_are_refused(pipe, settings, message):
    with pytest.raises(ConfigError, match=message):
        generate(pipe, "a red square on the left", **settings)


def test_plain_diffusers_gets_our_sampler_and_the_trained_size(tmp_path):
    # A UNet whose sample_size is not the training resolution, as when fine-tuning a pretrained model.
    path = save_untrained_pipeline(tmp_path / "pipeline", ["a red square"], resolution=64, sample_size=4)
    plain = StableDiffusionPipeline.from_pretrained(path)
    assert isinstance(plain.scheduler, DPMSolverMultistepScheduler) and plain.unet.config.sample_size == 8
    assert plain("a red square", num_inference_steps=1).images[0].size == (64, 64)


def test_progress_frames_and_gif(pipe, tmp_path):
    images, progress = generate(pipe, ["a red square on the left"], seeds=[0], num_inference_steps=3,
                                return_progress=True, show_progress=False)
    assert len(progress) == 1 and len(progress[0]) == 3
    assert progress[0][-1].size == images[0].size
    with Image.open(save_progress_gif(progress[0], tmp_path / "steps.gif")) as gif:
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert durations[:-1] == [120] * (len(durations) - 1) and durations[-1] >= 5 * 120  # last frame held


def test_cli_generate_writes_numbered_pngs(trained_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square on the right\n\n")
    code = cli(["generate", "--model", str(trained_run / "pipeline"), "--prompt", "a red square on the left",
                "--prompts-file", str(prompts), "--num-images", "2", "--seed", "5", "--steps", "2",
                "--out", str(tmp_path / "imgs"), "--device", "cpu", "--save-progress"])
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "imgs").glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert len(list((tmp_path / "imgs").glob("*.gif"))) == 4
    with Image.open(tmp_path / "imgs" / "00000.gif") as gif:
        assert gif.n_frames >= 2
    assert [read_png_metadata(tmp_path / "imgs" / f)["seed"] for f in files] == ["5", "6", "5", "6"]
    assert read_png_metadata(tmp_path / "imgs" / "00002.png")["prompt"] == "a blue square on the right"
    assert str(tmp_path / "imgs") in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        load_pipeline(tmp_path)


def test_console_script_lists_every_command_without_loading_torch():
    result = subprocess.run([sys.executable, "-m", "ldm_pipeline.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "evaluate", "make-shapes", "train", "cache", "export", "demo"):
        assert command in result.stdout
    # --help must answer at once: torch, diffusers & co. take seconds to import, so only the commands do.
    code = ("import sys\nfrom ldm_pipeline.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'datasets') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]", loaded.stderr


def test_train_help_describes_its_options(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "YAML config, e.g. train_configs/shapes.yaml" in text and "override a config value" in text
    assert "then exit without writing anything" in text
