"""Data: `datasets` sources, caption rules, image transforms and checks, the held-out split.

Every source goes through `datasets.load_dataset`: an image folder with `metadata.jsonl`
captions, an image folder whose class subfolders become captions through a template, an image
folder without captions (unconditional), or a hub dataset name (also streamed, into the latent
cache of `latent_cache.py`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import traceback
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from .config import Config, DataConfig

logger = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class DataError(ValueError):
    """A problem with the training data that the user must fix."""


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
            dataset = quietly(datasets.load_dataset, "imagefolder", **files, split="train")
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


def quietly(function, *args, **kwargs):
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
    else:  # the Arrow files datasets made of the hub data: their names carry the hash of what was downloaded
        files = [] if data.streaming else [Path(entry["filename"]) for entry in dataset.cache_files]
        own = "".join(f"{path.name}\0{path.stat().st_size}\n" for path in files) or "streamed"
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
    """(the source as opened, the dataset to train on, its captions, its fingerprint)."""
    opened = _open_source(data)
    dataset = _finish_source(opened, data)
    captions = captions_of(dataset, data)
    return opened, dataset, captions, data_fingerprint(dataset, data, len(captions))


def _list_folder_in_child(data: DataConfig):
    """`_list_source` of an image folder, run in a forked child: datasets' listing of the files leaves Python's
    1 MiB small-object arenas nearly empty but pinned (~0.85 KB per file: 85 MB at 100k images) for the rest of the
    run. The child hands back the Arrow files datasets wrote, which are opened here memory-mapped, the captions and
    the fingerprint."""
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
