"""The shapes checker: does an image show the captioned colour, shape and position? It scores `ldm-pipeline
evaluate`, and the VAE's reconstructions during training (the shapes plug-in's reconstruction check).

One filled shape on white or on the dark background (maker.py). Generated images are blurry, noisy and sometimes
washed out, so every step below prefers robust statistics over exact pixels.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import random

import numpy as np
from PIL import Image

from ..config import ConfigError
from ..distributed import process_state
from ..evaluate import vae_psnr
from ..generation import generate
from ..pipeline import load_pipeline
from .maker import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    all_captions,
    balanced_combinations,
    caption,
    draw_shape,
    parse_caption,
)

# A pixel is foreground when one of its channels is this far from the background's. On white every palette
# colour is >= 195 away (purple's green channel), so ~100 puts the mask boundary at ~50% edge coverage: the
# mask then has the shape's true area, which the fit to the ideal shapes below relies on. On the dark background
# the nearest colour is 146 away (green), hence 75. Noise of a few levels never gets near either.
FOREGROUND_THRESHOLD = {"white": 100, "dark": 75}
# Images whose border (the outermost 2 pixels, where no shape reaches) has a median luminance below this are
# read as dark-backgrounded: halfway between the two backgrounds (255 and 24).
DARK_BORDER_LUMINANCE = 128
BORDER = 2
# Components smaller than this fraction of the image are specks, not a shape (the smallest real shape, a
# 30%-side triangle, covers 4.5%).
MIN_FOREGROUND_FRACTION = 0.01
# Below this chroma (max - min channel of the core colour) the foreground is grey and has no meaningful hue.
MIN_CHROMA = 40
# The shape is the ideal circle, square or upright triangle that overlaps the foreground best (intersection
# over union, searched over slight changes of width / height, angle, size and place around the ideal with the
# foreground's area and centroid: a person still calls a slightly narrow or tilted triangle a triangle), if that
# overlap reaches MIN_SHAPE_IOU and the foreground is convex enough (MIN_SOLIDITY: its pixels over those inside
# its convex hull); otherwise the shape is none of them. Calibrated by eye on generated 64 px images and the
# VAE's reconstructions (docs/shapes_recipe.md): drawn shapes fit their own ideal at >= 0.97 and the next-best at
# <= 0.86 (a circle against a square); a four-pointed star fits none above 0.65 and is at solidity 0.67; squares
# with visibly pinched sides are at <= 0.93 solidity, lumpy blobs fit a circle at <= 0.92, while a square whose
# corners a trained VAE's blur rounds near the frame is at 0.925 / 1.0 and the VAE's worst circle at 0.95 / 1.0.
# A triangle's slanted, stepped edges and thin blurred apex cost it more of both measures than a blur costs a
# circle or a square: well-drawn generated and reconstructed triangles are at >= 0.90 / 0.90, triangles with
# hollow sides below.
MIN_SHAPE_IOU = {"circle": 0.93, "square": 0.92, "triangle": 0.88}
MIN_SOLIDITY = {"circle": 0.93, "square": 0.93, "triangle": 0.90}
# width / height: a triangle may be somewhat narrower or wider than tall, a circle or square hardly
FIT_ASPECTS = {"circle": (0.94, 1.0, 1.06), "square": (0.94, 1.0, 1.06), "triangle": (0.85, 0.92, 1.0, 1.08, 1.17)}
FIT_ANGLES = (-8.0, 0.0, 8.0)  # degrees
FIT_SCALES = (0.96, 1.0, 1.04)
FIT_SHIFTS = (-0.5, 0.0, 0.5)  # pixels
IDEAL_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # of its bounding box
# An image is clean when no blob besides the shape is larger than this fraction of the image (4 pixels at
# 64 px): a speck of colour beside the shape is a flaw a person sees. Blobs are read at SPECK_THRESHOLD, lower
# than the shape's, since a faint speck is visible too.
MAX_SPECK_FRACTION = 2 / 64 ** 2
SPECK_THRESHOLD = {"white": 40, "dark": 35}

FIELDS = ("color", "shape", "position")  # what a caption names
CHECKS = FIELDS + ("clean",)  # what is scored
_SHAPES_CAPTIONS = frozenset(all_captions())
_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in COLORS.items()}


def _max_filter3(array: np.ndarray) -> np.ndarray:
    """3x3 maximum of a (H, W) array, zero outside (separable: rows, then columns)."""
    padded = np.pad(array, 1)
    rows = np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])  # (H, W + 2)
    return np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, pixel count per label) of the 8-connected components of a (H, W) bool mask, by max-label
    propagation (no scipy dependency); label 0 is the background, its count set to 0. Iterations ~ the largest
    component's diameter in pixels, each one vectorised: a few ms for a 64x64 image."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = _max_filter3(labels) * mask
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel(), minlength=mask.size + 1)
    counts[0] = 0
    return labels, counts


def ideal_mask(shape: str, center_x, center_y, width, height, angle, grid: tuple[np.ndarray, np.ndarray]):
    """Bool masks of the pixel centres `grid` (ys, xs) inside the ideal `shape` whose width x height bounding box is
    centred at (center_x, center_y) and turned by `angle` radians; the triangle stands upright at angle 0, apex at
    the top. The parameters may be arrays of N candidates shaped (N, 1, 1): the result is then (N, H, W)."""
    ys, xs = grid
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((xs - center_x) * cos + (ys - center_y) * sin) / (width / 2)  # in the box's own frame, -1 .. 1
    v = (-(xs - center_x) * sin + (ys - center_y) * cos) / (height / 2)
    if shape == "circle":
        return u ** 2 + v ** 2 <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    return (v >= -1) & (v <= 1) & (np.abs(u) <= (v + 1) / 2)  # as wide as deep below the apex (in box units)


def shape_fits(mask: np.ndarray) -> dict[str, float]:
    """{shape: the best intersection over union of `mask` with that ideal shape}. The search starts from the
    ideal with the mask's area and centroid: first every FIT_ASPECTS x FIT_ANGLES x FIT_SCALES in place, then the
    best of those at every FIT_SCALES x FIT_SHIFTS (a person still calls a slightly narrow or tilted triangle a
    triangle). Each pass scores all its candidates at once."""
    ys, xs = np.nonzero(mask)
    top, left = max(ys.min() - 3, 0), max(xs.min() - 3, 0)  # the fit needs only the shape's neighbourhood
    mask = mask[top:ys.max() + 4, left:xs.max() + 4]
    ys, xs = ys - top, xs - left
    grid = tuple((np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5).astype(np.float32))
    area, center_x, center_y = len(ys), xs.mean() + 0.5, ys.mean() + 0.5

    def best(shape: str, candidates: list[tuple]) -> tuple[float, tuple]:
        """The best (IoU, candidate) of (aspect, angle in degrees, scale, dx, dy) candidates."""
        aspect, angle, scale, dx, dy = np.array(candidates, dtype=np.float32).T[:, :, None, None]  # (N, 1, 1) each
        angle = np.radians(angle)
        side = math.sqrt(area / IDEAL_FILL[shape]) * scale
        width, height = side * np.sqrt(aspect), side / np.sqrt(aspect)
        # A triangle's centroid is 2/3 of the way down from its apex: 1/6 of its height below its box centre.
        drop = height / 6 if shape == "triangle" else 0.0
        ideal = ideal_mask(shape, center_x + dx + drop * np.sin(angle), center_y + dy - drop * np.cos(angle),
                           width, height, angle, grid)  # (N, H, W)
        overlap = (ideal & mask).sum(axis=(1, 2))
        scores = overlap / (area + ideal.sum(axis=(1, 2)) - overlap)
        return float(scores.max()), candidates[int(scores.argmax())]

    fits = {}
    for shape in IDEAL_FILL:
        _, (aspect, angle, *_) = best(shape, list(itertools.product(FIT_ASPECTS[shape], FIT_ANGLES, FIT_SCALES,
                                                                    [0.0], [0.0])))
        fits[shape], _ = best(shape, list(itertools.product([aspect], [angle], FIT_SCALES, FIT_SHIFTS, FIT_SHIFTS)))
    return fits


def solidity(mask: np.ndarray) -> float:
    """The mask's pixels over the pixels whose centres lie in the convex hull of its pixel centres: 1.0 for a
    convex shape, lower for a concave one (a star, a square with pinched sides)."""
    ys, xs = np.nonzero(mask)
    points = sorted(set(zip(xs.tolist(), ys.tolist())))
    if len(points) < 3:
        return 1.0

    def turn(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    hull = []  # Andrew's monotone chain: the lower, then the upper half
    for chain in (points, points[::-1]):
        half = []
        for point in chain:
            while len(half) >= 2 and turn(half[-2], half[-1], point) <= 0:
                half.pop()
            half.append(point)
        hull += half[:-1]
    grid_y, grid_x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    inside = np.ones(mask.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(hull, hull[1:] + hull[:1]):
        inside &= (x2 - x1) * (grid_y - y1) - (y2 - y1) * (grid_x - x1) >= 0
    return len(xs) / max(int(inside.sum()), 1)


def _nearest_color(core_rgb: np.ndarray) -> str | None:
    # Match by hue: the six palette colours differ mainly in hue (>= 22 degrees apart, orange/yellow), and hue is
    # unchanged when a generated shape is washed out toward white or darkened, which RGB distance is not.
    if core_rgb.max() - core_rgb.min() < MIN_CHROMA:
        return None
    hue = colorsys.rgb_to_hsv(*(core_rgb / 255))[0]  # in [0, 1), a circle: red sits at both ends
    distances = {name: abs(hue - palette_hue) for name, palette_hue in _PALETTE_HUES.items()}
    return min(distances, key=lambda name: min(distances[name], 1 - distances[name]))


def border_pixels(pixels: np.ndarray) -> np.ndarray:
    """(N, 3): the outermost BORDER pixels of a (H, W, 3) image, where no shape reaches."""
    inner = np.zeros(pixels.shape[:2], dtype=bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    return pixels[~inner]


def border_luminance(pixels: np.ndarray) -> float:
    """Median luma (ITU-R BT.601, 0-255) of the outermost BORDER pixels of a (H, W, 3) image."""
    return float(np.median(border_pixels(pixels) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)))


def classify_image(image: Image.Image) -> dict:
    """Read one image: {"color", "shape", "position"} (each None without a usable foreground; shape None also
    when no ideal shape fits), "clean" (no speck beside the shape), the background ("white" or "dark", from the
    border's luminance), the foreground fraction, the fit behind the shape ("shape_iou", "solidity") and whether
    the shape runs past the frame ("cut")."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    height, width, _ = pixels.shape
    background = "dark" if border_luminance(pixels) < DARK_BORDER_LUMINANCE else "white"
    ink = np.abs(pixels - np.array(BACKGROUNDS[background], dtype=np.float32)).max(axis=2)  # (H, W)
    # Specks are told from the image's own background (its border's median colour): a tint is not a speck.
    tint = np.abs(pixels - np.median(border_pixels(pixels), axis=0)).max(axis=2)  # (H, W)
    labels, counts = components((tint > SPECK_THRESHOLD[background]) | (ink > FOREGROUND_THRESHOLD[background]))
    main = counts.argmax()
    specks = np.delete(counts, [0, main])
    clean = not (specks > MAX_SPECK_FRACTION * height * width).any()
    component = (labels == main) & (ink > FOREGROUND_THRESHOLD[background])  # the shape, at its own threshold
    if component.any():
        shape_labels, shape_counts = components(component)
        component = shape_labels == shape_counts.argmax()
    fraction = float(component.mean())
    if fraction < MIN_FOREGROUND_FRACTION:
        return {"color": None, "shape": None, "position": None, "clean": clean, "background": background,
                "foreground_fraction": fraction, "shape_iou": 0.0, "solidity": 0.0, "cut": False}

    # Median colour of the component: the mask already drops edge pixels blended more than half with white,
    # the median ignores noise and stray pixels, and the hue match ignores the blending that is left.
    color = _nearest_color(np.median(pixels[component], axis=0))
    fits, convexity = shape_fits(component), solidity(component)
    best = max(fits, key=fits.get)
    shape = best if fits[best] >= MIN_SHAPE_IOU[best] and convexity >= MIN_SOLIDITY[best] else None

    # Centroid, not box centre: stray pixels attached to the shape barely move it. A triangle's centroid sits
    # 1/6 of its side below its box centre (<= 7% of the image); positions are >= 25% apart, so that is harmless.
    ys, xs = np.nonzero(component)
    center = ((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height)
    position = min(POSITIONS, key=lambda name: math.dist(center, POSITIONS[name]))
    # Drawn shapes keep a 1 px margin: a shape on the outermost pixels runs past the frame.
    cut = bool(component[0].any() or component[-1].any() or component[:, 0].any() or component[:, -1].any())
    return {"color": color, "shape": shape, "position": position, "clean": clean, "background": background,
            "foreground_fraction": fraction, "shape_iou": fits[best], "solidity": convexity, "cut": cut}


def score_images(images, captions) -> dict:
    """Accuracy of colour, shape and position of `images` against their shapes `captions`, and how many are
    clean (no speck beside the shape); "all_accuracy" counts the images right in all four."""
    images, captions = list(images), list(captions)
    if not images or len(images) != len(captions):
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} images "
                         f"and {len(captions)} captions")
    per_image = []
    for image, text in zip(images, captions):
        expected = dict(zip(FIELDS, parse_caption(text)), clean=True)
        predicted = classify_image(image)
        row = {"caption": text, "background": predicted["background"], "cut": predicted["cut"],
               "shape_iou": round(predicted["shape_iou"], 3), "solidity": round(predicted["solidity"], 3)}
        for field in CHECKS:
            row[field] = predicted[field]
            row[f"{field}_correct"] = predicted[field] == expected[field]
        per_image.append(row)
    accuracy = {f"{field}_accuracy": float(np.mean([row[f"{field}_correct"] for row in per_image]))
                for field in CHECKS}
    all_correct = [all(row[f"{field}_correct"] for field in CHECKS) for row in per_image]
    dark = float(np.mean([row["background"] == "dark" for row in per_image]))
    cut = float(np.mean([row["cut"] for row in per_image]))  # shapes running past the frame
    return {**accuracy, "all_accuracy": float(np.mean(all_correct)), "dark_background_fraction": dark,
            "cut_fraction": cut, "num_images": len(per_image), "per_image": per_image}


def is_shapes_data(captions) -> bool:
    """True when every caption is a shapes caption, so the checker can score images made from them."""
    captions = list(captions)
    return bool(captions) and all(text in _SHAPES_CAPTIONS for text in captions)


class ReconstructionCheck:
    """The plug-in's check of VAE reconstructions (`plugins.reconstruction_checker`): how many of them the checker
    reads as their caption's colour, shape and position."""

    fields = CHECKS

    def count_correct(self, images, captions) -> dict[str, int]:
        rows = score_images(images, captions)["per_image"]
        return {field: sum(row[f"{field}_correct"] for row in rows) for field in CHECKS}


def evaluation_prompts(seeds_per_prompt: int = 2, first_seed: int = 1000) -> tuple[list[str], list[int]]:
    """The full 90-caption grid, each caption with seeds first_seed, first_seed + 1, ...: the same prompts and
    noise for every checkpoint, so scores are comparable across runs. Returns parallel lists (prompts, seeds)."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    prompts = [text for text in all_captions() for _ in range(seeds_per_prompt)]
    seeds = [first_seed + k for _ in all_captions() for k in range(seeds_per_prompt)]
    return prompts, seeds


def heldout_images(resolution: int, num_images: int = 256, seed: int = 12345) -> list[tuple[Image.Image, str]]:
    """Fresh shapes images drawn in memory (seed distinct from the training default 0): sizes and jitters the
    VAE has not seen, with all combinations balanced. Returns (image, caption) pairs."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = random.Random(seed)
    return [(draw_shape(c, s, p, resolution, rng), caption(c, s, p))
            for c, s, p in balanced_combinations(num_images, rng)]


def check_shapes_tokenizer(tokenizer, model) -> None:
    """Refuse a model not trained on shapes captions, told by its tokenizer (saved with every pipeline):
    a model trained here on other captions has a tokenizer learned from them, which splits shapes words
    such as "triangle" into byte pieces or is too short for the captions. A pretrained CLIP tokenizer
    knows every shapes word, so a model fine-tuned from one passes."""
    captions = all_captions()
    words = sorted({word for text in captions for word in text.split()})
    unknown = [word for word in words if len(tokenizer.tokenize(word)) != 1]
    longest = max(len(ids) for ids in tokenizer(captions, verbose=False)["input_ids"])
    if unknown or longest > tokenizer.model_max_length:
        reason = (f"its tokenizer does not know the shapes words {', '.join(unknown[:6])}" if unknown else
                  f"its tokenizer cuts the shapes captions at {tokenizer.model_max_length} tokens")
        raise ConfigError(f"evaluate scores models trained on the shapes data set (captions like "
                          f"'{captions[0]}'), and {model} was not: {reason}. Use `ldm-pipeline generate` for it")


def evaluate_model(model, seeds_per_prompt: int = 2, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, batch_size: int = 30, psnr_images: int = 256,
                   device=None, first_seed: int = 1000, lora=None) -> dict:
    """Score a pipeline trained on shapes: adherence over the 90-caption grid plus the VAE's PSNR on
    held-out shapes images. Returns score_images' report with "vae_psnr_db" and the settings added.

    Under `accelerate launch` the prompts are split across processes; every image depends only on its
    prompt and seed, so the numbers are the same at any process count."""
    state = process_state()
    pipe = load_pipeline(model, device=device or state.device, lora=lora)
    model = pipe.name_or_path
    check_shapes_tokenizer(pipe.tokenizer, model)
    prompts, seeds = evaluation_prompts(seeds_per_prompt, first_seed)
    images = generate(pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      batch_size=batch_size, show_progress=state.is_main_process, state=state)
    report = score_images(images, prompts)
    resolution = images[0].width  # the model's own output size, so the VAE sees what it was trained on
    report["vae_psnr_db"] = vae_psnr(pipe.vae, [image for image, _ in heldout_images(resolution, psnr_images)],
                                     batch_size=batch_size)
    used = images[0].info["parameters"]  # what generate resolved from the model's defaults
    report["settings"] = {"model": str(model), **({"lora": str(lora)} if lora is not None else {}),
                          "seeds_per_prompt": seeds_per_prompt, "first_seed": first_seed,
                          "resolution": resolution,
                          "psnr_images": psnr_images,
                          **{key: used[key] for key in ("num_inference_steps", "guidance_scale", "scheduler")}}
    return report
