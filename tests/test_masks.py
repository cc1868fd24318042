"""Masked loss: each image's mask (its alpha channel, or a file of its name in data.mask_dir) follows the image
through every resize, crop and flip, weights the loss on the latent grid, and bad masks are refused by name."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image, ImageDraw

from ldm_pipeline import data as data_lib
from ldm_pipeline.config import ConfigError, DataConfig


def subject_on_background(size=(48, 32), box=(10, 6, 26, 22)) -> tuple[Image.Image, Image.Image]:
    """A red subject on a green background, and its mask (white on the subject)."""
    image = Image.new("RGB", size, (40, 170, 60))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle(box, fill=(220, 40, 40))
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return image, mask


def test_the_mask_is_cut_exactly_as_its_image(tmp_path):
    image, mask = subject_on_background()
    for center, flip in ((True, False), (False, True)):
        data_lib.random.seed(3)
        pixels, cut = data_lib.image_to_tensor(image, 32, center, flip, mask)
        assert pixels.shape == (3, 32, 32) and cut.shape == (1, 32, 32)
        red = (pixels[0] > 0.5) & (pixels[1] < -0.5)  # the subject's pixels after the crop
        assert torch.equal(red, cut[0] > 0.5)


def test_masks_come_from_the_alpha_channel_or_a_file_of_the_same_name(tmp_path):
    image, mask = subject_on_background()
    with_alpha = image.copy()
    with_alpha.putalpha(mask)
    with_alpha.save(tmp_path / "a.png")
    image.save(tmp_path / "b.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    mask.save(masks / "b.png")
    from_alpha = data_lib.open_mask({"path": str(tmp_path / "a.png"), "bytes": None}, DataConfig(masked_loss=True))
    from_file = data_lib.open_mask({"path": str(tmp_path / "b.png"), "bytes": None},
                                   DataConfig(masked_loss=True, mask_dir=str(masks)))
    assert np.array_equal(np.asarray(from_alpha), np.asarray(mask)) and np.array_equal(np.asarray(from_file),
                                                                                         np.asarray(mask))


def test_bad_masks_are_refused_by_name(tmp_path):
    image, mask = subject_on_background()
    image.save(tmp_path / "plain.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(data_lib.DataError, match=r"plain\.png has no alpha channel and no mask file"):
        data_lib.open_mask({"path": str(tmp_path / "plain.png"), "bytes": None}, DataConfig(masked_loss=True))
    mask.resize((24, 16)).save(masks / "plain.png")
    with pytest.raises(data_lib.DataError, match=r"masks/plain\.png is 24x16 px but its image .*plain\.png is 48x32"):
        data_lib.open_mask({"path": str(tmp_path / "plain.png"), "bytes": None},
                           DataConfig(masked_loss=True, mask_dir=str(masks)))
    Image.new("L", (48, 32), 0).save(masks / "plain.png")
    with pytest.raises(data_lib.DataError, match=r"is all black: nothing of the image would train"):
        data_lib.open_mask({"path": str(tmp_path / "plain.png"), "bytes": None},
                           DataConfig(masked_loss=True, mask_dir=str(masks)))


def test_mask_settings_are_checked_when_the_config_is_read(tmp_path, caption_folder):
    with pytest.raises(ConfigError, match="data.mask_dir: .* holds masks for data.masked_loss: true"):
        tiny_config(tmp_path / "out", caption_folder, data__mask_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.masked_loss reads each image's mask as it trains"):
        tiny_config(tmp_path / "out", caption_folder, data__masked_loss=True, data__cache_latents=True)
    assert tiny_config(tmp_path / "out", caption_folder, data__masked_loss=True).data.masked_loss is True


def test_a_masked_run_trains_on_the_subject_only(tmp_path, monkeypatch):
    """End to end at tiny size: the images' alpha channels reach the loss, on the latent grid."""
    import ldm_pipeline.losses as losses
    from ldm_pipeline.training import train

    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for k in range(8):
        image, mask = subject_on_background((32, 32), (4 + k, 4, 20 + k, 20))
        image.putalpha(mask)
        image.save(folder / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": "a red square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    seen, diffusion_loss = [], losses.diffusion_loss

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("mask"))
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(losses, "diffusion_loss", spy)  # the UNet stage calls losses.diffusion_loss
    train(tiny_config(tmp_path / "out", folder, data__masked_loss=True, max_train_steps=2,
                      validation__num_heldout=2))
    masks = [mask for mask in seen if mask is not None]
    assert masks and masks[0].shape[1:] == (1, 4, 4)  # 32 px images: a 4x4 latent grid
    assert 0 < float(masks[0].mean()) < 1 and float(masks[0].min()) == 0.0  # the background is masked out
