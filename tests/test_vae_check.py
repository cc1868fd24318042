"""The VAE stage checks its own reconstructions: held-out PSNR and, on the shapes data set, the checker's color /
shape / position accuracy on reconstructed images, during training and at the end, and stops loudly below a bar."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from ldm_pipeline.evaluate import IMAGES, reconstruction_sums
from ldm_pipeline.loop import TrainingError, sample_generators
from ldm_pipeline.shapes.checker import ReconstructionCheck, is_shapes_data
from ldm_pipeline.shapes.maker import make_shapes
from ldm_pipeline.training import train
from ldm_pipeline.vae_stage import calibrate_latents


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", num_images=40, resolution=32, seed=0)


def vae_config(out, data_dir, **overrides):
    settings = dict(stages=["vae"], vae_training__max_train_steps=4, vae_training__psnr_samples=8,
                    vae_training__validation_steps=2)
    return tiny_config(out, data_dir, **{**settings, **overrides})


def test_shapes_run_records_reconstruction_accuracy_and_a_grid(tmp_path, shapes_folder):
    train(vae_config(tmp_path / "out", shapes_folder))
    calibration = json.loads((tmp_path / "out" / "vae" / "calibration.json").read_text())
    for key in ("heldout_psnr_db", "recon_color_accuracy", "recon_shape_accuracy", "recon_position_accuracy"):
        assert key in calibration
    assert calibration["check"]["passed"] is True  # no bars set
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    checks = [m for m in metrics if m["stage"] == "vae" and "recon_color_accuracy" in m]
    assert [m["step"] for m in checks] == [2, 4]  # at validation_steps, and the final check (not twice)
    grid = Image.open(tmp_path / "out" / "samples" / "vae.png")
    assert grid.size == (8 * 32, 2 * 32)  # 8 originals above 8 reconstructions


def test_a_vae_below_its_bar_stops_the_run_loudly_and_is_kept(tmp_path, shapes_folder, capsys):
    config = vae_config(tmp_path / "out", shapes_folder, stages=["vae", "unet"], vae_training__min_psnr=99.0,
                        vae_training__min_recon_color=1.0, vae_training__min_recon_shape=1.0)
    with pytest.raises(TrainingError, match="min_psnr 99.0") as error:
        train(config)
    assert "max_train_steps" in str(error.value) and "on_check_failure: warn" in str(error.value)
    assert "reconstruction shape accuracy" in str(error.value) and "vae_training.min_recon_shape 100%" in str(
        error.value)  # a VAE trained 2 steps draws no shape the strict checker accepts
    assert "THE VAE FAILED ITS CHECK" in capsys.readouterr().out
    assert not (tmp_path / "out" / "pipeline").exists()  # the UNet stage never ran
    calibration = json.loads((tmp_path / "out" / "vae" / "calibration.json").read_text())
    assert calibration["check"]["passed"] is False  # nothing lost: the VAE and its report are on disk

    resumed = vae_config(tmp_path / "out", shapes_folder, stages=["vae", "unet"], vae_training__min_psnr=99.0,
                         resume_from_checkpoint="latest")
    with pytest.raises(TrainingError, match="failed its check"):  # reusing the failed VAE is refused too
        train(resumed)
    warned = vae_config(tmp_path / "out", shapes_folder, stages=["vae", "unet"], vae_training__min_psnr=99.0,
                        resume_from_checkpoint="latest", vae_training__on_check_failure="warn")
    assert (train(warned) / "model_index.json").is_file()


@pytest.mark.parametrize("psnr_samples, count", [(0, 16), (8, 4)])
def test_no_held_out_images_still_saves_the_vae(tmp_path, psnr_samples, count):
    from conftest import write_caption_folder

    data = write_caption_folder(tmp_path / "data", count=count)
    train(vae_config(tmp_path / "out", data, vae_training__psnr_samples=psnr_samples, train_batch_size=2,
                     vae_training__train_batch_size=2))
    calibration = json.loads((tmp_path / "out" / "vae" / "calibration.json").read_text())
    assert calibration["scaling_factor"] > 0 and "heldout_psnr_db" not in calibration


def test_reconstruction_scores_of_a_perfect_and_a_grey_autoencoder(shapes_folder):
    captions = [json.loads(line)["text"] for line in (shapes_folder / "metadata.jsonl").read_text().splitlines()]
    assert is_shapes_data(captions) and not is_shapes_data(captions + ["a photo of a cat"])
    images = [Image.open(shapes_folder / f"{i:05d}.png").convert("RGB") for i in range(6)]
    pixels = torch.stack([torch.tensor(np.asarray(image)).permute(2, 0, 1) for image in images]).float() / 127.5 - 1

    class Identity(torch.nn.Module):  # encode/decode as the identity: a perfect autoencoder
        device, dtype = torch.device("cpu"), torch.float32

        def encode(self, x):
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": x})})

        def decode(self, z):
            return type("Out", (), {"sample": z})

    sums = reconstruction_sums(Identity(), pixels, captions[:6], ReconstructionCheck())
    assert sums[0] == 6 and sums[2:].tolist() == [6, 6, 6, 6]  # the checker reads every original right (and clean)
    assert [image.tobytes() for image in IMAGES.postprocess(pixels, output_type="pil")] == \
        [image.tobytes() for image in images]

    class Blank(Identity):  # decodes everything to a white image: nothing for the checker to read
        def decode(self, z):
            return type("Out", (), {"sample": torch.ones_like(z)})

    blank = reconstruction_sums(Blank(), pixels, captions[:6], ReconstructionCheck())
    assert blank[2:].tolist() == [0, 0, 0, 6] and blank[1] / 6 < sums[1] / 6  # nothing to read; nothing unclean


def test_calibration_centres_the_latents_and_keeps_reconstructions(tmp_path):
    from accelerate import Accelerator

    from ldm_pipeline.models import ModelConfig, build_vae

    torch.manual_seed(0)
    vae = build_vae(ModelConfig()).eval()
    dataset = [{"pixel_values": torch.rand(3, 32, 32) * 2 - 1} for _ in range(10)]
    pixels = torch.stack([row["pixel_values"] for row in dataset])
    with torch.no_grad():
        before = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        stats = calibrate_latents(Accelerator(cpu=True), vae, dataset, num_samples=10, batch_size=3)
        means = vae.encode(pixels).latent_dist.mean
        after = vae.decode(means).sample
    assert torch.allclose(means.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)  # centred per channel
    assert (means * stats["scaling_factor"]).std().item() == pytest.approx(1.0, abs=0.02)  # unit variance
    assert torch.allclose(before, after, atol=1e-4)  # the decoder reads the centred latents the same


def test_the_seed_changes_the_vae_init_the_data_order_and_the_noise(tmp_path, shapes_folder):
    from ldm_pipeline.models import ModelConfig, build_vae, seeded
    from ldm_pipeline.training import build_accelerator

    def vae_weights(seed):
        return seeded(seed, "vae", lambda: build_vae(ModelConfig())).encoder.conv_in.weight

    assert torch.equal(vae_weights(0), vae_weights(0)) and not torch.equal(vae_weights(0), vae_weights(1))

    def first_epoch(seed):
        accelerator = build_accelerator(vae_config(tmp_path / "out", shapes_folder, seed=seed))
        loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(16)), batch_size=4, shuffle=True))
        loader.set_epoch(0)
        return torch.cat(list(loader)).tolist()

    assert first_epoch(0) == first_epoch(0) != first_epoch(1)

    def noise(seed):
        return torch.randn(4, generator=sample_generators(seed, 3, [5])[0])

    assert torch.equal(noise(0), noise(0)) and not torch.equal(noise(0), noise(1))


def test_decoder_steps_train_the_decoder_alone_after_the_calibration(tmp_path, shapes_folder):
    from diffusers import AutoencoderKL

    def trained(name, decoder_steps):
        train(vae_config(tmp_path / name, shapes_folder, vae_training__decoder_steps=decoder_steps))
        return AutoencoderKL.from_pretrained(tmp_path / name / "vae")

    plain, hardened = trained("plain", 0), trained("hardened", 3)
    weights = lambda vae, part: getattr(vae, part).state_dict()
    for part in ("encoder", "quant_conv"):  # the encoder and its calibrated mean: the UNet's latents are unchanged
        assert all(torch.equal(a, b) for a, b in zip(weights(plain, part).values(), weights(hardened, part).values()))
    assert hardened.config.scaling_factor == plain.config.scaling_factor
    assert not all(torch.equal(a, b) for a, b in zip(weights(plain, "decoder").values(),
                                                     weights(hardened, "decoder").values()))
    rows = [json.loads(line) for line in (tmp_path / "hardened" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["stage"] == "vae-decoder" and "loss" in row] == [1, 2, 3]
    calibration = json.loads((tmp_path / "hardened" / "vae" / "calibration.json").read_text())
    assert "recon_shape_accuracy" in calibration  # the check reads the decoder that is saved


def test_a_decoder_step_sees_noise_of_its_own_sample_only(shapes_folder, monkeypatch):
    """Each image's posterior sample and latent noise come from its own generator, scaled by a fixed latent std:
    a batch's loss is the mean of its images' losses alone, so the process count changes nothing."""
    from types import SimpleNamespace

    import ldm_pipeline.vae_stage as vae_stage
    from ldm_pipeline.models import ModelConfig, build_vae, vae_scale_factor
    from ldm_pipeline.vae_stage import DecoderForTraining, decoder_step_loss

    monkeypatch.setattr(vae_stage, "CLEAN_FRACTION", 0.0)  # every image noisy, so the noise is what is compared

    vae = build_vae(ModelConfig())
    model = DecoderForTraining(vae, latent_std=1.7)
    pixels = torch.stack([IMAGES.preprocess(Image.open(path).convert("RGB"))[0]
                          for path in sorted(shapes_folder.glob("*.png"))[:2]])
    settings = SimpleNamespace(decoder_noise=0.3, foreground_weight=4.0)

    def loss(rows, noise=0.3):
        batch = {"pixel_values": pixels[rows]}
        settings.decoder_noise = noise
        return decoder_step_loss(model, 4, vae_scale_factor(vae), settings, batch, sample_generators(0, 7, rows)).item()

    assert loss([0, 1]) == pytest.approx((loss([0]) + loss([1])) / 2, rel=1e-5)
    assert loss([0, 1]) == loss([0, 1]) != loss([0, 1], noise=3.0)


def test_the_noise_strength_is_zero_for_the_clean_share_and_bounded_otherwise():
    from ldm_pipeline.vae_stage import CLEAN_FRACTION, noise_strength

    strengths = torch.stack([noise_strength(0.3, generator) for generator in sample_generators(0, 0, range(2000))])
    assert (strengths == 0).float().mean().item() == pytest.approx(CLEAN_FRACTION, abs=0.04)
    noisy = strengths[strengths > 0]
    assert noisy.max().item() <= 0.3 and noisy.mean().item() == pytest.approx(0.15, abs=0.02)  # uniform in [0, 0.3]


def test_a_run_stopped_in_its_decoder_steps_ends_with_the_vae_of_an_uninterrupted_one(tmp_path, shapes_folder,
                                                                                        monkeypatch):
    """The decoder steps keep no checkpoint: a rerun resumes the VAE's own steps from theirs (here the last) and
    repeats the decoder steps whole, to the same weights."""
    from safetensors.torch import load_file

    import ldm_pipeline.vae_stage as vae_stage

    settings = dict(vae_training__decoder_steps=3, vae_training__checkpointing_steps=4,
                    resume_from_checkpoint="latest")
    train(vae_config(tmp_path / "whole", shapes_folder, **settings))

    class Stopped(Exception):
        pass

    real, calls = vae_stage.decoder_step_loss, []

    def stop_at_the_second_step(*args):
        calls.append(args)
        if len(calls) == 2:
            raise Stopped
        return real(*args)

    monkeypatch.setattr(vae_stage, "decoder_step_loss", stop_at_the_second_step)
    with pytest.raises(Stopped):
        train(vae_config(tmp_path / "cut", shapes_folder, **settings))
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "vae").exists()
    train(vae_config(tmp_path / "cut", shapes_folder, **settings))
    saved, expected = (load_file(out / "vae" / "diffusion_pytorch_model.safetensors") for out in
                       (tmp_path / "cut", tmp_path / "whole"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
