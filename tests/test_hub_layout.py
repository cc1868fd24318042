"""A local directory laid out like a hub dataset repo (parquet shards under data/) trains through
data.dataset_name, the path a hub id takes."""

import datasets
import pytest
import torch
import yaml
from conftest import COLORS, draw_square, tiny_config, tiny_config_dict
from huggingface_hub import ModelCard
from test_bad_input import assert_one_error_line

from ldm_pipeline.data import DataError, ImageTextDataset, image_to_tensor, load_train_data
from ldm_pipeline.training import main as train_main
from ldm_pipeline.training import train


def write_hub_layout(root, count=16, shards=2, with_captions=True):
    """What `Dataset.push_to_hub` uploads: data/train-0000k-of-0000n.parquet, images as {bytes, path}."""
    names, lefts = [list(COLORS)[i % 2] for i in range(count)], [(i // 2) % 2 == 0 for i in range(count)]
    images = [draw_square(COLORS[name], left) for name, left in zip(names, lefts)]
    captions = [f"a {name} square on the {'left' if left else 'right'}" for name, left in zip(names, lefts)]
    columns = {"image": images, "text": captions} if with_captions else {"image": images}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")} if with_captions else
                                 {"image": datasets.Image()})
    dataset = datasets.Dataset.from_dict(columns, features=features)
    for k in range(shards):
        shard = root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"
        dataset.shard(shards, k, contiguous=True).to_parquet(str(shard))
    return images, captions


def test_hub_layout_directory_trains_like_a_hub_id(tmp_path):
    images, captions = write_hub_layout(tmp_path / "dataset")
    config = tiny_config(tmp_path / "out", tmp_path, data={"dataset_name": str(tmp_path / "dataset")},
                         max_train_steps=2)
    loaded = load_train_data(config)
    assert loaded.captions == captions and len(loaded.dataset) == 16
    assert loaded.dataset[0]["image"]["bytes"]  # stored as bytes, decoded by our own transform
    item = ImageTextDataset(loaded.dataset, torch.zeros(16, 1), config.data, 32)[5]
    assert torch.equal(item["pixel_values"], image_to_tensor(images[5].convert("RGB"), 32))
    pipeline = train(config)
    assert (pipeline / "model_index.json").is_file()
    card = ModelCard.load(pipeline / "README.md")
    assert f"the dataset `{tmp_path / 'dataset'}`" in card.text and card.data.datasets is None  # local: not a hub id


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_local_dataset_is_one_clear_error(tmp_path, make):
    if make == "empty":
        (tmp_path / "dataset").mkdir()
    config = tiny_config(tmp_path / "out", tmp_path, data={"dataset_name": str(tmp_path / "dataset")})
    with pytest.raises(DataError, match="data.dataset_name: .*(not a directory|holds no data files)"):
        load_train_data(config)


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_a_truncated_parquet_file_is_one_line_naming_it(tmp_path, capsys, streaming):
    write_hub_layout(tmp_path / "dataset")
    damaged = tmp_path / "dataset" / "data" / "train-00001-of-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    data = {"dataset_name": str(tmp_path / "dataset"), "streaming": streaming, "cache_latents": streaming}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", tmp_path, data=data)))
    assert train_main(["--config", str(tmp_path / "run.yaml")]) == 2
    assert_one_error_line(capsys.readouterr().err, f"data.dataset_name: {damaged} is not a readable parquet file "
                                                   "(Parquet magic bytes not found in footer")
    assert not (tmp_path / "out").exists()


def test_a_data_set_without_captions_is_refused_unless_asked_and_the_card_says_so(tmp_path):
    write_hub_layout(tmp_path / "dataset", with_captions=False)
    data = {"dataset_name": str(tmp_path / "dataset")}
    with pytest.raises(DataError, match=r"data.caption_column: 'text' is not a column of .*dataset \(columns: "
                                        r"\['image'\]\) and no other column holds text: it would train a model "
                                        r"that ignores its prompts.*or set data.caption_column: null to train "
                                        r"unconditionally"):
        train(tiny_config(tmp_path / "out", tmp_path, data=data, max_train_steps=1))
    assert not (tmp_path / "out").exists()
    pipeline = train(tiny_config(tmp_path / "out", tmp_path, data={**data, "caption_column": None},
                                 max_train_steps=1))
    card = ModelCard.load(pipeline / "README.md").text
    assert "- captions: none: an unconditional model (every prompt empty)\n" in card and "dropped" not in card
