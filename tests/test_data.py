"""Data sources through `datasets`, caption rules, image handling and the latent cache."""

import json
import multiprocessing
import os
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_config, write_caption_folder, write_class_folder
from PIL import Image

from ldm_pipeline import data as data_lib
from ldm_pipeline import latent_cache
from ldm_pipeline.config import ModelConfig
from ldm_pipeline.models import build_text_encoder, build_vae, load_tokenizer


def test_caption_folder_uses_metadata_captions(tmp_path, caption_folder):
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder))
    assert len(train.dataset) == 16
    assert train.captions[0] == "a red square on the left"
    assert set(train.captions) == {f"a {c} square on the {s}" for c in ("red", "blue") for s in ("left", "right")}


def test_class_folders_become_templated_captions(tmp_path, class_folder):
    config = tiny_config(tmp_path / "out", class_folder, data__caption_template="a drawing of a {label}")
    train = data_lib.load_train_data(config)
    assert sorted(set(train.captions)) == ["a drawing of a blue", "a drawing of a red"]
    assert len(train.captions) == 16


def test_split_folders_train_on_train(tmp_path):
    write_caption_folder(tmp_path / "data" / "train", count=8)
    write_class_folder(tmp_path / "data" / "test", count=2)  # never read: only the train split is
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", tmp_path / "data"))
    assert len(train.dataset) == 8 and train.captions[0] == "a red square on the left"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_an_image_folder_is_listed_in_a_child_process(tmp_path, caption_folder, monkeypatch):
    # datasets' listing of a folder leaves the heap of the process that ran it fragmented for good (~85 MB at
    # 100k files): it runs in a forked child, and this process opens the Arrow files the child wrote.
    listed_by = tmp_path / "listed_by"
    load_dataset = data_lib.datasets.load_dataset

    def recording(*args, **kwargs):
        with listed_by.open("a") as log:
            log.write(f"{os.getpid()}\n")
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(data_lib.datasets, "load_dataset", recording)
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder, data__max_train_samples=12))
    pids = listed_by.read_text().split()
    assert pids and str(os.getpid()) not in pids
    assert len(train.dataset) == len(train.captions) == 12 and train.captions[0] == "a red square on the left"
    assert train.dataset.cache_files  # memory-mapped, not copied into this process
    assert train.dataset[0]["image"]["path"].endswith(".png")  # left undecoded, as without the child


def test_flat_folder_trains_unconditionally(tmp_path, flat_folder):
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", flat_folder))
    assert train.captions == [""] * 16


def test_explicit_null_caption_column_is_unconditional(tmp_path, caption_folder):
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder, data__caption_column=None))
    assert set(train.captions) == {""}


def test_misnamed_caption_column_is_an_error(tmp_path, caption_folder):
    config = tiny_config(tmp_path / "out", caption_folder, data__caption_column="caption")
    with pytest.raises(data_lib.DataError, match="caption_column: 'caption'.*text columns are \\['text'\\]"):
        data_lib.load_train_data(config)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data_lib.DataError, match="empty"):
        data_lib.load_train_data(tiny_config(tmp_path / "out", tmp_path / "empty"))


def test_undecodable_images_fail_or_are_skipped(tmp_path, caption_folder):
    (caption_folder / "003.png").write_bytes(b"this is not a png")
    good = (caption_folder / "004.png").read_bytes()
    (caption_folder / "005.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(data_lib.DataError, match="2 image\\(s\\) failed to decode.*003.png.*data.skip_bad_images: "
                                                 "true to train without them"):
        data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder))
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder, data__skip_bad_images=True))
    assert len(train.dataset) == 14 and len(train.captions) == 14
    assert [Path(reason.split(":")[0]).name for reason in train.skipped] == ["003.png", "005.png"]
    # on_bad_image: skip, the older spelling, still skips
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder, data__on_bad_image="skip"))
    assert len(train.dataset) == 14


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_image_mode_becomes_rgb(mode):
    image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    rgb = data_lib.open_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (20, 10)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert data_lib.open_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_images_keep_their_brightness():
    image = Image.new("I;16", (4, 4), 32768)  # mid grey at 16 bits
    assert data_lib.open_rgb(image).getpixel((0, 0))[0] == 128


def test_transform_resizes_crops_and_flips():
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 10, 20))  # black left quarter
    pixels = data_lib.image_to_tensor(image, 16)
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    small = data_lib.image_to_tensor(Image.new("RGB", (8, 8), "red"), 16)  # smaller than the resolution
    assert small.shape == (3, 16, 16)
    wide = data_lib.image_to_tensor(image, 20, center_crop=True)
    flipped = data_lib.image_to_tensor(image, 20, center_crop=True, flip=True)
    assert torch.allclose(flipped, wide.flip(-1))


def test_tokenize_truncates_long_captions_with_one_warning(caplog):
    tokenizer = load_tokenizer(ModelConfig(), lambda: ["a short caption"])
    long = " ".join(["word"] * 100)
    with caplog.at_level("WARNING"):
        ids = data_lib.tokenize(tokenizer, [long, long, "a short caption"])
    assert ids.shape == (3, tokenizer.model_max_length)
    assert sum("truncated" in record.message for record in caplog.records) == 1
    assert "2 caption(s)" in caplog.text


def test_heldout_split_is_seeded_and_disjoint():
    train, heldout = data_lib.split_heldout(100, 10, seed=3)
    assert len(heldout) == 10 and not set(train) & set(heldout) and len(train) == 90
    assert data_lib.split_heldout(100, 10, seed=3) == (train, heldout)
    assert data_lib.split_heldout(10, 10, seed=3)[1].__len__() == 2  # at most a fifth


def _cache_parts(tmp_path, data_dir, **overrides):
    config = tiny_config(tmp_path / "out", data_dir, data__cache_latents=True, **overrides)
    train = data_lib.load_train_data(config)
    tokenizer = load_tokenizer(config.model, lambda: train.captions)
    torch.manual_seed(0)
    text_encoder, vae = build_text_encoder(config.model, tokenizer), build_vae(config.model)
    return config, train, tokenizer, text_encoder, vae


def test_latent_cache_is_reused_and_refuses_stale(tmp_path, caption_folder, capsys):
    accelerator = Accelerator(cpu=True)
    config, train, tokenizer, text_encoder, vae = _cache_parts(tmp_path, caption_folder)
    cache = latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])
    directory = tmp_path / "out" / "latent_cache"
    assert (directory / "manifest.json").is_file() and cache.directory == directory
    rows = cache.rows[:]
    assert rows["latent_mean"].shape == (16, 1, 4, 4, 4)  # (rows, orientations, C, h, w)
    assert rows["prompt_embeds"].shape == (16, tokenizer.model_max_length, text_encoder.config.hidden_size)
    assert rows["row"].tolist() == list(range(16))
    assert torch.equal(torch.from_numpy(rows["input_ids"]).long(), data_lib.tokenize(tokenizer, train.captions))
    expected = vae.encode(data_lib.image_to_tensor(data_lib.open_rgb(train.dataset[0]["image"]), 32)[None])
    assert torch.allclose(torch.from_numpy(rows["latent_mean"][0, 0]).float(), expected.latent_dist.mean[0], atol=1e-2)
    assert cache.empty_prompt_embeds.shape == rows["prompt_embeds"].shape[1:]

    shard = directory / "shard-00000" / "data-00000-of-00001.arrow"
    mtime = shard.stat().st_mtime_ns
    again = latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])
    assert "reusing latent cache" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == mtime
    assert (again.rows[:]["latent_mean"] == rows["latent_mean"]).all()

    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.1
        vae.encoder.conv_out.bias += 0.1  # different VAE weights
    with pytest.raises(data_lib.DataError, match="stale.*different vae.*Delete that directory"):
        latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])
    assert shard.stat().st_mtime_ns == mtime  # nothing overwritten


def test_latent_cache_with_flips_stores_both_orientations(tmp_path, caption_folder):
    accelerator = Accelerator(cpu=True)
    config, train, tokenizer, _, vae = _cache_parts(tmp_path, caption_folder, data__random_flip=True)
    cache = latent_cache.build_latent_cache(accelerator, config, train, vae, None, [tokenizer])
    image = data_lib.open_rgb(train.dataset[1]["image"])
    mirrored = vae.encode(data_lib.image_to_tensor(image, 32, flip=True)[None]).latent_dist.mean[0]
    means = cache.rows[1]["latent_mean"]
    assert means.shape[0] == 2
    assert torch.allclose(torch.from_numpy(means[1]).float(), mirrored, atol=1e-2)
    assert "prompt_embeds" not in cache.rows.column_names  # text encoder trained: its outputs are not cached
    assert cache.empty_prompt_embeds is None
    key = json.loads((tmp_path / "out" / "latent_cache" / "manifest.json").read_text())["key"]
    assert key["random_flip"] is True and key["text_encoder"] is None


def test_cache_dir_with_foreign_files_is_not_touched(tmp_path, caption_folder):
    accelerator = Accelerator(cpu=True)
    config, train, tokenizer, text_encoder, vae = _cache_parts(tmp_path, caption_folder)
    cache = tmp_path / "out" / "latent_cache"
    cache.mkdir(parents=True)
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(data_lib.DataError, match="holds no latent cache"):
        latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])
    assert (cache / "notes.txt").read_text() == "mine"


def test_a_cache_of_the_old_format_is_refused_with_the_way_out(tmp_path, caption_folder):
    accelerator = Accelerator(cpu=True)
    config, train, tokenizer, text_encoder, vae = _cache_parts(tmp_path, caption_folder)
    cache = tmp_path / "out" / "latent_cache"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"key": {"vae": "0"}, "rows": 16}))
    (cache / "latents.safetensors").write_bytes(b"old")
    with pytest.raises(data_lib.DataError, match="older version.*delete that directory to rebuild it"):
        latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])
    assert (cache / "latents.safetensors").read_bytes() == b"old"


def test_images_are_checked_by_their_shard_once_and_bad_ones_skipped_or_named(tmp_path, caption_folder, monkeypatch):
    (caption_folder / "003.png").write_bytes(b"this is not a png")
    accelerator = Accelerator(cpu=True)
    config, _, tokenizer, text_encoder, vae = _cache_parts(tmp_path, caption_folder, data__on_bad_image="skip",
                                                            data__cache_shard_size=5)
    train = data_lib.load_train_data(config, check_images=False)  # as a cached run loads it: nothing decoded yet
    decoded, open_rgb = [], data_lib.open_rgb
    monkeypatch.setattr(data_lib, "open_rgb", lambda value: decoded.append(value["path"]) or open_rgb(value))
    cache = latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])
    assert sorted(decoded) == sorted(train.dataset["image"][i]["path"] for i in range(16))  # each image once
    assert cache.rows[:]["row"].tolist() == [r for r in range(16) if r != 3]
    manifest = json.loads((tmp_path / "out" / "latent_cache" / "manifest.json").read_text())
    assert [shard["rows"] for shard in manifest["shards"]] == [4, 5, 5, 1]

    config = tiny_config(tmp_path / "strict", caption_folder, data__cache_latents=True, data__cache_shard_size=5)
    with pytest.raises(data_lib.DataError, match=r"rows 0-4: 1 image\(s\) failed to decode \(.*003.png.*"
                                                 "data.skip_bad_images: true"):
        latent_cache.build_latent_cache(accelerator, config, train, vae, [text_encoder], [tokenizer])


def test_row_reader_gives_datasets_own_rows_across_shards_in_any_order():
    # A cache of several shards is a table of several record batches; a batch of training rows draws from any
    # of them, in any order, repeats included.
    features = datasets.Features({"row": datasets.Value("int64"),
                                  "latent_mean": datasets.Array3D((2, 3, 3), "float16"),
                                  "input_ids": datasets.List(datasets.Value("int32"), length=4)})
    generator = torch.Generator().manual_seed(0)
    shards = []
    for shard, size in enumerate((5, 1, 7)):
        shards.append(datasets.Dataset.from_dict({
            "row": list(range(shard * 10, shard * 10 + size)),
            "latent_mean": torch.randn(size, 2, 3, 3, generator=generator).half().numpy(),
            "input_ids": torch.randint(0, 99, (size, 4), generator=generator, dtype=torch.int32).numpy()},
            features=features))
    rows = datasets.concatenate_datasets(shards).with_format("numpy")
    reader = latent_cache.RowReader(rows, ["latent_mean", "input_ids"])
    indices = [12, 0, 5, 5, 7, 3, 12, 6]
    read, expected = reader.read(indices), rows[indices]
    assert read["latent_mean"].shape == (8, 2, 3, 3) and read["input_ids"].shape == (8, 4)
    assert (read["latent_mean"] == expected["latent_mean"]).all()
    assert (read["input_ids"] == expected["input_ids"]).all()
