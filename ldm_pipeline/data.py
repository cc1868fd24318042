"""Data: `datasets` sources, caption rules, image transforms, the held-out split, the latent cache.

Every source goes through `datasets.load_dataset`: an image folder with `metadata.jsonl`
captions, an image folder whose class subfolders become captions through a template, an image
folder without captions (unconditional), or a hub dataset name (also streamed, into the cache).
The latent cache is Arrow shards on disk, built by every process for its share of the shards and
read memory-mapped: no process holds the data set in RAM or decodes all of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFile
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Config, DataConfig
from .locks import LOCK_FILE, directory_lock

logger = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class DataError(ValueError):
    """A problem with the training data that the user must fix."""


def load_source(data: DataConfig) -> datasets.Dataset:
    """The configured dataset, images left undecoded (decoding happens in our own transform)."""
    return _finish_source(_open_source(data), data)


def _open_source(data: DataConfig):
    if data.train_data_dir:
        root = Path(data.train_data_dir)
        if not root.is_dir():
            raise DataError(f"data.train_data_dir: {root} does not exist or is not a directory")
        check_metadata(root)
        try:
            # Split folders (train/, test/ ...): let datasets find them. Otherwise one pattern: finding
            # splits walks the folder dozens of times (8 s of a 6,000-image folder's 10 s load).
            split_folders = (root / "train").is_dir()
            files = {"data_dir": str(root)} if split_folders else {"data_files": {"train": str(root / "**")}}
            dataset = _quietly(datasets.load_dataset, "imagefolder", **files, split="train")
        except (ValueError, FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise DataError(f"data.train_data_dir: {root} holds no readable images ({error}); "
                            "put .png/.jpg files there (see the README for accepted layouts)") from error
        unused = _count_images(root) - len(dataset)
        if unused > 0:  # imagefolder drops images that its metadata file does not list
            logger.warning("%d image file(s) in %s have no row in its metadata file and are not used", unused, root)
    else:
        # A hub id, or a local directory in the hub's layout (parquet shards under data/, as push_to_hub
        # writes them): the same call loads both.
        name = data.dataset_name
        local = Path(name).expanduser()
        if name.startswith((".", "/", "~")) and not local.is_dir():
            raise DataError(f"data.dataset_name: {name} is not a directory; give a hub dataset id or a local "
                            "directory laid out like a hub dataset repo (e.g. data/train-00000-of-00001.parquet)")
        try:
            dataset = datasets.load_dataset(name, data.dataset_config_name, split="train", streaming=data.streaming)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise DataError(f"data.dataset_name: {name} holds no data files ({error}); a local dataset keeps "
                            "its train split as parquet shards such as data/train-00000-of-00001.parquet") from error
    return dataset


def _finish_source(dataset, data: DataConfig):
    if data.streaming:
        return _checked_stream(dataset, data)
    if len(dataset) == 0:
        raise DataError(f"the dataset {data.train_data_dir or data.dataset_name} is empty; add images")
    if data.image_column not in dataset.column_names:
        raise DataError(f"data.image_column: {data.image_column!r} is not a column of the dataset; "
                        f"columns are {dataset.column_names}")
    if isinstance(dataset.features[data.image_column], datasets.Image):
        dataset = dataset.cast_column(data.image_column, datasets.Image(decode=False))
    if data.max_train_samples is not None:
        dataset = dataset.select(range(min(data.max_train_samples, len(dataset))))
    return dataset


def _checked_stream(dataset: datasets.IterableDataset, data: DataConfig) -> datasets.IterableDataset:
    """The streamed data set, checked as far as it can be without reading it: its columns, when known."""
    columns = dataset.column_names
    if columns is not None and data.image_column not in columns:
        raise DataError(f"data.image_column: {data.image_column!r} is not a column of the dataset; "
                        f"columns are {columns}")
    if dataset.features and isinstance(dataset.features.get(data.image_column), datasets.Image):
        dataset = dataset.cast_column(data.image_column, datasets.Image(decode=False))
    if data.max_train_samples is not None:
        dataset = dataset.take(data.max_train_samples)
    return dataset


def _quietly(function, *args, **kwargs):
    """Run without datasets' progress bars: for a local folder "Downloading data" only lists its files."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        return function(*args, **kwargs)
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def check_metadata(root: Path) -> None:
    """Read the folder's metadata.jsonl / metadata.csv files before `datasets` does: it fails on a file
    that is not UTF-8 with a traceback and on rows without `file_name` with a misleading message, and
    it takes an image listed twice as two training examples."""
    for path in sorted([*root.rglob("metadata.jsonl"), *root.rglob("metadata.csv")]):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                            "UTF-8") from error
        if path.suffix == ".csv":
            rows = enumerate(csv.DictReader(io.StringIO(text)), start=2)
        else:
            rows = _json_lines(path, text)
        seen = {}  # one name per image: the rows themselves are not kept (a large data set has millions)
        for number, row in rows:
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                raise DataError(f'{path} line {number} has no "file_name"; every row names its image, like '
                                '{"file_name": "0001.png", "text": "a caption"}')
            if name in seen:
                raise DataError(f"{path} lists {name} twice (lines {seen[name]} and {number}); keep one row per "
                                "image")
            seen[name] = number


def _json_lines(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as error:
                raise DataError(f"{path} line {number} is not a JSON object ({error}); each line "
                                'holds one, like {"file_name": "0001.png", "text": "a caption"}') from error


def _count_images(root: Path) -> int:
    """Image files as imagefolder finds them (by extension; hidden and `__*` folders skipped)."""
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    return sum(1 for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
               and not any(part.startswith((".", "__")) for part in path.relative_to(root).parts))


def caption_rule(features, data: DataConfig):
    """(columns read, batch of columns -> captions) by these rules (None: every caption empty):

    - `caption_column` present: its text (None becomes the empty prompt);
    - absent, but a class `label` column: `caption_template` with the class name;
    - absent, and only images: unconditional training, every prompt empty;
    - absent while other text columns exist: an error, since the column is probably misnamed.
    """
    column = data.caption_column
    if column is None:
        return [], None
    if column in features:
        return [column], lambda batch: [text if isinstance(text, str) else "" for text in batch[column]]
    label = features.get("label")
    text_columns = [name for name, feature in features.items()
                    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]
    if text_columns:
        raise DataError(f"data.caption_column: {column!r} is not a column of the dataset; "
                        f"text columns are {text_columns}; set data.caption_column to one of them")
    if isinstance(label, datasets.ClassLabel):
        names = [name.replace("_", " ") for name in label.names]
        return ["label"], lambda batch: [data.caption_template.format(label=names[i]) for i in batch["label"]]
    logger.warning("no captions found in the dataset: training unconditionally (empty prompts)")
    return [], None


def captions_of(dataset, data: DataConfig) -> list[str]:
    """One caption per row (see `caption_rule`); a streamed data set is read once, its caption column only."""
    if isinstance(dataset, datasets.IterableDataset):
        columns, rule = caption_rule(dataset.features or {data.caption_column: datasets.Value("string")}, data)
        captions = []
        for batch in dataset.select_columns(columns or [data.image_column]).iter(batch_size=1000):
            captions += rule(batch) if rule else [""] * len(next(iter(batch.values())))
        if not captions:
            raise DataError(f"the dataset {data.dataset_name} is empty; add images")
        return captions
    columns, rule = caption_rule(dataset.features, data)
    return rule({name: dataset[name] for name in columns}) if rule else [""] * len(dataset)


def open_rgb(value) -> Image.Image:
    """Decode one image to 8-bit RGB; transparency is composited onto white."""
    if isinstance(value, Image.Image):
        image = value
    elif value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        image = Image.open(value["path"])
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: keep the top 8 bits
        scale = 1 / 256 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 1
        image = image.point(lambda v: v * scale).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_or_note(value, row: int, bad: list) -> Image.Image | None:
    """The image of `value`, or None after noting (row, reason) in `bad` when it fails to decode."""
    try:
        return open_rgb(value)
    except BAD_IMAGE_ERRORS as error:
        where = value.get("path") if isinstance(value, dict) else None
        bad.append((row, f"{where or 'row ' + str(row)}: {error}"))
        return None


def find_bad_images(dataset: datasets.Dataset, image_column: str, start: int = 0, stop: int | None = None,
                    show_progress: bool = True) -> list[tuple[int, str]]:
    """(row, reason) for every image of rows [start, stop) that fails to decode; read in batches, so
    only a batch of image bytes is in memory at a time."""
    stop = len(dataset) if stop is None else stop
    bad, row = [], start
    bar = tqdm(total=stop - start, desc="checking images", disable=None if show_progress else True, leave=False)
    for batch in dataset.select_columns([image_column]).select(range(start, stop)).iter(batch_size=256):
        for value in batch[image_column]:
            decode_or_note(value, row, bad)
            row += 1
        bar.update(len(batch[image_column]))
    bar.close()
    return bad


def bad_image_error(bad: list[tuple[int, str]], data: DataConfig) -> DataError | None:
    """The error to raise for these undecodable images, or None (after a warning) to skip them."""
    listing = "; ".join(reason for _, reason in bad[:3]) + (" ..." if len(bad) > 3 else "")
    if data.on_bad_image == "error":
        return DataError(f"{len(bad)} image(s) failed to decode ({listing}); remove or fix them, or set "
                         "data.on_bad_image: skip to train without them")
    logger.warning("skipping %d image(s) that failed to decode: %s", len(bad), listing)
    return None


def drop_bad_images(dataset: datasets.Dataset, captions: list[str], data: DataConfig, accelerator=None):
    """Decode every image once: each process checks its contiguous share of the rows, and the (few)
    bad rows are gathered, so no process decodes the whole data set."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    rows = len(dataset)
    bad = find_bad_images(dataset, data.image_column, rows * rank // world, rows * (rank + 1) // world,
                          show_progress=rank == 0)
    if world > 1:
        from accelerate.utils import gather_object

        bad = sorted(gather_object(bad))
    if not bad:
        return dataset, captions
    error = bad_image_error(bad, data)
    if error:
        raise error
    keep = np.ones(rows, dtype=bool)
    keep[[row for row, _ in bad]] = False
    if not keep.any():
        raise DataError("every image in the dataset failed to decode; nothing to train on")
    kept = np.flatnonzero(keep)
    return dataset.select(kept), [captions[i] for i in kept]


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False):
    """Resize the short side to `resolution`, crop a square, map to [-1, 1]: (3, R, R)."""
    width, height = image.size
    if min(width, height) != resolution:
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = random.randint(0, width - resolution), random.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def warn_truncated(tokenizer, captions: list[str]) -> None:
    """One warning for all captions longer than the tokenizer's length (they are cut); read in chunks."""
    max_length, too_long = tokenizer.model_max_length, 0
    for start in range(0, len(captions), 4096):
        # verbose=False: transformers' own too-long warning would repeat ours, and only for the first caption.
        lengths = tokenizer(captions[start:start + 4096], truncation=False, verbose=False)["input_ids"]
        too_long += sum(len(ids) > max_length for ids in lengths)
    if too_long:
        logger.warning("%d caption(s) are longer than the tokenizer's %d tokens and were truncated",
                       too_long, max_length)


def tokenize(tokenizer, captions: list[str], warn: bool = True) -> torch.Tensor:
    """(N, model_max_length) ids; longer captions are cut, with one warning for all of them."""
    if warn:
        warn_truncated(tokenizer, captions)
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")["input_ids"]


class TokenIds:
    """`ids[row]`: the caption's token ids, tokenized when asked: (N, L) ids held for a large data set
    would grow with it (77 x 8 bytes a row)."""

    def __init__(self, tokenizer, captions: list[str]):
        self.tokenizer, self.captions = tokenizer, captions

    def __getitem__(self, row: int) -> torch.Tensor:
        return tokenize(self.tokenizer, [self.captions[row]], warn=False)[0]


class ImageTextDataset(torch.utils.data.Dataset):
    """Rows of a `datasets` dataset as {"pixel_values": (3, R, R), "input_ids": (L,)}."""

    def __init__(self, dataset, input_ids, data: DataConfig, resolution: int, indices=None):
        self.dataset, self.input_ids, self.data, self.resolution = dataset, input_ids, data, resolution
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.indices[i]
        image = open_rgb(self.dataset[row][self.data.image_column])
        flip = self.data.random_flip and random.random() < 0.5
        pixels = image_to_tensor(image, self.resolution, self.data.center_crop, flip)
        return {"pixel_values": pixels, "input_ids": self.input_ids[row]}


def split_heldout(num_rows: int, num_heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, heldout) split of row indices; at most a fifth of the data is held out."""
    num_heldout = min(num_heldout, num_rows // 5)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_heldout:]), sorted(order[:num_heldout])


@dataclass
class TrainData:
    dataset: datasets.Dataset | datasets.IterableDataset  # iterable when data.streaming
    captions: list[str]
    fingerprint: str  # identifies the data files, for the latent cache key
    checked: bool = True  # every image was decoded once (bad ones dropped or refused)

    @property
    def num_rows(self) -> int:
        return len(self.captions)


def data_fingerprint(dataset, data: DataConfig, num_rows: int) -> str:
    """Local folders: every file's path, size and mtime. Hub datasets: datasets' own fingerprint."""
    digest = hashlib.sha256()
    root = Path(data.train_data_dir or data.dataset_name).expanduser()
    if data.train_data_dir or (data.streaming and root.is_dir()):
        for folder, subfolders, files in os.walk(root):  # one folder's names at a time, not the whole tree
            subfolders.sort()
            for name in sorted(files):
                stat = os.stat(os.path.join(folder, name))
                relative = os.path.relpath(os.path.join(folder, name), root)
                digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        own = "streamed" if data.streaming else dataset._fingerprint
        digest.update(f"{data.dataset_name}\0{data.dataset_config_name}\0{own}".encode())
    digest.update(f"{data.max_train_samples}\0{num_rows}".encode())
    return digest.hexdigest()[:16]


def load_train_data(config: Config, accelerator=None, check_images: bool = True) -> TrainData:
    """The data set and its captions. `check_images` decodes every image once (split across the processes
    of `accelerator`); without it, images are checked where they are first decoded: by the latent cache
    build, per shard, by the process that owns the shard."""
    data = config.data
    if data.train_data_dir and "fork" in multiprocessing.get_all_start_methods():
        dataset, captions, fingerprint = _list_folder_in_child(data)
    else:
        _, dataset, captions, fingerprint = _list_source(data)
    train = TrainData(dataset=dataset, captions=captions, fingerprint=fingerprint, checked=False)
    return check_train_images(train, data, accelerator) if check_images else train


def _list_source(data: DataConfig):
    """(the source as opened, the dataset `load_source` gives, its captions, its fingerprint)."""
    opened = _open_source(data)
    dataset = _finish_source(opened, data)
    captions = captions_of(dataset, data)
    return opened, dataset, captions, data_fingerprint(dataset, data, len(captions))


def _list_folder_in_child(data: DataConfig):
    """`load_source`, `captions_of` and `data_fingerprint` of an image folder, run in a forked child: datasets'
    listing of the files leaves Python's 1 MiB small-object arenas nearly empty but pinned (~0.85 KB per file:
    85 MB at 100k images) for the rest of the run. The child hands back the Arrow files datasets wrote, which are
    opened here memory-mapped, the captions and the fingerprint."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_listing, args=(data, sender), daemon=True)
    child.start()
    sender.close()
    try:
        outcome, *result = receiver.recv()
    except EOFError:
        child.join()
        raise DataError(f"listing data.train_data_dir {data.train_data_dir} stopped (exit code {child.exitcode}); "
                        "run again, or check the folder can be read") from None
    child.join()
    if outcome == "error":
        is_data_error, message = result
        raise DataError(message) if is_data_error else RuntimeError(f"loading {data.train_data_dir}: {message}")
    files, captions, fingerprint = result
    dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(name) for name in files])
    return _finish_source(dataset, data), captions, fingerprint


def _send_listing(data: DataConfig, sender) -> None:
    try:
        opened, _, captions, fingerprint = _list_source(data)
        if not opened.cache_files:
            raise DataError(f"datasets kept the listing of {data.train_data_dir} in memory, not in its cache; "
                            "set HF_DATASETS_CACHE to a writable directory")
        sender.send(("ok", [entry["filename"] for entry in opened.cache_files], captions, fingerprint))
    except Exception as error:  # every failure goes back to the parent, which raises it
        message = str(error) if isinstance(error, DataError) else traceback.format_exc()
        sender.send(("error", isinstance(error, DataError), message))
    finally:
        sender.close()


def check_train_images(train: TrainData, data: DataConfig, accelerator=None) -> TrainData:
    """`train` without its undecodable images (or an error naming them); each process decodes its share."""
    if train.checked or data.streaming:
        return train
    dataset, captions = drop_bad_images(train.dataset, train.captions, data, accelerator)
    return TrainData(dataset=dataset, captions=captions, fingerprint=train.fingerprint, checked=True)


# --- latent cache -------------------------------------------------------------------------------
#
# <latent_cache_dir>/manifest.json        what the cache is valid for (`key`), its layout, and once complete its
#                                         shards and their row counts
# <latent_cache_dir>/shard-00000/ ...     `save_to_disk` folders: shard k holds the data set's rows
#                                         [k * shard_size, (k + 1) * shard_size), bad images left out
# <latent_cache_dir>/stream-p0of2-00000/  (data.streaming) shard k of process 0's part of the stream
# <latent_cache_dir>/empty_prompt_embeds.safetensors   (text embeddings cached) for caption dropout
# <latent_cache_dir>/.partial-*           a shard being written, renamed when whole: a killed build leaves
#                                         only these, and the next build removes them and redoes that shard

CACHE_FORMAT = 2
ENCODE_BATCH = 32  # images per VAE call; fixed, so a shard's bytes do not depend on the process count
EMPTY_EMBEDS_FILE = "empty_prompt_embeds.safetensors"


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


def cache_key(config: Config, train: TrainData, vae, text_encoder, tokenizer) -> dict:
    """Everything the cached rows depend on; a cache whose key differs is stale. `text_encoder` is None
    when its outputs are not cached (it is trained, or data.cache_text_embeddings is off)."""
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
        "text_encoder": weights_hash(text_encoder),
        "captions": captions.hexdigest()[:16],
        "tokenizer": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16],
        "max_length": tokenizer.model_max_length,
    }


def cache_features(config: Config, vae, text_encoder, tokenizer) -> datasets.Features:
    """One row per image: its latent distribution (mean, std) for each cached orientation (with random
    flips both: the VAE is not flip-equivariant, so mirrored latents would not be exact), the caption's
    token ids, and its text-encoder output when that is cached. `row` is the image's row in the data set
    (for a streamed data set: its position in the stream of the process that encoded it)."""
    from .models import vae_scale_factor

    side = config.resolution // vae_scale_factor(vae)
    latent = ((2 if config.data.random_flip else 1), vae.config.latent_channels, side, side)
    features = {"row": datasets.Value("int64"),
                "latent_mean": datasets.Array4D(latent, "float16"),
                "latent_std": datasets.Array4D(latent, "float16"),
                "input_ids": datasets.Sequence(datasets.Value("int32"), length=tokenizer.model_max_length)}
    if text_encoder is not None:
        features["prompt_embeds"] = datasets.Array2D(
            (tokenizer.model_max_length, text_encoder.config.hidden_size), "float16")
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


def _write_json(path: Path, value: dict) -> None:
    partial = path.with_name(f".partial-{path.name}-{os.getpid()}")
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)


@dataclass
class LatentCache:
    """The cache, memory-mapped: `rows` is the concatenation of its shards (nothing is read into RAM
    until a row is asked for)."""

    rows: datasets.Dataset
    empty_prompt_embeds: torch.Tensor | None  # (L, D), when text embeddings are cached
    directory: Path


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
            self.batches = self.rows.data.table.select(self.names).to_batches()  # views of the mapped files
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
            columns[name] = array.to_numpy(zero_copy_only=False).reshape(len(indices), *shape)
        return columns


class LatentDataset(torch.utils.data.Dataset):
    """Rows of the latent cache: {"latent_mean", "latent_std": (C, h, w), "input_ids": (L,)} and
    "prompt_embeds": (L, D) when cached. With random flips each row picks one of its two orientations."""

    def __init__(self, cache: LatentCache, indices, random_flip: bool):
        self.indices, self.random_flip = indices, random_flip
        self.reader = RowReader(cache.rows, [name for name in cache.rows.column_names if name != "row"])

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
            item = {"latent_mean": torch.from_numpy(columns["latent_mean"][k, side]).float(),
                    "latent_std": torch.from_numpy(columns["latent_std"][k, side]).float(),
                    "input_ids": torch.from_numpy(columns["input_ids"][k]).long()}
            if "prompt_embeds" in columns:
                item["prompt_embeds"] = torch.from_numpy(columns["prompt_embeds"][k]).float()
            items.append(item)
        return items


def _encoder(config: Config, vae, text_encoder, tokenizer, bad: list):
    """encode(batch of raw rows, their row numbers, their captions) -> columns of cache rows. An image
    that fails to decode is left out and noted in `bad` as (row, reason)."""
    data, resolution = config.data, config.resolution
    sides = (False, True) if data.random_flip else (False,)

    def encode(batch, rows, captions):
        pixels, kept, kept_captions = [], [], []
        for value, row, caption in zip(batch[data.image_column], rows, captions):
            image = decode_or_note(value, row, bad)
            if image is None:
                continue
            pixels.append(torch.stack([image_to_tensor(image, resolution, True, flip) for flip in sides]))
            kept.append(row)
            kept_captions.append(caption)
        if not kept:
            return {"row": [], "latent_mean": [], "latent_std": [], "input_ids": []} | (
                {"prompt_embeds": []} if text_encoder is not None else {})
        pixels = torch.stack(pixels)  # (b, sides, 3, R, R)
        dist = vae.encode(pixels.flatten(0, 1).to(vae.device, vae.dtype)).latent_dist
        shape = (len(kept), len(sides))
        ids = tokenize(tokenizer, kept_captions, warn=False)  # (b, L)
        columns = {"row": kept,
                   "latent_mean": dist.mean.float().half().unflatten(0, shape).cpu().numpy(),
                   "latent_std": dist.std.float().half().unflatten(0, shape).cpu().numpy(),
                   "input_ids": ids.to(torch.int32).numpy()}
        if text_encoder is not None:
            embeds = text_encoder(ids.to(text_encoder.device))[0]  # (b, L, D)
            columns["prompt_embeds"] = embeds.float().half().cpu().numpy()
        return columns

    return encode


def _check_shard_images(bad: list, data: DataConfig, where: str) -> None:
    if bad:
        error = bad_image_error(sorted(bad), data)
        if error:
            raise DataError(f"{where}: {error}")


def _encode_shard(cache_dir: Path, name: str, part: datasets.Dataset, start: int, captions: list[str],
                  encode_rows, features, data: DataConfig, bar, bad: list) -> None:
    """Encode rows [start, start + len(part)) of the data set with `datasets.map` into an Arrow file,
    `save_to_disk` it under a temporary name, and rename it into place when whole."""
    partial = cache_dir / f".partial-{name}-{os.getpid()}"
    scratch = cache_dir / f".partial-{name}-{os.getpid()}.arrow"

    def encode(batch, indices):
        bar.update(len(indices))
        return encode_rows(batch, [start + i for i in indices], [captions[start + i] for i in indices])

    encoded = _quietly(part.map, encode, batched=True, batch_size=ENCODE_BATCH, with_indices=True,
                       remove_columns=part.column_names, features=features, cache_file_name=str(scratch),
                       load_from_cache_file=False, new_fingerprint=f"latent-cache-{name}-{os.getpid()}")
    _check_shard_images(bad, data, f"rows {start}-{start + len(part) - 1}")
    _quietly(encoded.save_to_disk, str(partial))
    del encoded
    scratch.unlink()
    partial.rename(cache_dir / name)


def _encode_stream(cache_dir: Path, accelerator, train: TrainData, shard_size: int, encode_rows, features,
                   data: DataConfig, bar, bad: list) -> None:
    """This process's part of a streamed data set (`split_dataset_by_node`), shard after shard; a resumed
    build skips the rows of the shards already written."""
    from datasets.distributed import split_dataset_by_node

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
            part = _quietly(datasets.Dataset.from_generator, generate, features=features, cache_dir=str(scratch),
                            fingerprint=f"latent-cache-{name}-{os.getpid()}")
        except ValueError:
            if written[0]:
                raise
            part = datasets.Dataset.from_dict({key: [] for key in features}, features=features)  # all bad images
        _check_shard_images(bad, data, f"stream shard {name}")
        _quietly(part.save_to_disk, str(partial))
        del part
        shutil.rmtree(scratch, ignore_errors=True)
        partial.rename(cache_dir / name)
        shard, position = shard + 1, position + shard_size
        bad.clear()
    _write_json(done_marker, {"shards": shard})


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


def build_latent_cache(accelerator, config: Config, train: TrainData, vae, text_encoder, tokenizer) -> LatentCache:
    """Open the cache at `latent_cache_dir`, encoding what it lacks first; refuse a stale or foreign one.

    Each process encodes its contiguous part of the missing shards (a shard's rows are fixed by
    data.cache_shard_size, not by the process count, so the cache is the same at any process count) and
    checks those images, once. Finished shards are kept: a build that was killed, or is run again, only
    encodes the rest. `text_encoder` is None when its outputs are not to be cached.

    A build holds the cache directory's lock (its main process does), so a second build of the same cache
    is refused instead of removing the first one's shards in progress; reading a finished cache takes none.
    """
    cache_dir = latent_cache_dir(config)
    builds = accelerator.is_main_process and not (read_manifest(cache_dir) or {}).get("complete")
    with directory_lock(cache_dir, "data.latent_cache_dir", "latent cache build", DataError, hold=builds):
        return _build_latent_cache(accelerator, config, train, vae, text_encoder, tokenizer, cache_dir)


@torch.no_grad()
def _build_latent_cache(accelerator, config: Config, train: TrainData, vae, text_encoder, tokenizer,
                        cache_dir: Path) -> LatentCache:
    key = cache_key(config, train, vae, text_encoder, tokenizer)
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
            return open_latent_cache(cache_dir, manifest, cache_features(config, vae, text_encoder, tokenizer))
    elif cache_dir.exists() and any(path.name != LOCK_FILE for path in cache_dir.iterdir()):
        raise DataError(f"data.latent_cache_dir: {cache_dir} exists but holds no latent cache "
                        "(no manifest.json); point it at a new or empty directory")
    empty_embeds = None
    if text_encoder is not None:
        empty_ids = tokenize(tokenizer, [""], warn=False).to(text_encoder.device)
        empty_embeds = text_encoder(empty_ids)[0][0].float().half().cpu()  # (L, D)
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
                    save_file({"empty_prompt_embeds": empty_embeds}, str(cache_dir / EMPTY_EMBEDS_FILE))
                _write_json(cache_dir / "manifest.json", manifest)
        elif accelerator.is_main_process:
            for leftover in cache_dir.glob(".partial-*"):  # of a killed build: incomplete by construction
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        _encode_missing(accelerator, config, train, vae, text_encoder, tokenizer, cache_dir, manifest)
    return open_latent_cache(cache_dir, read_manifest(cache_dir), cache_features(config, vae, text_encoder, tokenizer))


def _encode_missing(accelerator, config, train, vae, text_encoder, tokenizer, cache_dir: Path, manifest) -> None:
    shard_size, data = manifest["shard_size"], config.data
    features = cache_features(config, vae, text_encoder, tokenizer)
    bad = []
    encode_rows = _encoder(config, vae, text_encoder, tokenizer, bad)
    main = accelerator.is_main_process
    if manifest["streaming"]:
        accelerator.wait_for_everyone()
        bar = tqdm(desc="caching latents (streamed)", unit="img", disable=not main, dynamic_ncols=True)
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
        bar = tqdm(total=total, desc=f"caching latents ({world} process(es))", unit="img", disable=not main,
                   dynamic_ncols=True)
        for k in mine:
            start, stop = k * shard_size, min(train.num_rows, (k + 1) * shard_size)
            _encode_shard(cache_dir, names[k], train.dataset.select(range(start, stop)), start, train.captions,
                          encode_rows, features, data, bar, bad)
            bad.clear()
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        names = _shard_names(cache_dir, manifest)
        shards = [{"name": name, "rows": datasets.load_from_disk(str(cache_dir / name)).num_rows} for name in names]
        rows = sum(shard["rows"] for shard in shards)
        _write_json(cache_dir / "manifest.json", {**manifest, "complete": True, "shards": shards, "cached_rows": rows})
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
    if "prompt_embeds" in features:
        try:
            empty = load_file(str(cache_dir / EMPTY_EMBEDS_FILE))["empty_prompt_embeds"]
        except (SafetensorError, OSError, KeyError) as error:
            raise _unreadable_cache(cache_dir, cache_dir / EMPTY_EMBEDS_FILE, error) from error
    rows = datasets.concatenate_datasets(parts).with_format("numpy")
    return LatentCache(rows=rows, empty_prompt_embeds=empty, directory=cache_dir)
