"""Aspect-ratio buckets: each image trains at the bucket size nearest its own aspect ratio instead of being cropped
to one square, and every optimizer step's batch comes from one bucket.

- `bucket_sizes` lists the (height, width) sizes: a target pixel area with sides in steps of 64 (8 x the VAE's
  factor), between a minimum and a maximum side and up to a maximum aspect ratio; or the sizes given.
- `assign_buckets` reads each image's size from its file header (nothing is decoded) and picks the bucket nearest
  its aspect ratio; buckets too small for one global batch are merged into their nearest neighbour, so no image is
  dropped (`merge_small_buckets`).
- `crop_box` places an image in its bucket (data.bucketed_pixels applies it): resized to cover the bucket, then
  cropped at the centre or at an offset drawn from the image's own seed (the same every epoch, at any process
  count, in the latent cache and in the loop).
- `BucketSampler` orders an epoch as whole global batches of one bucket each, shuffled from (seed, epoch).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import BucketConfig, ConfigError


def bucket_sizes(buckets: BucketConfig, resolution: int) -> list[tuple[int, int]]:
    """The (height, width) of every bucket, sorted by aspect ratio (width / height)."""
    if buckets.sizes:
        return sorted({(int(h), int(w)) for h, w in buckets.sizes}, key=lambda size: size[1] / size[0])
    area = buckets.area or resolution * resolution
    step = buckets.step
    low, high = buckets.min_side or max(step, resolution // 2), buckets.max_side or 2 * resolution
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)  # the tallest height of the step within the area
        if height >= low and max(width / height, height / width) <= buckets.max_aspect:
            sizes.add((height, width))
    for height, width in list(sizes):
        sizes.add((width, height))  # portrait and landscape alike
    if not sizes:
        raise ConfigError(f"data.buckets: no bucket fits sides {low}-{high} in steps of {step} within an area of "
                          f"{area} pixels and an aspect ratio of {buckets.max_aspect}; widen min_side / max_side or "
                          "give data.buckets.sizes")
    return sorted(sizes, key=lambda size: size[1] / size[0])


def nearest_bucket(sizes: list[tuple[int, int]], width: int, height: int) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's, on a log scale (2:1 and 1:2 are equally
    far from 1:1)."""
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda k: abs(math.log(sizes[k][1] / sizes[k][0]) - ratio))


def header_size(value) -> tuple[int, int]:
    """(width, height) of an undecoded image (a datasets image dict with "path" or "bytes", or a PIL image): PIL
    reads only the file's header until pixels are asked for."""
    if isinstance(value, Image.Image):
        return value.size
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    with Image.open(source) as image:
        return image.size


@dataclass
class BucketAssignment:
    sizes: list[tuple[int, int]]  # (height, width) of each bucket
    bucket: np.ndarray  # (N,) int16: each row's bucket
    original: np.ndarray  # (N, 2) int32: each row's (height, width) as stored

    def counts(self) -> np.ndarray:
        return np.bincount(self.bucket, minlength=len(self.sizes))


def read_dimensions(dataset, image_column: str):
    """Each row's (width, height) from its file header, a batch of rows at a time (no pixels decoded)."""
    for batch in dataset.select_columns([image_column]).iter(batch_size=1024):
        yield from (header_size(value) for value in batch[image_column])


def assign_buckets(sizes: list[tuple[int, int]], dimensions) -> BucketAssignment:
    """Each row's bucket from its (width, height), read from the file headers; memory grows by 10 bytes a row."""
    original, bucket = [], []
    for width, height in dimensions:
        original.append((height, width))
        bucket.append(nearest_bucket(sizes, width, height))
    return BucketAssignment(sizes, np.asarray(bucket, dtype=np.int16).reshape(-1),
                            np.asarray(original, dtype=np.int32).reshape(-1, 2))


def merge_small_buckets(assignment: BucketAssignment, min_images: int) -> tuple[BucketAssignment, list[str]]:
    """Move the images of every bucket holding fewer than `min_images` (one global batch) into the nearest bucket
    by aspect ratio that holds enough, so that none is dropped; returns the new assignment and what was moved."""
    counts, notes = assignment.counts(), []
    keep = [k for k in range(len(assignment.sizes)) if counts[k] >= min_images]
    if not keep:
        raise ConfigError(f"data.buckets: no bucket holds one global batch ({min_images} images); the largest holds "
                          f"{counts.max()}. Use fewer buckets (data.buckets.sizes), a smaller batch, or more data")
    bucket = assignment.bucket.copy()
    for k in range(len(assignment.sizes)):
        if counts[k] and k not in keep:
            h, w = assignment.sizes[k]
            target = min(keep, key=lambda j: abs(math.log(assignment.sizes[j][1] / assignment.sizes[j][0])
                                                 - math.log(w / h)))
            bucket[bucket == k] = target
            notes.append(f"{counts[k]} image(s) of bucket {h}x{w} trained at {assignment.sizes[target][0]}x"
                         f"{assignment.sizes[target][1]}")
    return BucketAssignment(assignment.sizes, bucket, assignment.original), notes


def row_seed(seed: int, row: int, purpose: str) -> int:
    """A seed for one image's own random choices (its crop), the same every epoch and at any process count."""
    key = hashlib.blake2b(f"{seed}/{purpose}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1


def crop_box(width: int, height: int, bucket: tuple[int, int], center: bool, seed: int) -> tuple[tuple[int, int],
                                                                                                 tuple[int, int]]:
    """((resized width, resized height), (crop left, crop top)) that place a width x height image in `bucket`
    (height, width): scaled to cover the bucket, then cropped at the centre or at an offset drawn from `seed`."""
    target_h, target_w = bucket
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    spare_w, spare_h = resized[0] - target_w, resized[1] - target_h
    if center:
        return resized, (spare_w // 2, spare_h // 2)
    generator = torch.Generator().manual_seed(seed)
    left, top = (int(torch.randint(0, spare + 1, (), generator=generator)) for spare in (spare_w, spare_h))
    return resized, (left, top)


class BucketSampler(torch.utils.data.Sampler):
    """Dataset positions ordered as whole windows of `window` images (the global batch of one optimizer step:
    batch per process x processes x accumulation), each window from one bucket: the DataLoader cuts them into
    per-process micro-batches and Accelerate deals those out, so every micro-batch of a step has one shape on
    every process. Each epoch shuffles every bucket and the order of the windows from (seed, epoch); a bucket's
    last images that do not fill a window wait for the next epoch's shuffle."""

    def __init__(self, buckets: np.ndarray, window: int, seed: int):
        self.buckets, self.window, self.seed, self.epoch = np.asarray(buckets), window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def windows(self) -> list[np.ndarray]:
        generator = np.random.default_rng([self.seed, self.epoch])
        windows = []
        labels, first = np.unique(self.buckets, return_index=True)
        for bucket in labels[np.argsort(first)]:  # in order of appearance: the same whatever numbers the buckets
            members = np.flatnonzero(self.buckets == bucket)
            members = members[generator.permutation(len(members))]
            whole = len(members) // self.window * self.window
            windows += list(members[:whole].reshape(-1, self.window))
        return [windows[k] for k in generator.permutation(len(windows))]

    def __iter__(self):
        for window in self.windows():
            yield from window.tolist()

    def __len__(self) -> int:
        counts = np.bincount(self.buckets.astype(np.int64))
        return int(sum(count // self.window * self.window for count in counts))


def bucket_table(assignment: BucketAssignment, window: int, notes: list[str]) -> str:
    """What --dry-run prints: every bucket's size, its images and the optimizer steps it gives an epoch."""
    counts = assignment.counts()
    lines = ["buckets (height x width: images, steps per epoch):"]
    lines += [f"  {h}x{w}: {counts[k]} images, {counts[k] // window} steps" for k, (h, w) in
              enumerate(assignment.sizes) if counts[k]]
    lines += [f"  merged: {note}" for note in notes]
    return "\n".join(lines)
