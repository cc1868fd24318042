"""SDXL end to end: train_configs/sdxl_finetune.yaml and sdxl_lora.yaml shrunk by `--set` on a tiny pipeline saved in
SDXL 1.0 base's repo layout (two tokenizers and text encoders, Euler scheduler, a force_upcast VAE with SDXL's latent
scale, fp16 variant files beside the fp32 ones), from-scratch training of the tiny SDXL layout (the shapes main job
included), exact resume and 2 processes equal to 1, the latent cache, micro-conditioning, and the refusals."""

import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline, stopped_after_checkpoint, tiny_config, tiny_config_dict, write_caption_folder
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from test_launch import accelerate_launch
from test_scale import STEPS, assert_same_state, scale_config, write_config
from test_sd15 import PROMPT
from test_sd15 import shrink as sd15_shrink
from test_shapes_main import SHRINK

import ldm_pipeline.unet_stage as unet_stage
from ldm_pipeline import load_config, load_pipeline
from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError, ModelConfig, config_from_dict
from ldm_pipeline.data import ImageTextDataset, TokenIds
from ldm_pipeline.generation import read_png_metadata
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, micro_conditioning
from ldm_pipeline.shapes.checker import evaluate_model
from ldm_pipeline.shapes.maker import make_shapes
from ldm_pipeline.tokenizer import build_tokenizer
from ldm_pipeline.training import train
from ldm_pipeline.unet_stage import vae_dtype

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
SDXL = {"model__family": "sdxl"}


def save_sdxl_layout(root: Path) -> Path:
    """A tiny pipeline laid out as stable-diffusion-xl-base-1.0 is on the hub: model_index.json of a
    StableDiffusionXLPipeline with an Euler scheduler, tokenizer_2 padding with "!" (as OpenCLIP's), a VAE marked
    force_upcast with SDXL's scaling factor, and a .fp16.safetensors variant beside every weight file."""
    torch.manual_seed(0)
    model = ModelConfig(family="sdxl", vae_kwargs={"scaling_factor": 0.13025, "force_upcast": True})
    tokenizer = build_tokenizer([f"a {c} square on the {s}" for c in ("red", "blue") for s in ("left", "right")]
                                + ["!"])
    tokenizer_2 = build_tokenizer([f"a {c} square on the {s}" for c in ("red", "blue") for s in ("left", "right")]
                                  + ["!"])
    tokenizer_2.pad_token = "!"
    text_encoder = build_text_encoder(model, tokenizer)
    text_encoder_2 = build_text_encoder(model, tokenizer_2, "text_encoder_2")
    vae = build_vae(model)
    unet = build_unet(model, 32, vae, text_encoder, text_encoder_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    for weights in list(root.glob("*/*.safetensors")):
        save_file({k: v.half() for k, v in load_file(weights).items()}, weights.with_suffix(".fp16.safetensors"))
    return root


@pytest.fixture(scope="module")
def xl_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    write_caption_folder(root / "data", count=8)
    save_sdxl_layout(root / "sdxl")
    return root


def shrink(root: Path, out: str, *extra: str) -> list[str]:
    """test_sd15's shrinking on the tiny SDXL layout, with plain AdamW (bitsandbytes' 8-bit one is tested on its
    own)."""
    return sd15_shrink(root, out, "optimizer=adamw", *extra, base="sdxl")


def images(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def test_the_sdxl_configs_are_sdxl_settings(xl_root):
    for name, learning_rate in (("sdxl_finetune", 1e-6), ("sdxl_lora", 1e-4)):
        config = load_config(CONFIGS / f"{name}.yaml", [f"data.train_data_dir={xl_root / 'data'}"])
        assert (config.resolution, config.stages, config.mixed_precision) == (1024, ["unet"], "bf16")
        assert config.model.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
        assert config.learning_rate == learning_rate and config.gradient_checkpointing
    assert load_config(CONFIGS / "sdxl_lora.yaml", [f"data.train_data_dir={xl_root}"]).lora.rank == 16


def test_sdxl_finetune_trains_the_whole_unet_and_plain_diffusers_samples_it(xl_root):
    config = load_config(CONFIGS / "sdxl_finetune.yaml", shrink(xl_root, "finetune", "model.variant=fp16"))
    assert config.mixed_precision == "bf16" and config.gradient_checkpointing
    pipeline = train(config)
    base = load_file(xl_root / "sdxl" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    trained = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in trained.values()} == {torch.float32}  # upcast from the fp16 files
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k].float()) for k in base)
    plain = StableDiffusionXLPipeline.from_pretrained(str(pipeline))
    assert plain.vae.config.force_upcast and plain.vae.config.scaling_factor == 0.13025
    assert plain.tokenizer_2.pad_token == "!" and plain.scheduler.config.steps_offset == 1  # SDXL's kept
    ours = load_pipeline(pipeline, device="cpu")
    assert isinstance(ours, StableDiffusionXLPipeline) and ours.generation_defaults["height"] == 32
    plain.scheduler = ours.scheduler
    np.testing.assert_allclose(images(ours), images(plain), atol=1e-6)
    card = (pipeline / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "- text_encoder_2: " in card


def test_sdxl_lora_on_unet_and_both_text_encoders_loads_in_plain_diffusers(xl_root):
    lora = train(load_config(CONFIGS / "sdxl_lora.yaml", shrink(xl_root, "lora", "learning_rate=0.05",
                                                                 "lora.train_text_encoder=true")))
    saved = load_file(lora / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in saved} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(xl_root / "sdxl"), variant="fp16", dtype=torch.float32)
    before = images(pipe)
    pipe.load_lora_weights(str(lora))
    after = images(pipe)
    assert np.abs(after - before).max() > 1e-3
    ours = load_pipeline(None, device="cpu", lora=lora, scheduler="ddim")  # variant fp16, from base_model.json
    pipe.scheduler = ours.scheduler
    np.testing.assert_allclose(images(ours), images(pipe), atol=1e-6)
    assert "both text encoders'" in (lora / "README.md").read_text()


def test_a_lora_of_one_family_is_refused_on_the_other_by_name(xl_root, tmp_path):
    sdxl_lora = xl_root / "lora" / "lora"
    if not sdxl_lora.is_dir():
        sdxl_lora = train(load_config(CONFIGS / "sdxl_lora.yaml", shrink(xl_root, "lora_b")))
    sd_base = save_tiny_pipeline(tmp_path / "sd")
    with pytest.raises(ConfigError, match=r"is an SDXL LoRA \(it was trained on .*sdxl\) and the model .*sd is a "
                                          r"Stable Diffusion 1.x/2.x pipeline; load it onto its own base"):
        load_pipeline(sd_base, device="cpu", lora=sdxl_lora)
    sd_lora = train(tiny_config(tmp_path / "sd_run", xl_root / "data", max_train_steps=1, validation__num_heldout=1,
                                lora__rank=4, model={"pretrained_model_name_or_path": str(sd_base)}))
    with pytest.raises(ConfigError, match=r"is a Stable Diffusion 1.x/2.x LoRA .* and the model .*sdxl is an SDXL "
                                          r"pipeline"):
        load_pipeline(xl_root / "sdxl", device="cpu", lora=sd_lora)


def test_an_sdxl_directory_without_text_encoder_2_is_refused_by_name(xl_root, tmp_path):
    copy = shutil.copytree(xl_root / "sdxl", tmp_path / "sdxl")
    shutil.rmtree(copy / "text_encoder_2")
    message = r"is incomplete: (its )?model_index.json lists text_encoder_2 but there is no text_encoder_2/ folder"
    with pytest.raises(ConfigError, match=message):
        train(load_config(CONFIGS / "sdxl_finetune.yaml",
                          shrink(xl_root, "missing", f"model.pretrained_model_name_or_path={copy}")))
    assert not (xl_root / "missing").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=message):
        load_pipeline(copy, device="cpu")


def test_micro_conditioning_comes_from_each_images_size_and_crop(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.new("RGB", (48, 32), "red").save(folder / "a.png")
    dataset = datasets.Dataset.from_dict({"image": [str(folder / "a.png")]}).cast_column("image", datasets.Image())
    data = config_from_dict(tiny_config_dict(tmp_path / "out", folder)).data
    tokenizer = build_tokenizer(["a red square"])
    item = ImageTextDataset(dataset, TokenIds(tokenizer, ["a red square"]), data, 16)[0]
    # 48x32 resized to 24x16 (short side 16), the centre 16x16 crop starts 4 pixels in.
    assert item["original_size"].tolist() == [32, 48] and item["crop_top_left"].tolist() == [0, 4]
    time_ids = micro_conditioning(item["original_size"][None], item["crop_top_left"][None], (16, 16))
    assert time_ids.tolist() == [[32.0, 48.0, 0.0, 4.0, 16.0, 16.0]]


@pytest.mark.parametrize("dtype, expected", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_sdxls_vae_stays_float32_under_fp16_and_a_fixed_vae_does_not(dtype, expected):
    with torch.device("meta"):
        upcast = build_vae(ModelConfig(vae_kwargs={"force_upcast": True}))
        fixed = build_vae(ModelConfig(vae_kwargs={"force_upcast": False}))
    assert vae_dtype(upcast, dtype) == expected and vae_dtype(fixed, dtype) == dtype


@pytest.fixture(scope="module")
def xl_scale(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_scale")
    write_caption_folder(root / "data")
    reference = root / "reference"
    train(config_from_dict(scale_config(reference, root / "data", **SDXL)))
    return root, reference


def test_an_sdxl_run_resumes_exactly(xl_scale):
    root, reference = xl_scale
    config = scale_config(root / "stopped", root / "data", **SDXL)
    with stopped_after_checkpoint(2):
        train(config_from_dict(config))
    train(config_from_dict({**config, "resume_from_checkpoint": "latest"}))
    assert_same_state(root / "stopped" / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")
    assert (root / "stopped" / "text_encoder_2").is_dir()  # the run's own second encoder, read back on the resume


def test_two_sdxl_processes_end_with_the_weights_of_one(xl_scale):
    root, reference = xl_scale
    out = root / "two"
    config = write_config(root / "two.yaml", scale_config(out, root / "data", train_batch_size=2, **SDXL))
    result = accelerate_launch("train.py", "--config", str(config), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}", atol=5e-5)


def test_a_cached_sdxl_run_equals_one_encoded_in_the_loop(xl_scale):
    root, reference = xl_scale
    out = root / "cached"
    train(config_from_dict(scale_config(out, root / "data", data__cache_latents=True, data__center_crop=True,
                                        **SDXL)))
    rows = datasets.load_from_disk(str(next((out / "latent_cache").glob("shard-*"))))
    assert {"prompt_embeds", "pooled_prompt_embeds", "input_ids_2", "original_size"} <= set(rows.column_names)
    in_loop = root / "in_loop"
    train(config_from_dict(scale_config(in_loop, root / "data", data__center_crop=True, **SDXL)))
    # The cache holds latents and text states in float16: equal to that rounding.
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", in_loop / "checkpoints" / f"step-{STEPS}", atol=2e-3)


def test_the_shapes_main_job_trains_a_tiny_sdxl_layout_that_generate_and_evaluate_read(tmp_path, capsys):
    overrides = [f"data.train_data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}", "model.family=sdxl",
                 *SHRINK]
    pipeline = train(load_config(CONFIGS / "shapes.yaml", overrides))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(pipeline))
    assert pipe.unet.config.addition_embed_type == "text_time" and not isinstance(pipe, StableDiffusionPipeline)
    assert images(pipe).shape == (1, 64, 64, 3)
    assert cli(["generate", "--model", str(pipeline), "--prompt", "a red circle in the center", "--num-images", "2",
                "--steps", "2", "--out", str(tmp_path / "imgs"), "--device", "cpu"]) == 0
    made = sorted((tmp_path / "imgs").glob("*.png"))
    assert len(made) == 2 and read_png_metadata(made[1])["seed"] == "1"
    report = evaluate_model(pipeline, seeds_per_prompt=1, batch_size=45, psnr_images=8, device="cpu")
    assert report["num_images"] == 90 and 0.0 <= report["shape_accuracy"] <= 1.0


@pytest.mark.parametrize("cached", [False, True])
def test_bucketed_sdxl_runs_condition_on_each_images_own_size_and_bucket(tmp_path, monkeypatch, cached):
    data = make_shapes(tmp_path / "data", 24, resolution=32, seed=0, sizes=[(32, 32), (48, 32), (32, 48)])
    seen, added_conditions = [], unet_stage.added_conditions

    def spy(parts, batch, pooled, latent_size):
        added = added_conditions(parts, batch, pooled, latent_size)
        seen.extend(tuple(row) for row in added["time_ids"].long().tolist())
        return added

    monkeypatch.setattr(unet_stage, "added_conditions", spy)
    train(tiny_config(tmp_path / "out", data, max_train_steps=6, validation__num_heldout=0, data__buckets={
        "sizes": [[32, 32], [32, 48], [48, 32]]}, data__cache_latents=cached, data__center_crop=True, **SDXL))
    # (original height, width, crop top, left, target height, width): each image trains at its own bucket, with
    # its own size; a centred crop of an image already the bucket's shape starts at (0, 0).
    assert {row[:2] for row in seen} == {(32, 32), (32, 48), (48, 32)}
    assert all(row[:2] == row[4:] and row[2:4] == (0, 0) for row in seen)


def test_dreambooth_on_an_sdxl_base_generates_its_class_images_and_trains(tmp_path):
    base = save_tiny_pipeline(tmp_path / "base", family="sdxl")
    pictures = write_caption_folder(tmp_path / "pictures", count=4)
    config = tiny_config(tmp_path / "out", pictures, max_train_steps=2, train_batch_size=2, validation__num_heldout=0,
                         model={"pretrained_model_name_or_path": str(base)},
                         data={"train_data_dir": None, "instance_data_dir": str(pictures),
                               "instance_prompt": "a sks square", "class_data_dir": str(tmp_path / "class"),
                               "class_prompt": "a square", "num_class_images": 3})
    pipeline = train(config)
    made = sorted((tmp_path / "class").glob("*.png"))
    assert len(made) == 3 and read_png_metadata(made[0])["prompt"] == "a square"
    assert isinstance(load_pipeline(pipeline, device="cpu"), StableDiffusionXLPipeline)
