"""Aspect-ratio buckets: the sizes, each image's bucket from its header, the crop, and batches of one bucket."""

import io

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.buckets import (
    BucketSampler,
    assign_buckets,
    bucket_sizes,
    crop_box,
    header_size,
    merge_small_buckets,
    nearest_bucket,
)
from ldm_pipeline.config import BucketConfig, ConfigError


def test_sizes_from_an_area_keep_sides_on_the_step_and_within_the_aspect_limit():
    sizes = bucket_sizes(BucketConfig(area=512 * 512, step=64, min_side=256, max_side=1024, max_aspect=2.0), 512)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for height, width in sizes:
        assert height % 64 == 0 and width % 64 == 0 and 256 <= min(height, width) and max(height, width) <= 1024
        assert height * width <= 512 * 512 and max(height / width, width / height) <= 2.0
    assert sizes == sorted(sizes, key=lambda size: size[1] / size[0])  # tall to wide
    assert bucket_sizes(BucketConfig(sizes=[[64, 96], [64, 64], [96, 64]]), 64) == [(96, 64), (64, 64), (64, 96)]


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    sizes = [(96, 64), (64, 64), (64, 96)]  # (height, width): tall, square, wide
    assert nearest_bucket(sizes, 96, 64) == 2 and nearest_bucket(sizes, 64, 96) == 0
    assert nearest_bucket(sizes, 500, 480) == 1
    assert nearest_bucket(sizes, 1000, 620) == 2  # 1.61: nearer 1.5 than 1.0 on a log scale


def test_sizes_come_from_file_headers_without_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (96, 64)).save(path)
    assert header_size({"path": str(path), "bytes": None}) == (96, 64)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 96)).save(buffer, format="PNG")
    truncated = buffer.getvalue()[:60]  # the header survives; the pixels do not: a decode would fail
    assert header_size({"path": None, "bytes": truncated}) == (64, 96)


def test_small_buckets_are_merged_into_their_nearest_neighbour_not_dropped():
    sizes = [(128, 64), (96, 64), (64, 64), (64, 96)]
    assignment = assign_buckets(sizes, [(64, 64)] * 10 + [(64, 96)] * 3 + [(64, 128)] * 9)
    merged, notes = merge_small_buckets(assignment, min_images=8)
    assert merged.counts().tolist() == [9 + 3, 0, 10, 0]  # the three 96-tall images join the 128-tall bucket
    assert notes == ["3 image(s) of bucket 96x64 trained at 128x64"]
    with pytest.raises(ConfigError, match="no bucket holds one global batch"):
        merge_small_buckets(assignment, min_images=50)


@pytest.mark.parametrize("center", [True, False])
def test_the_crop_covers_the_bucket_and_stays_inside_the_image(center):
    for width, height in ((640, 480), (100, 300), (64, 64)):
        (resized_w, resized_h), (left, top) = crop_box(width, height, (96, 64), center, seed=7)
        assert resized_w >= 64 and resized_h >= 96 and (resized_w == 64 or resized_h == 96)  # covers, no more
        assert 0 <= left <= resized_w - 64 and 0 <= top <= resized_h - 96
    assert crop_box(640, 480, (64, 64), False, 7) == crop_box(640, 480, (64, 64), False, 7)  # the image's own seed
    offsets = {crop_box(640, 480, (64, 64), False, seed)[1] for seed in range(20)}
    assert len(offsets) > 5 if not center else True


def test_every_window_is_one_bucket_and_an_epoch_is_a_seeded_shuffle():
    buckets = np.array([0] * 20 + [1] * 13 + [2] * 7)
    sampler = BucketSampler(buckets, window=4, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 20 + 12 + 4
    windows = [order[k:k + 4] for k in range(0, len(order), 4)]
    assert all(len(set(buckets[window])) == 1 for window in windows)
    assert len(set(order)) == len(order)  # no image twice in an epoch
    assert list(BucketSampler(buckets, 4, 3)) == order  # the same at every construction: resume, any process count
    relabelled = np.array([2, 0, 1])[buckets]  # the cache numbers buckets by latent size, the folder by aspect
    assert list(BucketSampler(relabelled, 4, 3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(set(buckets[list(sampler)])) == [0, 1, 2]


# --- end to end: a folder of three frame sizes, trained in buckets --------------------------------------------------

import json  # noqa: E402

import torch  # noqa: E402
from conftest import stopped_after_checkpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_launch import accelerate_launch  # noqa: E402
from test_scale import STEPS, assert_same_state, scale_config, write_config  # noqa: E402

import ldm_pipeline.unet_stage as unet_stage  # noqa: E402
from ldm_pipeline.config import config_from_dict  # noqa: E402
from ldm_pipeline.models import ModelConfig, build_unet, seeded  # noqa: E402
from ldm_pipeline.shapes.maker import make_shapes  # noqa: E402
from ldm_pipeline.training import train  # noqa: E402

SIZES = [[32, 32], [32, 48], [48, 32]]  # [height, width]: square, wide, tall


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """36 shapes images, 12 each of 32x32, 48x32 (wide) and 32x48 (tall), captioned."""
    return make_shapes(tmp_path_factory.mktemp("mixed") / "data", 36, resolution=32, seed=0,
                       sizes=[(32, 32), (48, 32), (32, 48)])


def bucket_config(out, data, **overrides) -> dict:
    return scale_config(out, data, **{"data__buckets": {"sizes": SIZES}, **overrides})


@pytest.fixture(scope="module")
def reference(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("buckets") / "reference"
    train(config_from_dict(bucket_config(out, mixed)))
    return out


def test_every_step_trains_one_bucket_and_every_bucket_trains(mixed, tmp_path, monkeypatch):
    shapes, step_loss = [], unet_stage.step_loss

    def spy(parts, batch, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step, not the held-out loss
            shapes.append(tuple(batch["pixel_values"].shape))
        return step_loss(parts, batch, *args, **kwargs)

    monkeypatch.setattr(unet_stage, "step_loss", spy)  # training_loss looks it up in its module
    train(config_from_dict(bucket_config(tmp_path / "out", mixed, max_train_steps=6)))
    assert len(shapes) == 6 and {shape[2:] for shape in shapes} == {(32, 32), (32, 48), (48, 32)}
    assert all(shape[0] == 4 for shape in shapes)  # whole batches of one size


def test_a_bucketed_run_resumes_mid_epoch_exactly(mixed, reference, tmp_path):
    out = tmp_path / "out"
    with stopped_after_checkpoint(2):  # 9 steps an epoch: step 2 is mid-epoch
        train(config_from_dict(bucket_config(out, mixed)))
    train(config_from_dict(bucket_config(out, mixed, resume_from_checkpoint="latest")))
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")


def test_two_processes_train_the_buckets_of_one_process_at_the_same_global_batch(mixed, reference, tmp_path):
    config = write_config(tmp_path / "two.yaml", bucket_config(tmp_path / "out", mixed, train_batch_size=2))
    result = accelerate_launch("train.py", "--config", str(config), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_state(tmp_path / "out" / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}",
                      atol=5e-5)


def test_a_cached_bucketed_run_equals_encoding_in_the_loop_to_fp16_rounding(mixed, reference, tmp_path):
    out = tmp_path / "cached"
    train(config_from_dict(bucket_config(out, mixed, data__cache_latents=True, data__center_crop=False)))
    manifest = json.loads((out / "latent_cache" / "manifest.json").read_text())
    assert json.loads(manifest["key"]["buckets"])["sizes"] == SIZES
    in_loop = tmp_path / "in_loop"
    train(config_from_dict(bucket_config(in_loop, mixed, data__center_crop=False)))
    pipeline = out / "pipeline"
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae, text_encoder = AutoencoderKL.from_pretrained(pipeline / "vae"), CLIPTextModel.from_pretrained(
        pipeline / "text_encoder")
    initial = seeded(0, "unet", lambda: build_unet(ModelConfig(unet="tiny"), 32, vae, text_encoder)).state_dict()
    cached, looped = (load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
                      for run in (out, in_loop))
    update = torch.cat([(cached[k] - initial[k]).flatten() for k in sorted(cached)])
    difference = torch.cat([(cached[k] - looped[k]).flatten() for k in sorted(cached)])
    assert update.norm() > 0 and difference.norm() / update.norm() < 0.01  # the same crops, the same batches


def test_dry_run_prints_the_bucket_table(mixed, tmp_path, capsys):
    train(config_from_dict(bucket_config(tmp_path / "out", mixed, data__buckets={"sizes": SIZES + [[40, 32]]})),
          dry_run=True)
    printed = capsys.readouterr().out
    assert "buckets (height x width: images, steps per epoch):" in printed
    assert "  32x32: 12 images, 3 steps" in printed and "  32x48: 12 images, 3 steps" in printed
    assert "40x32" not in printed  # a bucket no image falls in is not listed
    assert not (tmp_path / "out").exists()


def test_the_vae_stage_trains_checks_and_calibrates_on_buckets(mixed, tmp_path):
    out = tmp_path / "out"
    train(config_from_dict(bucket_config(out, mixed, stages=["vae", "unet"], max_train_steps=2,
                                         vae_training__psnr_samples=6)))
    calibration = json.loads((out / "vae" / "calibration.json").read_text())
    assert calibration["scaling_factor"] > 0 and "recon_shape_accuracy" in calibration  # sizes checked apart


def test_an_image_too_small_for_its_bucket_is_named_or_skipped(mixed, tmp_path, capsys):
    import shutil

    data = shutil.copytree(mixed, tmp_path / "data")
    Image.new("RGB", (12, 12), "white").save(data / "00003.png")  # would be enlarged 2.7x to 32x32
    with pytest.raises(Exception, match=r"too small for any bucket .*00003\.png: 12x12 px, too small for its 32x32 "
                                        r"bucket \(it would be enlarged 2\.7x\).*data\.buckets\.min_side"):
        train(config_from_dict(bucket_config(tmp_path / "out", data)))
    assert not (tmp_path / "out" / "config.yaml").exists()  # refused before anything was written
    train(config_from_dict(bucket_config(tmp_path / "out", data, data__skip_bad_images=True, max_train_steps=1)))
    assert "00003.png: 12x12 px" in (tmp_path / "out" / "skipped_images.txt").read_text()
