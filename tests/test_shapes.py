"""The synthetic shapes data set: the drawing spec, captions, determinism, balance, holdout, safe writing."""

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.shapes import maker as shapes
from ldm_pipeline.shapes.maker import COLORS, POSITIONS, all_captions, caption, draw_shape, make_shapes, parse_caption

AREA_PER_SIDE_SQUARED = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


def test_palette_and_layout_are_the_fixed_spec():
    # Written out again on purpose: evaluation and trained models depend on these exact values.
    assert COLORS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                      "yellow": (230, 200, 30), "purple": (140, 60, 190), "orange": (240, 130, 30)}
    assert list(COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
                         "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}


def coverage(image: Image.Image, rgb) -> np.ndarray:
    """(H, W) fraction of each pixel covered by the shape, read back from its blend with white, after checking
    every pixel is such a blend (white, the palette colour, or in between: no outline, no other colour)."""
    pixels = np.asarray(image, dtype=np.float64)
    ink = 255 - np.array(rgb, dtype=np.float64)
    alpha = (255 - pixels[..., ink.argmax()]) / ink.max()
    blended = 255 - alpha[..., None] * ink
    assert np.abs(pixels - blended).max() <= 1.0, "a pixel is not a blend of white and the shape's colour"
    return alpha


def test_captions_round_trip():
    assert caption("red", "circle", "top left") == "a red circle in the top left"
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 90
    assert captions[0] == "a red circle in the top left" and captions[-1] == "an orange triangle in the center"
    for text in captions:
        assert caption(*parse_caption(text)) == text
    for bad in ("a pink circle in the top left", "a red circle in the middle", "red circle in the top left"):
        with pytest.raises(ValueError, match=bad):
            parse_caption(bad)


@pytest.mark.parametrize("resolution", [64, 128])
def test_every_combination_is_drawn_to_spec(resolution):
    rng = random.Random(resolution)
    for text in all_captions():
        color, shape, position = parse_caption(text)
        for _ in range(2):
            image = draw_shape(color, shape, position, resolution, rng)
            assert image.mode == "RGB" and image.size == (resolution, resolution)
            alpha = coverage(image, COLORS[color])
            pixels = np.asarray(image)

            border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
            assert not border.any(), f"{text}: touches the image border (not fully inside, corners not white)"

            # Pixels whose 7x7 neighbourhood is all shape lie >= 3 px inside a convex shape: fully covered.
            touched = alpha > 0
            interior = np.ones_like(touched)
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    interior[3:-3, 3:-3] &= touched[3 + dy:resolution - 3 + dy, 3 + dx:resolution - 3 + dx]
            interior[:3], interior[-3:], interior[:, :3], interior[:, -3:] = False, False, False, False
            assert interior.sum() > 20 and (pixels[interior] == COLORS[color]).all(), text

            side = math.sqrt(alpha.sum() / AREA_PER_SIDE_SQUARED[shape])  # from the drawn area
            assert 0.30 * resolution - 0.5 <= side <= 0.40 * resolution + 0.5, (text, side)

            ys, xs = np.nonzero(touched)
            center_x, center_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            expected_x, expected_y = (frac * resolution for frac in POSITIONS[position])
            assert abs(center_x - expected_x) <= 0.05 * resolution + 1, text
            assert abs(center_y - expected_y) <= 0.05 * resolution + 1, text

            solid = alpha > 0.5
            ys, xs = np.nonzero(solid)
            box = solid[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            fill = box.mean()
            if shape == "square":
                assert fill > 0.95, (text, fill)
            elif shape == "circle":
                assert 0.72 < fill < 0.85, (text, fill)
            else:
                assert 0.40 < fill < 0.60, (text, fill)
                top_row, bottom_row = np.nonzero(box[0])[0], np.nonzero(box[-1])[0]
                assert len(top_row) <= 0.25 * box.shape[1], f"{text}: apex is not at the top"
                assert len(bottom_row) >= 0.85 * box.shape[1], f"{text}: base is not along the bottom"
                assert abs(top_row.mean() + 0.5 - box.shape[1] / 2) <= 1, f"{text}: apex is not centred"


def test_draw_shape_is_deterministic_and_rejects_bad_input():
    first = draw_shape("red", "circle", "center", 64, random.Random(7))
    again = draw_shape("red", "circle", "center", 64, random.Random(7))
    other = draw_shape("red", "circle", "center", 64, random.Random(8))
    assert first.tobytes() == again.tobytes() != other.tobytes()
    with pytest.raises(ValueError, match="pink"):
        draw_shape("pink", "circle", "center", 64, random.Random(0))
    with pytest.raises(ValueError, match="resolution must be >= 16"):
        draw_shape("red", "circle", "center", 8, random.Random(0))


def read_metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_make_shapes_is_deterministic(tmp_path):
    first = make_shapes(tmp_path / "a", 20, resolution=32, seed=3)
    second = make_shapes(tmp_path / "b", 20, resolution=32, seed=3)
    other = make_shapes(tmp_path / "c", 20, resolution=32, seed=4)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert names == [f"{i:05d}.png" for i in range(20)] + ["metadata.jsonl"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert read_metadata(first) != read_metadata(other)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left


def test_make_shapes_writes_a_loadable_image_folder(tmp_path):
    from datasets import load_dataset

    out = make_shapes(tmp_path / "shapes", 12, resolution=32, seed=0)
    rows = read_metadata(out)
    assert [row["file_name"] for row in rows] == [f"{i:05d}.png" for i in range(12)]
    for row in rows:
        assert row["text"] == caption(row["color"], row["shape"], row["position"])
        with Image.open(out / row["file_name"]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    dataset = load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 12 and "text" in dataset.column_names
    assert sorted(dataset["text"]) == sorted(row["text"] for row in rows)


def test_combinations_are_balanced_and_holdout_is_respected(tmp_path):
    counts = Counter(row["text"] for row in read_metadata(make_shapes(tmp_path / "all", 180, resolution=16)))
    assert set(counts) == set(all_captions()) and set(counts.values()) == {2}

    holdout = ["a red circle in the top left", "a blue square in the center"]
    rows = read_metadata(make_shapes(tmp_path / "held", 100, resolution=16, seed=1, holdout=holdout))
    counts = Counter(row["text"] for row in rows)
    assert not set(holdout) & set(counts) and len(counts) == 88
    assert max(counts.values()) - min(counts.values()) <= 1


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="a pink circle in the top left"):
        make_shapes(tmp_path / "out", 10, holdout=["a red circle in the top left", "a pink circle in the top left"])
    with pytest.raises(ValueError, match="all 90"):
        make_shapes(tmp_path / "out", 10, holdout=all_captions())
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        make_shapes(tmp_path / "out", 0)
    with pytest.raises(ValueError, match="resolution must be >= 16"):
        make_shapes(tmp_path / "out", 10, resolution=8)
    assert not any(tmp_path.iterdir())


def test_existing_data_is_never_overwritten(tmp_path):
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out}.*delete it or choose another --out"):
        make_shapes(out, 10)
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [path.name for path in tmp_path.iterdir()] == ["shapes"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(read_metadata(make_shapes(empty, 3, resolution=16))) == 3  # an empty folder is fine to fill


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def draw_then_fail(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return Image.new("RGB", (16, 16), "white")

    monkeypatch.setattr(shapes, "draw_shape", draw_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(tmp_path / "shapes", 10, resolution=16)
    assert len(calls) == 5 and not any(tmp_path.iterdir())


def test_make_shapes_dark_draws_the_same_shapes_and_captions_on_a_dark_background(tmp_path, capsys):
    from ldm_pipeline.cli import main as cli
    from ldm_pipeline.shapes.checker import score_images

    assert cli(["make-shapes", "--out", str(tmp_path / "dark"), "--num-images", "30", "--resolution", "64",
                "--seed", "3", "--background", "dark"]) == 0
    assert "30 images (64x64, dark background)" in capsys.readouterr().out
    white, dark = make_shapes(tmp_path / "white", 30, resolution=64, seed=3), tmp_path / "dark"
    rows = read_metadata(dark)
    assert [row["text"] for row in rows] == [row["text"] for row in read_metadata(white)]  # parseable as before
    assert {row["background"] for row in rows} == {"dark"}
    images = []
    for row in rows:
        with Image.open(dark / row["file_name"]) as image, Image.open(white / row["file_name"]) as plain:
            pixels, plain_pixels = np.asarray(image.convert("RGB")), np.asarray(plain.convert("RGB"))
            images.append(image.convert("RGB"))
        assert (pixels[0, 0] == shapes.BACKGROUNDS["dark"]).all() and (plain_pixels[0, 0] == 255).all()
        inside = (plain_pixels == COLORS[row["color"]]).all(axis=2)  # fully covered pixels: the palette color
        assert inside.any() and (pixels[inside] == COLORS[row["color"]]).all()
    report = score_images(images, [row["text"] for row in rows])
    assert report["all_accuracy"] == 1.0 and report["dark_background_fraction"] == 1.0
    assert cli(["make-shapes", "--out", str(tmp_path / "x"), "--background", "black"]) == 2
    assert "background: 'black' is not one of ['white', 'dark']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_make_shapes_draws_frames_of_several_sizes_and_the_checker_reads_them(tmp_path, capsys):
    from ldm_pipeline.cli import main as cli
    from ldm_pipeline.shapes.checker import score_images

    assert cli(["make-shapes", "--out", str(tmp_path / "mixed"), "--num-images", "90", "--sizes",
                "64x64,96x64,64x96"]) == 0
    assert "90 images (64x64, 96x64, 64x96, white background)" in capsys.readouterr().out
    rows = read_metadata(tmp_path / "mixed")
    images = [Image.open(tmp_path / "mixed" / row["file_name"]).convert("RGB") for row in rows]
    assert [image.size for image in images[:3]] == [(64, 64), (96, 64), (64, 96)]
    assert [(row["width"], row["height"]) for row in rows[:3]] == [(64, 64), (96, 64), (64, 96)]
    # positions are fractions of the frame and sides of its short side: the checker reads every one right
    report = score_images(images, [row["text"] for row in rows])
    assert report["all_accuracy"] == 1.0
    assert cli(["make-shapes", "--out", str(tmp_path / "bad"), "--sizes", "64by64"]) == 2
    assert "--sizes: '64by64' is not WIDTHxHEIGHT" in capsys.readouterr().err
