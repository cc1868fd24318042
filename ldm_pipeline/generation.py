"""Generation: `generate` (batching, seeds, PNG metadata, any number of processes), the image writer, GIFs."""

from __future__ import annotations

import math
import os
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers.utils import export_to_gif, make_image_grid
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from tqdm.auto import tqdm

from .config import ConfigError
from .pipeline import FALLBACK_DEFAULTS
from .run_dir import written_then_renamed


class GeneratedImage(Image.Image):
    """A PIL image whose PNG files carry its generation settings (`image.info["parameters"]`)."""

    def save(self, fp, format=None, **params):
        if "pnginfo" not in params:
            info = PngImagePlugin.PngInfo()
            for key, value in self.info.get("parameters", {}).items():
                info.add_text(key, str(value))
            params["pnginfo"] = info
        super().save(fp, format, **params)


def _as_generated(image: Image.Image, parameters: dict) -> GeneratedImage:
    image.__class__ = GeneratedImage  # same object, PNG-metadata-aware save()
    image.info["parameters"] = parameters
    return image


def _seed_list(seeds, count: int) -> list[int]:
    if seeds is None:
        return list(range(count))
    if isinstance(seeds, int):
        return [seeds + i for i in range(count)]
    seeds = list(seeds)
    if len(seeds) != count:
        raise ValueError(f"seeds: got {len(seeds)} seeds for {count} prompts; give one per prompt or one int")
    return seeds


def generate(pipe, prompts, seeds=None, **kwargs):
    """Generate one image per prompt, each from its own seed, so an image depends only on
    (prompt, seed, settings), never on batching or on which process made it. Returns the images
    (PIL, carrying their settings as PNG metadata), or (images, progress) with `return_progress`.

    `seeds`: None (0, 1, ...), an int (seed, seed + 1, ...) or one per prompt. Keyword arguments
    are those of `generate_batches`, which yields the same images batch by batch as they are made.
    """
    made = [item for batch in generate_batches(pipe, prompts, seeds, **kwargs) for item in batch]
    images = [image for image, _ in made]
    return (images, [frames for _, frames in made]) if kwargs.get("return_progress") else images


def generate_batches(pipe, prompts, seeds=None, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                     batch_size: int = 8, negative_prompt: str | None = None, return_progress: bool = False,
                     show_progress: bool = True, state=None, check_finite: bool = True,
                     guidance_rescale: float | None = None):
    """Yield the images of `generate` in prompt order, one batch at a time, as soon as it is made: a list
    of (image, frames) pairs, where frames are the decoded intermediate images with `return_progress`
    (else None). Nothing is held back, so a caller can write each batch before the next one starts.
    Settings left None take the model's defaults (`pipe.generation_defaults`: steps, guidance, its rescaling
    for a zero-terminal-SNR model, and the trained resolution as height and width).

    With an Accelerate `state` (a `PartialState` or `Accelerator`), every process must iterate: each
    round of batch_size x processes prompts is split across the processes and gathered, so every
    process yields every image, the same at any process count.

    An image with NaN/inf pixels (weights holding NaN, an overflow) stops the generation with an error
    unless `check_finite` is off (training's validation grids: a diverging run should go on to its
    loss guard, not stop at a picture).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = _seed_list(seeds, len(prompts))
    check_generation_settings(num_inference_steps, guidance_scale, height, width, batch_size, pipe.vae_scale_factor)
    defaults = {**FALLBACK_DEFAULTS, **getattr(pipe, "generation_defaults", {})}
    steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    rescale = defaults.get("guidance_rescale", 0.0) if guidance_rescale is None else guidance_rescale
    height, width = height or defaults.get("height"), width or defaults.get("width")
    settings = {"negative_prompt": negative_prompt or "", "num_inference_steps": steps, "guidance_scale": guidance,
                **({"guidance_rescale": rescale} if rescale else {}),
                "scheduler": getattr(pipe, "scheduler_name", type(pipe.scheduler).__name__),
                "model": pipe.name_or_path or ""}
    if getattr(pipe, "lora_path", None):
        settings["lora"] = pipe.lora_path

    def make(jobs):  # [(index, prompt, seed)] -> [(index, image, frames)], one pipeline call
        steps_latents = []

        def keep_latents(pipeline, step, timestep, tensors):
            steps_latents.append(tensors["latents"].detach().clone())
            return tensors

        pixels = pipe(
            [prompt for _, prompt, _ in jobs], num_inference_steps=steps, guidance_scale=guidance, height=height,
            width=width, guidance_rescale=rescale,
            negative_prompt=[negative_prompt] * len(jobs) if negative_prompt else None,
            generator=[torch.Generator("cpu").manual_seed(seed) for _, _, seed in jobs],
            callback_on_step_end=keep_latents if return_progress else None,
            output_type="np",  # (B, H, W, 3) in [0, 1]; NaN stays NaN here, while as a PIL image it is black
        ).images
        made = []
        for i, (index, prompt, seed) in enumerate(jobs):
            if check_finite and not np.isfinite(pixels[i]).all():
                made.append((index, None, None))
                continue
            image = pipe.image_processor.numpy_to_pil(pixels[i:i + 1])[0]  # as diffusers' output_type="pil"
            frames = [decode_latents(pipe, latents[i:i + 1])[0] for latents in steps_latents] or None
            parameters = {"prompt": prompt, "seed": seed, **settings, "width": image.width, "height": image.height}
            made.append((index, _as_generated(image, parameters), frames))
        return made

    jobs = [(i, prompt, seed) for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
    per_round = batch_size * (state.num_processes if state is not None else 1)
    is_main = state is None or state.is_main_process
    with tqdm(total=len(jobs), desc="generating", unit="image", disable=not (show_progress and is_main) or None,
              leave=False) as bar:
        for start in range(0, len(jobs), per_round):
            round_jobs = jobs[start:start + per_round]
            if state is None:
                made = make(round_jobs)
            else:
                with state.split_between_processes(round_jobs) as mine:
                    made = make(mine) if mine else []
                made = sorted(gather_object(made), key=lambda item: item[0])
            failed = [jobs[index] for index, image, _ in made if image is None]
            if failed:  # every process sees the gathered list, so all of them stop here together
                _, prompt, seed = failed[0]
                raise ValueError(
                    f"model {settings['model'] or 'in use'} made {len(failed)} image(s) of NaN/inf pixels (saved, "
                    f"they would be black), e.g. prompt {prompt!r} seed {seed}: its weights hold NaN/inf values "
                    f"(a damaged or diverged model), or {pipe.dtype} overflowed; check the model's files, or "
                    "generate in float32 (e.g. --device cpu)")
            bar.update(len(made))
            yield [(image, frames) for _, image, frames in made]


def check_generation_settings(num_inference_steps=None, guidance_scale=None, height=None, width=None,
                              batch_size: int = 1, factor: int = 8) -> None:
    """Refuse settings that would silently give other images than asked for (None: the model's default)."""
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or
                                            not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ConfigError(f"num_inference_steps (--steps): {num_inference_steps!r} must be a whole number of "
                          "at least 1; leave it out for the model's default")
    # diffusers applies classifier-free guidance only above 1: any value <= 1, a negative one too, gives the
    # unguided image while the PNG would record the value asked for.
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ConfigError(f"guidance_scale (--guidance): {guidance_scale} must be a finite number >= 0 (values <= 1 "
                          "turn guidance off; above 1 it follows the prompt more closely); leave it out for the "
                          "model's default")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < factor or value % factor):
            raise ConfigError(f"{name} (--{name}): {value} must be a positive multiple of {factor}, the VAE's "
                              "downsampling factor; leave it out for the size the model was trained at")
    if batch_size < 1:
        raise ConfigError(f"batch_size (--batch-size): {batch_size} must be at least 1")


@torch.no_grad()
def decode_latents(pipe, latents) -> list[Image.Image]:
    """Decode (B, 4, h, w) scaled latents to PIL images, as the pipeline does at its last step."""
    pixels = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


class ImageWriter:
    """Numbered PNGs in one folder (`00000.png`, ... after the highest number already there), each
    under a name claimed atomically: the image is written to a hidden temporary file, then hard-linked
    to the next free number (a link never replaces an existing name). Generations writing into one
    folder at once therefore never overwrite each other, and a numbered name only ever appears with a
    complete image behind it."""

    def __init__(self, out_dir, prefix: str = ""):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.out_dir):  # a read-only folder fails here, before any generation
            pass
        pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.png")
        numbers = [int(m.group(1)) for path in self.out_dir.glob(f"{prefix}*.png")
                   if (m := pattern.fullmatch(path.name))]
        self.next_number = max(numbers, default=-1) + 1

    def save(self, image: Image.Image) -> Path:
        # Not mkstemp: its files are 0600 whatever the umask, and the link keeps that mode, so other users and
        # web servers could not read the image. 0o666 here gets the umask, as any file the user writes.
        temporary = self.out_dir / f".{os.getpid()}-{secrets.token_hex(8)}.png.partial"
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as file:
                image.save(file, format="PNG")
            while True:
                path = self.out_dir / f"{self.prefix}{self.next_number:05d}.png"
                self.next_number += 1
                try:
                    os.link(temporary, path)
                    return path
                except FileExistsError:  # taken since we looked, e.g. by another generation
                    continue
        finally:
            os.unlink(temporary)


def save_images(images, out_dir, prefix: str = "") -> list[Path]:
    """Numbered PNGs, continuing after the images already there; nothing is ever overwritten."""
    writer = ImageWriter(out_dir, prefix)
    return [writer.save(image) for image in images]


def read_png_metadata(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def save_progress_gif(frames, path, fps: int = 8) -> Path:
    """An animated GIF of the decoded latents, one frame per denoising step, the last frame held
    (repeated: the GIF writer merges repeats into one long frame). 8 fps: 125 ms frames, which GIF's
    centisecond clock stores as 120 ms. Written under a temporary name and renamed: complete or absent."""
    path = Path(path)
    with written_then_renamed(path) as partial:
        export_to_gif(list(frames) + [frames[-1]] * 5, str(partial), fps=fps)
    return path


def captioned_grid(images: list[Image.Image], rows: int, captions: list[str], min_width: int = 128) -> Image.Image:
    """`make_image_grid` of `images` (row-major, one column per caption) with each column's caption written under
    it, so a grid shows what was asked beside what was drawn. Images narrower than `min_width` are enlarged
    (nearest neighbour: pixels stay visible) so a caption fits in a few lines."""
    cols = len(captions)
    scale = max(1, -(-min_width // images[0].width))
    tiles = [image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) for image in images]
    grid = make_image_grid(tiles, rows=rows, cols=cols)
    width, font = tiles[0].width, ImageFont.load_default(size=11)
    wrapped = [_wrap(text or "(empty prompt)", font, width - 6) for text in captions]
    line_height = font.getbbox("Ag")[3] + 3
    strip = 6 + line_height * max(len(lines) for lines in wrapped)
    canvas = Image.new("RGB", (grid.width, grid.height + strip), "white")
    canvas.paste(grid, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for col, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((col * width + 3, grid.height + 3 + k * line_height), line, fill=(0, 0, 0), font=font)
    return canvas


def _wrap(text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines
