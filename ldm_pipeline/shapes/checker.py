"""The shapes checker: does an image show the captioned colour, shape and position? It scores `ldm-pipeline
evaluate`, and the VAE's reconstructions during training (the shapes plug-in's reconstruction check).

One filled shape on white or on the dark background (maker.py). Generated images are blurry, noisy and sometimes
washed out, so every step below prefers robust statistics over exact pixels.
"""

from __future__ import annotations

import colorsys
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
# mask then has the shape's true area, which the fill-ratio test below relies on. On the dark background the
# nearest colour is 146 away (green), hence 75. Noise of a few levels never gets near either.
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
# Upright triangle: 1/4 of its area lies in the upper half of its bounding box; circle and square: 1/2.
TRIANGLE_TOP_FRACTION = 0.375
# Fill of the bounding box: square 1.0, circle pi/4 = 0.785; split halfway (blur rounds square corners a bit).
SQUARE_FILL = 0.89

FIELDS = ("color", "shape", "position")
_SHAPES_CAPTIONS = frozenset(all_captions())
_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in COLORS.items()}


def _max_filter3(array: np.ndarray) -> np.ndarray:
    """3x3 maximum of a (H, W) array, zero outside (separable: rows, then columns)."""
    padded = np.pad(array, 1)
    rows = np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])  # (H, W + 2)
    return np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening (3x3 erode, then dilate): drops specks and the 1-pixel spurs that noise attaches
    to an edge, which would otherwise inflate the bounding box and make a square look like a circle."""
    eroded = _max_filter3((~mask).astype(np.uint8)) == 0
    return _max_filter3(eroded.astype(np.uint8)) > 0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a (H, W) bool mask, by max-label propagation (no scipy dependency).
    Iterations ~ the component's diameter in pixels, each one vectorised: a few ms for a 64x64 image."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = _max_filter3(labels) * mask
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def _nearest_color(core_rgb: np.ndarray) -> str | None:
    # Match by hue: the six palette colours differ mainly in hue (>= 22 degrees apart, orange/yellow), and hue is
    # unchanged when a generated shape is washed out toward white or darkened, which RGB distance is not.
    if core_rgb.max() - core_rgb.min() < MIN_CHROMA:
        return None
    hue = colorsys.rgb_to_hsv(*(core_rgb / 255))[0]  # in [0, 1), a circle: red sits at both ends
    distances = {name: abs(hue - palette_hue) for name, palette_hue in _PALETTE_HUES.items()}
    return min(distances, key=lambda name: min(distances[name], 1 - distances[name]))


def border_luminance(pixels: np.ndarray) -> float:
    """Median luma (ITU-R BT.601, 0-255) of the outermost BORDER pixels of a (H, W, 3) image."""
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    inner = np.zeros(luma.shape, dtype=bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    return float(np.median(luma[~inner]))


def classify_image(image: Image.Image) -> dict:
    """Predict {"color", "shape", "position"} (each None without a usable foreground), the background ("white" or
    "dark", from the border's luminance) and the foreground fraction."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    height, width, _ = pixels.shape
    background = "dark" if border_luminance(pixels) < DARK_BORDER_LUMINANCE else "white"
    ink = np.abs(pixels - np.array(BACKGROUNDS[background], dtype=np.float32)).max(axis=2)  # (H, W)
    mask = ink > FOREGROUND_THRESHOLD[background]
    component = _largest_component(mask) if mask.any() else mask
    fraction = float(component.mean())
    if fraction < MIN_FOREGROUND_FRACTION:
        return {"color": None, "shape": None, "position": None, "background": background,
                "foreground_fraction": fraction}

    # Median colour of the component: the mask already drops edge pixels blended more than half with white,
    # the median ignores noise and stray pixels, and the hue match ignores the blending that is left.
    color = _nearest_color(np.median(pixels[component], axis=0))

    ys, xs = np.nonzero(component)
    top_fraction = np.mean(ys + 0.5 < (ys.min() + ys.max() + 1) / 2)
    if top_fraction < TRIANGLE_TOP_FRACTION:  # mass test: robust to a triangle whose corners blur away
        shape = "triangle"
    else:  # fill of the box, measured after opening so noisy edges do not inflate the box
        opened_ys, opened_xs = np.nonzero(_open(component))
        box_area = (np.ptp(opened_ys) + 1) * (np.ptp(opened_xs) + 1) if len(opened_ys) else np.inf
        shape = "square" if len(opened_ys) / box_area > SQUARE_FILL else "circle"

    # Centroid, not box centre: stray pixels attached to the shape barely move it. A triangle's centroid sits
    # 1/6 of its side below its box centre (<= 7% of the image); positions are >= 25% apart, so that is harmless.
    center = ((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height)
    position = min(POSITIONS, key=lambda name: math.dist(center, POSITIONS[name]))
    return {"color": color, "shape": shape, "position": position, "background": background,
            "foreground_fraction": fraction}


def score_images(images, captions) -> dict:
    """Accuracy of colour, shape and position of `images` against their shapes `captions`."""
    images, captions = list(images), list(captions)
    if not images or len(images) != len(captions):
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} images "
                         f"and {len(captions)} captions")
    per_image = []
    for image, text in zip(images, captions):
        expected = dict(zip(FIELDS, parse_caption(text)))
        predicted = classify_image(image)
        row = {"caption": text, "background": predicted["background"]}
        for field in expected:
            row[field] = predicted[field]
            row[f"{field}_correct"] = predicted[field] == expected[field]
        per_image.append(row)
    accuracy = {f"{field}_accuracy": float(np.mean([row[f"{field}_correct"] for row in per_image]))
                for field in FIELDS}
    all_correct = [row["color_correct"] and row["shape_correct"] and row["position_correct"] for row in per_image]
    dark = float(np.mean([row["background"] == "dark" for row in per_image]))
    return {**accuracy, "all_accuracy": float(np.mean(all_correct)), "dark_background_fraction": dark,
            "num_images": len(per_image), "per_image": per_image}


def is_shapes_data(captions) -> bool:
    """True when every caption is a shapes caption, so the checker can score images made from them."""
    captions = list(captions)
    return bool(captions) and all(text in _SHAPES_CAPTIONS for text in captions)


class ReconstructionCheck:
    """The plug-in's check of VAE reconstructions (`plugins.reconstruction_checker`): how many of them the checker
    reads as their caption's colour, shape and position."""

    fields = FIELDS

    def count_correct(self, images, captions) -> dict[str, int]:
        rows = score_images(images, captions)["per_image"]
        return {field: sum(row[f"{field}_correct"] for row in rows) for field in FIELDS}


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
