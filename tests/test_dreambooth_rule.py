"""The subject rule of benchmarks/dreambooth_shapes.py (the DreamBooth measurement): a drawn ring of the asked colour
is the subject; a filled circle, a square, a ring broken open, a square outline, a disc with a pale or a pinhole
centre, an off-centre hole or another colour is not. And the rare token's check against the base's tokenizer."""

import random
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dreambooth_shapes import TOKEN, check_token, draw_ring, is_subject, read_ring  # noqa: E402

from ldm_pipeline.shapes.maker import COLORS, POSITIONS, all_captions, draw_shape  # noqa: E402
from ldm_pipeline.tokenizer import build_tokenizer  # noqa: E402

RED = COLORS["red"]


def drawn(draw) -> Image.Image:
    """A 64x64 white image: `draw` draws on an ImageDraw 4x larger, which is then reduced, as the maker draws."""
    image = Image.new("RGB", (256, 256), "white")
    draw(ImageDraw.Draw(image))
    return image.reduce(4)


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("width", [0.2, 0.25, 0.33])
def test_drawn_rings_are_the_subject_at_every_position_and_line_width(position, width):
    image = draw_ring("red", position, 64, random.Random(len(position) + int(100 * width)), width)
    assert is_subject(image), read_ring(image)


def test_a_blurred_ring_is_still_the_subject_and_a_ring_of_another_colour_is_not_the_red_subject():
    ring = draw_ring("red", "center", 64, random.Random(1))
    assert is_subject(ring.filter(ImageFilter.GaussianBlur(1)))
    blue = draw_ring("blue", "center", 64, random.Random(1))
    assert read_ring(blue)["ring"] and is_subject(blue, "blue") and not is_subject(blue, "red")


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_filled_shapes_are_not_the_subject(shape):
    image = draw_shape("red", shape, "center", 64, random.Random(0))
    assert not read_ring(image)["ring"], shape


def test_a_ring_broken_open_is_not_the_subject():
    image = draw_ring("red", "center", 64, random.Random(2))
    ImageDraw.Draw(image).rectangle((30, 0, 33, 31), fill="white")  # a 4-pixel gap through the top of the line
    verdict = read_ring(image)
    assert not verdict["ring"] and verdict["hole_fraction"] == 0.0  # the inside now joins the outside


def test_a_square_outline_a_pale_centre_a_pinhole_and_an_off_centre_hole_are_not_rings():
    box = (80, 80, 176, 176)  # a 24-pixel shape at the centre, 4x
    cases = {
        "square outline": drawn(lambda d: d.rectangle(box, outline=RED, width=12)),
        "pale centre": drawn(lambda d: d.ellipse(box, fill=(250, 185, 185), outline=RED, width=12)),
        "pinhole": drawn(lambda d: d.ellipse(box, outline=RED, width=40)),
        "off-centre hole": drawn(lambda d: (d.ellipse(box, fill=RED), d.ellipse((92, 92, 140, 140), fill="white"))),
    }
    for name, image in cases.items():
        assert not is_subject(image), (name, read_ring(image))
    # ... while the same ring drawn round, thin and empty is one
    assert is_subject(drawn(lambda d: d.ellipse(box, outline=RED, width=12)))


def test_an_empty_image_is_not_the_subject():
    assert not is_subject(Image.new("RGB", (64, 64), "white"))


def test_the_rare_token_must_be_unused_by_the_base_captions():
    tokenizer = build_tokenizer(all_captions())
    assert len(check_token(tokenizer)) == len(tokenizer.tokenize(TOKEN))
    for token in ("circle", "shred", "xa"):  # a shapes word; words ending in one ("red</w>", "a</w>")
        with pytest.raises(SystemExit, match=token):
            check_token(tokenizer, token)
