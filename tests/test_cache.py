"""The latent cache at scale: `ldm-pipeline cache` writes Arrow shards from any number of processes (the same
bytes at 1 and 2), a SIGKILLed build resumes, a stale cache is refused, training reads it memory-mapped (the
same model as encoding in the loop, to fp16 rounding; exact resume), and a streamed data set trains from it.

16 images of 32 px, shards of 5 rows: 4 shards (5, 5, 5, 1), split 2 + 2 between two processes.
"""

import json
import os
import shutil
import signal
import sys

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import stopped_after_checkpoint, tiny_config_dict, write_caption_folder
from safetensors.torch import load_file
from test_bad_input import assert_one_error_line
from test_hub_layout import write_hub_layout
from test_launch import ROOT, accelerate_launch, run_watched
from test_scale import STEPS, assert_same_state, scale_config

from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ModelConfig, config_from_dict
from ldm_pipeline.locks import LOCK_FILE, directory_lock
from ldm_pipeline.models import build_unet, seeded
from ldm_pipeline.training import train

SHARDS = ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]


def cache_config(out, data_dir, **overrides) -> dict:
    return tiny_config_dict(out, data_dir, data__cache_latents=True, data__cache_shard_size=5, **overrides)


def write_config(path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cache_rows(directory) -> dict:
    """Every column of the cache, shards in manifest order, as numpy arrays."""
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["complete"]
    parts = [datasets.load_from_disk(str(directory / shard["name"])) for shard in manifest["shards"]]
    return datasets.concatenate_datasets(parts).with_format("numpy")[:]


def assert_same_cache(got, want):
    rows, expected = cache_rows(got), cache_rows(want)
    assert rows.keys() == expected.keys()
    for name, column in expected.items():
        assert rows[name].dtype == column.dtype and np.array_equal(rows[name], column), name  # byte for byte


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_caption_folder(root / "data")
    return root


@pytest.fixture(scope="module")
def one_process_cache(root):
    out = root / "one"
    assert cli(["cache", "--config", write_config(root / "one.yaml", cache_config(out, root / "data"))]) == 0
    return out / "latent_cache"


def test_two_processes_build_the_cache_of_one_process_byte_for_byte(root, one_process_cache):
    out = root / "two"
    config = write_config(root / "two.yaml", cache_config(out, root / "data"))
    result = accelerate_launch("-m", "ldm_pipeline.cli", "cache", "--config", config, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote latent cache") == 1  # the main process reports
    assert sorted(p.name for p in (out / "latent_cache").glob("shard-*")) == SHARDS
    assert_same_cache(out / "latent_cache", one_process_cache)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out / "latent_cache", one_process_cache)]
    assert manifests[0]["key"] == manifests[1]["key"] and manifests[0]["shards"] == manifests[1]["shards"]
    assert cache_rows(one_process_cache)["row"].tolist() == list(range(16))


# Run as `python killer.py --config run.yaml`: builds the cache in this process and SIGKILLs itself while the
# third shard is being saved (its Arrow file written, not yet renamed into place).
KILLER = """
import os, signal, sys

import datasets

from ldm_pipeline.cli import main

save_to_disk, calls = datasets.Dataset.save_to_disk, []


def dying_save_to_disk(self, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 3:
        save_to_disk(self, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return save_to_disk(self, path, *args, **kwargs)


datasets.Dataset.save_to_disk = dying_save_to_disk
sys.exit(main(["cache", *sys.argv[1:]]))
"""


def test_a_killed_cache_build_resumes_and_ends_equal(root, one_process_cache, capsys):
    (root / "killer.py").write_text(KILLER)
    out = root / "killed"
    config = write_config(root / "killed.yaml", cache_config(out, root / "data"))
    result = run_watched([sys.executable, str(root / "killer.py"), "--config", config], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    cache = out / "latent_cache"
    assert sorted(p.name for p in cache.glob("shard-*")) == SHARDS[:2]
    assert list(cache.glob(".partial-shard-00002-*"))  # the shard being written when it died
    assert not json.loads((cache / "manifest.json").read_text())["complete"]
    kept = (cache / "shard-00000" / "data-00000-of-00001.arrow").stat().st_mtime_ns

    assert cli(["cache", "--config", config]) == 0
    assert "2 of 4 shards are done; encoding the other 2" in capsys.readouterr().out
    assert (cache / "shard-00000" / "data-00000-of-00001.arrow").stat().st_mtime_ns == kept  # not redone
    assert not list(cache.glob(".partial-*"))
    assert_same_cache(cache, one_process_cache)


def test_a_cache_of_other_weights_is_refused_and_kept(root, one_process_cache, tmp_path, capsys):
    cache = shutil.copytree(one_process_cache, tmp_path / "cache")
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    other = cache_config(root / "one", root / "data", seed=1, data__latent_cache_dir=str(cache))  # another VAE
    assert cli(["cache", "--config", write_config(tmp_path / "other.yaml", other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the latent cache at {cache} is stale: it was built with "
                                               "different vae, text_encoder")
    assert "Delete that directory to rebuild it, or set data.latent_cache_dir to a new path" in err[0]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_a_second_build_of_a_cache_in_progress_is_refused_and_removes_nothing(root, one_process_cache, tmp_path,
                                                                             capsys):
    cache = shutil.copytree(one_process_cache, tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    shutil.rmtree(cache / "shard-00003")
    (cache / ".partial-shard-00003-4242").mkdir()  # the shard the other build is writing
    config = write_config(tmp_path / "run.yaml", cache_config(tmp_path / "out", root / "data",
                                                              data__latent_cache_dir=str(cache)))
    with directory_lock(cache, "data.latent_cache_dir", "latent cache build", RuntimeError):  # the other build
        assert cli(["cache", "--config", config]) == 2
        assert_one_error_line(capsys.readouterr().err, f"data.latent_cache_dir: {cache} is in use by another "
                                                       f"latent cache build (pid {os.getpid()} on ")
        assert (cache / ".partial-shard-00003-4242").is_dir()
    assert cli(["cache", "--config", config]) == 0  # once it is gone, a build finishes the cache
    assert not list(cache.glob(".partial-*")) and not (cache / LOCK_FILE).exists()
    assert_same_cache(cache, one_process_cache)
    with directory_lock(cache, "data.latent_cache_dir", "latent cache build", RuntimeError):
        assert cli(["cache", "--config", config]) == 0  # a finished cache is read without the lock
        assert f"reusing latent cache {cache}" in capsys.readouterr().out


def test_the_cache_command_refuses_a_run_whose_vae_is_not_trained_yet(root, tmp_path, capsys):
    config = cache_config(tmp_path / "out", root / "data", stages=["vae", "unet"])
    assert cli(["cache", "--config", write_config(tmp_path / "run.yaml", config)]) == 2
    assert "run the vae stage before caching" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def unet_weights(out) -> dict:
    return load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def cached_reference(root):
    """5 steps from the disk cache, checkpoints at 2 and 4 (mid-epoch), EMA, a linear LR schedule."""
    out = root / "cached_reference"
    train(config_from_dict(scale_config(out, root / "data", data__cache_latents=True, data__cache_shard_size=5)))
    return out


def test_training_from_the_disk_cache_equals_encoding_in_the_loop_to_fp16_rounding(root, cached_reference):
    """The old in-RAM cache is gone (checked once by hand: this config trained from it gave bit-identical weights);
    the reference here is encoding in the loop (`cache_latents: false`), which differs from any cache only by the
    fp16 rounding of the stored latents and text states. The weight updates of the two runs must agree to 1% (they
    do to 0.03%); a cache that paired rows with other images or captions would not (~100%)."""
    out = root / "in_loop"
    train(config_from_dict(scale_config(out, root / "data")))
    pipeline = cached_reference / "pipeline"
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae, text_encoder = AutoencoderKL.from_pretrained(pipeline / "vae"), CLIPTextModel.from_pretrained(
        pipeline / "text_encoder")
    initial = seeded(0, "unet", lambda: build_unet(ModelConfig(unet="tiny"), 32, vae, text_encoder)).state_dict()
    cached, in_loop = unet_weights(cached_reference), unet_weights(out)
    update = torch.cat([(cached[k] - initial[k]).flatten() for k in sorted(cached)])
    difference = torch.cat([(cached[k] - in_loop[k]).flatten() for k in sorted(cached)])
    assert update.norm() > 0
    assert difference.norm() / update.norm() < 0.01  # measured: 3e-4


def test_a_run_from_the_disk_cache_resumes_exactly(root, cached_reference):
    out = root / "cached_stopped"
    config = scale_config(out, root / "data", data__cache_latents=True, data__cache_shard_size=5,
                          data__latent_cache_dir=str(cached_reference / "latent_cache"))
    with stopped_after_checkpoint(2):
        train(config_from_dict(config))
    train(config_from_dict({**config, "resume_from_checkpoint": "latest"}))
    assert_same_state(out / "checkpoints" / f"step-{STEPS}", cached_reference / "checkpoints" / f"step-{STEPS}")


def stream_config(out, dataset, **overrides) -> dict:
    return tiny_config_dict(out, dataset, data={"dataset_name": str(dataset), "streaming": True,
                                                "cache_latents": True, "cache_shard_size": 5}, **overrides)


def test_a_streamed_data_set_trains_from_the_cache(tmp_path):
    write_hub_layout(tmp_path / "dataset")  # 16 rows in 2 parquet files
    pipeline = train(config_from_dict(stream_config(tmp_path / "out", tmp_path / "dataset", max_train_steps=2)))
    assert (pipeline / "model_index.json").is_file()
    manifest = json.loads((tmp_path / "out" / "latent_cache" / "manifest.json").read_text())
    assert manifest["streaming"] and manifest["cached_rows"] == 16
    assert [shard["name"] for shard in manifest["shards"]] == [f"stream-p0of1-0000{k}" for k in range(4)]


def test_two_processes_split_a_stream_and_cache_every_row_once(tmp_path):
    write_hub_layout(tmp_path / "dataset")
    caches = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        config = write_config(tmp_path / f"{processes}.yaml", stream_config(out, tmp_path / "dataset"))
        result = accelerate_launch("-m", "ldm_pipeline.cli", "cache", "--config", config, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        caches[processes] = cache_rows(out / "latent_cache")
    # split_dataset_by_node gives each process one of the two parquet files: the same rows, in another order and
    # encoded in other batches (the VAE's float sums then round differently: equal to fp16 rounding, not bytes).
    # Rows with the same caption hold the same image in this data set, so sorting by token ids pairs them.
    one, two = ({name: column[np.lexsort(cache["input_ids"].T)] for name, column in cache.items()}
                for cache in (caches[1], caches[2]))
    assert len(two["row"]) == 16 and np.array_equal(one["input_ids"], two["input_ids"])
    for name in ("latent_mean", "latent_std", "prompt_embeds"):
        assert np.allclose(one[name].astype(np.float32), two[name].astype(np.float32), rtol=2**-10, atol=1e-4), name
