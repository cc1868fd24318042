"""The saved pipeline directory, `load_pipeline`, and `generate` (batching, seeds, PNG metadata).

A trained model is a standard diffusers `StableDiffusionPipeline` directory; we add one small
file, `ldm_pipeline.json`, with the sampling defaults the model was validated with.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import export_to_gif
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .config import ConfigError, SamplingConfig
from .models import make_sampler, vae_scale_factor
from .tokenizer import save_tokenizer

DEFAULTS_FILE = "ldm_pipeline.json"
# Components of Stable Diffusion 1.x repos we never load (load_pipeline passes None for them), so a copy may lack
# their folders.
NOT_LOADED = ("safety_checker", "feature_extractor")
FALLBACK_DEFAULTS = {"scheduler": "dpmsolver++", "num_inference_steps": 25, "guidance_scale": 7.5}


def replace_directory(partial: Path, final: Path) -> None:
    """Move a completely written `partial` directory to `final`, never leaving `final` half-written:
    an old `final` is renamed aside first and removed only once the new one is in place."""
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_pipeline(directory, *, vae, text_encoder, tokenizer, unet, noise_scheduler, sampling: SamplingConfig,
                  extra: dict | None = None, card=None, sample_grid: Path | None = None) -> Path:
    """Write a plain `StableDiffusionPipeline` directory (safetensors, no safety checker) atomically,
    with a model card (`card`, a huggingface_hub `ModelCard`; a minimal one by default) as README.md
    and the `sample_grid` image it shows.

    Its scheduler is the sampler from `sampling`, configured from the training noise schedule, and
    with `extra={"resolution": R}` the UNet's `sample_size` is R / 8, so plain
    `StableDiffusionPipeline.from_pretrained` users get the fast sampler and the trained image size too
    (steps and guidance are arguments of diffusers' `__call__`, which no saved file sets).
    """
    from .card import SAMPLE_GRID, minimal_card

    directory = Path(directory)
    resolution = (extra or {}).get("resolution")
    if resolution and unet.config.sample_size != resolution // vae_scale_factor(vae):
        # Plain diffusers sizes its images from the UNet's sample_size: make that the trained resolution.
        unet.register_to_config(sample_size=resolution // vae_scale_factor(vae))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_sampler(sampling.scheduler, noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    partial = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    save_tokenizer(tokenizer, partial / "tokenizer")  # adds vocab.json + merges.txt for older transformers
    defaults = {"scheduler": sampling.scheduler, "num_inference_steps": sampling.num_inference_steps,
                "guidance_scale": sampling.guidance_scale, **(extra or {})}
    (partial / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))
    (card or minimal_card(directory.name)).save(partial / "README.md")
    if sample_grid is not None:
        shutil.copyfile(sample_grid, partial / SAMPLE_GRID)
    replace_directory(partial, directory)
    return directory


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def best_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_pipeline(path_or_id: str | os.PathLike | None, device=None, dtype=None, scheduler: str | None = None,
                  lora: str | os.PathLike | None = None, variant: str | None = None):
    """A ready `StableDiffusionPipeline`: best device and dtype, our fast sampler.

    `pipe.generation_defaults` holds the steps, guidance and (for models trained here) image size the
    model was trained to be sampled with; `generate` and the CLI use them, and
    `pipe(prompt, **pipe.generation_defaults)` does the same by hand. A bare `pipe(prompt)` is diffusers'
    own call: our sampler and the UNet's size, but diffusers' 50 steps and guidance 7.5.

    `lora`: a LoRA directory (<output_dir>/lora of a LoRA run), loaded with diffusers' `load_lora_weights`;
    `path_or_id` None then loads the base it names. `variant`: read the base's variant weight files, e.g.
    "fp16" (default: the LoRA's, else the plain files). Safety checker and feature extractor are never loaded.
    """
    if lora is not None:
        from .lora import read_lora_dir

        reference = read_lora_dir(lora)
        if path_or_id is None and not reference.get("base_model"):
            raise ConfigError(f"--lora {lora} does not name its base model (no base_model.json); give the base "
                              "with --model")
        path_or_id = path_or_id if path_or_id is not None else reference["base_model"]
        variant = variant or reference.get("variant")
    elif path_or_id is None:
        raise ConfigError("give a model: a pipeline directory or hub id (--model), or a LoRA directory (--lora)")
    path = Path(path_or_id).expanduser()
    if not path.exists() and str(path_or_id).startswith((".", "/", "~")):
        raise ConfigError(f"model {path_or_id} does not exist; give a trained pipeline directory "
                          "(e.g. outputs/shapes/pipeline) or a hub id")
    if path.exists() and not (path / "model_index.json").is_file():
        raise ConfigError(f"model {path_or_id} is not a diffusers pipeline directory (no model_index.json); "
                          "give <output_dir>/pipeline of a finished training run")
    if path.exists():
        check_pipeline_folders(path)
    device = check_device(device) if device is not None else best_device()
    dtype = dtype or best_dtype(device)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path_or_id), dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            use_safetensors=True, variant=variant)
    except OSError as error:
        raise ConfigError(f"could not load model {path_or_id}: {' '.join(str(error).split())} Weights are read "
                          "as safetensors only (pickled .bin files are refused).") from error
    defaults = dict(FALLBACK_DEFAULTS)
    if (path / DEFAULTS_FILE).is_file():
        defaults.update(json.loads((path / DEFAULTS_FILE).read_text()))
    defaults["scheduler"] = scheduler or defaults["scheduler"]
    pipe.scheduler = make_sampler(defaults["scheduler"], pipe.scheduler.config)
    pipe.generation_defaults = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale")}
    if defaults.get("resolution"):  # saved by training; without it diffusers' default size is used
        pipe.generation_defaults.update(height=defaults["resolution"], width=defaults["resolution"])
    pipe.scheduler_name = defaults["scheduler"]
    pipe.lora_path = None
    if lora is not None:
        from .lora import load_lora

        load_lora(pipe, lora)
        pipe.lora_path = str(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_pipeline_folders(path: Path) -> None:
    """Every component model_index.json lists must have its folder (a copy that missed tokenizer/ would
    otherwise fail with an unrelated error deep inside transformers)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except ValueError as error:
        raise ConfigError(f"model {path}: model_index.json cannot be read ({error}); copy the pipeline "
                          "directory again") from error
    missing = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
               and value[0] is not None and not (path / name).is_dir() and name not in NOT_LOADED]
    if missing:
        raise ConfigError(f"model {path} is incomplete: model_index.json lists {', '.join(missing)} but there is "
                          f"no {missing[0]}/ folder; copy the whole pipeline directory")


def check_device(device) -> torch.device:
    """A device this torch build can use, or an error saying which ones it can."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device {device!r} is not a device name ({' '.join(str(error).split())}); use cpu, "
                          "cuda, cuda:1, mps ... or leave it out for the best available") from error
    usable = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not usable.get(device.type, True):
        raise ConfigError(f"device {device}: this torch build has no {device.type.upper()} device it can use "
                          f"(torch {torch.__version__}); use --device cpu, or leave --device out for the best "
                          "available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


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
                     show_progress: bool = True, state=None, check_finite: bool = True):
    """Yield the images of `generate` in prompt order, one batch at a time, as soon as it is made: a list
    of (image, frames) pairs, where frames are the decoded intermediate images with `return_progress`
    (else None). Nothing is held back, so a caller can write each batch before the next one starts.
    Settings left None take the model's defaults (`pipe.generation_defaults`: steps, guidance, and
    the trained resolution as height and width).

    With an Accelerate `state` (a `PartialState` or `Accelerator`), every process must iterate: each
    round of batch_size x processes prompts is split across the processes and gathered, so every
    process yields every image, the same at any process count.

    An image with NaN/inf pixels (weights holding NaN, an overflow) stops the generation with an error
    unless `check_finite` is off (training's validation grids: a diverging run should go on to its
    loss guard, not stop at a picture).
    """
    from accelerate.utils import gather_object

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = _seed_list(seeds, len(prompts))
    check_generation_settings(num_inference_steps, guidance_scale, height, width, batch_size, pipe.vae_scale_factor)
    defaults = {**FALLBACK_DEFAULTS, **getattr(pipe, "generation_defaults", {})}
    steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    height, width = height or defaults.get("height"), width or defaults.get("width")
    settings = {"negative_prompt": negative_prompt or "", "num_inference_steps": steps, "guidance_scale": guidance,
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
            width=width,
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
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ConfigError(f"guidance_scale (--guidance): {guidance_scale} must be a finite number (1 turns "
                          "guidance off); leave it out for the model's default")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value < factor or value % factor):
            raise ConfigError(f"{name} (--{name}): {value} must be a positive multiple of {factor}, the VAE's "
                              "downsampling factor; leave it out for the size the model was trained at")
    if batch_size < 1:
        raise ConfigError(f"batch_size (--batch-size): {batch_size} must be at least 1")


def process_state():
    """This process's place among the ones `accelerate launch` started (alone when run directly).

    Only an `Accelerator` reads ACCELERATE_USE_CPU; a bare `PartialState` on a machine without GPUs
    ignores it, and then every launched process would make and write every image itself."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_process_group(state.num_processes)
    return state


def check_process_group(num_processes: int) -> None:
    """Refuse N launched processes that each run alone: they would all write the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ConfigError(f"{launched} processes were launched but they did not join one process group "
                          f"(each sees {num_processes}); on a machine without GPUs set ACCELERATE_USE_CPU=1, "
                          "which accelerate launch does not pass on from use_cpu: true")


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
        handle, temporary = tempfile.mkstemp(dir=self.out_dir, prefix=".", suffix=".png.partial")
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
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}.gif")
    export_to_gif(list(frames) + [frames[-1]] * 5, str(partial), fps=fps)
    os.replace(partial, path)
    return path
