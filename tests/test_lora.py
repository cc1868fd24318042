"""LoRA (lora.rank > 0): only the adapters train, checkpoints hold them and resume exactly, and the result, in
diffusers' LoRA format, loads in plain diffusers (`load_lora_weights`), in `load_pipeline(..., lora=)` and in
`ldm-pipeline generate --lora`, giving the images of the trained model."""

import json

import numpy as np
import pytest
import torch
from conftest import (
    save_tiny_pipeline,
    save_untrained_pipeline,
    stopped_after_checkpoint,
    tiny_config_dict,
    write_caption_folder,
)
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_bad_input import assert_one_error_line

from ldm_pipeline import load_pipeline, read_png_metadata
from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError, config_from_dict
from ldm_pipeline.lora import WEIGHTS_NAME
from ldm_pipeline.training import train

PROMPT = "a red square on the left"
# Adapters on attention, a feed-forward layer and the ResNet convolutions (4-D weights, channels_last in training)
WIDE_LORA = {"rank": 4, "alpha": 8.0,
             "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2"]}
CAPTIONS = [f"a {color} square on the {side}" for color in ("red", "blue") for side in ("left", "right")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    write_caption_folder(root / "data")
    save_untrained_pipeline(root / "base", CAPTIONS)
    return root


def lora_config(root, out, **overrides) -> dict:
    """A LoRA on the tiny base: rank 4 with alpha 8 (a scale of 2, which a loader must read from the file)."""
    settings = dict(model={"pretrained_model_name_or_path": str(root / "base")}, learning_rate=1e-2,
                    lora={"rank": 4, "alpha": 8.0})
    return tiny_config_dict(out, root / "data", **{**settings, **overrides})


@pytest.fixture(scope="module")
def lora_run(root):
    """UNet adapters on attention, feed-forward and ResNet convolutions, 4 steps, checkpoints at 2 and 4."""
    config = lora_config(root, root / "out", checkpointing_steps=2, lora=WIDE_LORA)
    assert train(config_from_dict(config)) == root / "out" / "lora"
    return root / "out"


def images(pipe, seed: int = 0) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def test_only_the_adapters_train_and_checkpoints_hold_only_them(root, lora_run):
    lora = lora_run / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "base_model.json",
                                                      "pytorch_lora_weights.safetensors", "sample_grid.png"]
    assert not (lora_run / "pipeline").exists()
    weights = load_file(lora / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in key for key in weights)
    assert {key.split(".")[0] for key in weights} == {"unet"}
    reference = json.loads((lora / "base_model.json").read_text())
    assert reference["base_model"] == str((root / "base").resolve())
    assert reference["lora"]["rank"] == 4 and reference["lora"]["alpha"] == 8.0
    # The base is untouched: its UNet is what the saved adapters are added to.
    unet = load_file(lora_run.parent / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    for step in (2, 4):
        checkpoint = lora_run / "checkpoints" / f"step-{step}"
        saved = load_file(checkpoint / "model.safetensors")
        assert all("lora_A" in key or "lora_B" in key for key in saved), list(saved)[:3]
        assert len(saved) == len(weights)
        optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
        assert len(optimizer["state"]) == len(weights)  # one AdamW state per adapter matrix, none for the base
    assert any(t.ndim == 4 for t in weights.values())  # the convolutions' adapters
    assert sum(t.numel() for k, t in weights.items() if k.startswith("unet.")) < 0.5 * sum(
        t.numel() for t in unet.values())
    card = ModelCard.load(lora / "README.md")
    assert "lora" in card.data.tags and "load_lora_weights" in card.text


def test_plain_diffusers_loads_the_lora_and_gets_the_trained_models_images(root, lora_run):
    lora = lora_run / "lora"
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "base"))
    before = images(pipe)
    pipe.load_lora_weights(lora)
    after = images(pipe)
    assert np.abs(after - before).max() > 0.05  # the adapters change the images
    # every adapter in the file, and nothing else, is in the UNet with its trained values
    from peft import get_peft_model_state_dict

    (adapter,) = pipe.get_list_adapters()["unet"]
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    saved = {key.removeprefix("unet."): tensor for key, tensor in load_file(lora / WEIGHTS_NAME).items()}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[key], saved[key]) for key in saved)
    ours = load_pipeline(None, device="cpu", lora=lora)  # the base is read from base_model.json
    assert ours.name_or_path == str((root / "base").resolve())
    np.testing.assert_allclose(images(ours), after, atol=1e-6)
    # ... and they are the images of the model as trained: the final validation grid (prompt PROMPT, seed 0)
    # (a captioned grid: the one image, enlarged by nearest neighbour, above its caption)
    made = ours(PROMPT, generator=torch.Generator("cpu").manual_seed(0), **ours.generation_defaults).images[0]
    with Image.open(lora_run / "samples" / "final.png") as grid:
        scale = -(-128 // made.width)
        trained = np.asarray(grid.convert("RGB").crop((0, 0, made.width * scale, made.height * scale)), dtype=int)
    made = np.asarray(made.resize((made.width * scale, made.height * scale), Image.Resampling.NEAREST), dtype=int)
    assert np.abs(made - trained).max() <= 1


def test_generate_with_lora_on_the_command_line(root, lora_run, tmp_path, capsys):
    out = tmp_path / "images"
    assert cli(["generate", "--lora", str(lora_run / "lora"), "--prompt", PROMPT, "--device", "cpu",
                "--out", str(out)]) == 0
    meta = read_png_metadata(out / "00000.png")
    assert meta["lora"] == str(lora_run / "lora") and meta["model"] == str((root / "base").resolve())
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cli(["generate", "--model", str(root / "base"), "--lora", str(empty), "--prompt", PROMPT,
                "--out", str(tmp_path / "x")]) == 2
    assert_one_error_line(capsys.readouterr().err, f"--lora {empty} holds no LoRA weights: no "
                          "pytorch_lora_weights.safetensors")
    other = save_tiny_pipeline(tmp_path / "other", unet_kwargs={"block_out_channels": (16, 32)})
    with pytest.raises(ConfigError, match=f"--lora {lora_run / 'lora'} does not fit the model {other} \\(it was "
                                          "trained on .*base\\): .*size"):
        load_pipeline(other, device="cpu", lora=lora_run / "lora")  # its UNet is half as wide


@pytest.mark.parametrize("change, message", [
    ({"lora": {"rank": -1}}, r"lora.rank: -1 must be >= 0"),
    ({"lora": {"rank": 4, "dropout": 1.0}}, r"lora.dropout: 1.0 must be in \[0, 1\)"),
    ({"lora": {"rank": 0, "train_text_encoder": True}}, r"lora.train_text_encoder needs lora.rank > 0"),
    ({"model": {"unet": "tiny"}}, r"lora.rank: 4 trains adapters for a pretrained pipeline; set "
                                  r"model.pretrained_model_name_or_path"),
    ({"model": {"pretrained_model_name_or_path": "x", "vae": "tiny"}}, r"model.vae: 'tiny' is set, but with lora"),
    ({"stages": ["vae", "unet"]}, r"stages: \['vae', 'unet'\]: a LoRA run adapts the pretrained UNet"),
    ({"train_text_encoder": True}, r"train_text_encoder trains the whole text encoder, which a LoRA file cannot"),
])
def test_bad_lora_settings_are_refused_by_name(root, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(lora_config(root, tmp_path / "out", **change))


def test_unknown_target_modules_are_refused_before_anything_is_written(root, tmp_path):
    config = config_from_dict(lora_config(root, tmp_path / "out", lora={"rank": 4, "target_modules": ["to_q", "qkv"]}))
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\] name no layer of the UNet .* its attention "
                                          r"layers end in \['to_k', 'to_out.0', 'to_q', 'to_v'\]"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_a_stopped_lora_run_resumes_exactly(root, tmp_path):
    """EMA of the adapters and adapter dropout (global RNG) on: the resumed run ends with the uninterrupted one's
    adapters, EMA and optimizer state."""
    settings = dict(max_train_steps=5, checkpointing_steps=2, use_ema=True, ema_decay=0.9, lr_scheduler="linear",
                    lora={"rank": 4, "alpha": 8.0, "dropout": 0.1})
    reference = tmp_path / "reference"
    train(config_from_dict(lora_config(root, reference, **settings)))

    resumed = tmp_path / "resumed"
    with stopped_after_checkpoint(2):
        train(config_from_dict(lora_config(root, resumed, **settings)))
    train(config_from_dict(lora_config(root, resumed, resume_from_checkpoint="latest", **settings)))

    for name in ("model.safetensors", "ema.safetensors"):
        got, want = (load_file(out / "checkpoints" / "step-5" / name) for out in (resumed, reference))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    got, want = (torch.load(out / "checkpoints" / "step-5" / "optimizer.bin", weights_only=True)["state"]
                 for out in (resumed, reference))
    assert all(torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"]) for i in want)
    saved = [load_file(out / "lora" / "pytorch_lora_weights.safetensors") for out in (resumed, reference)]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[1])
    losses = [{row["step"]: row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "loss" in row} for out in (resumed, reference)]
    assert losses[0] == losses[1] and len(losses[1]) == 5
    with safe_open(str(resumed / "checkpoints" / "step-5" / "model.safetensors"), "pt") as handle:
        assert all(".lora_" in key for key in handle.keys())


def test_a_lora_checkpoint_of_other_adapters_is_refused(root, lora_run, tmp_path):
    import shutil

    out = shutil.copytree(lora_run, tmp_path / "out")
    checkpoint = out / "checkpoints" / "step-2"
    weights = load_file(checkpoint / "model.safetensors")
    from safetensors.torch import save_file

    save_file(dict(list(weights.items())[:-1]), checkpoint / "model.safetensors")  # one adapter matrix missing
    (out / "checkpoints" / "step-4").rename(out / "checkpoints" / "old-4")
    config = lora_config(root, out, checkpointing_steps=2, resume_from_checkpoint="latest", lora=WIDE_LORA)
    with pytest.raises(ConfigError, match=r"model.safetensors holds \d+ weights, not the \d+ trained ones"):
        train(config_from_dict(config))


def test_text_encoder_adapters_load_in_plain_diffusers_or_are_refused_by_name(root, tmp_path):
    """transformers gives CLIP adapters only with a peft as new as it was written for; with an older one the run
    is refused before anything is written, with the way out (training could not be loaded back anywhere)."""
    from ldm_pipeline.lora import text_encoder_peft_problem

    config = config_from_dict(lora_config(root, tmp_path / "out",
                                          lora={"rank": 4, "alpha": 8.0, "train_text_encoder": True}))
    problem = text_encoder_peft_problem()
    if problem:
        with pytest.raises(ConfigError, match=r"lora.train_text_encoder: transformers .* only with peft >= .*; peft "
                                              r".* is installed. Upgrade peft \(pip install -U peft\), or set "
                                              r"lora.train_text_encoder: false"):
            train(config)
        assert not (tmp_path / "out").exists()
        return
    lora = train(config)
    weights = load_file(lora / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in weights} == {"unet", "text_encoder"}
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "base"))
    pipe.load_lora_weights(lora)
    np.testing.assert_allclose(images(load_pipeline(None, device="cpu", lora=lora)), images(pipe), atol=1e-6)
