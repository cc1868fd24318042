"""train_configs/sd15_finetune.yaml and sd15_lora.yaml start from a Stable Diffusion 1.x repo. Tested on a tiny
pipeline saved in exactly that repo's layout: model_index.json naming a safety checker and a feature extractor
(which we never load), fp16 variant files next to the fp32 ones, pickled .bin copies (never read), each config
shrunk only by `--set` (steps, batch, resolution, the base's path); bf16, EMA and gradient checkpointing stay."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_caption_folder
from diffusers import PNDMScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import load_file, save_file
from test_safety import booby_trap
from transformers import CLIPConfig, CLIPImageProcessor

from ldm_pipeline import load_config, load_pipeline
from ldm_pipeline.config import ConfigError, ModelConfig
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, resolve_source
from ldm_pipeline.tokenizer import build_tokenizer
from ldm_pipeline.training import train

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
PROMPT = "a red square on the left"


def save_sd15_layout(root: Path) -> Path:
    """A tiny pipeline laid out as stable-diffusion-v1-5 is on the hub: PNDM scheduler, a safety checker and a
    feature extractor in model_index.json, and per model folder the fp32 safetensors, a .fp16.safetensors
    variant and a pickled .bin copy (a booby trap here: unpickling it leaves a file)."""
    torch.manual_seed(0)
    model = ModelConfig()
    tokenizer = build_tokenizer([f"a {c} square on the {s}" for c in ("red", "blue") for s in ("left", "right")])
    text_encoder = build_text_encoder(model, tokenizer)
    vae = build_vae(model)
    unet = build_unet(model, 32, vae, text_encoder)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    safety_checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 16}, projection_dim=16))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=safety_checker,
                                   feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.save_pretrained(root, safe_serialization=True)
    for weights in list(root.glob("*/*.safetensors")):
        save_file({k: v.half() for k, v in load_file(weights).items()}, weights.with_suffix(".fp16.safetensors"))
        booby_trap(weights.with_name(weights.name.replace(".safetensors", ".bin").replace("model.", "pytorch_model.")
                                     if weights.parent.name in ("text_encoder", "safety_checker")
                                     else weights.name.replace(".safetensors", ".bin")), root / "unpickled")
    return root


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    write_caption_folder(root / "data", count=8)
    save_sd15_layout(root / "sd15")
    return root


def shrink(root: Path, out: str, *extra: str, base: str = "sd15") -> list[str]:
    """The config at 32 px (the tiny VAE's 4x4 latents), batch 1, 2 steps, on the tiny pipeline root/`base` (the
    SD-1.x layout)."""
    return [f"model.pretrained_model_name_or_path={root / base}", f"data.train_data_dir={root / 'data'}",
            f"output_dir={root / out}", "resolution=32", "train_batch_size=1", "gradient_accumulation_steps=1",
            "max_train_steps=2", "checkpointing_steps=1", "validation.num_heldout=1", "validation.seeds=[0]",
            f"validation.prompts=[{PROMPT}]", "sampling.num_inference_steps=2", "data.dataloader_num_workers=0",
            *extra]


def test_the_sd15_configs_are_stable_diffusion_1x_settings(sd_root):
    for name, learning_rate in (("sd15_finetune", 1e-5), ("sd15_lora", 1e-4)):
        config = load_config(CONFIGS / f"{name}.yaml", [f"data.train_data_dir={sd_root / 'data'}"])
        assert (config.resolution, config.stages, config.mixed_precision) == (512, ["unet"], "bf16")
        assert config.model.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert config.learning_rate == learning_rate and config.gradient_checkpointing
    assert load_config(CONFIGS / "sd15_finetune.yaml", [f"data.train_data_dir={sd_root}"]).lora.rank == 0
    assert 4 <= load_config(CONFIGS / "sd15_lora.yaml", [f"data.train_data_dir={sd_root}"]).lora.rank <= 16


def test_sd15_finetune_trains_the_whole_unet_from_the_fp16_variant(sd_root):
    config = load_config(CONFIGS / "sd15_finetune.yaml", shrink(sd_root, "finetune", "model.variant=fp16"))
    assert config.use_ema and config.mixed_precision == "bf16"
    pipeline = train(config)
    base = load_file(sd_root / "sd15" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    trained = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in trained.values()} == {torch.float32}  # upcast from the fp16 files
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k].float()) for k in base)
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline))
    assert pipe.safety_checker is None and pipe.scheduler.config.steps_offset == 1  # SD's noise schedule kept
    assert not (sd_root / "sd15" / "unpickled").exists()


def test_sd15_lora_trains_adapters_that_plain_diffusers_loads(sd_root):
    lora = train(load_config(CONFIGS / "sd15_lora.yaml", shrink(sd_root, "lora", "learning_rate=0.05")))
    assert lora == sd_root / "lora" / "lora" and (lora / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_root / "sd15"), variant="fp16", dtype=torch.float32,
                                                   safety_checker=None)
    generator = lambda: torch.Generator().manual_seed(0)
    before = pipe(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images
    pipe.load_lora_weights(str(lora))
    after = pipe(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images
    assert np.abs(after - before).max() > 1e-3
    ours = load_pipeline(None, device="cpu", lora=lora, scheduler="ddim")  # variant fp16, from base_model.json
    pipe.scheduler = ours.scheduler
    np.testing.assert_allclose(
        ours(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images,
        pipe(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images, atol=1e-6)
    assert not (sd_root / "sd15" / "unpickled").exists()


def test_a_copy_without_safety_checker_or_feature_extractor_loads(sd_root, tmp_path):
    copy = shutil.copytree(sd_root / "sd15", tmp_path / "sd15")
    shutil.rmtree(copy / "safety_checker")
    shutil.rmtree(copy / "feature_extractor")
    pipe = load_pipeline(copy, device="cpu")
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe(PROMPT, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("remove, variant, message", [
    ("*.fp16.safetensors", "fp16", r"unet has no fp16 variant weights \(\*.fp16.safetensors; model.variant: fp16\), "
                                   r"only diffusion_pytorch_model.safetensors; remove model.variant"),
    ("diffusion_pytorch_model.safetensors", None,
     r"unet holds only fp16 variant weights \(diffusion_pytorch_model.fp16.safetensors\); set model.variant: fp16"),
    ("*.safetensors", None, r"unet holds only pickled weights \(diffusion_pytorch_model.bin\), which can run code"),
])
def test_missing_weight_files_are_named_with_the_way_out(sd_root, tmp_path, remove, variant, message):
    copy = shutil.copytree(sd_root / "sd15", tmp_path / "sd15")
    for path in (copy / "unet").glob(remove):
        path.unlink()
    with pytest.raises(ConfigError, match=f"model.pretrained_model_name_or_path: .*{message}"):
        resolve_source(ModelConfig(pretrained_model_name_or_path=str(copy), variant=variant), "unet")
