"""A local directory laid out like a hub dataset repo (parquet shards under data/) trains through
data.dataset_name, the path a hub id takes."""

import datasets
import pytest
import torch
from conftest import COLORS, draw_square, tiny_config
from huggingface_hub import ModelCard

from ldm_pipeline.data import DataError, ImageTextDataset, image_to_tensor, load_train_data
from ldm_pipeline.training import train


def write_hub_layout(root, count=16, shards=2):
    """What `Dataset.push_to_hub` uploads: data/train-0000k-of-0000n.parquet, images as {bytes, path}."""
    names, lefts = [list(COLORS)[i % 2] for i in range(count)], [(i // 2) % 2 == 0 for i in range(count)]
    images = [draw_square(COLORS[name], left) for name, left in zip(names, lefts)]
    captions = [f"a {name} square on the {'left' if left else 'right'}" for name, left in zip(names, lefts)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)
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
