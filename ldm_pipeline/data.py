"""Data: `datasets` sources, caption rules, tags, image transforms and checks, the held-out split.

Every source goes through `datasets.load_dataset`: an image folder with `metadata.jsonl` captions or a
caption file beside each image, an image folder whose class subfolders become captions through a template,
an image folder without captions (unconditional), a hub dataset name, or webdataset tar shards (the last two
also streamed, into the latent cache of `latent_cache.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate.state import GradientState
from accelerate.utils import gather_object
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from .buckets import (
    BucketAssignment,
    assign_buckets,
    bucket_sizes,
    crop_box,
    merge_small_buckets,
    read_dimensions,
    row_seed,
)
from .config import Config, DataConfig, stage_settings

logger = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class DataError(ValueError):
    """A problem with the training data that the user must fix."""


def _open_source(data: DataConfig):
    if data.image_folder:
        root, key = Path(data.image_folder), data.image_folder_key
        if not root.is_dir():
            raise DataError(f"{key}: {root} does not exist or is not a directory")
        check_metadata(root)
        try:
            # Split folders (train/, test/ ...): let datasets find them. Otherwise one pattern: finding
            # splits walks the folder dozens of times (8 s of a 6,000-image folder's 10 s load).
            split_folders = (root / "train").is_dir()
            files = {"data_dir": str(root)} if split_folders else {"data_files": {"train": str(root / "**")}}
            dataset = quietly(datasets.load_dataset, "imagefolder", **files, split="train")
        except (ValueError, FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise DataError(f"{key}: {root} holds no readable images ({error}); "
                            "put .png/.jpg files there (see the README for accepted layouts)") from error
        unused = count_images(root) - len(dataset)
        if unused > 0:  # imagefolder drops images that its metadata file does not list
            logger.warning("%d image file(s) in %s have no row in its metadata file and are not used", unused, root)
    elif data.webdataset:
        files = webdataset_files(data.webdataset)
        dataset = _generated("data.webdataset", quietly, datasets.load_dataset, "webdataset",
                             data_files={"train": files}, split="train", streaming=data.streaming)
    else:
        # A hub id, or a local directory in the hub's layout (parquet shards under data/, as push_to_hub
        # writes them): the same call loads both.
        name = data.dataset_name
        local = Path(name).expanduser()
        if name.startswith((".", "/", "~")) and not local.is_dir():
            raise DataError(f"data.dataset_name: {name} is not a directory; give a hub dataset id or a local "
                            "directory laid out like a hub dataset repo (e.g. data/train-00000-of-00001.parquet)")
        if local.is_dir():
            check_parquet_files(local)
        try:
            dataset = _generated("data.dataset_name", datasets.load_dataset, name, data.dataset_config_name,
                                 split="train", streaming=data.streaming)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise DataError(f"data.dataset_name: {name} holds no data files ({error}); a local dataset keeps "
                            "its train split as parquet shards such as data/train-00000-of-00001.parquet") from error
    return dataset


def _generated(key: str, load, *args, **kwargs):
    """`load(*args, **kwargs)`, with a data file datasets cannot read (a damaged tar shard, say) as one line: datasets
    raises DatasetGenerationError with the file's own error as its cause, and logs the file's name apart."""
    try:
        return load(*args, **kwargs)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = " ".join(str(error.__cause__ or error).split())
        raise DataError(f"{key}: a data file could not be read ({cause}); replace the damaged file with a complete "
                        "copy, or remove it, and run again") from error


def check_parquet_files(root: Path) -> None:
    """Read the footer of each parquet file of a local data set (a few KB each), so that a truncated or damaged file
    is named in one line before anything is written; datasets would stop with a traceback naming no file (or, when
    streaming, fail part-way through the stream)."""
    for path in sorted(root.rglob("*.parquet")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # hidden folders (a hub download's .cache/) are not data: datasets skips them too
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"data.dataset_name: {path} is not a readable parquet file ({' '.join(str(error).split())}"
                            "); replace it with a complete copy, or remove it, and run again") from error


def webdataset_files(patterns: str | list[str]) -> list[str]:
    """The tar shards that `data.webdataset` names: each entry a path or a glob (shards/train-*.tar), sorted."""
    files = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise DataError(f"data.webdataset: {pattern} matches no file; give the tar shards as a path, a glob such "
                            "as shards/train-*.tar, or a list of them")
        for file in matched:
            if file in files:  # it would train twice as often as the others
                raise DataError(f"data.webdataset: {file} is named twice; name each shard once")
            files.append(file)
    return files


def _webdataset_columns(dataset, data: DataConfig):
    """The shards' samples with their image member (png, jpg ...: the one Image column datasets makes) as
    data.image_column and their `txt` member as data.caption_column, unless the shards have a member of that name."""
    features = dataset.features or {}
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(images) != 1:
        held = f"images under several extensions ({', '.join(images)})" if images else "no image members"
        raise DataError(f"data.webdataset: the shards hold {held}; each sample needs one image, e.g. 0001.png with its "
                        "caption 0001.txt, in one format across the shards")
    renames = {images[0]: data.image_column}
    if data.caption_column and data.caption_column not in features and "txt" in features:
        renames["txt"] = data.caption_column
    renames = {old: new for old, new in renames.items() if old != new}
    return dataset.rename_columns(renames) if renames else dataset


def _check_webdataset_samples(batch: dict, data: DataConfig) -> None:
    """Refuse a sample of the shards that lacks its image or (when captions are asked for) its caption: datasets
    gives the missing member None, which would train a caption without its image, or an image unconditionally."""
    members = [(data.image_column, "no image member (<key>.png, .jpg ...); add it, or remove the sample's other "
                                   "files from the shard")]
    if data.caption_column in batch:
        members.append((data.caption_column, "an image and no caption (<key>.txt); add one, or remove the sample, "
                                             "or set data.caption_column: null to train without captions"))
    for column, problem in members:
        for i, value in enumerate(batch[column]):
            if value is None:
                key = batch["__key__"][i]
                raise DataError(f"data.webdataset: {batch['__url__'][i]}: sample {key} has "
                                + problem.replace("<key>", key))


def _check_webdataset_rows(dataset: datasets.Dataset, data: DataConfig) -> None:
    """`_check_webdataset_samples` over a loaded data set: only the null masks are read, and the first sample that
    lacks a member."""
    columns = [name for name in (data.image_column, data.caption_column) if name in dataset.column_names]
    for column in columns:
        missing = np.flatnonzero(dataset.data.column(column).is_null().to_numpy(zero_copy_only=False))
        if len(missing):
            first = dataset.select_columns([*columns, "__key__", "__url__"]).select([int(missing[0])])
            _check_webdataset_samples(first.cast_column(data.image_column, datasets.Image(decode=False))[:1], data)


def _finish_source(dataset, data: DataConfig):
    if data.streaming:
        return _checked_stream(dataset, data)
    if len(dataset) == 0:
        raise DataError(f"the dataset {data.source} is empty; add images")
    if data.webdataset:
        dataset = _webdataset_columns(dataset, data)
        _check_webdataset_rows(dataset, data)
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
    if data.webdataset:
        dataset = _webdataset_columns(dataset, data)
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
    for path in _metadata_files(root):
        seen = {}  # one name per image: the rows themselves are not kept (a large data set has millions)
        for number, row in _metadata_rows(path):
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                raise DataError(f'{path} line {number} has no "file_name"; every row names its image, like '
                                '{"file_name": "0001.png", "text": "a caption"}')
            if name in seen:
                raise DataError(f"{path} lists {name} twice (lines {seen[name]} and {number}); keep one row per "
                                "image")
            seen[name] = number


def _metadata_files(root: Path) -> list[Path]:
    return sorted([*root.rglob("metadata.jsonl"), *root.rglob("metadata.csv")])


def _metadata_rows(path: Path):
    """(line number, row) of a metadata.jsonl / metadata.csv file."""
    text = read_utf8(path)
    if path.suffix == ".csv":
        return enumerate(csv.DictReader(io.StringIO(text)), start=2)
    return _json_lines(path, text)


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from error


def _json_lines(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as error:
                raise DataError(f"{path} line {number} is not a JSON object ({error}); each line "
                                'holds one, like {"file_name": "0001.png", "text": "a caption"}') from error


def count_images(root: Path) -> int:
    """Image files as imagefolder finds them (by extension; hidden and `__*` folders skipped)."""
    return sum(1 for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
               and not any(part.startswith((".", "__")) for part in path.relative_to(root).parts))


UNCONDITIONAL = "none: an unconditional model (every prompt empty)"


def _caption_plan(features, data: DataConfig):
    """(columns read, batch of columns -> captions, where the captions come from) by these rules (None: every
    caption empty):

    - `caption_column` present: its text (None becomes the empty prompt);
    - absent, but a class `label` column: `caption_template` with the class name;
    - absent while other text columns exist: an error, since the column is probably misnamed;
    - absent, and only images: an image folder trains unconditionally (its documented layout; said loudly by
      `_list_source`); a table (a data set, webdataset shards) is refused unless `caption_column: null` asks for
      that, since a table without its caption column is far more often a mistake.
    """
    column = data.caption_column
    if column is None:
        return [], None, UNCONDITIONAL
    if column in features:
        source = f"column `{column}`" if not data.webdataset else "each sample's caption member (<key>.txt)"
        return [column], lambda batch: [text if isinstance(text, str) else "" for text in batch[column]], source
    label = features.get("label")
    text_columns = [name for name, feature in features.items() if not name.startswith("__")
                    and isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]
    if text_columns:
        raise DataError(f"data.caption_column: {column!r} is not a column of the dataset; "
                        f"text columns are {text_columns}; set data.caption_column to one of them")
    if isinstance(label, datasets.ClassLabel):
        names = [name.replace("_", " ") for name in label.names]
        return (["label"], lambda batch: [data.caption_template.format(label=names[i]) for i in batch["label"]],
                f"class folders, as `{data.caption_template}`")
    if not data.image_folder:
        raise DataError(f"data.caption_column: {column!r} is not a column of {data.source} (columns: "
                        f"{[name for name in features if not name.startswith('__')]}) and no other column holds "
                        "text: it would train a model that ignores its prompts. Name the caption column in "
                        "data.caption_column, or set data.caption_column: null to train unconditionally")
    return [], None, UNCONDITIONAL


def caption_rule(features, data: DataConfig):
    """(columns read, batch of columns -> captions): see `_caption_plan`."""
    return _caption_plan(features, data)[:2]


def captions_of(dataset, data: DataConfig) -> tuple[list[str], str]:
    """(one caption per row, where they come from; see `_caption_plan`); a streamed data set is read once, its caption
    column only (webdataset shards: also each sample's name and image, to refuse a sample that lacks a member)."""
    if isinstance(dataset, datasets.IterableDataset):
        columns, rule, source = _caption_plan(dataset.features or {data.caption_column: datasets.Value("string")},
                                              data)
        read = columns or [data.image_column]
        if data.webdataset:
            read = [data.image_column, *columns, "__key__", "__url__"]
        captions = []
        try:
            for batch in dataset.select_columns(read).iter(batch_size=1000):
                if data.webdataset:
                    _check_webdataset_samples(batch, data)
                captions += rule(batch) if rule else [""] * len(next(iter(batch.values())))
        except pa.ArrowException as error:  # a parquet file damaged past its footer, found as the stream reaches it
            raise DataError(f"reading {data.source} as a stream failed ({' '.join(str(error).split())}); replace the "
                            "damaged file with a complete copy, or remove it, and run again") from error
        if not captions:
            raise DataError(f"the dataset {data.source} is empty; add images")
        return captions, source
    columns, rule, source = _caption_plan(dataset.features, data)
    return (rule({name: dataset[name] for name in columns}) if rule else [""] * len(dataset)), source


def with_caption_files(dataset: datasets.Dataset, captions: list[str], source: str, data: DataConfig):
    """(captions, where they come from, a warning or None) with each image's caption file
    (`<name><data.caption_extension>` beside it, kohya's layout) in place of its class-folder template or empty
    prompt. An image captioned both by a file and by a metadata row is refused, naming both; a caption file that is
    not UTF-8 is refused, naming it."""
    extension = data.caption_extension
    if extension.lower() in IMAGE_EXTENSIONS:
        raise DataError(f"data.caption_extension: {extension} is an image extension; caption files are text, e.g. "
                        ".txt or .caption")
    written = dataset[data.caption_column] if source.startswith("column") else None  # the metadata captions
    captions, found, uncaptioned = list(captions), 0, []
    for row, value in enumerate(dataset[data.image_column]):
        image = Path(value["path"])
        file = image.with_suffix(extension)
        if not file.is_file():
            if source == UNCONDITIONAL:
                uncaptioned.append(image)
            continue
        if written is not None and written[row] is not None:
            raise DataError(f"{image} has two captions: {file} and {_metadata_row(Path(data.image_folder), image)}"
                            f"; keep one of them")
        # One line, as a prompt is; without the byte-order mark some Windows editors write first.
        captions[row] = " ".join(read_utf8(file).removeprefix("\ufeff").split())
        found += 1
    if not found:
        example = Path(dataset[0][data.image_column]["path"]).with_suffix(extension)
        raise DataError(f"data.caption_extension: {extension}, but no image in {data.image_folder} has a caption "
                        f"file beside it (e.g. {example}); check the extension, or remove data.caption_extension")
    warning = None
    if uncaptioned:
        warning = (f"{len(uncaptioned)} of {len(captions)} images have no caption file (e.g. {uncaptioned[0].name} has "
                   f"no {uncaptioned[0].with_suffix(extension).name}): they train with the empty prompt")
    files = f"`{extension}` files beside the images"
    if found < len(captions):
        files += f" ({found} of {len(captions)}; the others: {source})"
    return captions, files, warning


def _metadata_row(root: Path, image: Path) -> str:
    """Where a metadata file under `root` captions `image` ("<root>/metadata.jsonl line 3"), for a message."""
    for path in _metadata_files(root):
        for number, row in _metadata_rows(path):
            if (path.parent / row["file_name"]).resolve() == image.resolve():
                return f"{path} line {number}"
    return "its metadata row"


@dataclass(frozen=True)
class TagRule:
    """How a training sample reshapes its comma-separated caption ("1girl, red hair, smiling"): the first `keep`
    tags stay in place, the others are shuffled (`shuffle`) and each dropped with probability `dropout`.

    The draws come from (seed, epoch, row) alone, hashed as the loop's per-sample generators are: a sample sees the
    same tags whichever process draws it, at any process count and after a resume, and other tags every epoch."""

    seed: int
    shuffle: bool
    keep: int
    dropout: float

    def apply(self, caption: str, epoch: int, row: int) -> str:
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[:self.keep], tags[self.keep:]
        key = hashlib.blake2b(f"tags/{self.seed}/{epoch}/{row}".encode(), digest_size=8).digest()
        draws = random.Random(int.from_bytes(key, "little"))
        if self.shuffle:
            draws.shuffle(rest)
        if self.dropout:
            rest = [tag for tag in rest if draws.random() >= self.dropout]
        return ", ".join(tag for tag in kept + rest if tag)


def tag_rule(config: Config) -> TagRule | None:
    data = config.data
    if not data.shuffle_tags and not data.tag_dropout:
        return None
    return TagRule(seed=config.seed, shuffle=data.shuffle_tags, keep=data.keep_tokens, dropout=data.tag_dropout)


class Captions(list):
    """The captions, one per row, as written (everything that reads captions reads these: the tokenizer, the cache
    key, the prompts offered by the demo), with `tags`: how a training sample reshapes them (None: it does not).
    `TokenIds` applies `tags` when it tokenizes a training sample's caption."""

    def __init__(self, captions=(), tags: TagRule | None = None):
        super().__init__(captions)
        self.tags = tags


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


def mask_file(value, data: DataConfig) -> Path | None:
    """The image's mask in data.mask_dir: the file of the same name, with any image extension (None: none there)."""
    if data.mask_dir is None or not isinstance(value, dict) or not value.get("path"):
        return None
    stem = Path(value["path"]).stem
    found = [path for path in sorted(Path(data.mask_dir).glob(f"{glob.escape(stem)}.*"))
             if path.suffix.lower() in IMAGE_EXTENSIONS]
    return found[0] if found else None


def open_mask(value, data: DataConfig) -> Image.Image:
    """The image's training mask, 8-bit greyscale (white trains, black is ignored): its file in data.mask_dir, else
    its own alpha channel. A missing mask, one of another size than its image, or an all-black one is refused by
    name: each would train on something other than the user meant."""
    path = mask_file(value, data)
    where = (value.get("path") if isinstance(value, dict) else None) or "an image"
    if path is not None:
        with Image.open(path) as image:
            mask = image.convert("L")
        with Image.open(value["path"]) as image:
            size = image.size
        if mask.size != size:
            raise DataError(f"{path} is {mask.size[0]}x{mask.size[1]} px but its image {where} is {size[0]}x{size[1]} "
                            "px; give each image a mask of its own size")
    else:
        source = value if isinstance(value, Image.Image) else Image.open(
            io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        if "A" not in source.getbands() and not (source.mode == "P" and "transparency" in source.info):
            raise DataError(f"data.masked_loss: {where} has no alpha channel and no mask file in data.mask_dir "
                            f"({data.mask_dir}); give it one, or set data.masked_loss: false")
        mask = source.convert("RGBA").getchannel("A")
    if mask.getextrema()[1] == 0:
        raise DataError(f"the mask of {where} ({path or 'its alpha channel'}) is all black: nothing of the image "
                        "would train; fix the mask or remove the image")
    return mask


BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_or_note(value, row: int, bad: list) -> Image.Image | None:
    """The image of `value`, or None after noting (row, reason) in `bad` when it fails to decode."""
    try:
        return open_rgb(value)
    except BAD_IMAGE_ERRORS as error:
        where = value.get("path") if isinstance(value, dict) else None
        bad.append((row, f"{where or 'row ' + str(row)}: {error}"))
        return None


def header_or_note(value, row: int, bad: list) -> None:
    """Open the image without decoding its pixels (~0.03 ms a file; 0.3 ms for a 512 px PNG, whose chunk checksums
    `verify` reads) and note (row, reason) in `bad` when that fails: not an image, an unknown format, a decompression
    bomb, and for PNG a damaged or truncated file. What only decoding finds (a truncated JPEG) is found where the
    image is first decoded."""
    try:
        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]) as image:
            image.verify()
    except BAD_IMAGE_ERRORS as error:
        bad.append((row, f"{value.get('path') or 'row ' + str(row)}: {error}"))


def find_bad_images(dataset: datasets.Dataset, image_column: str, start: int = 0, stop: int | None = None,
                    show_progress: bool = True, decode: bool = True) -> list[tuple[int, str]]:
    """(row, reason) for every image of rows [start, stop) that fails to decode (or, with `decode` off, to open: see
    `header_or_note`); read in batches, so only a batch of image bytes is in memory at a time."""
    stop = len(dataset) if stop is None else stop
    bad, row = [], start
    check = decode_or_note if decode else header_or_note
    bar = tqdm(total=stop - start, desc="checking images" if decode else "checking image headers",
               disable=None if show_progress else True, leave=False)
    for batch in dataset.select_columns([image_column]).select(range(start, stop)).iter(batch_size=256):
        for value in batch[image_column]:
            check(value, row, bad)
            row += 1
        bar.update(len(batch[image_column]))
    bar.close()
    return bad


def bad_image_error(bad: list[tuple[int, str]], data: DataConfig, problem: str = "failed to decode",
                    listed_in: Path | None = None, warn: bool = True) -> DataError | None:
    """The error to raise for these images, or None (after one warning line) to skip them."""
    listing = "; ".join(reason for _, reason in bad[:3]) + (" ..." if len(bad) > 3 else "")
    if not data.skips_bad_images:
        return DataError(f"{len(bad)} image(s) {problem} ({listing}); remove or fix them, or set "
                         "data.skip_bad_images: true to train without them")
    if warn:
        logger.warning("skipping %d image(s) that %s: %s%s", len(bad), problem, listing,
                       f" (each listed with its reason in {listed_in})" if listed_in else "")
    return None


def drop_bad_images(dataset: datasets.Dataset, captions: list[str], data: DataConfig, accelerator=None,
                    decode: bool = True, listed_in: Path | None = None):
    """(dataset, captions, the bad images' reasons) without the images that fail to decode (with `decode` off: to
    open): each process checks its contiguous share of the rows, and the (few) bad rows are gathered, so no process
    reads the whole data set."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    rows = len(dataset)
    bad = find_bad_images(dataset, data.image_column, rows * rank // world, rows * (rank + 1) // world,
                          show_progress=rank == 0, decode=decode)
    if world > 1:
        bad = sorted(gather_object(bad))
    if not bad:
        return dataset, captions, []
    if "__url__" in dataset.column_names:  # webdataset: the image's path is its member's name; name its shard too
        shards = dataset.select_columns(["__url__"]).select([row for row, _ in bad])["__url__"]
        bad = [(row, f"{shard}: {reason}") for (row, reason), shard in zip(bad, shards)]
    problem = "failed to decode" if decode else "cannot be opened as images"
    error = bad_image_error(bad, data, problem, listed_in, warn=rank == 0)
    if error:
        raise error
    keep = np.ones(rows, dtype=bool)
    keep[[row for row, _ in bad]] = False
    if not keep.any():
        raise DataError(f"every image in the dataset {problem}; nothing to train on")
    kept = np.flatnonzero(keep)
    return dataset.select(kept), [captions[i] for i in kept], [reason for _, reason in bad]


def square_box(width: int, height: int, resolution: int, center_crop: bool):
    """((resized width, resized height), (left, top)): the short side resized to `resolution`, then a square crop
    at the centre or at a random place."""
    if min(width, height) != resolution:
        scale = resolution / min(width, height)
        width, height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if center_crop:
        return (width, height), ((width - resolution) // 2, (height - resolution) // 2)
    return (width, height), (random.randint(0, width - resolution), random.randint(0, height - resolution))


def placed(image: Image.Image, resized: tuple[int, int], corner: tuple[int, int], size: tuple[int, int],
           flip: bool, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """`image` resized to `resized` (width, height), cropped to `size` (width, height) at `corner` (left, top), and
    mirrored left-right when `flip`."""
    if resized != image.size:
        image = image.resize(resized, resample)
    image = image.crop((corner[0], corner[1], corner[0] + size[0], corner[1] + size[1]))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
                    mask: Image.Image | None = None):
    """Resize the short side to `resolution`, crop a square, map to [-1, 1]: (3, R, R); with a `mask`, also the
    mask cut the same way, (1, R, R) in [0, 1]."""
    resized, corner = square_box(*image.size, resolution, center_crop)
    pixels = to_pixels(placed(image, resized, corner, (resolution, resolution), flip))
    if mask is None:
        return pixels
    return pixels, mask_tensor(placed(mask, resized, corner, (resolution, resolution), flip))


def square_pixels(image: Image.Image, resolution: int, center_crop: bool, flip: bool = False,
                  mask: Image.Image | None = None) -> dict[str, torch.Tensor]:
    """`image_to_tensor` as a training item: "pixel_values" (3, R, R), the image's "original_size" (height, width) and
    the crop's "crop_top_left" (top, left) in the resized image (SDXL's micro-conditioning reads both), and with a
    `mask` the "mask" (1, R, R) cut the same way."""
    resized, corner = square_box(*image.size, resolution, center_crop)
    square = (resolution, resolution)
    item = {"pixel_values": to_pixels(placed(image, resized, corner, square, flip)),
            "original_size": torch.tensor((image.height, image.width)),
            "crop_top_left": torch.tensor((corner[1], corner[0]))}
    if mask is not None:
        item["mask"] = mask_tensor(placed(mask, resized, corner, square, flip))
    return item


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) in [0, 1] of an 8-bit greyscale mask."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None]


def bucketed_pixels(image: Image.Image, bucket: tuple[int, int], row: int, data: DataConfig, seed: int,
                    flip: bool = False, mask: Image.Image | None = None) -> dict[str, torch.Tensor]:
    """The row's image placed in its `bucket` (height, width) ("pixel_values", (3, h, w)), with its original (height,
    width) and the crop's (top, left): the crop is the centre, or one drawn from the row's own seed, the same every
    epoch. With a `mask`, also the mask placed alike ("mask", (1, h, w))."""
    height, width = bucket
    resized, corner = crop_box(*image.size, (height, width), data.center_crop, row_seed(seed, row, "crop"))
    item = {"pixel_values": to_pixels(placed(image, resized, corner, (width, height), flip)),
            "original_size": torch.tensor((image.height, image.width)),
            "crop_top_left": torch.tensor((corner[1], corner[0]))}
    if mask is not None:
        item["mask"] = mask_tensor(placed(mask, resized, corner, (width, height), flip))
    return item


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
    would grow with it (77 x 8 bytes a row). `ids.sample(row, epoch)`: those of the caption a training sample sees
    in that epoch, its tags reshaped when the captions carry a `TagRule`."""

    def __init__(self, tokenizer, captions: list[str]):
        self.tokenizer, self.captions = tokenizer, captions

    def __getitem__(self, row: int) -> torch.Tensor:
        return tokenize(self.tokenizer, [self.captions[row]], warn=False)[0]

    def sample(self, row: int, epoch: int) -> torch.Tensor:
        tags = getattr(self.captions, "tags", None)
        caption = self.captions[row] if tags is None else tags.apply(self.captions[row], epoch, row)
        return tokenize(self.tokenizer, [caption], warn=False)[0]


def loader_epoch(dataset) -> int | None:
    """The epoch of the Accelerate data loader that is drawing from `dataset` now, or None when it is read outside
    one (the held-out set, read at validation, keeps its captions as written, so its loss compares like with like).

    The epoch is the loader's `iteration`: the training loop sets it with `set_epoch`, and `skip_first_batches` copies
    it on a resume. A data set's own `set_epoch` would not do: Accelerate calls it only when one process runs (on
    several, `DataLoaderShard.set_epoch` gives the epoch to the distributed sampler instead)."""
    loader = GradientState().active_dataloader
    return loader.iteration if loader is not None and getattr(loader, "dataset", None) is dataset else None


class ImageTextDataset(torch.utils.data.Dataset):
    """Rows of a `datasets` dataset as {"pixel_values": (3, R, R), "input_ids": (L,), "original_size": (2,),
    "crop_top_left": (2,)} (see `square_pixels`); with bucket `buckets` (data.buckets) each image at its bucket's size
    (see `bucketed_pixels`; `seed` draws the crops). SDXL's second tokenizer's ids (`input_ids_2`) as "input_ids_2"."""

    def __init__(self, dataset, input_ids, data: DataConfig, resolution: int, indices=None,
                 buckets: BucketAssignment | None = None, seed: int = 0, input_ids_2=None):
        self.dataset, self.input_ids, self.data, self.resolution = dataset, input_ids, data, resolution
        self.input_ids_2 = input_ids_2
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.buckets, self.seed = buckets, seed
        self.copied_in_epoch = None

    def __len__(self):
        return len(self.indices)

    def __getstate__(self):
        # A DataLoader worker started by spawn or forkserver gets a pickled copy, made as its loader starts the epoch,
        # and no Accelerate state of its own: the copy keeps that epoch. (A forked worker reads its copy of the state.)
        return {**self.__dict__, "copied_in_epoch": loader_epoch(self)}

    def __getitem__(self, i):
        epoch = loader_epoch(self)
        return self.item(i, self.copied_in_epoch if epoch is None else epoch)

    def item(self, i: int, epoch: int | None, bucket: tuple[int, int] | None = None) -> dict:
        """Position `i` as a training sample of `epoch` (None: read outside the loader), placed in `bucket` (height,
        width) when given, else in its own bucket (data.buckets) or the `resolution` square."""
        row = self.indices[i]
        value = self.dataset[row][self.data.image_column]
        image = open_rgb(value)
        mask = open_mask(value, self.data) if self.data.masked_loss else None
        flip = self.data.random_flip and random.random() < 0.5
        if bucket is None and self.buckets is not None:
            bucket = self.buckets.sizes[self.buckets.bucket[row]]
        if bucket is not None:
            item = bucketed_pixels(image, bucket, row, self.data, self.seed, flip, mask)
        else:
            item = square_pixels(image, self.resolution, self.data.center_crop, flip, mask)
        for key, ids in (("input_ids", self.input_ids), ("input_ids_2", self.input_ids_2)):
            if ids is not None:
                item[key] = ids.sample(row, epoch) if isinstance(ids, TokenIds) and epoch is not None else ids[row]
        return item

    def bucket_of(self) -> np.ndarray | None:
        """Each position's bucket, for the sampler that batches one bucket at a time (None: no buckets)."""
        return None if self.buckets is None else self.buckets.bucket[np.asarray(self.indices, dtype=np.int64)]


def split_heldout(num_rows: int, num_heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, heldout) split of row indices; at most a fifth of the data is held out."""
    num_heldout = min(num_heldout, num_rows // 5)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_heldout:]), sorted(order[:num_heldout])


@dataclass
class TrainData:
    dataset: datasets.Dataset | datasets.IterableDataset  # iterable when data.streaming
    captions: list[str]  # a `Captions` when loaded by `load_train_data`
    fingerprint: str  # identifies the data files, for the latent cache key
    checked: bool = True  # every image was decoded once (bad ones dropped or refused)
    caption_source: str = ""  # where the captions come from, for the model card ("column `text`", ...)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each image left out (data.skip_bad_images)
    buckets: BucketAssignment | None = None  # each row's aspect-ratio bucket (data.buckets)
    prior: TrainData | None = None  # DreamBooth: the class images (data.class_data_dir), captioned data.class_prompt

    @property
    def num_rows(self) -> int:
        return len(self.captions)


def data_fingerprint(dataset, data: DataConfig, num_rows: int) -> str:
    """Local folders and shards: every file's path, size and mtime. Hub datasets: datasets' own fingerprint."""
    digest = hashlib.sha256()
    root = Path(data.image_folder or data.dataset_name or ".").expanduser()
    if data.webdataset:
        for name in webdataset_files(data.webdataset):
            stat = os.stat(name)
            digest.update(f"{os.path.abspath(name)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    elif data.image_folder or (data.streaming and root.is_dir()):
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
    if data.image_folder and "fork" in multiprocessing.get_all_start_methods():
        dataset, captions, fingerprint, source, warnings = _list_folder_in_child(data)
    else:
        _, dataset, captions, fingerprint, source, warnings = _list_source(data)
    for warning in warnings:  # said here: a forked child's log records would not reach this process's handlers
        logger.warning(warning)
    train = TrainData(dataset=dataset, captions=Captions(captions, tag_rule(config)), fingerprint=fingerprint,
                      checked=False, caption_source=source)
    return check_train_images(train, data, accelerator) if check_images else train


def _list_source(data: DataConfig):
    """(the source as opened, the dataset to train on, its captions, its fingerprint, where its captions come from,
    warnings to give)."""
    opened = _open_source(data)
    dataset = _finish_source(opened, data)
    captions, source = captions_of(dataset, data)
    if data.instance_prompt is not None:  # DreamBooth: every picture of the subject (or of its class) captioned alike
        captions, source = [data.instance_prompt] * len(dataset), f"`{data.instance_prompt}` for every picture"
    warnings = []
    if data.caption_extension:
        captions, source, warning = with_caption_files(dataset, captions, source, data)
        warnings += [warning] if warning else []
    if source == UNCONDITIONAL and data.caption_column is not None:
        hint = "" if data.caption_extension or next(Path(data.image_folder).rglob("*.txt"), None) is None else \
            " (its .txt files are captions with data.caption_extension: .txt)"
        warnings.append(f"no captions in {data.source} (no metadata.jsonl or metadata.csv, no class folders"
                        f"{', no caption files' if data.caption_extension else ''}): training a model that ignores "
                        f"its prompts; add captions{hint}, or set data.caption_column: null to say so")
    return opened, dataset, captions, data_fingerprint(dataset, data, len(captions)), source, warnings


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
        raise DataError(f"listing {data.image_folder_key} {data.image_folder} stopped (exit code {child.exitcode}); "
                        "run again, or check the folder can be read") from None
    child.join()
    if outcome == "error":
        is_data_error, message = result
        raise DataError(message) if is_data_error else RuntimeError(f"loading {data.image_folder}: {message}")
    files, captions, fingerprint, source, warnings = result
    dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(name) for name in files])
    return _finish_source(dataset, data), captions, fingerprint, source, warnings


def _send_listing(data: DataConfig, sender) -> None:
    try:
        opened, _, captions, fingerprint, source, warnings = _list_source(data)
        if not opened.cache_files:
            raise DataError(f"datasets kept the listing of {data.image_folder} in memory, not in its cache; "
                            "set HF_DATASETS_CACHE to a writable directory")
        sender.send(("ok", [entry["filename"] for entry in opened.cache_files], captions, fingerprint, source,
                     warnings))
    except Exception as error:  # every failure goes back to the parent, which raises it
        message = str(error) if isinstance(error, DataError) else traceback.format_exc()
        sender.send(("error", isinstance(error, DataError), message))
    finally:
        sender.close()


def check_train_images(train: TrainData, data: DataConfig, accelerator=None, decode: bool = True,
                       listed_in: Path | None = None) -> TrainData:
    """`train` without its undecodable images (with `decode` off: those that cannot even be opened, a check of the
    file headers), or an error naming them; each process checks its share. `listed_in`: the file the caller writes
    the skipped images to, named in the warning."""
    if train.checked or data.streaming:
        return train
    dataset, captions, skipped = drop_bad_images(train.dataset, train.captions, data, accelerator, decode, listed_in)
    captions = Captions(captions, getattr(train.captions, "tags", None))
    return dataclasses.replace(train, dataset=dataset, captions=captions, checked=decode,
                               skipped=train.skipped + skipped)


MAX_ENLARGEMENT = 2.0  # an image is enlarged at most this much per side to cover its bucket; smaller is too small


def with_buckets(train: TrainData, config: Config, num_processes: int, listed_in: Path | None = None):
    """(`train` with each row's aspect-ratio bucket, what --dry-run says of small buckets merged away). Sizes come
    from the file headers. An image that would have to be enlarged more than MAX_ENLARGEMENT per side to cover its
    bucket is refused by name (or skipped and listed with data.skip_bad_images)."""
    data = config.data
    sizes = bucket_sizes(data.buckets, config.resolution)
    assignment = assign_buckets(sizes, read_dimensions(train.dataset, data.image_column))
    targets = np.asarray(sizes, dtype=np.float64)[assignment.bucket]  # (N, 2) each row's bucket (height, width)
    enlargement = (targets / assignment.original).max(axis=1)
    small = np.flatnonzero(enlargement > MAX_ENLARGEMENT)
    skipped = []
    if len(small):
        names = train.dataset.select_columns([data.image_column]).select(small)[data.image_column]
        bad = [(int(row), f"{(value or {}).get('path') or f'row {row}'}: {width}x{height} px, too small for its "
                f"{target_h}x{target_w} bucket (it would be enlarged {factor:.1f}x)")
               for row, value, (height, width), (target_h, target_w), factor in zip(
                   small, names, assignment.original[small], targets[small].astype(int), enlargement[small])]
        error = bad_image_error(bad, data, f"are too small for any bucket (enlarged more than {MAX_ENLARGEMENT:g}x)",
                                listed_in)
        if error:
            raise DataError(f"{error}; or lower data.buckets.min_side / data.buckets.area")
        keep = np.setdiff1d(np.arange(train.num_rows), small)
        skipped = [reason for _, reason in bad]
        train = dataclasses.replace(train, dataset=train.dataset.select(keep),
                                    captions=Captions([train.captions[i] for i in keep],
                                                      getattr(train.captions, "tags", None)))
        assignment = BucketAssignment(sizes, assignment.bucket[keep], assignment.original[keep])
    windows = [stage_settings(config, name) for name in config.stages]
    window = max(stage.train_batch_size * num_processes * stage.gradient_accumulation_steps for stage in windows)
    assignment, notes = merge_small_buckets(assignment, window)
    return dataclasses.replace(train, buckets=assignment, skipped=train.skipped + skipped), notes
