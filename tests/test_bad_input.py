"""The bad-input sweep (issue 4): each wrong input a user can hand us ends in an error that names the
problem and the way out, or is handled as documented; a refused run leaves nothing behind."""

import errno
import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import draw_square, tiny_config, tiny_config_dict, write_caption_folder, write_flat_folder
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_pipeline import cli, unet_stage
from ldm_pipeline import data as data_lib
from ldm_pipeline import generation as generation_module
from ldm_pipeline.config import ConfigError, config_from_dict, load_config, safe_yaml
from ldm_pipeline.models import UNET_PRESETS
from ldm_pipeline.pipeline import load_pipeline
from ldm_pipeline.training import main as train_main
from ldm_pipeline.training import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from a second thread, and lose several times over on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def files_of(root: Path) -> dict:
    """Every file under `root` with its size, mtime and bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_metadata_folder(root: Path, captions: list, column: str = "text") -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(captions):
            draw_square((200, 30, 30), i % 2 == 0).save(root / f"{i:03d}.png")
            handle.write(json.dumps({"file_name": f"{i:03d}.png", column: caption}) + "\n")
    return root


def pickled_unet_dir(root: Path) -> Path:
    """A tiny UNet saved the pre-safetensors way: config.json + diffusion_pytorch_model.bin."""
    unet = UNet2DConditionModel(**UNET_PRESETS["tiny"], sample_size=4, in_channels=4, out_channels=4,
                                cross_attention_dim=32)
    unet.save_pretrained(root, safe_serialization=False)
    assert (root / "diffusion_pytorch_model.bin").is_file()
    return root


# --- inputs refused before training: (id, make the run's config overrides, error, message) ---------------


def _corrupt_images(tmp_path, data_dir):
    (data_dir / "003.png").write_bytes(b"this is text, not a png")
    good = (data_dir / "004.png").read_bytes()
    (data_dir / "005.png").write_bytes(good[: len(good) // 2])  # truncated
    return {}


def _no_images(tmp_path, data_dir):
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image extension: imagefolder ignores this file")
    return {"data": {"train_data_dir": str(empty)}}


def _caption_column_missing(tmp_path, data_dir):
    captioned = write_metadata_folder(tmp_path / "other_column", ["a red square"] * 8, column="caption")
    return {"data": {"train_data_dir": str(captioned)}}


def huge_png(path: Path, side: int = 15000) -> None:
    """A 1x1 PNG whose header says side x side pixels: PIL refuses it on opening, as it would the real one."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height, after the signature and chunk head
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _huge_image(tmp_path, data_dir):
    huge_png(data_dir / "003.png")
    return {}


def _not_an_image_in_a_cached_run(tmp_path, data_dir):
    (data_dir / "003.png").write_bytes(b"this is text, not a png")
    return {"data": {"cache_latents": True}}  # the cache build decodes the images: their headers are read before


def _caption_file_not_utf8(tmp_path, data_dir):
    for path in data_dir.glob("*.png"):
        path.with_suffix(".txt").write_text("a red square")
    (data_dir / "metadata.jsonl").unlink()
    (data_dir / "003.txt").write_bytes("a red square, caf\u00e9".encode("latin-1"))
    return {"data": {"caption_extension": ".txt"}}


def _shard_without_caption(tmp_path, data_dir):
    from test_webdataset import write_shards

    write_shards(tmp_path / "shards", without_caption={"0007"})
    return {"data": {"train_data_dir": None, "webdataset": str(tmp_path / "shards" / "*.tar")}}


def _shard_with_a_truncated_image(tmp_path, data_dir):
    from test_webdataset import write_shards

    write_shards(tmp_path / "shards", truncated={"0007"})
    return {"data": {"train_data_dir": None, "webdataset": str(tmp_path / "shards" / "*.tar")}}


def _metadata(lines):
    def make(tmp_path, data_dir):
        (data_dir / "metadata.jsonl").write_bytes(b"\n".join(lines))
        return {}
    return make


BAD_RUNS = [
    ("undecodable images", _corrupt_images, data_lib.DataError,
     r"2 image\(s\) failed to decode \(.*003.png.*005.png.*remove or fix them, or set data.skip_bad_images: true"),
    ("not an image, cached run", _not_an_image_in_a_cached_run, data_lib.DataError,
     r"1 image\(s\) cannot be opened as images \(.*003.png: cannot identify image file.*remove or fix them, or set "
     r"data.skip_bad_images: true"),
    ("caption file not UTF-8", _caption_file_not_utf8, data_lib.DataError,
     r"003.txt is not UTF-8 text \(unexpected end of data at byte 17\); save it as UTF-8"),
    ("shard sample without caption", _shard_without_caption, data_lib.DataError,
     r"data.webdataset: .*shard-00001.tar: sample 0007 has an image and no caption \(0007.txt\); add one, or remove "
     r"the sample, or set data.caption_column: null"),
    ("shard cut short", _shard_with_a_truncated_image, data_lib.DataError,
     r"1 image\(s\) failed to decode \(.*shard-00001.tar: 0007.png: .*truncated.*or set data.skip_bad_images: true"),
    ("empty dataset", _no_images, data_lib.DataError, r"no_images holds no readable images.*put .png/.jpg files"),
    ("15000x15000 image", _huge_image, data_lib.DataError, r"1 image\(s\) failed to decode \(.*003.png: Image size "
     r"\(225000000 pixels\) exceeds limit .*decompression bomb.*or set data.skip_bad_images: true"),
    ("metadata without file_name", _metadata([b'{"name": "000.png", "text": "a"}']), data_lib.DataError,
     r'metadata.jsonl line 1 has no "file_name"; every row names its image'),
    ("metadata not UTF-8", _metadata([json.dumps({"file_name": "000.png", "text": "caf\u00e9"},
                                                 ensure_ascii=False).encode("latin-1")]),
     data_lib.DataError, r"metadata.jsonl is not UTF-8 text \(invalid continuation byte at byte 37\); save it as"),
    ("metadata not JSON", _metadata([b'{"file_name": "000.png",']), data_lib.DataError,
     r"metadata.jsonl line 1 is not a JSON object"),
    ("an image listed twice", _metadata([b'{"file_name": "000.png", "text": "a"}', b"",
                                         b'{"file_name": "000.png", "text": "b"}']),
     data_lib.DataError, r"metadata.jsonl lists 000.png twice \(lines 1 and 3\); keep one row per image"),
    ("misnamed caption column", lambda tmp, data: {"data": {"caption_column": "caption"}}, data_lib.DataError,
     r"data.caption_column: 'caption' is not a column.*text columns are \['text'\]"),
    ("missing caption column", _caption_column_missing, data_lib.DataError,
     r"data.caption_column: 'text' is not a column.*text columns are \['caption'\]"),
    ("model.unet ./nope", lambda tmp, data: {"model": {"unet": "./nope"}}, ConfigError,
     r"model.unet: ./nope does not exist; give a preset \(.*tiny\), an existing directory or a hub id"),
    ("preset typo", lambda tmp, data: {"model": {"unet": "smal"}}, ConfigError,
     r"model.unet: 'smal' is not a preset \(base, sd15, sdxl, small, tiny\), not an existing directory, and not a "
     r"hub id \(those read owner/name\); did you mean 'small'\?"),
    ("pretrained typo", lambda tmp, data: {"model": {"pretrained_model_name_or_path": "sd15"}}, ConfigError,
     r"model.pretrained_model_name_or_path: 'sd15' is not an existing directory, and not a hub id"),
    ("pretrained /nope", lambda tmp, data: {"model": {"pretrained_model_name_or_path": "/nope"}}, ConfigError,
     r"model.pretrained_model_name_or_path: /nope does not exist"),
    ("pickled unet", lambda tmp, data: {"model": {"unet": str(pickled_unet_dir(tmp / "bin_unet"))}}, ConfigError,
     r"model.unet: .*bin_unet holds only pickled weights \(diffusion_pytorch_model.bin\).*safetensors only"),
]


def _bad_run(tmp_path, make):
    data_dir = write_caption_folder(tmp_path / "data", count=8)
    data = tiny_config_dict(tmp_path / "out", data_dir, max_train_steps=1)
    for section, values in make(tmp_path, data_dir).items():
        data[section].update(values)
    return config_from_dict(data)


@pytest.mark.parametrize("make, error, message", [case[1:] for case in BAD_RUNS], ids=[c[0] for c in BAD_RUNS])
def test_bad_input_is_refused_with_a_message_that_says_what_to_do(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        train(_bad_run(tmp_path, make))


@pytest.mark.parametrize("make, error", [case[1:3] for case in BAD_RUNS], ids=[c[0] for c in BAD_RUNS])
def test_a_refused_run_leaves_no_output_dir(tmp_path, make, error):
    with pytest.raises(error):
        train(_bad_run(tmp_path, make))
    assert not (tmp_path / "out").exists()


# --- inputs that are handled: they train ------------------------------------------------------------------


def test_odd_images_train_as_rgb_and_bad_files_are_skipped_with_a_count(tmp_path, caplog):
    root = write_flat_folder(tmp_path / "odd", count=4)
    base = Image.new("RGB", (48, 40), (200, 30, 30))
    base.convert("L").save(root / "grey.png")
    base.convert("RGBA").save(root / "rgba.png")
    base.convert("P").save(root / "palette.png")
    Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(root / "sixteen_bit.png")
    Image.new("RGB", (8, 8), "blue").save(root / "smaller_than_resolution.png")
    (root / "text.png").write_text("a .png that is really text")
    good = (root / "000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("imagefolder reads image extensions only: this file is ignored")
    assert Image.open(root / "sixteen_bit.png").mode == "I;16"

    config = tiny_config(tmp_path / "out", root, max_train_steps=1, data__on_bad_image="skip",
                         validation__num_heldout=0)
    with caplog.at_level("WARNING"):
        train_data = data_lib.load_train_data(config)
    assert "skipping 2 image(s) that failed to decode" in caplog.text
    assert "text.png" in caplog.text and "truncated.png" in caplog.text and "notes.txt" not in caplog.text
    assert len(train_data.dataset) == 9
    dataset = data_lib.ImageTextDataset(train_data.dataset, torch.zeros(9, 1), config.data, config.resolution)
    for i in range(len(dataset)):
        pixels = dataset[i]["pixel_values"]
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    names = [Path(row["path"]).name for row in train_data.dataset["image"]]
    sixteen = dataset[names.index("sixteen_bit.png")]["pixel_values"]
    assert torch.allclose(sixteen, torch.full_like(sixteen, (40000 // 256) / 127.5 - 1))  # top 8 bits kept
    small = dataset[names.index("smaller_than_resolution.png")]["pixel_values"]  # 8x8, upscaled to 32x32
    assert torch.equal(small, torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 32, 32))

    assert (train(config) / "unet" / "config.json").is_file()


def test_a_decompression_bomb_is_skipped_with_on_bad_image_skip(tmp_path, caption_folder):
    huge_png(caption_folder / "005.png")
    config = tiny_config(tmp_path / "out", caption_folder, data__on_bad_image="skip")
    train_data = data_lib.load_train_data(config)
    assert len(train_data.dataset) == 15 and "005.png" not in str(train_data.dataset["image"])


def test_empty_and_overlong_captions_train_with_one_warning(tmp_path, caplog, capfd):
    long = " ".join(["word"] * 100)  # past CLIP's 77 tokens, the cap of our captions tokenizer
    captions = ["", None, "a red square", long, long + " more", "a blue square", "", "a red square"]
    root = write_metadata_folder(tmp_path / "data", captions)
    config = tiny_config(tmp_path / "out", root, max_train_steps=1, data__cache_latents=True,
                         validation__num_heldout=0)
    assert data_lib.load_train_data(config).captions.count("") == 3  # empty and null: the unconditional prompt
    with caplog.at_level("WARNING"):
        assert (train(config) / "unet" / "config.json").is_file()
    warnings = [record.getMessage() for record in caplog.records if "truncated" in record.getMessage()]
    assert warnings == ["2 caption(s) are longer than the tokenizer's 77 tokens and were truncated"]
    assert "Token indices sequence length" not in capfd.readouterr().err  # transformers' own warning: silenced


# --- configs and paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"learnin_rate": 1e-3}, "unknown config key 'learnin_rate'; valid keys here: output_dir, "),
    ({"data": {"caption_colum": "text"}}, "unknown config key 'data.caption_colum'"),
    ({"train_batch_size": "four"}, "train_batch_size: expected int, got 'four'"),
    ({"model": {"unet_kwargs": [1, 2]}}, "model.unet_kwargs: expected a mapping"),
    ({"report_to": "tensorbord"}, r"report_to: 'tensorbord' is not a tracker Accelerate knows \(all, .*tensorboard"
                                  r".*\); did you mean 'tensorboard'\?"),
])
def test_config_typos_and_wrong_types_name_the_key(tmp_path, caption_folder, change, message):
    data = tiny_config_dict(tmp_path / "out", caption_folder)
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, caption_folder):
    (tmp_path / "taken").write_text("my notes")
    with pytest.raises(ConfigError, match="output_dir: .*taken is a file; choose a directory path"):
        tiny_config(tmp_path / "taken", caption_folder)
    assert (tmp_path / "taken").read_text() == "my notes"


def test_load_pipeline_from_a_missing_path():
    with pytest.raises(ConfigError, match="model /nope does not exist; give a trained pipeline directory"):
        load_pipeline("/nope")


# --- an existing run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    data_dir = write_caption_folder(root / "data", count=8)
    train(tiny_config(root / "out", data_dir, max_train_steps=1, checkpointing_steps=1, validation__num_heldout=0))
    return root


def test_an_existing_run_is_refused_and_left_untouched(finished_run):
    out, before = finished_run / "out", files_of(finished_run / "out")
    assert "checkpoints/step-1/model.safetensors" in before and "pipeline/model_index.json" in before
    with pytest.raises(ConfigError, match="already holds a training run. Set resume_from_checkpoint: latest.*"
                                          "overwrite_output_dir: true"):
        train(tiny_config(out, finished_run / "data", max_train_steps=1, seed=1))
    assert files_of(out) == before


def test_resuming_with_a_different_model_names_the_key_and_touches_nothing(finished_run):
    out, before = finished_run / "out", files_of(finished_run / "out")
    config = tiny_config(out, finished_run / "data", max_train_steps=2, resume_from_checkpoint="latest",
                         validation__num_heldout=0, model={"unet": "tiny", "vae": "tiny", "text_encoder": "tiny",
                                                           "unet_kwargs": {"layers_per_block": 2}})
    with pytest.raises(ConfigError, match=r"holds a run made with different settings "
                                          r"\(model.unet_kwargs.layers_per_block: None -> 2\)"):
        train(config)
    assert files_of(out) == before


def test_an_existing_run_continues_with_resume_or_is_replaced_with_overwrite(finished_run, tmp_path, capsys):
    out, data_dir = shutil.copytree(finished_run / "out", tmp_path / "out"), finished_run / "data"
    train(tiny_config(out, data_dir, max_train_steps=2, checkpointing_steps=1, validation__num_heldout=0,
                      resume_from_checkpoint="latest"))
    assert "resumed from" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    train(tiny_config(out, data_dir, max_train_steps=1, validation__num_heldout=0, overwrite_output_dir=True))
    assert not (out / "checkpoints").exists()


def test_overwrite_removes_only_what_the_previous_run_wrote(finished_run, tmp_path, capsys):
    out, data_dir = shutil.copytree(finished_run / "out", tmp_path / "out"), finished_run / "data"
    mine = {"checkpoints/my_notes.txt": "notes", "samples/keep.png": "a picture", "logs/mine.txt": "log",
            "notes.md": "top level", "pipeline.tmp-123/x": "leftover of a killed save", "logs/ldm_pipeline/events": "t"}
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    train(tiny_config(out, data_dir, max_train_steps=1, validation__num_heldout=0, overwrite_output_dir=True))
    assert ("overwrite_output_dir: removed the previous run's files from " + str(out) + "; kept what it did not write: "
            "checkpoints/my_notes.txt, logs/mine.txt, samples/keep.png") in capsys.readouterr().out
    for name in ("checkpoints/my_notes.txt", "samples/keep.png", "logs/mine.txt", "notes.md"):
        assert (out / name).read_text() == mine[name], name
    # The old tracker files went with the old run (the new run logs to TensorBoard afresh).
    assert not (out / "pipeline.tmp-123").exists() and not (out / "logs" / "ldm_pipeline" / "events").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["my_notes.txt"]  # step-1 was the run's
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["final.png", "final.txt", "keep.png"]


@pytest.mark.parametrize("output_dir, data_dir, message", [
    ("/", "data", "output_dir: / is the filesystem root; a run writes there and, with overwrite_output_dir, clears"),
    ("~", "data", "output_dir: ~ is your home directory; .* Give the run a folder of its own"),
    ("data", "data", r"output_dir: .*data is the data folder \(data.train_data_dir: .*data\): the run's images"),
    ("data/out", "data", "output_dir: .*data/out is inside the data folder"),
    ("out", "out/data", "output_dir: .*out holds the data folder"),
])
def test_an_output_dir_that_would_clash_is_refused(tmp_path, monkeypatch, output_dir, data_dir, message):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_caption_folder(tmp_path / data_dir, count=4)
    paths = {key: value if value in ("/", "~") else str(tmp_path / value)
             for key, value in (("output_dir", output_dir), ("data", data_dir))}
    with pytest.raises(ConfigError, match=message):
        tiny_config(paths["output_dir"], paths["data"])


@pytest.mark.parametrize("change, message", [
    ({"train_batch_size": 16}, r"train_batch_size: one optimizer step of the unet stage takes 16 examples \(16 per "
                               r"process x 1 processes x 1 accumulation\), but it trains on 14 \(16 minus 2 held "
                               r"out\); lower train_batch_size or add data"),
    ({"stages": ["vae", "unet"], "vae_training__train_batch_size": 15}, "vae_training.train_batch_size: one optimizer "
                                                                        "step of the vae stage takes 15 examples"),
    ({"resolution": 40, "model__vae_kwargs": {"block_out_channels": [8, 16, 16, 16, 16]}},
     "resolution: 40 is not divisible by the VAE's downsampling factor 16"),
])
def test_a_run_refused_for_its_sizes_writes_nothing_so_the_fixed_rerun_starts(tmp_path, caption_folder, change,
                                                                              message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(tmp_path / "out", caption_folder, **change))
    assert not (tmp_path / "out").exists()  # no config.yaml that would make the corrected run "an existing run"


def test_the_fixed_rerun_of_a_refused_run_starts(tmp_path, caption_folder):
    with pytest.raises(ConfigError, match="train_batch_size: one optimizer step"):
        train(tiny_config(tmp_path / "out", caption_folder, train_batch_size=16, max_train_steps=1))
    assert (train(tiny_config(tmp_path / "out", caption_folder, max_train_steps=1)) / "model_index.json").is_file()


# --- a bad image found after output_dir is written (issue 5): the fixed data reruns with the same command -------


def truncated_jpeg(path: Path) -> None:
    """A JPEG cut short in its image data: its header opens (JPEG has no checksums to verify), only decoding finds
    it."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-200])


@pytest.mark.parametrize("resume", [None, "latest"])
def test_a_bad_image_found_by_the_cache_build_leaves_a_run_that_the_same_command_restarts(tmp_path, capsys, resume):
    data_dir = write_caption_folder(tmp_path / "data", count=8)
    truncated_jpeg(data_dir / "003.png")  # found by the cache build, after output_dir is written
    config = write_config(tmp_path / "run.yaml", tmp_path / "out", data_dir, max_train_steps=1,
                          data__cache_latents=True, validation__num_heldout=0, resume_from_checkpoint=resume)
    assert train_main(["--config", config]) == 2
    assert_one_error_line(capsys.readouterr().err, "rows 0-7: 1 image(s) failed to decode (")
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "latent_cache").is_dir()
    # The user removes the image (and its metadata row), and runs the same command again.
    (data_dir / "003.png").unlink()
    lines = (data_dir / "metadata.jsonl").read_text().splitlines()
    (data_dir / "metadata.jsonl").write_text("".join(line + "\n" for line in lines if '"003.png"' not in line))
    assert train_main(["--config", config]) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert f"output_dir: {tmp_path / 'out'} holds a run that stopped before its first trained step" in out
    assert "that the run's earlier start built for other data or settings (data, rows, captions" in out
    assert json.loads((tmp_path / "out" / "run_data.json").read_text())["num_examples"] == 7
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()
    # Now a step is trained: the run is an existing one again.
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(tiny_config(tmp_path / "out", data_dir, max_train_steps=1, data__cache_latents=True,
                          validation__num_heldout=0))


def test_a_rerun_that_skips_the_bad_image_keeps_the_cache_shards_already_encoded(tmp_path, capsys):
    """A run that trained no step starts over, but its own latent cache stays when the data is the same."""
    data_dir = write_caption_folder(tmp_path / "data", count=8)
    truncated_jpeg(data_dir / "006.png")  # in the last of 3 shards
    config = write_config(tmp_path / "run.yaml", tmp_path / "out", data_dir, max_train_steps=1,
                          data__cache_latents=True, data__cache_shard_size=3, validation__num_heldout=0)
    assert train_main(["--config", config]) == 2
    assert_one_error_line(capsys.readouterr().err, "rows 6-7: 1 image(s) failed to decode (")
    shard = tmp_path / "out" / "latent_cache" / "shard-00000"
    written = shard.stat().st_mtime_ns
    assert train_main(["--config", config, "--set", "data.skip_bad_images=true"]) == 0
    out = capsys.readouterr().out
    assert "removed the latent cache" not in out and "2 of 3 shards are done; encoding the other 1" in out
    assert shard.stat().st_mtime_ns == written
    card = (tmp_path / "out" / "pipeline" / "README.md").read_text()
    assert "- images: 7 (0 of them held out" in card
    # found by decoding, not by its header: listed with its reason all the same, and counted on the card
    listed = (tmp_path / "out" / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{data_dir / '006.png'}: "), listed
    assert "1 left out before training, listed in the run's skipped_images.txt" in card


def test_skip_bad_images_leaves_them_out_counted_and_listed(tmp_path, caplog):
    data_dir = write_caption_folder(tmp_path / "data", count=8)
    (data_dir / "003.png").write_bytes(b"this is text, not a png")  # found by the header check, before training
    config = tiny_config(tmp_path / "out", data_dir, max_train_steps=1, data__cache_latents=True,
                         data__skip_bad_images=True, validation__num_heldout=0)
    with caplog.at_level("WARNING"):
        pipeline = train(config)
    listed = tmp_path / "out" / "skipped_images.txt"
    skipped = [record.getMessage() for record in caplog.records if record.getMessage().startswith("skipping")]
    assert skipped == [f"skipping 1 image(s) that cannot be opened as images: {data_dir / '003.png'}: cannot "
                       f"identify image file {str(data_dir / '003.png')!r} (each listed with its reason in {listed})"]
    assert listed.read_text() == f"{data_dir / '003.png'}: cannot identify image file {str(data_dir / '003.png')!r}\n"
    card = (pipeline / "README.md").read_text()
    assert "- images: 7 (0 of them held out" in card
    assert ("- bad images: skipped (`data.skip_bad_images`): 1 left out before training, listed in the run's "
            "skipped_images.txt") in card


# --- the command lines: one `error:` line, exit code 2, no traceback ------------------------------------


def assert_one_error_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: {message}"), err[-2000:]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err


def test_train_command_reports_a_config_error_in_one_line(tmp_path, caption_folder, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**tiny_config_dict(tmp_path / "out", caption_folder), "learnin_rate": 1}))
    assert train_main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, "unknown config key 'learnin_rate'")
    assert train_main(["--config", str(path), "--set", "learnin_rate=[1"]) == 2  # unparsable override
    assert_one_error_line(capsys.readouterr().err, "--set 'learnin_rate=[1'")


def test_train_command_reports_a_data_error_in_one_line(tmp_path, caption_folder, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", caption_folder)))
    assert train_main(["--config", str(path), "--set", "data.caption_column=caption"]) == 2
    assert_one_error_line(capsys.readouterr().err, "data.caption_column: 'caption' is not a column")


@pytest.mark.parametrize("args, message", [
    (["--model", "/nope", "--prompt", "a red square"], "model /nope does not exist"),
    (["--model", "/nope"], "give at least one --prompt"),
    (["--model", "/nope", "--prompt", "x", "--num-images", "0"], "--num-images must be at least 1"),
    (["--model", "/nope", "--prompt", "x", "--steps", "0"], r"num_inference_steps (--steps): 0 must be"),
    (["--model", "/nope", "--prompt", "x", "--guidance", "nan"], r"guidance_scale (--guidance): nan must be"),
    (["--model", "/nope", "--prompt", "x", "--guidance", "inf"], r"guidance_scale (--guidance): inf must be"),
    (["--model", "/nope", "--prompt", "x", "--guidance", "-3"], "guidance_scale (--guidance): -3.0 must be a finite "
                                                                "number >= 0 (values <= 1 turn guidance off"),
    (["--model", "/nope", "--prompt", "x", "--height", "100"], "height (--height): 100 must be a positive multiple"),
    (["--model", "/nope", "--prompt", "x", "--batch-size", "0"], "batch_size (--batch-size): 0 must be at least 1"),
    (["--model", "/nope", "--prompt", "x", "--batch-size", "-1"], "batch_size (--batch-size): -1 must be at least"),
])
def test_generate_command_reports_errors_in_one_line(tmp_path, capsys, args, message):
    assert cli.main(["generate", *args, "--out", str(tmp_path / "images")]) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "images").exists()


# --- damaged files, full or read-only disks, odd options (issue 13): one `error:` line, nothing lost -------


def write_config(path: Path, output_dir: Path, data_dir: Path, **overrides) -> str:
    path.write_text(yaml.safe_dump(tiny_config_dict(output_dir, data_dir, **overrides)))
    return str(path)


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(200))


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, damage", [("model.safetensors", _random_bytes), ("model.safetensors", _truncated),
                                          ("optimizer.bin", _random_bytes), ("config.yaml", _random_bytes)])
def test_a_damaged_checkpoint_is_named_before_anything_is_written(finished_run, tmp_path, capsys, name, damage):
    out = shutil.copytree(finished_run / "out", tmp_path / "out")
    damage(out / "checkpoints" / "step-1" / name)
    before = files_of(out)
    config = write_config(tmp_path / "run.yaml", out, finished_run / "data", max_train_steps=2, checkpointing_steps=1,
                          validation__num_heldout=0, resume_from_checkpoint="latest")
    assert train_main(["--config", config]) == 2
    assert_one_error_line(capsys.readouterr().err, f"resume_from_checkpoint: {out / 'checkpoints' / 'step-1'} is "
                                                   f"damaged: {name} cannot be read (")
    assert files_of(out) == before


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """A finished run with a trained VAE (vae/) and a latent cache, and no checkpoints."""
    root = tmp_path_factory.mktemp("cached")
    data_dir = write_caption_folder(root / "data")
    train(tiny_config(root / "out", data_dir, stages=["vae", "unet"], max_train_steps=1, data__cache_latents=True,
                      validation__num_heldout=0))
    return root


def _swap_latents(path):
    import datasets

    doubled = datasets.concatenate_datasets([datasets.load_from_disk(str(path))] * 2)  # another run's shard
    doubled.save_to_disk(str(path.with_name("other")))
    shutil.rmtree(path)
    path.with_name("other").rename(path)


SHARD = "latent_cache/shard-00000"


@pytest.mark.parametrize("name, damage, message", [
    ("vae/diffusion_pytorch_model.safetensors", _random_bytes, r"{out}/vae holds a damaged VAE \(.*Delete that folder "
                                                               "to train the VAE again"),
    ("vae/config.json", _truncated, "{out}/vae holds a damaged VAE"),
    (f"{SHARD}/data-00000-of-00001.arrow", _random_bytes, "the latent cache at {out}/latent_cache is damaged: "
                                                          "shard-00000 cannot be read .*Delete that directory"),
    ("latent_cache/manifest.json", _truncated, "the latent cache at {out}/latent_cache is damaged: manifest.json"),
    (SHARD, _swap_latents, r"the latent cache at {out}/latent_cache does not fit this run: shard-00000 holds 32 "
                           r"rows .* where the manifest says 16 rows .*\(a shard from another run\?\). Delete that "
                           "directory"),
])
def test_a_damaged_vae_or_latent_cache_is_named_with_the_way_out(cached_run, tmp_path, capsys, name, damage, message):
    out = shutil.copytree(cached_run / "out", tmp_path / "out")
    damage(out / name)
    config = write_config(tmp_path / "run.yaml", out, cached_run / "data", stages=["vae", "unet"], max_train_steps=2,
                          data__cache_latents=True, validation__num_heldout=0, resume_from_checkpoint="latest")
    assert train_main(["--config", config]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "")
    assert re.search(message.format(out=re.escape(str(out))), err.strip().splitlines()[-1]), err[-1000:]


def test_a_full_disk_during_training_is_one_line(tmp_path, caption_folder, capsys, monkeypatch):
    calls = []

    def disk_full(directory, **parts):
        calls.append(directory)
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(unet_stage, "save_pipeline", disk_full)  # where the UNet stage looks it up
    config = write_config(tmp_path / "run.yaml", tmp_path / "out", caption_folder, max_train_steps=1,
                          validation__num_heldout=0)
    assert train_main(["--config", config]) == 2
    assert calls == [tmp_path / "out" / "pipeline"]
    assert_one_error_line(capsys.readouterr().err, f"No space left on device: {tmp_path / 'out' / 'pipeline'} (the "
                                                   "disk is full; free some space or choose a folder on another disk)")


def test_generate_on_a_full_disk_keeps_the_images_already_written(trained_run, tmp_path, capsys, monkeypatch):
    save, saved = generation_module.GeneratedImage.save, []

    def fill_up(image, fp, format=None, **params):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", getattr(fp, "name", None))
        save(image, fp, format, **params)
        saved.append(fp)

    monkeypatch.setattr(generation_module.GeneratedImage, "save", fill_up)
    args = ["generate", "--model", str(trained_run / "pipeline"), "--prompt", "a red square on the left",
            "--num-images", "4", "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "images")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "No space left on device: ")
    assert "(the disk is full; free some space" in err and "stopped after writing 2 of 4 images" in err
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.png", "00001.png"]  # no partial file
    for path in (tmp_path / "images").iterdir():
        with Image.open(path) as image:
            image.load()


def test_generate_into_a_read_only_folder_fails_before_generating(trained_run, tmp_path, capsys, monkeypatch):
    def read_only(dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    def never(*args, **kwargs):
        raise AssertionError("generated before checking that the images can be written")

    monkeypatch.setattr(generation_module.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(generation_module, "generate_batches", never)  # cmd_generate imports it when it runs
    args = ["generate", "--model", str(trained_run / "pipeline"), "--prompt", "a red square on the left",
            "--device", "cpu", "--out", str(tmp_path / "images")]
    assert cli.main(args) == 2
    assert_one_error_line(capsys.readouterr().err, f"Read-only file system: {tmp_path / 'images'} (the filesystem "
                                                   "is read-only; choose a writable folder)")


def _no_tokenizer(pipeline: Path) -> None:
    shutil.rmtree(pipeline / "tokenizer")


def _unet_header(pipeline: Path) -> None:
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(8) + weights.read_bytes()[8:])


def _nan_unet(pipeline: Path) -> None:
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_out.bias"][0] = float("nan")
    save_file(tensors, weights)


@pytest.mark.parametrize("damage, extra, message", [
    (_no_tokenizer, [], "model {model} is incomplete: model_index.json lists tokenizer but there is no tokenizer/ "
                        "folder; copy the whole pipeline directory"),
    (_unet_header, [], "could not load model {model}: Unable to load weights"),
    (_nan_unet, [], "model {model} made 1 image(s) of NaN/inf pixels (saved, they would be black), e.g. prompt "
                    "'a red square on the left' seed 0: its weights hold NaN/inf values"),
    (None, ["--device", "cuda"], "device cuda: this torch build has no CUDA device it can use"),
    (None, ["--device", "tpu9"], "device 'tpu9' is not a device name"),
])
def test_generate_from_a_damaged_model_or_on_a_missing_device_is_one_line(trained_run, tmp_path, capsys, damage,
                                                                          extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = shutil.copytree(trained_run / "pipeline", tmp_path / "pipeline")
    if damage:
        damage(model)
    args = ["generate", "--model", str(model), "--prompt", "a red square on the left", "--out", str(tmp_path / "out")]
    assert cli.main(args + (extra or ["--device", "cpu"])) == 2
    assert_one_error_line(capsys.readouterr().err, message.format(model=model))
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\nseed: *i\n")  # 9^9 = 387,420,489 strings
    with pytest.raises(ConfigError, match=f"config file {path}: its aliases \\(\\*name\\) expand to more than "
                                          "100,000 values; write the values out instead"):
        load_config(path)
    assert safe_yaml("a: &x [1, 2]\nb: *x\n", "test") == {"a": [1, 2], "b": [1, 2]}  # small aliases still work
