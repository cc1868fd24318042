"""The latent cache: the data set encoded once by the frozen VAE (and text encoder) into Arrow shards on disk, built
by every process for its share of the shards and read memory-mapped, so no process holds the data set in RAM or
decodes all of it.

<latent_cache_dir>/manifest.json        what the cache is valid for (`key`), its layout, and once complete its
                                        shards, their row counts and the images left out
<latent_cache_dir>/shard-00000/ ...     `save_to_disk` folders: shard k holds the data set's rows
                                        [k * shard_size, (k + 1) * shard_size), bad images left out (with
                                        data.skip_bad_images; listed with their reasons in its skipped.txt)
<latent_cache_dir>/stream-p0of2-00000/  (data.streaming) shard k of process 0's part of the stream
<latent_cache_dir>/empty_prompt_embeds.safetensors   (text embeddings cached) for caption dropout
<latent_cache_dir>/.partial-*           a shard being written, renamed when whole: a killed build leaves
                                        only these, and the next build removes them and redoes that shard
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.distributed import split_dataset_by_node
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .buckets import BucketAssignment
from .config import Config, DataConfig
from .data import (
    DataError,
    TrainData,
    bad_image_error,
    bucketed_pixels,
    caption_rule,
    decode_or_note,
    quietly,
    square_pixels,
    tokenize,
)
from .locks import LOCK_FILE, directory_lock
from .models import encode_prompt, vae_scale_factor
from .run_dir import write_json, written_then_renamed

CACHE_FORMAT = 2
ENCODE_BATCH = 32  # images per VAE call; fixed, so a shard's bytes do not depend on the process count
EMPTY_EMBEDS_FILE = "empty_prompt_embeds.safetensors"
SKIPPED_FILE = "skipped.txt"  # in a shard: the images it left out (data.skip_bad_images) and why


def weights_hash(module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_cache_dir(config: Config) -> Path:
    return Path(config.data.latent_cache_dir or Path(config.output_dir) / "latent_cache")


def vocabulary_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]


def cache_key(config: Config, train: TrainData, vae, text_encoders: list | None, tokenizers: list) -> dict:
    """Everything the cached rows depend on; a cache whose key differs is stale. `text_encoders` (one, or SDXL's two)
    is None when their outputs are not cached (they train, or data.cache_text_embeddings is off)."""
    tokenizer = tokenizers[0]
    captions = hashlib.sha256()
    for caption in train.captions:
        captions.update(caption.encode() + b"\n")
    return {
        "vae": weights_hash(vae),
        "data": train.fingerprint,
        "rows": train.num_rows,
        "resolution": config.resolution,
        "center_crop": config.data.center_crop,
        "random_flip": config.data.random_flip,
        "text_encoder": None if text_encoders is None else "+".join(map(weights_hash, text_encoders)),
        "captions": captions.hexdigest()[:16],
        "tokenizer": vocabulary_hash(tokenizer),
        **({"tokenizer_2": vocabulary_hash(tokenizers[1])} if len(tokenizers) > 1 else {}),
        "max_length": tokenizer.model_max_length,
        # the buckets and the seed that draws each image's crop in its bucket
        **({"buckets": json.dumps(vars(config.data.buckets), sort_keys=True), "seed": config.seed}
           if config.data.buckets is not None else {}),
    }


def cache_features(config: Config, vae, text_encoders: list | None, tokenizers: list) -> datasets.Features:
    """One row per image: its latent distribution (mean, std) for each cached orientation (with random
    flips both: the VAE is not flip-equivariant, so mirrored latents would not be exact), the caption's
    token ids, and its text-encoder output when that is cached. `row` is the image's row in the data set
    (for a streamed data set: its position in the stream of the process that encoded it).
    SDXL (two tokenizers): also the second tokenizer's ids, the pooled text embedding when cached, and each image's
    original size and crop corner, its micro-conditioning."""
    tokenizer, sdxl = tokenizers[0], len(tokenizers) > 1
    pair = datasets.Sequence(datasets.Value("int32"), length=2)
    side = config.resolution // vae_scale_factor(vae)
    latent = ((2 if config.data.random_flip else 1), vae.config.latent_channels, side, side)
    features = {"row": datasets.Value("int64"),
                "latent_mean": datasets.Array4D(latent, "float16"),
                "latent_std": datasets.Array4D(latent, "float16"),
                "input_ids": datasets.Sequence(datasets.Value("int32"), length=tokenizer.model_max_length)}
    if sdxl:
        features.update(input_ids_2=datasets.Sequence(datasets.Value("int32"), length=tokenizers[1].model_max_length),
                        original_size=pair, crop_top_left=pair)
    if config.data.buckets is not None:  # each bucket's latents at their own size: flat, with their shape
        features.update(latent_mean=datasets.Sequence(datasets.Value("float16")),
                        latent_std=datasets.Sequence(datasets.Value("float16")),
                        latent_shape=datasets.Sequence(datasets.Value("int32"), length=4),  # (sides, C, h, w)
                        original_size=pair, crop_top_left=pair)
    if text_encoders is not None:
        width = sum(encoder.config.hidden_size for encoder in text_encoders)
        features["prompt_embeds"] = datasets.Array2D((tokenizer.model_max_length, width), "float16")
        if sdxl:
            features["pooled_prompt_embeds"] = datasets.Sequence(datasets.Value("float16"),
                                                                 length=text_encoders[1].config.projection_dim)
    return datasets.Features(features)


def _unreadable_cache(cache_dir: Path, path: Path, error: Exception) -> DataError:
    return DataError(f"the latent cache at {cache_dir} is damaged: {path.name} cannot be read "
                     f"({' '.join(str(error).split())}). Delete that directory to rebuild it")


def read_manifest(cache_dir: Path) -> dict | None:
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["key"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _unreadable_cache(cache_dir, path, error) from error
    if manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"the latent cache at {cache_dir} was written by an older version of ldm_pipeline (one "
                        "latents.safetensors file loaded whole); delete that directory to rebuild it as shards")
    return manifest


@dataclass
class LatentCache:
    """The cache, memory-mapped: `rows` is the concatenation of its shards (nothing is read into RAM
    until a row is asked for)."""

    rows: datasets.Dataset
    empty_prompt_embeds: torch.Tensor | None  # (L, D), when text embeddings are cached
    directory: Path
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each image the build left out


class RowReader:
    """`read(indices)`: those rows of a memory-mapped Arrow data set as one array per column, of shape
    (len(indices), *feature shape). datasets' numpy formatting builds each row's nested arrays one by one (a
    batch of 64 cached latents and text embeddings: 15.7 ms against 3-6 ms here, once per training step), and
    Arrow's `take` on a table of many record batches (a cache of many shards) first copies them all into one
    (1.5 s and 400 MB a read at 100k rows): each batch here gives only its own rows."""

    def __init__(self, rows: datasets.Dataset, names: list[str]):
        self.rows, self.names, self.batches = rows, names, None

    def __getstate__(self):  # a DataLoader worker started by spawn reopens the files (datasets pickles paths)
        return {**self.__dict__, "batches": None}

    def read(self, indices: list[int]) -> dict[str, np.ndarray]:
        if self.batches is None:
            self.batches = self.rows.data.select(self.names).to_batches()  # views of the mapped files
            self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])
        indices = np.asarray(indices, dtype=np.int64)
        owner = np.searchsorted(self.starts, indices, side="right") - 1  # the record batch of each row
        order = np.argsort(owner, kind="stable")
        indices, owner = indices[order], owner[order]  # grouped by record batch
        pieces = [self.batches[b].take(pa.array(indices[owner == b] - self.starts[b])) for b in np.unique(owner)]
        table = pa.Table.from_batches(pieces).combine_chunks().take(pa.array(np.argsort(order)))  # asked order
        columns = {}
        for name in self.names:
            array = table.column(name).combine_chunks()
            if isinstance(array, pa.ExtensionArray):  # datasets' ArrayXD features: nested fixed-size lists inside
                array = array.storage
            while pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
                array = array.flatten()
            feature = self.rows.features[name]
            shape = getattr(feature, "shape", None) or ((feature.length,) if isinstance(feature, datasets.List) else ())
            # writable: torch refuses to wrap a read-only array without a warning
            columns[name] = array.to_numpy(zero_copy_only=False, writable=True).reshape(len(indices), *shape)
        return columns


class LatentDataset(torch.utils.data.Dataset):
    """Rows of the latent cache: {"latent_mean", "latent_std": (C, h, w), "input_ids": (L,)} and
    "prompt_embeds": (L, D) when cached. With random flips each row picks one of its two orientations."""

    def __init__(self, cache: LatentCache, indices, random_flip: bool):
        self.indices, self.random_flip = indices, random_flip
        self.reader = RowReader(cache.rows, [name for name in cache.rows.column_names if name != "row"])
        self.shapes = None  # (N, 4) each row's latent shape, when the cache holds aspect-ratio buckets
        if "latent_shape" in cache.rows.column_names:
            self.shapes = RowReader(cache.rows, ["latent_shape"]).read(list(range(len(cache.rows))))["latent_shape"]

    def bucket_of(self) -> np.ndarray | None:
        """Each position's bucket (its latent size), for the sampler that batches one bucket at a time."""
        if self.shapes is None:
            return None
        _, bucket = np.unique(self.shapes[np.asarray(self.indices, dtype=np.int64), 2:], axis=0, return_inverse=True)
        return bucket.reshape(-1)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, positions):
        """A batch read at once from Arrow (the DataLoader calls this with a batch's indices)."""
        columns = self.reader.read([int(self.indices[i]) for i in positions])
        items = []
        for k in range(len(positions)):
            side = int(self.random_flip and random.random() < 0.5)
            shape = columns["latent_shape"][k] if "latent_shape" in columns else None  # buckets: rows stored flat
            mean, std = ((columns[name][k].reshape(*shape) if shape is not None else columns[name][k])[side]
                         for name in ("latent_mean", "latent_std"))
            item = {"latent_mean": torch.from_numpy(mean).float(), "latent_std": torch.from_numpy(std).float(),
                    "input_ids": torch.from_numpy(columns["input_ids"][k]).long()}
            for name in ("original_size", "crop_top_left", "input_ids_2"):
                if name in columns:
                    item[name] = torch.from_numpy(columns[name][k]).long()
            for name in ("prompt_embeds", "pooled_prompt_embeds"):
                if name in columns:
                    item[name] = torch.from_numpy(columns[name][k]).float()
            items.append(item)
        return items


def _encoder(config: Config, vae, text_encoders: list | None, tokenizers: list, bad: list,
             buckets: BucketAssignment | None = None):
    """encode(batch of raw rows, their row numbers, their captions) -> columns of cache rows. An image
    that fails to decode is left out and noted in `bad` as (row, reason). With aspect-ratio `buckets` each image
    is placed in its bucket as the training loop would (the same crop) and the VAE encodes each size apart."""
    data, resolution = config.data, config.resolution
    sides = (False, True) if data.random_flip else (False,)
    features = cache_features(config, vae, text_encoders, tokenizers)
    sdxl = len(tokenizers) > 1

    def encode(batch, rows, captions):
        pixels, kept, kept_captions, placed = [], [], [], []
        for value, row, caption in zip(batch[data.image_column], rows, captions):
            image = decode_or_note(value, row, bad)
            if image is None:
                continue
            if buckets is None:
                views = [square_pixels(image, resolution, True, flip) for flip in sides]
                pixels.append(torch.stack([view["pixel_values"] for view in views]))
                placed.append(views[0])
            else:
                bucket = buckets.sizes[buckets.bucket[row]]
                views = [bucketed_pixels(image, bucket, row, data, config.seed, flip) for flip in sides]
                pixels.append(torch.stack([view["pixel_values"] for view in views]))
                placed.append(views[0])
            kept.append(row)
            kept_captions.append(caption)
        if not kept:
            return {name: [] for name in features}
        means, stds = encode_by_size(vae, pixels)  # each (sides, C, h, w)
        ids = [tokenize(each, kept_captions, warn=False) for each in tokenizers]  # (b, L) each
        columns = {"row": kept, "input_ids": ids[0].to(torch.int32).numpy()}
        if sdxl:
            columns.update(input_ids_2=ids[1].to(torch.int32).numpy(),
                           original_size=[view["original_size"].tolist() for view in placed],
                           crop_top_left=[view["crop_top_left"].tolist() for view in placed])
        if buckets is None:
            columns.update(latent_mean=np.stack(means), latent_std=np.stack(stds))
        else:
            columns.update(latent_mean=[mean.reshape(-1) for mean in means],
                           latent_std=[std.reshape(-1) for std in stds],
                           latent_shape=[mean.shape for mean in means],
                           original_size=[view["original_size"].tolist() for view in placed],
                           crop_top_left=[view["crop_top_left"].tolist() for view in placed])
        if text_encoders is not None:
            device = text_encoders[0].device
            embeds, pooled = encode_prompt(text_encoders, [each.to(device) for each in ids])  # (b, L, D), (b, P)
            columns["prompt_embeds"] = embeds.float().half().cpu().numpy()
            if pooled is not None:
                columns["pooled_prompt_embeds"] = pooled.float().half().cpu().numpy()
        return columns

    return encode


def encode_by_size(vae, pixels: list[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The fp16 latent mean and std of each (sides, 3, H, W) entry of `pixels`, encoded in one VAE call per size
    (one call in all without buckets, as before: the bytes do not depend on how sizes are mixed in a batch)."""
    groups = {}
    for k, views in enumerate(pixels):
        groups.setdefault(tuple(views.shape), []).append(k)
    means, stds = [None] * len(pixels), [None] * len(pixels)
    for members in groups.values():
        stacked = torch.stack([pixels[k] for k in members])  # (b, sides, 3, H, W)
        dist = vae.encode(stacked.flatten(0, 1).to(vae.device, vae.dtype)).latent_dist
        for name, values in (("mean", means), ("std", stds)):
            tensor = getattr(dist, name).float().half().unflatten(0, stacked.shape[:2]).cpu().numpy()
            for k, array in zip(members, tensor):
                values[k] = array
    return means, stds


def _check_shard_images(bad: list, data: DataConfig, where: str) -> None:
    if bad:
        error = bad_image_error(sorted(bad), data)
        if error:
            raise DataError(f"{where}: {error}")


def _note_skipped(shard: Path, bad: list) -> None:
    """Keep the reasons of the images a shard left out (data.skip_bad_images) in the shard, for the manifest."""
    if bad:
        (shard / SKIPPED_FILE).write_text("".join(f"{reason}\n" for _, reason in sorted(bad)))


def _encode_shard(cache_dir: Path, name: str, part: datasets.Dataset, start: int, captions: list[str],
                  encode_rows, features, data: DataConfig, bar, bad: list) -> None:
    """Encode rows [start, start + len(part)) of the data set with `datasets.map` into an Arrow file,
    `save_to_disk` it under a temporary name, and rename it into place when whole."""
    partial = cache_dir / f".partial-{name}-{os.getpid()}"
    scratch = cache_dir / f".partial-{name}-{os.getpid()}.arrow"

    def encode(batch, indices):
        bar.update(len(indices))
        return encode_rows(batch, [start + i for i in indices], [captions[start + i] for i in indices])

    encoded = quietly(part.map, encode, batched=True, batch_size=ENCODE_BATCH, with_indices=True,
                       remove_columns=part.column_names, features=features, cache_file_name=str(scratch),
                       load_from_cache_file=False, new_fingerprint=f"latent-cache-{name}-{os.getpid()}")
    _check_shard_images(bad, data, f"rows {start}-{start + len(part) - 1}")
    quietly(encoded.save_to_disk, str(partial))
    _note_skipped(partial, bad)
    del encoded
    scratch.unlink()
    partial.rename(cache_dir / name)


def _encode_stream(cache_dir: Path, accelerator, train: TrainData, shard_size: int, encode_rows, features,
                   data: DataConfig, bar, bad: list) -> None:
    """This process's part of a streamed data set (`split_dataset_by_node`), shard after shard; a resumed
    build skips the rows of the shards already written."""
    rank, world = accelerator.process_index, accelerator.num_processes
    prefix = f"stream-p{rank}of{world}-"
    done_marker = cache_dir / f"{prefix}done.json"
    if done_marker.is_file():
        return
    done = 0
    while (cache_dir / f"{prefix}{done:05d}").is_dir():
        done += 1
    stream = split_dataset_by_node(train.dataset, rank=rank, world_size=world).skip(done * shard_size)
    _, rule = caption_rule(train.dataset.features or {data.caption_column: datasets.Value("string")}, data)
    rows = iter(stream)
    shard, position = done, done * shard_size
    while (head := next(rows, None)) is not None:
        shard_rows = itertools.chain([head], itertools.islice(rows, shard_size - 1))
        written = [0]

        def generate(shard_rows=shard_rows, first=position, written=written):
            """The shard's rows, encoded batch by batch and written as Arrow as they come (never the whole
            shard's images in memory)."""
            while batch := list(itertools.islice(shard_rows, ENCODE_BATCH)):
                columns = {key: [row[key] for row in batch] for key in batch[0]}
                captions = rule(columns) if rule else [""] * len(batch)
                encoded = encode_rows(columns, list(range(first, first + len(batch))), captions)
                for i in range(len(encoded["row"])):
                    yield {key: value[i] for key, value in encoded.items()}
                first, written[0] = first + len(batch), written[0] + len(encoded["row"])
                bar.update(len(batch))

        name = f"{prefix}{shard:05d}"
        partial = cache_dir / f".partial-{name}-{os.getpid()}"
        scratch = cache_dir / f".partial-{name}-{os.getpid()}.tmp"
        try:
            part = quietly(datasets.Dataset.from_generator, generate, features=features, cache_dir=str(scratch),
                            fingerprint=f"latent-cache-{name}-{os.getpid()}")
        except ValueError:
            if written[0]:
                raise
            part = datasets.Dataset.from_dict({key: [] for key in features}, features=features)  # all bad images
        _check_shard_images(bad, data, f"stream shard {name}")
        quietly(part.save_to_disk, str(partial))
        _note_skipped(partial, bad)
        del part
        shutil.rmtree(scratch, ignore_errors=True)
        partial.rename(cache_dir / name)
        shard, position = shard + 1, position + shard_size
        bad.clear()
    write_json(done_marker, {"shards": shard})


def _shard_names(cache_dir: Path, manifest: dict) -> list[str]:
    if not manifest["streaming"]:
        count = math.ceil(manifest["key"]["rows"] / manifest["shard_size"])
        return [f"shard-{k:05d}" for k in range(count)]
    names = []
    for rank in range(manifest["processes"]):
        prefix = f"stream-p{rank}of{manifest['processes']}-"
        shards = json.loads((cache_dir / f"{prefix}done.json").read_text())["shards"]
        names += [f"{prefix}{k:05d}" for k in range(shards)]
    return names


def build_latent_cache(accelerator, config: Config, train: TrainData, vae, text_encoders: list | None,
                       tokenizers: list) -> LatentCache:
    """Open the cache at `latent_cache_dir`, encoding what it lacks first; refuse a stale or foreign one.

    Each process encodes its contiguous part of the missing shards (a shard's rows are fixed by
    data.cache_shard_size, not by the process count, so the cache is the same at any process count) and
    checks those images, once. Finished shards are kept: a build that was killed, or is run again, only
    encodes the rest. `text_encoders` (one, or SDXL's two; `tokenizers` alike) is None when their outputs are not
    to be cached.

    A build holds the cache directory's lock (its main process does), so a second build of the same cache
    is refused instead of removing the first one's shards in progress; reading a finished cache takes none.
    """
    cache_dir = latent_cache_dir(config)
    builds = accelerator.is_main_process and not (read_manifest(cache_dir) or {}).get("complete")
    with directory_lock(cache_dir, "data.latent_cache_dir", "latent cache build", DataError, hold=builds):
        return _build_latent_cache(accelerator, config, train, vae, text_encoders, tokenizers, cache_dir)


@torch.no_grad()
def _build_latent_cache(accelerator, config: Config, train: TrainData, vae, text_encoders, tokenizers,
                        cache_dir: Path) -> LatentCache:
    key = cache_key(config, train, vae, text_encoders, tokenizers)
    features = cache_features(config, vae, text_encoders, tokenizers)
    manifest = read_manifest(cache_dir)
    if manifest is not None:
        changed = [name for name in key if manifest["key"].get(name) != key[name]]
        if changed:
            raise DataError(
                f"the latent cache at {cache_dir} is stale: it was built with different {', '.join(changed)}. "
                "Delete that directory to rebuild it, or set data.latent_cache_dir to a new path.")
        if manifest["streaming"] and not manifest["complete"] and manifest["processes"] != accelerator.num_processes:
            raise DataError(f"the latent cache at {cache_dir} is half built from a stream by "
                            f"{manifest['processes']} process(es); finish it with that many processes, or delete "
                            "that directory to start again")
        if manifest["complete"]:
            if accelerator.is_main_process:
                print(f"reusing latent cache {cache_dir} ({manifest['cached_rows']} images)")
            return open_latent_cache(cache_dir, manifest, features)
    elif cache_dir.exists() and any(path.name != LOCK_FILE for path in cache_dir.iterdir()):
        raise DataError(f"data.latent_cache_dir: {cache_dir} exists but holds no latent cache "
                        "(no manifest.json); point it at a new or empty directory")
    empty_embeds = None
    if text_encoders is not None and len(text_encoders) == 1:  # SDXL's unconditional input is zeros
        empty_ids = tokenize(tokenizers[0], [""], warn=False).to(text_encoders[0].device)
        empty_embeds = text_encoders[0](empty_ids)[0][0].float().half().cpu()  # (L, D)
    accelerator.wait_for_everyone()  # every process has read the directory before the main one writes
    if manifest is None or not manifest["complete"]:
        if manifest is None:
            # Shards of whole 32-image batches, at least one per process: the VAE then sees the same batches
            # at any shard size and process count, and every process has a shard to encode.
            per_process = math.ceil(train.num_rows / accelerator.num_processes)
            shard_size = min(config.data.cache_shard_size, ENCODE_BATCH * math.ceil(per_process / ENCODE_BATCH))
            manifest = {"format": CACHE_FORMAT, "key": key, "shard_size": shard_size,
                        "streaming": config.data.streaming, "processes": accelerator.num_processes,
                        "complete": False}
            if accelerator.is_main_process:
                cache_dir.mkdir(parents=True, exist_ok=True)
                if empty_embeds is not None:
                    with written_then_renamed(cache_dir / EMPTY_EMBEDS_FILE) as partial:
                        save_file({"empty_prompt_embeds": empty_embeds}, str(partial))
                write_json(cache_dir / "manifest.json", manifest)
        elif accelerator.is_main_process:
            for leftover in cache_dir.glob(".partial-*"):  # of a killed build: incomplete by construction
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        _encode_missing(accelerator, config, train, vae, text_encoders, tokenizers, cache_dir, manifest)
    return open_latent_cache(cache_dir, read_manifest(cache_dir), features)


def _encode_missing(accelerator, config, train, vae, text_encoders, tokenizers, cache_dir: Path, manifest) -> None:
    shard_size, data = manifest["shard_size"], config.data
    features = cache_features(config, vae, text_encoders, tokenizers)
    bad = []
    encode_rows = _encoder(config, vae, text_encoders, tokenizers, bad, train.buckets)
    main = accelerator.is_main_process
    if manifest["streaming"]:
        accelerator.wait_for_everyone()
        # closed however the block ends, so that a Ctrl+C's message starts on a line of its own
        with tqdm(desc="caching latents (streamed)", unit="img", disable=not main, dynamic_ncols=True) as bar:
            _encode_stream(cache_dir, accelerator, train, shard_size, encode_rows, features, data, bar, bad)
    else:
        names = [f"shard-{k:05d}" for k in range(math.ceil(train.num_rows / shard_size))]
        missing = [k for k, name in enumerate(names) if not (cache_dir / name).is_dir()]
        accelerator.wait_for_everyone()  # every process has listed the finished shards before any is added
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = missing[len(missing) * rank // world:len(missing) * (rank + 1) // world]
        if main and len(missing) < len(names):
            print(f"latent cache {cache_dir}: {len(names) - len(missing)} of {len(names)} shards are done; "
                  f"encoding the other {len(missing)}")
        total = sum(min(train.num_rows, (k + 1) * shard_size) - k * shard_size for k in mine)
        with tqdm(total=total, desc=f"caching latents ({world} process(es))", unit="img", disable=not main,
                  dynamic_ncols=True) as bar:
            for k in mine:
                start, stop = k * shard_size, min(train.num_rows, (k + 1) * shard_size)
                _encode_shard(cache_dir, names[k], train.dataset.select(range(start, stop)), start, train.captions,
                              encode_rows, features, data, bar, bad)
                bad.clear()
    accelerator.wait_for_everyone()
    if main:
        names = _shard_names(cache_dir, manifest)
        shards = [{"name": name, "rows": datasets.load_from_disk(str(cache_dir / name)).num_rows} for name in names]
        rows = sum(shard["rows"] for shard in shards)
        skipped = [line for name in names if (cache_dir / name / SKIPPED_FILE).is_file()
                   for line in (cache_dir / name / SKIPPED_FILE).read_text().splitlines()]
        write_json(cache_dir / "manifest.json", {**manifest, "complete": True, "shards": shards, "cached_rows": rows,
                                                 "skipped": skipped})
        size = sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file())
        print(f"wrote latent cache {cache_dir} ({rows} images, {len(shards)} shard(s), {size / 1e6:.1f} MB)")
    accelerator.wait_for_everyone()


def open_latent_cache(cache_dir: Path, manifest: dict, features: datasets.Features) -> LatentCache:
    """The finished cache, memory-mapped; a damaged shard or one that does not fit this run is named."""
    parts = []
    for shard in manifest["shards"]:
        path = cache_dir / shard["name"]
        try:
            part = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError, pa.ArrowException) as error:
            raise _unreadable_cache(cache_dir, path, error) from error
        if part.features != features or part.num_rows != shard["rows"]:
            have = {name: getattr(part.features.get(name), "shape", None) for name in ("latent_mean", "prompt_embeds")}
            want = {name: getattr(features.get(name), "shape", None) for name in ("latent_mean", "prompt_embeds")}
            raise DataError(f"the latent cache at {cache_dir} does not fit this run: {shard['name']} holds "
                            f"{part.num_rows} rows of {have} where the manifest says {shard['rows']} rows and this "
                            f"run needs {want} (a shard from another run?). Delete that directory to rebuild it")
        parts.append(part)
    if not parts:
        raise DataError(f"the latent cache at {cache_dir} holds no images: every image failed to decode")
    empty = None
    if "prompt_embeds" in features and "pooled_prompt_embeds" not in features:  # SDXL's unconditional input is zeros
        try:
            empty = load_file(str(cache_dir / EMPTY_EMBEDS_FILE))["empty_prompt_embeds"]
        except (SafetensorError, OSError, KeyError) as error:
            raise _unreadable_cache(cache_dir, cache_dir / EMPTY_EMBEDS_FILE, error) from error
    rows = datasets.concatenate_datasets(parts).with_format("numpy")
    return LatentCache(rows=rows, empty_prompt_embeds=empty, directory=cache_dir, skipped=manifest.get("skipped", []))
