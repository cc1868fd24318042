"""The model card saved as README.md with every pipeline, in the Hugging Face hub's form.

The YAML header comes from huggingface_hub's `ModelCardData` (library, pipeline tag, tags, base
model, data sets); the body says what a reader needs to trust or reproduce the model: the data,
the steps of each stage, the settings, the evaluation numbers and a grid of samples. A training
variant (e.g. LoRA) adds its tag, its `base_model` and a section in `training_card`.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import TEXT_ENCODER_LORA_TARGETS, Config, fields_with, get_setting
from .data import UNCONDITIONAL
from .models import base_reference, resolve_source
from .run_dir import RUN_DATA_FILE, SKIPPED_IMAGES_FILE

TAGS = ["ldm_pipeline", "text-to-image", "diffusers", "stable-diffusion-style"]
SAMPLE_GRID = "sample_grid.png"  # the final validation grid, copied next to the card


def _card(body: str, base_model: list[str] | None = None, datasets: list[str] | None = None,
          tags: list[str] = TAGS) -> ModelCard:
    if base_model is not None and len(base_model) < 2:  # the hub's usual form for one base model: a string
        base_model = base_model[0] if base_model else None
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=list(tags),
                         base_model=base_model, datasets=datasets or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def minimal_card(name: str, pipeline_class: str = "StableDiffusionPipeline") -> ModelCard:
    """For a pipeline saved outside a training run: what it is and how to load it."""
    return _card(f"# {name}\n\nA diffusers `{pipeline_class}` saved by ldm_pipeline.\n\n"
                 f"{_usage(None, pipeline_class)}")


def _pipeline_class(parameters: dict[str, int]) -> str:
    return "StableDiffusionXLPipeline" if "text_encoder_2" in parameters else "StableDiffusionPipeline"


def _usage(sampling, pipeline_class: str) -> str:
    settings = "" if sampling is None else \
        f", num_inference_steps={sampling.num_inference_steps}, guidance_scale={sampling.guidance_scale}"
    return (f"## Use\n\n```python\nfrom diffusers import {pipeline_class}\n\n"
            f"pipe = {pipeline_class}.from_pretrained(\"path/to/this/directory\")\n"
            f"image = pipe(\"a prompt\"{settings}).images[0]\n```\n\n"
            "or `ldm-pipeline generate --model path/to/this/directory --prompt \"a prompt\"`, which writes the "
            "prompt, seed and settings into each PNG.")


def _lora_usage(config: Config, pipeline_class: str) -> str:
    sampling = config.sampling
    return (f"## Use\n\n```python\nfrom diffusers import {pipeline_class}\n\n"
            f"pipe = {pipeline_class}.from_pretrained(\"{base_reference(config.model)}\")\n"
            "pipe.load_lora_weights(\"path/to/this/directory\")\n"
            f"image = pipe(\"a prompt\", num_inference_steps={sampling.num_inference_steps}, "
            f"guidance_scale={sampling.guidance_scale}).images[0]\n```\n\n"
            "or `ldm-pipeline generate --lora path/to/this/directory --prompt \"a prompt\"` (the base is read from "
            "`base_model.json`).")


def _lora_section(config: Config, parameters: dict[str, int]) -> str:
    lora = config.lora
    encoders = "both text encoders'" if "text_encoder_2" in parameters else "the text encoder's"
    targets = f"the UNet's {', '.join(lora.target_modules)}" + (
        f" and {encoders} {', '.join(TEXT_ENCODER_LORA_TARGETS)}" if lora.train_text_encoder else "")
    return (f"## LoRA\n\nRank {lora.rank} adapters (alpha {lora.alpha or lora.rank}, dropout {lora.dropout}) on "
            f"{targets} of `{base_reference(config.model)}`: {parameters['trainable'] / 1e6:.3f}M trained "
            "parameters; the base stays as it is. The weights are in diffusers' LoRA format "
            "(`pytorch_lora_weights.safetensors`).")


def _is_hub_id(value: str | None) -> bool:
    """Only hub repositories go in the header; local directories are named in the body."""
    return bool(value) and not Path(value).expanduser().exists()


def _base_models(config: Config) -> list[str]:
    sources = [resolve_source(config.model, name) for name in ("unet", "vae", "text_encoder")]
    return sorted({source.path for source in sources if source.path and _is_hub_id(source.path)})


def _data_section(config: Config, num_images: int, num_heldout: int) -> str:
    data = config.data
    if data.dataset_name:
        source = f"the dataset `{data.dataset_name}`"
        if data.dataset_config_name:
            source += f" (config `{data.dataset_config_name}`)"
    elif data.webdataset:
        source = f"webdataset shards `{data.webdataset}`"
    else:
        source = f"the image folder `{data.image_folder}`"
        if data.instance_data_dir:
            source = f"DreamBooth: the pictures of one subject in `{data.instance_data_dir}`"
        if data.make_shapes is not None:
            source += f" (synthetic shapes, {data.make_shapes.num_images} drawn with seed {data.make_shapes.seed})"
    # Where the captions really came from, as the run found them (a folder without captions trains unconditionally
    # whatever data.caption_column says); the config's word for a card made outside a run.
    run_data = Path(config.output_dir) / RUN_DATA_FILE
    record = json.loads(run_data.read_text()) if run_data.is_file() else {}
    captions = record.get("caption_source") or (
        UNCONDITIONAL if data.caption_column is None else f"column `{data.caption_column}`")
    if captions != UNCONDITIONAL:
        captions += f", dropped {data.caption_dropout:.0%} of the time for classifier-free guidance"
        if data.shuffle_tags or data.tag_dropout:
            reshaped = " and ".join(part for part in ("shuffled" if data.shuffle_tags else "",
                                                      f"each dropped with probability {data.tag_dropout:g}"
                                                      if data.tag_dropout else "") if part)
            captions += (f"; comma-separated tags {reshaped} anew each epoch"
                         + (f", the first {data.keep_tokens} kept in place" if data.keep_tokens else ""))
    lines = [f"- source: {source}", f"- images: {num_images:,} ({num_heldout} of them held out for the validation "
             "loss)", f"- captions: {captions}"]
    if data.class_data_dir:
        lines.append(f"- prior preservation: the first {data.num_class_images} images of `{data.class_data_dir}`, "
                     f"captioned `{data.class_prompt}` (those it lacked were generated with the base model before "
                     "training, their prompt and seed in each PNG), one paired with each picture in every batch; "
                     f"loss = instance loss + {config.prior_loss_weight:g} x class loss")
    if data.skips_bad_images:
        lines.append(f"- bad images: skipped (`data.skip_bad_images`): {record.get('skipped_images', 0)} left out "
                     f"before training, listed in the run's {SKIPPED_IMAGES_FILE}")
    lines.append(f"- preprocessing: {config.resolution}x{config.resolution}, "
                 f"{'center' if data.center_crop else 'random'} crop, "
                 f"{'random' if data.random_flip else 'no'} horizontal flips")
    return "## Training data\n\n" + "\n".join(lines)


def _training_section(config: Config, num_processes: int, parameters: dict[str, int]) -> str:
    rows = []
    if "vae" in config.stages:
        vae = config.vae_training
        rows.append(f"| vae | {vae.max_train_steps} | {vae.train_batch_size * num_processes} | "
                    f"{vae.learning_rate:g} ({vae.lr_scheduler}) |")
    global_batch = config.train_batch_size * num_processes * config.gradient_accumulation_steps
    rows.append(f"| unet | {config.max_train_steps} | {global_batch} | {config.learning_rate:g} "
                f"({config.lr_scheduler}) |")
    trained = {"unet": "" if not config.lora.rank else ", frozen under its LoRA adapters",
               "vae": "" if "vae" in config.stages else ", frozen",
               "text_encoder": "" if config.train_text_encoder else ", frozen under its LoRA adapters"
               if config.lora.train_text_encoder else ", frozen"}
    trained["text_encoder_2"] = trained["text_encoder"]
    components = "\n".join(f"- {name}: {parameters[name] / 1e6:.2f}M parameters, initialised from "
                           f"{resolve_source(config.model, name).describe()}{trained[name]}"
                           for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name in parameters)
    settings = {key: get_setting(config, key) for key in fields_with(card=True)} | {"processes": num_processes}
    return ("## Training\n\n| stage | optimizer steps | global batch | learning rate |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n" + ", ".join(f"`{k}`: {v}" for k, v in settings.items())
            + f"\n\n{components}")


def _evaluation_section(config: Config, metrics: dict) -> str:
    rows = []
    calibration = Path(config.output_dir) / "vae" / "calibration.json"
    if calibration.is_file():
        psnr = json.loads(calibration.read_text()).get("heldout_psnr_db")
        if psnr is not None:
            rows.append(f"| VAE reconstruction PSNR, held-out images | {psnr:.2f} dB |")
    if metrics.get("val_loss") is not None:
        rows.append(f"| diffusion validation loss, held-out images (final) | {metrics['val_loss']:.4f} |")
    if not rows:
        return ""
    return "## Evaluation\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)


def _samples_section(config: Config) -> str:
    prompts = config.validation.prompts or [""]
    return (f"## Samples\n\n![validation samples: one column per prompt, one row per seed]({SAMPLE_GRID})\n\n"
            f"Columns: {' | '.join(repr(p) for p in prompts)}; rows: seeds {config.validation.seeds}; "
            f"{config.sampling.scheduler}, {config.sampling.num_inference_steps} steps, guidance "
            f"{config.sampling.guidance_scale}.")


def training_card(config: Config, *, num_images: int, num_heldout: int, num_processes: int,
                  parameters: dict[str, int], metrics: dict, sample_grid: bool) -> ModelCard:
    """The card of a pipeline made by a training run."""
    name = Path(config.output_dir).name
    lora = config.lora.rank > 0
    pipeline_class = _pipeline_class(parameters)
    encoders = "two CLIP text encoders" if "text_encoder_2" in parameters else "CLIP text encoder"
    intro = (f"# {name}\n\nA LoRA for the text-to-image pipeline `{config.model.pretrained_model_name_or_path}`, "
             "trained with ldm_pipeline." if lora else
             f"# {name}\n\nA text-to-image latent diffusion model (a diffusers `{pipeline_class}`: "
             f"`AutoencoderKL`, {encoders}, `UNet2DConditionModel`) trained with ldm_pipeline.")
    sections = [
        intro,
        _lora_usage(config, pipeline_class) if lora else _usage(config.sampling, pipeline_class),
        _lora_section(config, parameters) if lora else "",
        _data_section(config, num_images, num_heldout),
        _training_section(config, num_processes, parameters),
        _evaluation_section(config, metrics),
        _samples_section(config) if sample_grid else "",
    ]
    datasets = [config.data.dataset_name] if _is_hub_id(config.data.dataset_name) else []
    return _card("\n\n".join(s for s in sections if s) + "\n", base_model=_base_models(config), datasets=datasets,
                 tags=TAGS + ["lora"] if lora else TAGS)
