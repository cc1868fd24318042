"""benchmarks/ztsnr_dark.py's background measure: the shape and its blended edge stay out, any background stays in."""

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from ldm_pipeline.shapes.maker import draw_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ztsnr_dark import background_mean  # noqa: E402


def test_background_mean_is_the_backgrounds_value_without_the_shape():
    rng = random.Random(0)
    assert background_mean(draw_shape("yellow", "circle", "center", 64, rng, "dark")) == 24.0
    assert background_mean(draw_shape("purple", "triangle", "top left", 64, rng, "white")) == 255.0
    grey = Image.new("RGB", (64, 64), (128, 128, 128))  # a background that came out grey is measured as grey
    ImageDraw.Draw(grey).rectangle((20, 20, 40, 40), fill=(240, 130, 30))
    assert background_mean(grey) == 128.0
