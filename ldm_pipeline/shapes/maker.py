"""Synthetic shapes data set: one coloured shape on white (or, for a style to adapt to, on a dark background),
captioned "a red circle in the top left", "an orange triangle in the center" on either.

It is the project's embedded default data: small enough to train on a laptop, and every image can be
checked automatically (see evaluate.py), so the spec below is fixed.
"""

import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> (x, y) of the shape's centre as fractions of the image side
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# The default background, and a dark one: a style a LoRA can learn (benchmarks/lora_adaptation.py). Every
# palette color is >= 146 levels (green's red channel) from the dark one in its most distant channel.
BACKGROUNDS = {"white": (255, 255, 255), "dark": (24, 24, 24)}
SIZE_RANGE = (0.30, 0.40)  # bounding-box side as a fraction of the image side
JITTER = 0.05  # +- uniform jitter of the centre, fraction of the image side
SUPERSAMPLE = 4  # draw 4x larger, then average 4x4 blocks: smooth edges, interior stays exactly the palette RGB


def caption(color: str, shape: str, position: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} in the {position}"


def all_captions() -> list[str]:
    return [caption(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


_PARTS_BY_CAPTION = {caption(c, s, p): (c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS}


def parse_caption(text: str) -> tuple[str, str, str]:
    if text not in _PARTS_BY_CAPTION:
        raise ValueError(
            f"{text!r} is not a shapes caption; expected 'a(n) {{color}} {{shape}} in the {{position}}' with color in "
            f"{list(COLORS)}, shape in {list(SHAPES)}, position in {list(POSITIONS)}"
        )
    return _PARTS_BY_CAPTION[text]


def check_background(background: str) -> None:
    if background not in BACKGROUNDS:
        raise ValueError(f"background: {background!r} is not one of {list(BACKGROUNDS)} (make-shapes --background, "
                         "data.make_shapes.background)")


def draw_shape(color: str, shape: str, position: str, resolution: int, rng: random.Random,
               background: str = "white", size: tuple[int, int] | None = None) -> Image.Image:
    """Draw one image, `resolution` pixels square or `size` = (width, height); `rng` supplies the shape's size and
    the centre jitter, so a seeded rng gives the same image. The shape's side is a fraction of the frame's short
    side, its position a fraction of the frame's width and height."""
    parse_caption(caption(color, shape, position))  # one place that names the valid values
    check_background(background)
    frame = size or (resolution, resolution)  # (width, height)
    if min(frame) < 16:
        raise ValueError(f"resolution must be >= 16 pixels so a shape is more than a few pixels wide, got {frame}")
    side = rng.uniform(*SIZE_RANGE) * min(frame)
    # Keep a 1 px margin so the anti-aliased edge is never cut by the border and the corners stay background.
    center = [min(max((frac + rng.uniform(-JITTER, JITTER)) * extent, side / 2 + 1), extent - side / 2 - 1)
              for frac, extent in zip(POSITIONS[position], frame)]

    big_size = (frame[0] * SUPERSAMPLE, frame[1] * SUPERSAMPLE)
    # Box corners on the supersampled grid: [x0, x1) x [y0, y1); PIL's boxes include their last pixel, hence the -1.
    x0, y0 = (round((c - side / 2) * SUPERSAMPLE) for c in center)
    x1, y1 = (round((c + side / 2) * SUPERSAMPLE) for c in center)
    image = Image.new("RGB", big_size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    rgb = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    else:  # upright triangle: apex at the top centre of the box, base along its bottom
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=rgb)
    return image.reduce(SUPERSAMPLE)  # box average: a fully covered pixel keeps the exact palette RGB


def balanced_combinations(num_images: int, rng: random.Random, holdout=()) -> list[tuple[str, str, str]]:
    """(color, shape, position) for each image: cycle through all allowed combinations, reshuffled every cycle,
    so every combination appears equally often (+-1) and the order is still random."""
    holdout = set(holdout)
    unknown = sorted(holdout - set(_PARTS_BY_CAPTION))
    if unknown:
        raise ValueError(f"holdout captions {unknown} are not shapes captions; pick them from shapes.all_captions()")
    allowed = [parts for text, parts in _PARTS_BY_CAPTION.items() if text not in holdout]
    if not allowed:
        raise ValueError("holdout removes all 90 captions; leave at least one to generate")
    combos = []
    while len(combos) < num_images:
        cycle = list(allowed)
        rng.shuffle(cycle)
        combos.extend(cycle)
    return combos[:num_images]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"64x64,96x64,64x96" -> [(64, 64), (96, 64), (64, 96)]: frames as WIDTHxHEIGHT."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(f"--sizes: {item.strip()!r} is not WIDTHxHEIGHT; write e.g. 64x64,96x64,64x96")
        sizes.append((int(width), int(height)))
    return sizes


def make_shapes(out_dir, num_images: int, resolution: int = 64, seed: int = 0, holdout=(),
                background: str = "white", sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write an image folder (00000.png, ... + metadata.jsonl) for datasets.load_dataset("imagefolder").
    The captions do not mention the background: a model trained on dark shapes draws them for the same prompts.
    `sizes` (WIDTH, HEIGHT frames) are taken in turn, image after image; none: `resolution` squares."""
    out_dir = Path(out_dir)
    check_background(background)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if min([resolution] + [side for size in sizes or () for side in size]) < 16:
        raise ValueError(f"resolution must be >= 16 pixels so a shape is more than a few pixels wide, got "
                         f"{sizes or resolution}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; delete it or choose another --out")
    rng = random.Random(seed)
    combos = balanced_combinations(num_images, rng, holdout)

    # Write into a sibling and rename at the end: an interrupted run leaves only a *.tmp-<pid> folder,
    # never a half data set under the real name.
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        with open(tmp_dir / "metadata.jsonl", "w") as metadata:
            for index, (color, shape, position) in enumerate(tqdm(combos, desc="shapes", disable=None)):
                file_name = f"{index:05d}.png"
                size = sizes[index % len(sizes)] if sizes else None
                image = draw_shape(color, shape, position, resolution, rng, background, size)
                image.save(tmp_dir / file_name, compress_level=1)
                row = {"file_name": file_name, "text": caption(color, shape, position),
                       "color": color, "shape": shape, "position": position}
                if background != "white":
                    row["background"] = background
                if size:
                    row["width"], row["height"] = size
                metadata.write(json.dumps(row) + "\n")
        os.replace(tmp_dir, out_dir)  # also replaces an existing empty folder
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
