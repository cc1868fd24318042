"""Captions as people keep them: a caption file beside each image (kohya's layout), comma-separated tags shuffled
and dropped per sample from (seed, epoch, row), so that a sample sees the same tags at any process count and after
a resume."""

import json
from collections import Counter

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from conftest import COLORS, draw_square, stopped_after_checkpoint, tiny_config, write_class_folder
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_launch import ROOT

from ldm_pipeline import data as data_lib
from ldm_pipeline.config import Config, ConfigError, to_yaml
from ldm_pipeline.models import load_tokenizer
from ldm_pipeline.training import train

TAGS = ["square", "red", "on the left", "small", "outlined", "flat"]


def write_tag_folder(root, count=16):
    """Images with a .txt of comma-separated tags beside each, ending in a newline as editors leave it."""
    root.mkdir(parents=True)
    for i in range(count):
        name, left = list(COLORS)[i % 2], (i // 2) % 2 == 0
        draw_square(COLORS[name], left).save(root / f"{i:03d}.png")
        tags = ["square", name, "on the left" if left else "on the right", *TAGS[3:3 + i % 4]]
        (root / f"{i:03d}.txt").write_text(", ".join(tags) + "\n")
    return root


def test_caption_files_beside_the_images_are_the_captions(tmp_path, caplog):
    root = write_tag_folder(tmp_path / "data")
    (root / "001.txt").write_text("\ufeffsquare,blue ,\r\n on the left\n")  # as people's editors save them
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", root, data__caption_extension=".txt"))
    assert train.captions[0] == "square, red, on the left"
    assert train.captions[1] == "square,blue , on the left"
    assert train.caption_source == "`.txt` files beside the images"
    (root / "005.txt").unlink()
    with caplog.at_level("WARNING"):
        train = data_lib.load_train_data(tiny_config(tmp_path / "out", root, data__caption_extension=".txt"))
    assert train.captions[5] == "" and train.caption_source.startswith("`.txt` files beside the images (15 of 16; "
                                                                       "the others: none: an unconditional model")
    assert "1 of 16 images have no caption file (e.g. 005.png has no 005.txt): they train with the empty prompt" \
        in caplog.text
    # Without the key the .txt files are not captions: the folder trains unconditionally, and says so.
    with caplog.at_level("WARNING"):
        assert data_lib.load_train_data(tiny_config(tmp_path / "out", root)).caption_source.startswith("none")
    assert "add captions (its .txt files are captions with data.caption_extension: .txt)" in caplog.text


def test_a_folder_without_captions_says_so_and_its_card_says_unconditional(tmp_path, flat_folder, caplog):
    with caplog.at_level("WARNING"):
        pipeline = train(tiny_config(tmp_path / "out", flat_folder, max_train_steps=1))
    assert (f"no captions in {flat_folder} (no metadata.jsonl or metadata.csv, no class folders): training a model "
            "that ignores its prompts; add captions, or set data.caption_column: null to say so") in caplog.text
    card = ModelCard.load(pipeline / "README.md").text
    assert "- captions: none: an unconditional model (every prompt empty)\n" in card and "column `text`" not in card


def test_a_caption_file_wins_over_its_class_folder_and_the_others_keep_the_template(tmp_path):
    root = write_class_folder(tmp_path / "classes", count=4)
    (root / "red" / "001.txt").write_text("a red square, seen up close")
    train = data_lib.load_train_data(tiny_config(tmp_path / "out", root, data__caption_extension=".txt"))
    names = [row["path"].split("/classes/")[1] for row in train.dataset["image"]]
    assert train.captions[names.index("red/001.png")] == "a red square, seen up close"
    assert train.captions[names.index("red/002.png")] == "a photo of a red"
    assert train.caption_source == ("`.txt` files beside the images (1 of 8; the others: class folders, as "
                                    "`a photo of a {label}`)")


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "003.txt").write_text("a red square"),
     r"003.png has two captions: .*003.txt and .*metadata.jsonl line 4; keep one of them"),
    (lambda root: None, r"data.caption_extension: .txt, but no image in .* has a caption file beside it \(e.g. "
                        r".*000.txt\); check the extension"),
])
def test_caption_files_that_clash_with_metadata_or_are_missing_are_refused(tmp_path, caption_folder, make, message):
    make(caption_folder)
    with pytest.raises(data_lib.DataError, match=message):
        data_lib.load_train_data(tiny_config(tmp_path / "out", caption_folder, data__caption_extension=".txt"))


@pytest.mark.parametrize("overrides, message", [
    ({"data__caption_extension": "txt"}, "data.caption_extension: 'txt' must be a file extension with its dot"),
    ({"data__keep_tokens": 2}, "data.keep_tokens: 2 keeps the first tags in place when others move or drop"),
    ({"data__tag_dropout": 1.0}, r"data.tag_dropout: 1.0 must be in \[0, 1\)"),
    ({"data__shuffle_tags": True, "data__cache_latents": True},
     "data.shuffle_tags / data.tag_dropout give each sample other tags every epoch, but data.cache_latents"),
    ({"data__webdataset": "shards/*.tar"}, "data: set exactly one of data.train_data_dir .*; this config sets "
                                           "data.train_data_dir and data.webdataset"),
])
def test_caption_settings_that_cannot_work_are_refused_naming_the_key(tmp_path, caption_folder, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "out", caption_folder, **overrides)


def test_tags_keep_the_first_n_and_shuffle_and_drop_the_others_by_seed_epoch_and_row():
    caption = "portrait, 1girl, red hair, smiling, outdoors, night, , hat"
    rule = data_lib.TagRule(seed=0, shuffle=True, keep=2, dropout=0.0)
    epochs = [rule.apply(caption, epoch, row=7).split(", ") for epoch in range(8)]
    for tags in epochs:
        assert tags[:2] == ["portrait", "1girl"] and sorted(tags[2:]) == ["hat", "night", "outdoors", "red hair",
                                                                           "smiling"]
    assert len({tuple(tags) for tags in epochs}) > 4  # another order most epochs
    assert rule.apply(caption, 3, 7) == rule.apply(caption, 3, 7)  # nothing but (seed, epoch, row) decides
    assert len({rule.apply(caption, 3, row) for row in range(8)}) > 4  # other rows, other orders
    assert len({data_lib.TagRule(seed, True, 2, 0.0).apply(caption, 3, 7) for seed in range(8)}) > 4  # other seeds

    dropping = data_lib.TagRule(seed=0, shuffle=False, keep=1, dropout=0.25)
    kept = Counter()
    for epoch in range(400):
        tags = dropping.apply(caption, epoch, row=0).split(", ")
        assert tags[0] == "portrait"
        assert tags[1:] == [tag for tag in ["1girl", "red hair", "smiling", "outdoors", "night", "hat"] if tag in tags]
        kept.update(tags[1:])
    assert all(0.65 < kept[tag] / 400 < 0.85 for tag in ["1girl", "red hair", "smiling", "outdoors", "night", "hat"])


def tag_dataset(tmp_path, **overrides):
    root = write_tag_folder(tmp_path / "data")
    config = tiny_config(tmp_path / "out", root, data__caption_extension=".txt", data__shuffle_tags=True,
                         data__keep_tokens=1, data__tag_dropout=0.3, **overrides)
    train = data_lib.load_train_data(config)
    tokenizer = load_tokenizer(config.model, lambda: train.captions)
    ids = data_lib.TokenIds(tokenizer, train.captions)
    return config, train, data_lib.ImageTextDataset(train.dataset, ids, config.data, config.resolution)


def seen_tags(loader, epoch: int, calls: list) -> dict:
    """{row: caption} that the samples of one epoch of `loader` were tokenized with."""
    loader.set_epoch(epoch)
    start = len(calls)
    for _ in loader:
        pass
    return {row: caption for row, caption in calls[start:]}


def test_a_sample_sees_the_same_tags_at_one_and_two_processes_and_after_a_resume(tmp_path, monkeypatch):
    """Accelerate hands a data set's own `set_epoch` the epoch on one process only (on two it goes to the sampler):
    the tags must follow the epoch of the loader that draws the sample, whatever the process count."""
    config, train, dataset = tag_dataset(tmp_path)
    Accelerator(cpu=True)
    rule = train.captions.tags
    expected = {epoch: {row: (epoch, rule.apply(train.captions[row], epoch, row)) for row in range(16)}
                for epoch in range(3)}
    calls, apply = [], data_lib.TagRule.apply

    def recording(rule, caption, epoch, row):
        calls.append((row, (epoch, apply(rule, caption, epoch, row))))
        return apply(rule, caption, epoch, row)

    monkeypatch.setattr(data_lib.TagRule, "apply", recording)

    def loader(processes, rank, workers=0):
        plain = torch.utils.data.DataLoader(dataset, batch_size=4 // processes, shuffle=True, drop_last=True,
                                            num_workers=workers)
        return prepare_data_loader(plain, num_processes=processes, process_index=rank, use_seedable_sampler=True,
                                   data_seed=config.seed)

    two = [{**seen_tags(loader(2, 0), epoch, calls), **seen_tags(loader(2, 1), epoch, calls)} for epoch in range(3)]
    one = [seen_tags(loader(1, 0), epoch, calls) for epoch in range(3)]
    assert one == two == [expected[epoch] for epoch in range(3)]
    assert expected[1] != expected[2]

    # A resume mid-epoch skips the seen batches: the rest keep this epoch's tags.
    first = loader(1, 0)
    first.set_epoch(2)
    resumed = skip_first_batches(first, 2)
    start = len(calls)
    for _ in resumed:
        pass
    assert dict(calls[start:]) == {row: expected[2][row] for row, _ in calls[start:]} and len(calls) - start == 8
    # A DataLoader worker (a copy of the data set in another process) draws the same tags: its token ids match.
    worker, here = loader(1, 0, workers=1), loader(1, 0)
    for epoch in (0, 1):
        worker.set_epoch(epoch), here.set_epoch(epoch)
        for a, b in zip(worker, here, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
    # Read outside a loader (the held-out set at validation), a sample keeps its caption as written.
    assert torch.equal(dataset[3]["input_ids"], data_lib.tokenize(dataset.input_ids.tokenizer, [train.captions[3]])[0])


def test_tags_train_end_to_end_and_resume_exactly(tmp_path, monkeypatch):
    """16 images with .txt tags, 2 held out: 14 rows, batch 4, 3 steps an epoch; 6 steps are two epochs, and the run
    stopped at step 4 resumes mid-epoch."""
    root = write_tag_folder(tmp_path / "data")
    settings = dict(data__caption_extension=".txt", data__shuffle_tags=True, data__keep_tokens=1,
                    data__tag_dropout=0.3, max_train_steps=6, checkpointing_steps=2)
    calls, apply = [], data_lib.TagRule.apply

    def recording(rule, caption, epoch, row):
        calls.append((epoch, row, apply(rule, caption, epoch, row)))
        return calls[-1][2]

    monkeypatch.setattr(data_lib.TagRule, "apply", recording)
    pipeline = train(tiny_config(tmp_path / "whole", root, **settings))
    whole = list(calls)
    assert {epoch for epoch, _, _ in whole} == {0, 1} and len(whole) == 6 * 4
    calls.clear()
    with stopped_after_checkpoint(4):
        train(tiny_config(tmp_path / "resumed", root, **settings))
    train(tiny_config(tmp_path / "resumed", root, resume_from_checkpoint="latest", **settings))
    # The same samples saw the same tags (the stopped run also read ahead the batch after its checkpoint).
    assert {(epoch, row): tags for epoch, row, tags in calls} == {(epoch, row): tags for epoch, row, tags in whole}
    assert len(set(calls)) == len(whole)
    weights = [load_file(tmp_path / out / "checkpoints" / "step-6" / "model.safetensors")
               for out in ("whole", "resumed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    card = ModelCard.load(pipeline / "README.md").text
    assert ("- captions: `.txt` files beside the images, dropped 10% of the time for classifier-free guidance; "
            "comma-separated tags shuffled and each dropped with probability 0.3 anew each epoch, the first 1 kept in "
            "place") in card
    record = json.loads((tmp_path / "whole" / "run_data.json").read_text())
    assert record["caption_source"] == "`.txt` files beside the images"


def test_every_new_data_key_is_in_the_resolved_config_and_the_data_docs():
    resolved = yaml.safe_load(to_yaml(Config()))["data"]  # what --dry-run prints
    docs = (ROOT / "docs" / "data.md").read_text()
    for key in ("webdataset", "caption_extension", "shuffle_tags", "keep_tokens", "tag_dropout", "skip_bad_images"):
        assert key in resolved and f"data.{key}" in docs, key
