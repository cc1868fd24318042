"""webdataset tar shards as a source (data.webdataset), through datasets' webdataset loader: loaded or streamed,
split over processes, cached like any other source; 2 processes see every sample once per epoch."""

import io
import json
import tarfile
from collections import Counter

import yaml
from conftest import COLORS, draw_square, tiny_config_dict
from datasets.distributed import split_dataset_by_node
from test_launch import ROOT, accelerate_launch

from ldm_pipeline import data as data_lib
from ldm_pipeline.config import config_from_dict
from ldm_pipeline.training import train


def write_shards(root, shards=4, per_shard=5, without_caption=(), truncated=()):
    """shard-0000k.tar files of <key>.png + <key>.txt samples (keys 0000, 0001 ...), captioned with tags; the samples
    of `without_caption` lack their .txt, those of `truncated` have half a png."""
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                name, left = list(COLORS)[i % 2], (i // 2) % 2 == 0
                image = io.BytesIO()
                draw_square(COLORS[name], left).save(image, format="PNG")
                captions[f"{i:04d}"] = f"square, {name}, {'on the left' if left else 'on the right'}, number {i}"
                png = image.getvalue()
                members = {f"{i:04d}.png": png[: len(png) // 2] if f"{i:04d}" in truncated else png}
                if f"{i:04d}" not in without_caption:
                    members[f"{i:04d}.txt"] = captions[f"{i:04d}"].encode()
                for member, payload in members.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return captions


def shard_config(tmp_path, **overrides) -> dict:
    config = tiny_config_dict(tmp_path / "out", tmp_path, **overrides)
    config["data"] = {"webdataset": str(tmp_path / "shards" / "shard-*.tar"), **config["data"]}
    del config["data"]["train_data_dir"]
    return config


def test_shards_load_as_images_and_captions(tmp_path):
    captions = write_shards(tmp_path / "shards")
    loaded = data_lib.load_train_data(config_from_dict(shard_config(tmp_path)))
    assert loaded.captions == list(captions.values()) and len(loaded.dataset) == 20
    assert loaded.caption_source == "each sample's caption member (<key>.txt)"
    assert loaded.dataset[3]["__key__"] == "0003" and loaded.dataset[3]["__url__"].endswith("shard-00000.tar")
    first = data_lib.open_rgb(loaded.dataset[0]["image"])  # the png member as bytes, decoded by our own transform
    assert first.size == (32, 32) and first.getpixel((6, 10)) == COLORS["red"]
    # A list of shards (each a path or a glob) is the same data
    listed = shard_config(tmp_path)
    listed["data"]["webdataset"] = [str(tmp_path / "shards" / "shard-00000.tar"),
                                    str(tmp_path / "shards" / "*[123].tar")]
    again = data_lib.load_train_data(config_from_dict(listed))
    assert again.captions == loaded.captions and again.fingerprint == loaded.fingerprint


def test_streamed_shards_split_over_processes_and_train_from_the_cache(tmp_path):
    captions = write_shards(tmp_path / "shards")
    config = config_from_dict(shard_config(tmp_path, data__streaming=True, data__cache_latents=True,
                                           data__cache_shard_size=8, max_train_steps=2))
    stream = data_lib.load_train_data(config).dataset
    # The split the cache build makes on each process (latent_cache._encode_stream): 4 shards over 2 processes,
    # two whole shards each, every sample once.
    parts = [[row["__key__"] for row in split_dataset_by_node(stream, rank=rank, world_size=2)] for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(captions) and not set(parts[0]) & set(parts[1])
    assert (train(config) / "model_index.json").is_file()
    manifest = json.loads((tmp_path / "out" / "latent_cache" / "manifest.json").read_text())
    assert manifest["streaming"] and manifest["cached_rows"] == 20


# Run as `accelerate launch spy.py LOG_DIR --config run.yaml`: trains, and each process writes the (epoch, row,
# tags) of every training sample it tokenizes to LOG_DIR/seen-<rank>.jsonl.
SPY = """
import json, os, sys

import ldm_pipeline.data as data
import ldm_pipeline.training as training

log = open(os.path.join(sys.argv[1], f"seen-{os.environ['RANK']}.jsonl"), "a")
apply = data.TagRule.apply

def spying(rule, caption, epoch, row):
    tags = apply(rule, caption, epoch, row)
    log.write(json.dumps([epoch, row, tags]) + "\\n")
    log.flush()
    return tags

data.TagRule.apply = spying
sys.exit(training.main(sys.argv[2:]))
"""


def test_two_processes_train_from_shards_seeing_every_sample_once_per_epoch(tmp_path):
    """20 samples in 4 shards, 2 held out: 18 rows, 2 processes x batch 3, so an epoch is 3 steps; 6 steps are two
    epochs. Tags are shuffled and dropped, so each sample's tags also show that it saw the 1-process tags."""
    write_shards(tmp_path / "shards")
    config = shard_config(tmp_path, train_batch_size=3, max_train_steps=6, data__shuffle_tags=True,
                          data__keep_tokens=1, data__tag_dropout=0.2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "spy.py").write_text(SPY)
    result = accelerate_launch(str(tmp_path / "spy.py"), str(tmp_path), "--config", str(tmp_path / "run.yaml"),
                               processes=2, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()

    seen = {rank: [json.loads(line) for line in (tmp_path / f"seen-{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    loaded = data_lib.load_train_data(config_from_dict(config))
    rows, _ = data_lib.split_heldout(20, 2, seed=0)
    for epoch in (0, 1):
        counts = Counter(row for rank in (0, 1) for e, row, _ in seen[rank] if e == epoch)
        assert counts == Counter(rows), epoch  # every training sample once, no held-out one
        assert all(any(e == epoch for e, _, _ in seen[rank]) for rank in (0, 1))  # split over both processes
    assert {e for rank in (0, 1) for e, _, _ in seen[rank]} == {0, 1}
    for epoch, row, tags in seen[0] + seen[1]:
        assert tags == loaded.captions.tags.apply(loaded.captions[row], epoch, row)  # what one process draws
