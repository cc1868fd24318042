"""The adherence checker (colour / shape / position of shapes images), PSNR and the VAE round trip."""

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import save_untrained_pipeline
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw, ImageFilter
from test_bad_input import assert_one_error_line

from ldm_pipeline.cli import main as cli
from ldm_pipeline.config import ConfigError
from ldm_pipeline.evaluate import PSNR_CAP_DB, psnr, vae_psnr
from ldm_pipeline.shapes.checker import classify_image, evaluation_prompts, heldout_images, score_images
from ldm_pipeline.shapes.maker import all_captions, draw_shape, parse_caption


def drawn_grid(resolution: int, seeds, background: str = "white") -> tuple[list[Image.Image], list[str]]:
    """Every one of the 90 captions drawn once per seed."""
    images, captions = [], []
    for seed in seeds:
        rng = random.Random(seed)
        for text in all_captions():
            images.append(draw_shape(*parse_caption(text), resolution, rng, background))
            captions.append(text)
    return images, captions


@pytest.mark.parametrize("resolution, seeds, background", [(64, [0, 1, 2], "white"), (128, [3, 4], "white"),
                                                         (64, [0, 1], "dark")])
def test_ideal_images_are_all_classified_correctly(resolution, seeds, background):
    report = score_images(*drawn_grid(resolution, seeds, background))
    wrong = [row for row in report["per_image"] if not (row["color_correct"] and row["shape_correct"]
                                                         and row["position_correct"] and row["clean_correct"])]
    assert wrong == [] and report["all_accuracy"] == 1.0 and report["num_images"] == 90 * len(seeds)
    assert min(row["shape_iou"] for row in report["per_image"]) >= 0.97  # far above the floor
    assert report["dark_background_fraction"] == (1.0 if background == "dark" else 0.0)


def degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """Mild versions of what generated images show: blur, pixel noise, a colour cast."""
    if kind in ("blur", "all"):
        image = image.filter(ImageFilter.GaussianBlur(1))
    pixels = np.asarray(image, dtype=np.float64)
    if kind in ("noise", "all"):
        pixels = pixels + rng.normal(0, 10, pixels.shape)
    if kind in ("shift", "all"):
        pixels = pixels + rng.uniform(-15, 15, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("kind", ["blur", "noise", "shift", "all"])
@pytest.mark.parametrize("background", ["white", "dark"])
def test_mild_degradations_are_still_classified(kind, background):
    rng = np.random.default_rng(0)
    images, captions = drawn_grid(64, [5, 6], background)
    report = score_images([degrade(image, kind, rng) for image in images], captions)
    assert report["all_accuracy"] >= 0.95, report["all_accuracy"]
    assert report["dark_background_fraction"] == (1.0 if background == "dark" else 0.0)


def test_no_usable_foreground_gives_none():
    blank = Image.new("RGB", (64, 64), "white")
    speck = blank.copy()
    ImageDraw.Draw(speck).rectangle((30, 30, 32, 32), fill=(220, 40, 40))  # 9 px: noise, not a shape
    for image in (blank, speck):
        result = classify_image(image)
        assert (result["color"], result["shape"], result["position"]) == (None, None, None)
        assert result["foreground_fraction"] < 0.01
    report = score_images([blank], ["a red circle in the center"])
    assert report["color_accuracy"] == report["shape_accuracy"] == report["position_accuracy"] == 0.0


def test_grey_shape_has_a_shape_but_no_palette_color():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 59, 59), fill=(90, 90, 90))
    assert classify_image(image) | {"foreground_fraction": None, "shape_iou": None, "solidity": None} == {
        "color": None, "shape": "square", "position": "bottom right", "clean": True, "background": "white",
        "foreground_fraction": None, "shape_iou": None, "solidity": None, "cut": False}


def test_specks_and_spurs_do_not_change_the_answer():
    image = draw_shape("green", "square", "top left", 64, random.Random(0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((50, 50, 55, 55), fill=(40, 170, 60))  # a separate blob: not the largest component
    pixels = np.asarray(image).copy()
    ys, xs = np.nonzero(pixels[:40, :40].min(axis=2) < 155)  # the square in the foreground mask (ink > 100)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    for y, x in ((top - 1, left + 3), (bottom + 1, right - 3), (top + 5, left - 1), (bottom - 5, right + 1)):
        pixels[y, x] = (40, 170, 60)  # 1 px spurs, as noise leaves on edges: they must not grow the box
    result = classify_image(Image.fromarray(pixels))
    assert (result["color"], result["shape"], result["position"]) == ("green", "square", "top left")
    assert result["clean"] is False  # the blob beside it is a flaw of its own


def test_wrong_content_scores_zero():
    blue_square = draw_shape("blue", "square", "top left", 64, random.Random(0))
    report = score_images([blue_square], ["a red circle in the top left"])
    assert report["color_accuracy"] == 0.0 and report["shape_accuracy"] == 0.0
    assert report["position_accuracy"] == 1.0 and report["all_accuracy"] == 0.0
    assert report["per_image"] == [{"caption": "a red circle in the top left", "background": "white", "cut": False,
                                    "shape_iou": 1.0, "solidity": 1.0, "color": "blue", "color_correct": False,
                                    "shape": "square", "shape_correct": False, "position": "top left",
                                    "position_correct": True, "clean": True, "clean_correct": True}]


YELLOW = (230, 200, 30)


def supersampled(draw, size: int = 64, factor: int = 8) -> Image.Image:
    """`draw(ImageDraw, factor)` on a white canvas `factor` times larger, box-averaged down: smooth edges."""
    big = Image.new("RGB", (size * factor, size * factor), "white")
    draw(ImageDraw.Draw(big), factor)
    return big.reduce(factor)


def star(cx=32.0, cy=32.0, outer=12.0, inner=5.0):
    """A four-pointed star: what a model drew for "a yellow circle" (the old checker called it a circle)."""
    points = [(cx + (outer if k % 2 == 0 else inner) * math.cos(math.pi / 4 * k - math.pi / 2),
               cy + (outer if k % 2 == 0 else inner) * math.sin(math.pi / 4 * k - math.pi / 2)) for k in range(8)]
    return lambda draw, f: draw.polygon([(x * f, y * f) for x, y in points], fill=YELLOW)


def pinched_square(cx=32.0, cy=32.0, half=11.0, pinch=2.5):
    """A square whose sides bow inward by `pinch` pixels at their middle."""
    corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    points = []
    for (x1, y1), (x2, y2) in zip(corners, corners[1:] + corners[:1]):
        inward = (-(y2 - y1) / (2 * half), (x2 - x1) / (2 * half))
        for t in np.linspace(0, 1, 24, endpoint=False):
            depth = pinch * math.sin(math.pi * t)
            points.append((cx + x1 + (x2 - x1) * t + inward[0] * depth, cy + y1 + (y2 - y1) * t + inward[1] * depth))
    return lambda draw, f: draw.polygon([(x * f, y * f) for x, y in points], fill=YELLOW)


def rounded_triangle(cx=32.0, cy=34.0, side=24.0, radius=2.0):
    """An upright triangle (as wide as tall) with corners rounded to `radius`: a smaller triangle grown by a disk."""
    corners = [(cx, cy - side / 2), (cx + side / 2, cy + side / 2), (cx - side / 2, cy + side / 2)]
    lengths = [math.dist(corners[(k + 1) % 3], corners[(k + 2) % 3]) for k in range(3)]  # opposite each corner
    incenter = [sum(length * point[i] for length, point in zip(lengths, corners)) / sum(lengths) for i in (0, 1)]
    shrink = 1 - radius / (side * side / sum(lengths))  # inradius = area / half the perimeter
    inner = [(incenter[0] + (x - incenter[0]) * shrink, incenter[1] + (y - incenter[1]) * shrink) for x, y in corners]

    def draw(canvas, f):
        canvas.polygon([(x * f, y * f) for x, y in inner], fill=YELLOW)
        for (x1, y1), (x2, y2) in zip(inner, inner[1:] + inner[:1]):
            canvas.ellipse(((x1 - radius) * f, (y1 - radius) * f, (x1 + radius) * f, (y1 + radius) * f), fill=YELLOW)
            length = math.dist((x1, y1), (x2, y2))
            nx, ny = (y2 - y1) / length * radius, -(x2 - x1) / length * radius
            canvas.polygon([((x1 + nx) * f, (y1 + ny) * f), ((x2 + nx) * f, (y2 + ny) * f),
                            ((x2 - nx) * f, (y2 - ny) * f), ((x1 - nx) * f, (y1 - ny) * f)], fill=YELLOW)
    return draw


def test_a_four_pointed_star_is_no_shape():
    result = classify_image(supersampled(star()))
    assert result["shape"] is None and result["shape_iou"] < 0.7 and result["color"] == "yellow"


@pytest.mark.parametrize("pinch", [2.5, 3.5])
def test_a_square_with_pinched_sides_is_no_square(pinch):
    result = classify_image(supersampled(pinched_square(pinch=pinch)))
    assert result["shape"] is None and result["solidity"] < 0.85
    assert classify_image(supersampled(pinched_square(pinch=0.0)))["shape"] == "square"  # the same square, straight


def test_a_speck_beside_a_circle_leaves_the_circle_but_not_clean():
    def circle_and_speck(draw, f):
        draw.ellipse((20 * f, 20 * f, 42 * f, 42 * f), fill=YELLOW)
        draw.ellipse((50 * f, 50 * f, 53 * f, 53 * f), fill=(240, 225, 140))  # a faint 3 px speck
    result = classify_image(supersampled(circle_and_speck))
    assert (result["shape"], result["color"], result["clean"]) == ("circle", "yellow", False)
    assert classify_image(supersampled(lambda d, f: d.ellipse((20 * f, 20 * f, 42 * f, 42 * f), fill=YELLOW)))[
        "clean"] is True


def test_a_triangle_keeps_its_name_with_slightly_rounded_corners_and_loses_it_when_they_are_round():
    assert classify_image(supersampled(rounded_triangle(radius=2.0)))["shape"] == "triangle"
    assert classify_image(supersampled(rounded_triangle(radius=5.0)))["shape"] is None  # a blob: neither shape


def test_score_images_rejects_bad_input():
    image = Image.new("RGB", (64, 64), "white")
    with pytest.raises(ValueError, match="1 images and 2 captions"):
        score_images([image], ["a red circle in the center"] * 2)
    with pytest.raises(ValueError, match="a cat"):
        score_images([image], ["a cat"])


def test_psnr_matches_known_errors():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(4, 3, 16, 16, generator=generator) - 0.5  # [-0.5, 0.5]: no clamping below
    assert psnr(reference, reference.clone()) == PSNR_CAP_DB  # identical: capped, not inf
    signs = torch.randint(0, 2, reference.shape, generator=generator) * 2 - 1
    assert psnr(reference, reference + 0.2 * signs) == pytest.approx(20.0, abs=1e-4)  # 0.1 on the [0, 1] scale
    noisy = reference + 0.1 * torch.randn(reference.shape, generator=generator)  # sigma 0.05 on [0, 1]
    assert psnr(reference, noisy) == pytest.approx(-20 * math.log10(0.05), abs=0.3)
    # the batch mean is over images: one at 20 dB and one at 40 dB average to 30 dB
    offsets = torch.tensor([0.2, 0.02]).view(2, 1, 1, 1)
    assert psnr(reference[:2], reference[:2] + offsets) == pytest.approx(30.0, abs=1e-3)
    # reconstructions are clamped to the image range first, as saving them as images would
    white = torch.ones(1, 3, 8, 8)
    assert psnr(white, white * 1.5) == PSNR_CAP_DB
    with pytest.raises(ValueError, match="same shape"):
        psnr(reference, reference[:2])


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=32).eval()


def test_vae_psnr_of_a_tiny_vae_and_of_a_perfect_one():
    images = [image for image, _ in heldout_images(32, num_images=5)]
    random_vae = vae_psnr(tiny_vae(), images, batch_size=2)
    assert math.isfinite(random_vae) and 0 < random_vae < 30  # an untrained VAE reconstructs badly
    assert vae_psnr(tiny_vae(), images, batch_size=5) == pytest.approx(random_vae, abs=1e-3)  # batching is neutral

    identity = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                               encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
                               decode=lambda z: SimpleNamespace(sample=z))
    assert vae_psnr(identity, images) == PSNR_CAP_DB > random_vae
    # a VAE that always decodes mid-grey: white and black images are both 0.5 away on the [0, 1] scale
    grey = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                           encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
                           decode=lambda z: SimpleNamespace(sample=torch.zeros_like(z)))
    black_and_white = [Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")]
    assert vae_psnr(grey, black_and_white) == pytest.approx(-10 * math.log10(0.25), abs=1e-4)
    with pytest.raises(ValueError, match="same size"):
        vae_psnr(grey, [Image.new("RGB", (8, 8)), Image.new("RGB", (16, 16))])


def test_evaluation_prompts_cover_the_grid_with_fixed_seeds():
    prompts, seeds = evaluation_prompts(seeds_per_prompt=2)
    assert len(prompts) == len(seeds) == 180
    assert set(prompts) == set(all_captions())
    assert prompts[:2] == ["a red circle in the top left"] * 2 and seeds[:4] == [1000, 1001, 1000, 1001]
    assert evaluation_prompts(2) == (prompts, seeds)
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        evaluation_prompts(0)


def test_heldout_images_are_fresh_deterministic_and_balanced():
    pairs = heldout_images(32, num_images=90)
    assert [text for _, text in pairs] == [text for _, text in heldout_images(32, num_images=90)]
    assert pairs[0][0].tobytes() == heldout_images(32, num_images=1)[0][0].tobytes()
    assert sorted(text for _, text in pairs) == sorted(all_captions())
    assert all(image.size == (32, 32) for image, _ in pairs)
    other = heldout_images(32, num_images=90, seed=0)
    assert [image.tobytes() for image, _ in pairs] != [image.tobytes() for image, _ in other]


@pytest.fixture(scope="module")
def shapes_pipeline(tmp_path_factory):
    """Untrained, but with a tokenizer learned from the shapes captions, as a shapes run's pipeline has."""
    return save_untrained_pipeline(tmp_path_factory.mktemp("shapes") / "pipeline", all_captions())


def test_evaluate_model_reports_scores_for_a_saved_pipeline(shapes_pipeline):
    from ldm_pipeline.shapes.checker import evaluate_model

    report = evaluate_model(shapes_pipeline, seeds_per_prompt=1, batch_size=45, psnr_images=8, device="cpu")
    assert report["num_images"] == 90 and len(report["per_image"]) == 90
    assert all(0.0 <= report[f"{field}_accuracy"] <= 1.0 for field in ("color", "shape", "position", "all"))
    assert math.isfinite(report["vae_psnr_db"])
    assert report["settings"] | {"scheduler": None} == {
        "model": str(shapes_pipeline), "seeds_per_prompt": 1, "first_seed": 1000, "resolution": 32,
        "psnr_images": 8, "num_inference_steps": 2, "guidance_scale": 5.0, "scheduler": None}


def test_evaluate_refuses_a_model_not_trained_on_shapes(trained_run, capsys):
    from ldm_pipeline.shapes.checker import evaluate_model

    # trained_run's tokenizer was learned from "a red square on the left"-style captions
    with pytest.raises(ConfigError, match="evaluate scores models trained on the shapes data set .*, and "
                                          ".*pipeline was not: its tokenizer does not know the shapes words "
                                          "an, bottom, center, circle, green, in"):
        evaluate_model(trained_run / "pipeline", device="cpu")
    assert cli(["evaluate", "--model", str(trained_run / "pipeline"), "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, "evaluate scores models trained on the shapes data set")


def test_a_shape_running_past_the_frame_is_counted_as_cut():
    inside = draw_shape("red", "square", "top left", 64, random.Random(0))
    cut = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(cut).rectangle((-8, 4, 14, 26), fill=(220, 40, 40))  # its left part beyond the frame
    assert classify_image(inside)["cut"] is False and classify_image(cut)["cut"] is True
    report = score_images([inside, cut], ["a red square in the top left"] * 2)
    assert report["cut_fraction"] == 0.5
