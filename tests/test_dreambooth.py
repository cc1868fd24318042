"""DreamBooth: a subject's pictures (any sizes) captioned with one prompt, paired in every batch with class images that
the base model generates once (PNG metadata, seed k for image k, split over processes) and later runs reuse; the
loss adds the class rows' loss times prior_loss_weight; the run resumes exactly; bad inputs are refused by name."""

import json

import numpy as np
import pytest
import torch
from conftest import save_untrained_pipeline, stopped_after_checkpoint, tiny_config_dict
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw
from test_bad_input import assert_one_error_line
from test_scale import STEPS, assert_same_state, scale_config
from test_unet_step import make_parts

import ldm_pipeline.unet_stage as unet_stage
from ldm_pipeline import dreambooth
from ldm_pipeline.config import ConfigError, config_from_dict
from ldm_pipeline.generation import read_png_metadata
from ldm_pipeline.training import build_accelerator, train
from ldm_pipeline.training import main as train_main

INSTANCE, CLASS = "a photo of sks square", "a photo of a square"
SIZES = [(40, 32), (32, 48), (48, 40), (32, 32)]  # (width, height): none needs to be square


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny base pipeline that knows the prompts' words, and 8 pictures of the subject (a purple diamond)."""
    root = tmp_path_factory.mktemp("dreambooth")
    save_untrained_pipeline(root / "base", [INSTANCE, CLASS, "a red square on the left"])
    subject = root / "subject"
    subject.mkdir()
    for k in range(8):
        width, height = SIZES[k % len(SIZES)]
        image = Image.new("RGB", (width, height), "white")
        x, y = width // 2 + k % 3 - 1, height // 2
        ImageDraw.Draw(image).polygon([(x, y - 10), (x + 8, y), (x, y + 10), (x - 8, y)], fill=(130, 40, 170))
        image.save(subject / f"{k}.jpg" if k % 2 else subject / f"{k}.png")
    return root


def dreambooth_config(root, out, **overrides) -> dict:
    """Full fine-tuning of the tiny base on the subject, 6 class images, batches of 2 pairs (7 pictures after 1 held
    out: 3 steps an epoch, so checkpoint 2 is mid-epoch); EMA, checkpoints at 2, 4 and 5."""
    data = {"instance_data_dir": str(root / "subject"), "instance_prompt": INSTANCE,
            "class_data_dir": str(root / "class"), "class_prompt": CLASS, "num_class_images": 6}
    settings = dict(model={"pretrained_model_name_or_path": str(root / "base")}, data=data, train_batch_size=2,
                    validation__validation_steps=0, validation__prompts=[INSTANCE])
    return scale_config(out, root / "subject", **{**settings, **overrides})


def mtimes(folder):
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run, which generates the class images; the batches its loss saw."""
    seen, step_loss = [], unet_stage.step_loss

    def spy(parts, batch, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step, not the held-out loss
            seen.append({key: batch[key].clone() for key in ("prior", "input_ids", "pixel_values") if key in batch})
        return step_loss(parts, batch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unet_stage, "step_loss", spy)  # training_loss looks it up in its module
        train(config_from_dict(dreambooth_config(root, root / "reference")))
    return root / "reference", seen


def test_missing_class_images_are_generated_with_the_base_and_written_with_their_metadata(root, reference):
    out, _ = reference
    written = sorted((root / "class").iterdir())
    assert [path.name for path in written] == [f"{k:05d}.png" for k in range(6)]
    for k, path in enumerate(written):
        metadata = read_png_metadata(path)
        assert (metadata["prompt"], metadata["seed"]) == (CLASS, str(k))  # image k from seed k
        assert metadata["model"] == str((root / "base").resolve()) or metadata["model"].endswith("base")
        with Image.open(path) as image:
            assert image.size == (32, 32)  # the run's resolution
    card = ModelCard.load(out / "pipeline" / "README.md").text
    assert f"DreamBooth: the pictures of one subject in `{root / 'subject'}`" in card
    assert f"prior preservation: the first 6 images of `{root / 'class'}`, captioned `{CLASS}`" in card
    assert "`prior_loss_weight`: 1.0" in card
    assert json.loads((out / "run_data.json").read_text())["caption_source"] == f"`{INSTANCE}` for every picture"


def test_every_batch_pairs_instance_rows_with_as_many_class_rows(root, reference):
    from ldm_pipeline.config import ModelConfig
    from ldm_pipeline.data import tokenize
    from ldm_pipeline.models import load_tokenizer

    _, seen = reference
    assert len(seen) == STEPS
    tokenizer = load_tokenizer(ModelConfig(tokenizer=str(root / "base" / "tokenizer")), lambda: [])
    instance, prior = tokenize(tokenizer, [INSTANCE, CLASS])
    for batch in seen:
        assert batch["prior"].tolist() == [False, False, True, True]
        assert batch["pixel_values"].shape == (4, 3, 32, 32)  # non-square pictures cropped square
        ids = batch["input_ids"]
        assert all(torch.equal(row, instance) for row in ids[:2]) and all(torch.equal(row, prior) for row in ids[2:])


def test_a_stopped_run_resumes_exactly_and_reuses_the_class_images(root, reference, tmp_path, capsys):
    ref, _ = reference
    before = mtimes(root / "class")
    out = tmp_path / "out"
    with stopped_after_checkpoint(2):  # mid-epoch
        train(config_from_dict(dreambooth_config(root, out)))
    train(config_from_dict(dreambooth_config(root, out, resume_from_checkpoint="latest")))
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", ref / "checkpoints" / f"step-{STEPS}")
    assert mtimes(root / "class") == before  # nothing generated again, nothing rewritten
    assert "generating" not in capsys.readouterr().out


def test_two_processes_generate_the_same_class_images_and_end_with_the_weights_of_one(root, reference, tmp_path):
    """Through `accelerate launch`: the class images split over 2 processes (a fresh folder), each process then
    training 1 pair of the global batch of 2."""
    import yaml
    from safetensors.torch import load_file
    from test_launch import accelerate_launch

    ref, _ = reference
    config = dreambooth_config(root, tmp_path / "out", train_batch_size=1)
    config["data"]["class_data_dir"] = str(tmp_path / "class")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = accelerate_launch("train.py", "--config", str(tmp_path / "run.yaml"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    made = sorted((tmp_path / "class").iterdir())
    assert [path.name for path in made] == sorted(mtimes(root / "class"))  # every image once
    for path in made:
        with Image.open(path) as image, Image.open(root / "class" / path.name) as expected:
            assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1, path.name
    assert_same_state(tmp_path / "out" / "checkpoints" / f"step-{STEPS}", ref / "checkpoints" / f"step-{STEPS}",
                      atol=5e-5)
    saved, expected = (load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
                       for out in (tmp_path / "out", ref))
    assert all(torch.allclose(saved[name], expected[name], rtol=0, atol=5e-5) for name in expected)


def test_a_stopped_generation_is_completed_with_the_images_it_would_have_made(root, reference, tmp_path):
    folder = tmp_path / "class"
    first = config_from_dict(dreambooth_config(root, tmp_path / "out", data__class_data_dir=str(folder),
                                               data__num_class_images=2))
    accelerator = build_accelerator(first)
    assert dreambooth.make_class_images(accelerator, first) == 2  # as if stopped after two images
    rest = config_from_dict(dreambooth_config(root, tmp_path / "out", data__class_data_dir=str(folder)))
    assert dreambooth.make_class_images(accelerator, rest) == 4
    assert dreambooth.make_class_images(accelerator, rest) == 0
    for name in mtimes(root / "class"):
        with Image.open(folder / name) as made, Image.open(root / "class" / name) as expected:
            assert np.array_equal(np.asarray(made), np.asarray(expected)), name


def test_the_class_rows_add_prior_loss_weight_times_their_loss():
    """prior_loss_weight 0 trains exactly as the instance rows alone; otherwise the class rows add their loss (the
    same each time: linear in the weight) and change the gradient."""
    from ldm_pipeline.config import ModelConfig
    from ldm_pipeline.models import build_unet

    def loss_and_grad(weight, pairs: bool):
        torch.manual_seed(0)
        parts, batch = make_parts(None, prior_loss_weight=weight)
        torch.manual_seed(0)
        unet = build_unet(ModelConfig(), 32, parts.vae, parts.text_encoder)
        parts.unet = unet
        instance = {key: value[:2] for key, value in batch.items()}
        if pairs:
            instance |= {f"class_{key}": value[2:] for key, value in batch.items()}
        generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
        loss = unet_stage.training_loss(parts, instance, generators)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])

    alone, alone_grad = loss_and_grad(1.0, pairs=False)
    zero, zero_grad = loss_and_grad(0.0, pairs=True)
    assert torch.allclose(zero, alone, rtol=1e-6) and torch.allclose(zero_grad, alone_grad, rtol=1e-5, atol=1e-7)
    one, one_grad = loss_and_grad(1.0, pairs=True)
    two, _ = loss_and_grad(2.0, pairs=True)
    class_loss = one - zero
    assert class_loss > 0 and torch.allclose(two - one, class_loss, rtol=1e-5)
    assert not torch.allclose(one_grad, zero_grad, rtol=1e-3)


def test_class_images_take_their_instance_pictures_bucket(root, tmp_path, monkeypatch):
    shapes, step_loss = [], unet_stage.step_loss

    def spy(parts, batch, *args, **kwargs):
        if torch.is_grad_enabled():
            shapes.append(tuple(batch["pixel_values"].shape))
        return step_loss(parts, batch, *args, **kwargs)

    monkeypatch.setattr(unet_stage, "step_loss", spy)
    config = dreambooth_config(root, tmp_path / "out", data__buckets={"sizes": [[32, 32], [32, 40], [40, 32]]},
                               max_train_steps=3, use_ema=False, checkpointing_steps=0, train_batch_size=1)
    train(config_from_dict(config))
    assert len(shapes) == 3 and all(shape[0] == 2 for shape in shapes)  # one picture, one class image, one size
    assert {shape[2:] for shape in shapes} <= {(32, 32), (32, 40), (40, 32)} and shapes[0][2:] != (32, 32)


def bad(root, tmp_path, **overrides) -> dict:
    return dreambooth_config(root, tmp_path / "out", **overrides)


@pytest.mark.parametrize("change, message", [
    ({"data__instance_prompt": None}, r"data.instance_data_dir: .* holds the subject's pictures, all captioned "
                                      r"data.instance_prompt; set it"),
    ({"data__class_prompt": None}, r"data.class_data_dir: .* holds the class images, captioned and generated with "
                                   r"data.class_prompt; set it"),
    ({"data__class_data_dir": None}, r"data.class_prompt captions the class images of data.class_data_dir .*set "
                                     r"data.class_data_dir"),
    ({"data__num_class_images": 0}, r"data.num_class_images: 0 must be at least 1"),
    ({"prior_loss_weight": -1.0}, r"prior_loss_weight: -1.0 must be >= 0"),
    ({"data__cache_latents": True}, r"data.class_data_dir pairs each instance picture .* set data.cache_latents: "
                                    r"false"),
    ({"data__train_data_dir": "SUBJECT"}, r"data: set exactly one of .*; this config sets data.train_data_dir and "
                                          r"data.instance_data_dir"),
    ({"data__class_data_dir": "SUBJECT"}, r"data.class_data_dir: .* is data.instance_data_dir"),
])
def test_bad_dreambooth_settings_are_refused_by_name(root, tmp_path, change, message):
    change = {key: str(root / "subject") if value == "SUBJECT" else value for key, value in change.items()}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(bad(root, tmp_path, **change))


def run_cli(tmp_path, config: dict) -> int:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return train_main(["--config", str(path)])


def test_an_empty_instance_folder_is_one_line_naming_it(root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli(tmp_path, bad(root, tmp_path, data__instance_data_dir=str(tmp_path / "empty"))) == 2
    assert_one_error_line(capsys.readouterr().err, f"data.instance_data_dir: {tmp_path / 'empty'} holds no readable "
                                                   "images")
    assert not (tmp_path / "out").exists() and not (root / "class").joinpath("00006.png").exists()


@pytest.mark.parametrize("key", ["instance_prompt", "class_prompt"])
def test_a_prompt_the_tokenizer_would_cut_is_one_line_naming_it(root, tmp_path, capsys, key):
    long = "a photo of a square " * 3  # the base's tokenizer holds 8 tokens
    assert run_cli(tmp_path, bad(root, tmp_path, **{f"data__{key}": long})) == 2
    assert_one_error_line(capsys.readouterr().err, f"data.{key}: {long!r} is 17 tokens, longer than the tokenizer's "
                                                   "8, and would be cut to 'a photo of a square a'; shorten it")
    assert not (tmp_path / "out").exists()


def test_too_few_class_images_and_no_base_to_generate_them_is_one_line(root, tmp_path, capsys):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (32, 32), "white").save(folder / "mine.png")
    config = tiny_config_dict(tmp_path / "out", root / "subject", data={
        "instance_data_dir": str(root / "subject"), "instance_prompt": INSTANCE, "class_data_dir": str(folder),
        "class_prompt": CLASS, "num_class_images": 5})
    assert run_cli(tmp_path, config) == 2
    assert_one_error_line(capsys.readouterr().err, f"data.num_class_images: 5, but data.class_data_dir: {folder} "
                          "holds 1 images and there is no base model to generate the other 4 from; add class images, "
                          "lower data.num_class_images to 1, or set model.pretrained_model_name_or_path")
    assert sorted(path.name for path in folder.iterdir()) == ["mine.png"] and not (tmp_path / "out").exists()


def test_the_dry_run_says_what_is_trained_and_what_will_be_generated(root, tmp_path, capsys):
    config = bad(root, tmp_path, data__class_data_dir=str(tmp_path / "class"), data__num_class_images=4)
    assert train(config_from_dict(config), dry_run=True) is None
    out = capsys.readouterr().out
    assert f"DreamBooth: the pictures of {root / 'subject'}, captioned {INSTANCE!r}" in out
    assert (f"prior preservation: 4 class images from {tmp_path / 'class'} (0 there; 4 to generate with "
            f"{root / 'base'} before training), captioned {CLASS!r}") in out
    assert "instance_data_dir:" in out and "prior_loss_weight: 1.0" in out  # the resolved config
    assert not (tmp_path / "class").exists() and not (tmp_path / "out").exists()


def test_masked_pictures_pair_with_class_images_that_train_whole(root, reference, tmp_path, monkeypatch):
    import ldm_pipeline.losses as losses

    subject = tmp_path / "subject"
    subject.mkdir()
    for k in range(4):
        image = Image.new("RGBA", (32, 40), (255, 255, 255, 0))
        ImageDraw.Draw(image).rectangle((8 + k, 8, 20 + k, 24), fill=(130, 40, 170, 255))  # opaque: the subject
        image.save(subject / f"{k}.png")
    masks, diffusion_loss = [], losses.diffusion_loss

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            masks.append(args[5])
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(losses, "diffusion_loss", spy)  # step_loss calls losses.diffusion_loss
    train(config_from_dict(dreambooth_config(root, tmp_path / "out", data__instance_data_dir=str(subject),
                                             data__masked_loss=True, max_train_steps=1, use_ema=False,
                                             checkpointing_steps=0)))
    pictures, classes = masks  # one step: the pictures' loss, then the class images'
    assert pictures.shape == classes.shape == (2, 1, 4, 4) and float(pictures.min()) == 0.0
    assert torch.equal(classes, torch.ones_like(classes))
