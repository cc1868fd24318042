"""A miniature of the README's main command: `train_configs/shapes.yaml` from an empty data directory,
shrunk by `--set` overrides (fewer images, tiny models, a few steps) so it runs in well under 90 seconds,
started as the README starts it: `accelerate config default`, then `accelerate launch`."""

import json
import os
import re
import sys

import torch
import yaml
from diffusers import StableDiffusionPipeline
from test_launch import ROOT, run_watched

SHRINK = [
    "data.make_shapes.num_images=96", "model.vae=tiny", "model.unet=tiny", "model.text_encoder=tiny",
    "vae_training.max_train_steps=4", "vae_training.decoder_steps=2", "vae_training.train_batch_size=8",
    "vae_training.scaling_samples=32",
    "vae_training.psnr_samples=8", "train_batch_size=8", "max_train_steps=4", "checkpointing_steps=2",
    "validation.num_heldout=8", "validation.seeds=[0]", "sampling.num_inference_steps=2",
    "vae_training.validation_steps=2", "vae_training.on_check_failure=warn",  # 4 steps cannot pass the check
]
# Every line the run may print on stdout: what it will do, the VAE check, where things were written.
SCREEN = [r"cpu_threads: \d+ per process \(.*\); set cpu_threads to choose", r"making 96 synthetic shapes images in .*",
          r"text_encoder: .*M parameters, vae: .*M parameters, 96 training images",
          r"effective batch size: 8 = 8 per process x 1 processes x 1 accumulation",
          r"unet stage: 4 optimizer steps \(.* epochs of 96\)", r"writes: .*",
          r"vae stage: 4 steps of batch 8, then 2 steps of its decoder on noisy latents",
          r"\[vae\] step \d+: .*", r"\[vae\] check (passed|FAILED): .*; latent scaling_factor .*", r"!{100}",
          r"\[vae\] THE VAE FAILED ITS CHECK:", r"  - .*", r"To retrain it: .*", r"\[unet\] .*",
          r"wrote latent cache .*", r"saved the pipeline to .*"]
BARS = ("vae:", "vae-decoder:", "unet:", "caching latents")  # stderr holds only our progress bars


def test_main_command_in_miniature_ends_in_a_loadable_pipeline(tmp_path):
    data_dir, output_dir = tmp_path / "data" / "shapes", tmp_path / "outputs" / "shapes"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}  # a user's: no launcher config yet
    env.pop("OMP_NUM_THREADS", None)  # the suite sets it; without it the launcher would speak of threads
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    assert run_watched(accelerate + ["config", "default"], timeout=60, env=env).returncode == 0
    args = accelerate + ["launch", "--num_cpu_threads_per_process", "2", "train.py", "--config",
                         "train_configs/shapes.yaml", "--set", f"data.train_data_dir={data_dir}",
                         "--set", f"output_dir={output_dir}"]
    for override in SHRINK:
        args += ["--set", override]
    result = run_watched(args, timeout=90, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The first screen: the run's own lines, each a line we print, in order, and nothing else.
    lines = result.stdout.splitlines()
    strangers = [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in SCREEN)]
    assert strangers == [] and "" not in lines
    for line in ("making 96 synthetic shapes images", "vae stage: 4 steps of batch 8, then 2 steps of its decoder",
                 "unet stage: 4 optimizer steps",
                 f"writes: {output_dir / 'pipeline'}", "[vae] check FAILED: held-out PSNR",
                 f"saved the pipeline to {output_dir / 'pipeline'}"):
        assert line in result.stdout, line
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", result.stderr) if piece.strip()]
    assert pieces and [piece for piece in pieces if not piece.startswith(BARS)] == [], result.stderr[-2000:]

    captions = [json.loads(line)["text"] for line in (data_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(captions) == 96 and len(list(data_dir.glob("*.png"))) == 96  # the data was made
    assert list((output_dir / "latent_cache").iterdir())  # encoded once, for the next run
    calibration = json.loads((output_dir / "vae" / "calibration.json").read_text())
    assert calibration["scaling_factor"] > 0 and "heldout_psnr_db" in calibration
    assert "recon_color_accuracy" in calibration and "recon_clean_accuracy" in calibration  # the shapes checker ran
    assert list((output_dir / "samples").glob("*.png"))  # the grid of fixed prompts
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["resolution"] == 64

    pipe = StableDiffusionPipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.vae.config.scaling_factor == calibration["scaling_factor"]
    assert pipe.tokenizer.model_max_length == 16  # chosen for the shapes captions
    ids = pipe.tokenizer(captions[0]).input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == captions[0]
    image = pipe(captions[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
