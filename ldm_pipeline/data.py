"""Data: `datasets` sources, caption rules, image transforms, the held-out split, the latent cache.

Every source goes through `datasets.load_dataset`: an image folder with `metadata.jsonl`
captions, an image folder whose class subfolders become captions through a template, an image
folder without captions (unconditional), or a hub dataset name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageFile
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Config, DataConfig

logger = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class DataError(ValueError):
    """A problem with the training data that the user must fix."""


def load_source(data: DataConfig) -> datasets.Dataset:
    """The configured dataset, images left undecoded (decoding happens in our own transform)."""
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
            dataset = datasets.load_dataset(name, data.dataset_config_name, split="train")
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise DataError(f"data.dataset_name: {name} holds no data files ({error}); a local dataset keeps "
                            "its train split as parquet shards such as data/train-00000-of-00001.parquet") from error
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
            rows = list(enumerate(csv.DictReader(io.StringIO(text)), start=2))
        else:
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except ValueError as error:
                        raise DataError(f"{path} line {number} is not a JSON object ({error}); each line "
                                        'holds one, like {"file_name": "0001.png", "text": "a caption"}') from error
        seen = {}
        for number, row in rows:
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                raise DataError(f'{path} line {number} has no "file_name"; every row names its image, like '
                                '{"file_name": "0001.png", "text": "a caption"}')
            if name in seen:
                raise DataError(f"{path} lists {name} twice (lines {seen[name]} and {number}); keep one row per "
                                "image")
            seen[name] = number


def _count_images(root: Path) -> int:
    """Image files as imagefolder finds them (by extension; hidden and `__*` folders skipped)."""
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    return sum(1 for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
               and not any(part.startswith((".", "__")) for part in path.relative_to(root).parts))


def captions_of(dataset: datasets.Dataset, data: DataConfig) -> list[str]:
    """One caption per row, by these rules:

    - `caption_column` present: its text (None becomes the empty prompt);
    - absent, but a class `label` column: `caption_template` with the class name;
    - absent, and only images: unconditional training, every prompt empty;
    - absent while other text columns exist: an error, since the column is probably misnamed.
    """
    columns = dataset.column_names
    if data.caption_column is None:
        return [""] * len(dataset)
    if data.caption_column in columns:
        return [text if isinstance(text, str) else "" for text in dataset[data.caption_column]]
    label = dataset.features.get("label")
    text_columns = [name for name, feature in dataset.features.items()
                    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]
    if text_columns:
        raise DataError(f"data.caption_column: {data.caption_column!r} is not a column of the dataset; "
                        f"text columns are {text_columns}; set data.caption_column to one of them")
    if isinstance(label, datasets.ClassLabel):
        names = [name.replace("_", " ") for name in label.names]
        return [data.caption_template.format(label=names[i]) for i in dataset["label"]]
    logger.warning("no captions found in the dataset: training unconditionally (empty prompts)")
    return [""] * len(dataset)


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


def find_bad_images(dataset: datasets.Dataset, image_column: str) -> list[tuple[int, str]]:
    """(row, reason) for every image that fails to decode; one full pass over the data."""
    bad = []
    for row, value in enumerate(tqdm(dataset[image_column], desc="checking images", disable=None, leave=False)):
        try:
            open_rgb(value)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            bad.append((row, f"{value.get('path') or 'row ' + str(row)}: {error}"))
    return bad


def drop_bad_images(dataset: datasets.Dataset, captions: list[str], data: DataConfig):
    bad = find_bad_images(dataset, data.image_column)
    if not bad:
        return dataset, captions
    listing = "; ".join(reason for _, reason in bad[:3]) + (" ..." if len(bad) > 3 else "")
    if data.on_bad_image == "error":
        raise DataError(f"{len(bad)} image(s) failed to decode ({listing}); remove or fix them, or set "
                        "data.on_bad_image: skip to train without them")
    logger.warning("skipping %d image(s) that failed to decode: %s", len(bad), listing)
    keep = sorted(set(range(len(dataset))) - {row for row, _ in bad})
    if not keep:
        raise DataError("every image in the dataset failed to decode; nothing to train on")
    return dataset.select(keep), [captions[i] for i in keep]


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


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, model_max_length) ids; longer captions are cut, with one warning for all of them."""
    max_length = tokenizer.model_max_length
    # verbose=False: transformers' own too-long warning would repeat ours, and only for the first caption.
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
    too_long = sum(length > max_length for length in lengths)
    if too_long:
        logger.warning("%d caption(s) are longer than the tokenizer's %d tokens and were truncated",
                       too_long, max_length)
    ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")["input_ids"]
    return ids


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
    dataset: datasets.Dataset
    captions: list[str]
    fingerprint: str  # identifies the data files, for the latent cache key


def data_fingerprint(dataset: datasets.Dataset, data: DataConfig) -> str:
    """Local folders: every file's path, size and mtime. Hub datasets: datasets' own fingerprint."""
    digest = hashlib.sha256()
    if data.train_data_dir:
        root = Path(data.train_data_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        digest.update(f"{data.dataset_name}\0{data.dataset_config_name}\0{dataset._fingerprint}".encode())
    digest.update(f"{data.max_train_samples}\0{len(dataset)}".encode())
    return digest.hexdigest()[:16]


def load_train_data(config: Config) -> TrainData:
    data = config.data
    dataset = load_source(data)
    captions = captions_of(dataset, data)
    fingerprint = data_fingerprint(dataset, data)
    dataset, captions = drop_bad_images(dataset, captions, data)
    return TrainData(dataset=dataset, captions=captions, fingerprint=fingerprint)


# --- latent cache -------------------------------------------------------------------------------


def weights_hash(module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(config: Config, train: TrainData, vae, text_encoder, tokenizer) -> dict:
    """Everything the cached tensors depend on; a cache whose key differs is stale."""
    captions = hashlib.sha256("\n".join(train.captions).encode()).hexdigest()[:16]
    return {
        "vae": weights_hash(vae),
        "data": train.fingerprint,
        "resolution": config.resolution,
        "center_crop": config.data.center_crop,
        "random_flip": config.data.random_flip,
        "text_encoder": weights_hash(text_encoder),
        "captions": captions if text_encoder is not None else None,
        "tokenizer": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]
        if text_encoder is not None else None,
    }


class LatentDataset(torch.utils.data.Dataset):
    """Cached rows: latent distribution (mean, std) of each image (and of its mirror image when
    random flips are on: the VAE is not flip-equivariant, so we encode both orientations rather
    than flipping latents), the caption's ids, and its text-encoder output when that is frozen."""

    def __init__(self, tensors: dict, input_ids: torch.Tensor, indices, random_flip: bool):
        self.tensors, self.input_ids, self.indices, self.random_flip = tensors, input_ids, list(indices), random_flip

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.indices[i]
        side = int(self.random_flip and random.random() < 0.5)
        item = {
            "latent_mean": self.tensors["latent_mean"][row, side].float(),
            "latent_std": self.tensors["latent_std"][row, side].float(),
            "input_ids": self.input_ids[row],
        }
        if "prompt_embeds" in self.tensors:
            item["prompt_embeds"] = self.tensors["prompt_embeds"][self.tensors["caption_index"][row]].float()
        return item


def _encode_rows(accelerator, rows: list[int], encode, batch_size: int, desc: str) -> torch.Tensor:
    """encode(list_of_rows) -> tensor, over this process's share of rows; gathered on every rank."""
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(rows) as mine:
        pieces = []
        for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not accelerator.is_main_process):
            pieces.append(encode(mine[start:start + batch_size]).cpu())
        local = torch.cat(pieces) if pieces else None
    gathered = [piece for piece in gather_object([local]) if piece is not None]
    return torch.cat(gathered)


def _unreadable_cache(cache_dir: Path, path: Path, error: Exception) -> DataError:
    return DataError(f"the latent cache at {cache_dir} is damaged: {path.name} cannot be read "
                     f"({' '.join(str(error).split())}). Delete that directory to rebuild it")


def check_cache_shapes(cache_dir: Path, tensors: dict, config: Config, rows: int, vae, text_encoder) -> None:
    """The key says what a cache was built from; the shapes say that its tensors are the ones built then
    (a latents file copied in from another run has another number of rows, or another latent size)."""
    from .models import vae_scale_factor

    side = config.resolution // vae_scale_factor(vae)
    latent = (rows, 2 if config.data.random_flip else 1, vae.config.latent_channels, side, side)
    expected = {"latent_mean": latent, "latent_std": latent}
    if text_encoder is not None:
        expected["caption_index"] = (rows,)
    wrong = [f"{name} {tuple(tensors[name].shape) if name in tensors else 'missing'} instead of {shape}"
             for name, shape in expected.items() if name not in tensors or tuple(tensors[name].shape) != shape]
    if wrong:
        raise DataError(f"the latent cache at {cache_dir} does not fit this run's {rows} images: "
                        f"{'; '.join(wrong)} (a file from another run?). Delete that directory to rebuild it")


@torch.no_grad()
def build_latent_cache(accelerator, config: Config, train: TrainData, input_ids, vae, text_encoder, tokenizer):
    """Load the cache at `latent_cache_dir` if its key matches, else build it; refuse a stale one.

    Returns the tensors (every rank). Only the main process writes, into a temporary directory
    renamed when complete, so an interrupted build never leaves a cache that looks valid.
    """
    cache_dir = Path(config.data.latent_cache_dir or Path(config.output_dir) / "latent_cache")
    key = cache_key(config, train, vae, text_encoder, tokenizer)
    manifest = cache_dir / "manifest.json"
    if manifest.is_file():
        try:
            stored = json.loads(manifest.read_text())["key"]
        except (ValueError, KeyError, TypeError) as error:
            raise _unreadable_cache(cache_dir, manifest, error) from error
        changed = [name for name in key if stored.get(name) != key[name]]
        if changed:
            raise DataError(
                f"the latent cache at {cache_dir} is stale: it was built with different {', '.join(changed)}. "
                "Delete that directory to rebuild it, or set data.latent_cache_dir to a new path.")
        if accelerator.is_main_process:
            print(f"reusing latent cache {cache_dir}")
        try:
            tensors = load_file(str(cache_dir / "latents.safetensors"))
        except (SafetensorError, OSError) as error:
            raise _unreadable_cache(cache_dir, cache_dir / "latents.safetensors", error) from error
        check_cache_shapes(cache_dir, tensors, config, len(train.dataset), vae, text_encoder)
        return tensors
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise DataError(f"data.latent_cache_dir: {cache_dir} exists but holds no latent cache "
                        "(no manifest.json); point it at a new or empty directory")

    data, resolution = config.data, config.resolution
    sides = (False, True) if data.random_flip else (False,)

    def encode_images(rows):
        pixels = torch.stack([
            torch.stack([image_to_tensor(open_rgb(train.dataset[r][data.image_column]), resolution, True, flip)
                         for flip in sides])
            for r in rows])  # (b, sides, 3, R, R)
        dist = vae.encode(pixels.flatten(0, 1).to(vae.device, vae.dtype)).latent_dist
        moments = torch.stack([dist.mean, dist.std], dim=1).float()  # (b*sides, 2, C, h, w)
        return moments.unflatten(0, (len(rows), len(sides)))

    moments = _encode_rows(accelerator, list(range(len(train.dataset))), encode_images, 32, "caching latents")
    tensors = {"latent_mean": moments[:, :, 0].half().contiguous(), "latent_std": moments[:, :, 1].half().contiguous()}
    if text_encoder is not None:
        unique = sorted(set(train.captions) | {""})
        index = {caption: i for i, caption in enumerate(unique)}
        # Reuse the rows of `input_ids` (any row of a caption will do): no second truncation warning.
        row_of = {caption: row for row, caption in enumerate(train.captions)}
        empty_ids = tokenize(tokenizer, [""])[0]
        unique_ids = torch.stack([input_ids[row_of[c]] if c in row_of else empty_ids for c in unique])

        def encode_text(rows):
            return text_encoder(unique_ids[rows].to(text_encoder.device))[0].float()

        tensors["prompt_embeds"] = _encode_rows(
            accelerator, list(range(len(unique))), encode_text, 64, "caching text embeddings").half()
        tensors["caption_index"] = torch.tensor([index[c] for c in train.captions])
        tensors["empty_prompt_embeds"] = tensors["prompt_embeds"][index[""]].clone()

    if accelerator.is_main_process:
        partial = cache_dir.with_name(cache_dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(tensors, str(partial / "latents.safetensors"))
        (partial / "manifest.json").write_text(json.dumps({"key": key, "rows": len(train.dataset)}, indent=2))
        if cache_dir.exists():
            cache_dir.rmdir()  # empty, checked above
        partial.rename(cache_dir)
        print(f"wrote latent cache {cache_dir} ({len(train.dataset)} images)")
    accelerator.wait_for_everyone()
    return tensors
