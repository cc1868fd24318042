"""The training loop: loss falls, outputs follow the contract, runs start from saved pipelines."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, tiny_config_dict
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ldm_pipeline import cpu
from ldm_pipeline import loop as loop_module
from ldm_pipeline import training as train_module
from ldm_pipeline.config import Config, ConfigError, ModelConfig
from ldm_pipeline.losses import diffusion_loss, diffusion_target
from ldm_pipeline.models import build_noise_scheduler, build_text_encoder, build_unet, build_vae, load_tokenizer
from ldm_pipeline.training import train


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("v_prediction", 5.0)])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(prediction_type, snr_gamma):
    torch.manual_seed(0)
    model = ModelConfig()
    tokenizer = load_tokenizer(model, lambda: ["a red square", "a blue circle"])
    text_encoder, vae = build_text_encoder(model, tokenizer), build_vae(model)
    unet = build_unet(model, 32, vae, text_encoder)
    scheduler = build_noise_scheduler(model, prediction_type)
    ids = tokenizer(["a red square", "a blue circle"] * 2, padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids)[0]
        latents = vae.encode(torch.rand(4, 3, 32, 32) * 2 - 1).latent_dist.mean
    noise, timesteps = torch.randn_like(latents), torch.tensor([50, 300, 600, 900])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(unet(noisy, timesteps, states).sample, target, timesteps, scheduler, snr_gamma)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_run_writes_the_output_contract(trained_run):
    out = trained_run
    assert yaml.safe_load((out / "config.yaml").read_text())["use_ema"] is True
    assert (out / "samples" / "final.png").is_file() and (out / "samples" / "step-000002.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (out / "checkpoints" / "step-4" / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and any(m.get("stage") == "vae" for m in metrics)
    pipeline = out / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    weights = [p.name for p in pipeline.rglob("*") if p.is_file() and p.suffix in (".bin", ".safetensors", ".pt")]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    assert (pipeline / "tokenizer" / "vocab.json").is_file() and (pipeline / "tokenizer" / "merges.txt").is_file()
    # Training captions for the demo to offer: the validation prompt first, then other distinct ones.
    examples = json.loads((pipeline / "ldm_pipeline.json").read_text())["example_prompts"]
    assert examples == ["a red square on the left", "a blue square on the left", "a red square on the right",
                        "a blue square on the right"]


def test_a_validation_grid_carries_its_prompts_under_its_columns(trained_run):
    from PIL import Image

    with Image.open(trained_run / "samples" / "final.png") as grid:
        pixels = np.asarray(grid.convert("L"))
    tile = 128  # a 32 px image is enlarged 4x so its caption fits under it
    assert pixels.shape[1] == tile and pixels.shape[0] > tile  # one prompt, one seed, and a strip of text below
    strip = pixels[tile:]
    assert (strip < 128).sum() > 50 and (strip == 255).mean() > 0.5  # dark text on white

def test_vae_stage_measures_its_scaling_factor(trained_run):
    config = json.loads((trained_run / "pipeline" / "vae" / "config.json").read_text())
    calibration = json.loads((trained_run / "vae" / "calibration.json").read_text())
    assert config["scaling_factor"] == pytest.approx(calibration["scaling_factor"])
    assert config["scaling_factor"] != 0.18215  # measured, not Stable Diffusion's constant
    assert calibration["heldout_psnr_db"] > 0


def test_plain_diffusers_loads_and_generates(trained_run):
    pipe = StableDiffusionPipeline.from_pretrained(trained_run / "pipeline")
    image = pipe("a red square on the left", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_saved_unet_holds_the_ema_weights(trained_run):
    from safetensors.torch import load_file

    ema_state = load_file(trained_run / "checkpoints" / "step-4" / "ema.safetensors")
    saved = load_file(trained_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(trained_run / "checkpoints" / "step-4" / "model.safetensors")
    shadow = [ema_state[f"shadow.{i}"] for i in range(len(ema_state))]  # in the order of unet.parameters()
    assert len(shadow) == len(saved)
    unet = UNet2DConditionModel.from_pretrained(trained_run / "pipeline" / "unet")
    weight = "conv_in.weight"
    index = [name for name, _ in unet.named_parameters()].index(weight)
    assert torch.allclose(saved[weight], shadow[index])
    assert not torch.allclose(saved[weight], trained[weight])  # EMA differs from the raw weights


def test_training_starts_from_a_saved_pipeline(tmp_path, trained_run, caption_folder):
    pipeline = trained_run / "pipeline"
    config = tiny_config(tmp_path / "finetune", caption_folder, max_train_steps=2,
                         model={"pretrained_model_name_or_path": str(pipeline)}, train_text_encoder=True)
    result = train(config)
    original = StableDiffusionPipeline.from_pretrained(pipeline)
    tuned = StableDiffusionPipeline.from_pretrained(result)
    assert tuned.tokenizer.get_vocab() == original.tokenizer.get_vocab()
    assert torch.equal(tuned.vae.encoder.conv_in.weight, original.vae.encoder.conv_in.weight)  # frozen
    for name in ("unet", "text_encoder"):  # both trained
        before = next(getattr(original, name).parameters())
        after = next(getattr(tuned, name).parameters())
        assert before.shape == after.shape and not torch.equal(before, after)


def test_existing_run_is_refused_unless_resuming_or_overwriting(tmp_path, caption_folder, capsys):
    train(tiny_config(tmp_path / "out", caption_folder, max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(ConfigError, match="already holds a training run.*resume_from_checkpoint: latest"):
        train(tiny_config(tmp_path / "out", caption_folder, max_train_steps=2))
    train(tiny_config(tmp_path / "out", caption_folder, max_train_steps=2, resume_from_checkpoint="latest"))
    assert "resumed from" in capsys.readouterr().out
    (tmp_path / "out" / "latent_cache").mkdir()
    train(tiny_config(tmp_path / "out", caption_folder, max_train_steps=2, overwrite_output_dir=True))
    assert not (tmp_path / "out" / "checkpoints").exists()  # replaced run
    assert (tmp_path / "out" / "latent_cache").is_dir()  # the keyed cache is kept


def test_dry_run_prints_counts_and_writes_nothing(tmp_path, caption_folder, capsys):
    config = tiny_config(tmp_path / "out", caption_folder, gradient_accumulation_steps=3)
    assert train(config, dry_run=True) is None
    printed = capsys.readouterr().out
    assert "unet:" in printed and "M parameters" in printed and "vae:" in printed
    assert "effective batch size: 12 = 4 per process x 1 processes x 3 accumulation" in printed
    assert "max_train_steps: 4" in printed  # the resolved config
    assert not (tmp_path / "out").exists()


def test_dry_run_fails_where_the_run_would_fail_after_the_vae_stage(tmp_path, caption_folder, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", caption_folder, stages=["vae", "unet"],
                                                      train_batch_size=15)))  # 16 images, 2 held out
    assert train_module.main(["--config", str(config), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: train_batch_size: one optimizer step of the unet stage takes 15 examples")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("configured, local_processes, cores, busy_percent, expected", [
    (None, "1", 2, 0, 2), (None, "2", 2, 0, 1), (3, "2", 2, 0, 3),  # idle: the cores, shared among processes
    (None, "1", 2, 100, 1), (None, "1", 2, 50, 1), (None, "1", 8, 30, 6), (None, "2", 8, 30, 3), (3, "1", 2, 100, 3),
])
def test_cpu_runs_use_the_cores_that_are_free(monkeypatch, capsys, configured, local_processes, cores, busy_percent,
                                              expected):
    # accelerate launch leaves each process OMP_NUM_THREADS=1; on 2 cores that halves CPU training speed. But
    # a thread on a core that another program keeps busy holds up the others: busy cores are left out.
    chosen = []
    monkeypatch.setattr(cpu.torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(cpu.psutil, "cpu_count", lambda logical=True: cores)
    monkeypatch.setattr(cpu.psutil, "cpu_percent", lambda interval=None: busy_percent)
    monkeypatch.setattr(cpu.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "keep_freed_heap", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    cpu.set_up_cpu(Config(cpu_threads=configured))
    assert chosen == [expected]
    if configured is None:
        assert f"cpu_threads: {expected} per process ({cores} physical cores" in capsys.readouterr().out


def test_command_line_runs_set_the_cpu_threads(tmp_path, caption_folder, monkeypatch):
    chosen = []
    monkeypatch.setattr(train_module, "set_up_cpu", lambda config: chosen.append(config.cpu_threads))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny_config_dict(tmp_path / "out", caption_folder), "cpu_threads": None}))
    assert train_module.main(["--config", str(config), "--dry-run"]) == 0
    assert chosen == [None]


def test_a_rolled_back_run_never_prunes_its_starting_point_or_newer_checkpoints(tmp_path, caption_folder,
                                                                             monkeypatch):
    def names(out):
        return sorted((p.name for p in (out / "checkpoints").iterdir()), key=lambda name: int(name.split("-")[1]))

    out = tmp_path / "out"
    common = dict(max_train_steps=6, checkpoints_total_limit=2, validation__num_heldout=0)
    train(tiny_config(out, caption_folder, checkpointing_steps=2, **common))
    assert names(out) == ["step-4", "step-6"]
    old_six = (out / "checkpoints" / "step-6" / "model.safetensors").read_bytes()

    # Roll back to step-4, checkpoint every step, and crash right after step-5 is saved.
    step_4 = str(out / "checkpoints" / "step-4")
    rollback = tiny_config(out, caption_folder, checkpointing_steps=1, resume_from_checkpoint=step_4, **common)
    save_checkpoint = loop_module.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(accelerator, config, prefix, step, *args):
        save_checkpoint(accelerator, config, prefix, step, *args)
        if step == 5:
            raise Crash

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_crash)  # where the loop looks it up
    with pytest.raises(Crash):
        train(rollback)
    monkeypatch.undo()
    # Keeping 2 up to step 5 removes nothing: step-4 is where the run started, step-6 is newer.
    assert names(out) == ["step-4", "step-5", "step-6"]
    assert (out / "checkpoints" / "step-6" / "model.safetensors").read_bytes() == old_six

    train(rollback)  # to the end: step-6 is saved again, and of the older ones only this run's step-5 goes
    assert names(out) == ["step-4", "step-6"]


def test_pruning_keeps_the_newest_checkpoints(tmp_path, caption_folder):
    out = tmp_path / "out"
    train(tiny_config(out, caption_folder, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2,
                      validation__num_heldout=0))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-5"]
    train(tiny_config(out, caption_folder, max_train_steps=7, checkpointing_steps=1, checkpoints_total_limit=2,
                      validation__num_heldout=0, resume_from_checkpoint="latest"))  # a plain continuation
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-7"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_runs_keep_freed_memory_in_the_heap_for_the_next_step(tmp_path):
    # glibc hands every allocation over 128 KiB back to the OS when it is freed, so each training step would
    # fault its activations in again; after keep_freed_heap an 8 MiB block comes from (and returns to) the heap.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ctypes, sys\n"
        "from ldm_pipeline.cpu import keep_freed_heap\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',\n"
        "                'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]\n"
        "if sys.argv[1] == 'kept':\n"
        "    keep_freed_heap()\n"
        "before = libc.mallinfo2().hblkhd\n"
        "block = libc.malloc(8 << 20)\n"
        "print(libc.mallinfo2().hblkhd - before)\n"
        "libc.free(block)\n")
    mapped = {}  # bytes mmapped for the block
    for heap in ("default", "kept"):
        result = subprocess.run([sys.executable, str(probe), heap], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent)
        assert result.returncode == 0, result.stderr
        mapped[heap] = int(result.stdout)
    assert mapped["default"] >= 8 << 20  # glibc's own setting: a block of its own, unmapped on free
    assert mapped["kept"] == 0


def test_the_train_function_outlives_its_module_and_runs_twice_in_one_process(tmp_path, caption_folder):
    import ldm_pipeline
    import ldm_pipeline.generation  # noqa: F401  importing a submodule must not replace the function beside it
    import ldm_pipeline.training  # noqa: F401

    assert ldm_pipeline.train.__module__ == "ldm_pipeline" and callable(ldm_pipeline.generate)
    first = ldm_pipeline.train(tiny_config(tmp_path / "first", caption_folder, max_train_steps=1))
    # another mixed precision, in the same process: Accelerate's one state per process starts afresh
    second = ldm_pipeline.train(tiny_config(tmp_path / "second", caption_folder, max_train_steps=1,
                                            mixed_precision="bf16"))
    assert (first / "model_index.json").is_file() and (second / "model_index.json").is_file()


def test_importing_the_package_changes_no_logging_and_loads_no_torch():
    code = ("import logging, sys, ldm_pipeline; "
            "print(len(logging.getLogger('transformers.utils.import_utils').filters), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "False"]


def test_a_dry_run_of_a_resumed_run_reads_its_text_components(tmp_path, trained_run, caption_folder, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    config = tiny_config(out, trained_run.parent / "data", stages=["vae", "unet"], max_train_steps=4,
                         checkpointing_steps=2, use_ema=True, ema_decay=0.9, snr_gamma=5.0,
                         validation__validation_steps=2, resume_from_checkpoint="latest")
    sources, build = [], train_module.build_text_encoder
    monkeypatch.setattr(train_module, "build_text_encoder",  # where prepare() looks it up
                        lambda model, tokenizer: sources.append(model.text_encoder) or build(model, tokenizer))
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    assert train(config, dry_run=True) is None
    assert sources == [str(out / "text_encoder")]  # not a fresh one built from the captions
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before


def test_a_zero_terminal_snr_run_saves_a_pipeline_that_samples_the_same_way(tmp_path, caption_folder):
    from ldm_pipeline import generate, load_pipeline

    pipeline = train(tiny_config(tmp_path / "out", caption_folder, max_train_steps=2, prediction_type="v_prediction",
                                 rescale_betas_zero_terminal_snr=True, sampling__guidance_rescale=0.7))
    scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["prediction_type"] == "v_prediction"
    plain = StableDiffusionPipeline.from_pretrained(pipeline)  # plain diffusers reads the same schedule
    plain.scheduler.set_timesteps(2)
    assert int(plain.scheduler.timesteps[0]) == 999
    pipe = load_pipeline(pipeline, device="cpu")
    assert pipe.generation_defaults["guidance_rescale"] == 0.7
    image = generate(pipe, ["a red square on the left"], seeds=[0])[0]
    assert image.info["parameters"]["guidance_rescale"] == 0.7
