"""Training: `accelerate launch train.py --config train_configs/x.yaml [--set key=value] [--dry-run]`
(installed: `accelerate launch -m ldm_pipeline.cli train ...`, or `ldm-pipeline train` in one process).

`train(config)` reads top to bottom: Accelerator -> the run directory checks -> `prepare()` (data, text
components, VAE: the one set-up that training, `--dry-run` and `ldm-pipeline cache` share) -> the run
directory is written -> the stages ("vae", then "unet"), each of which ends in its saved result. The stages
live in `vae_stage.py` and `unet_stage.py`, the loop they both run in `loop.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import data as data_lib
from . import dreambooth, latent_cache, plugins
from .buckets import bucket_table
from .checkpoints import check_resume_checkpoints
from .config import (
    Config,
    ConfigError,
    ModelConfig,
    add_run_arguments,
    load_config,
    os_error_message,
    stage_settings,
    to_yaml,
)
from .console import quiet_library_logs
from .cpu import set_up_cpu
from .distributed import check_fsdp, check_process_group, failed_collective, process_group_kwargs
from .loop import TrainingError, peer_lost
from .lora import check_targets
from .models import (
    build_text_encoder,
    build_unet,
    build_vae,
    load_tokenizer,
    model_family,
    resolve_source,
    seeded,
    vae_scale_factor,
)
from .run_dir import (
    RUN_DATA_FILE,
    SKIPPED_IMAGES_FILE,
    check_output_dir,
    list_skipped_images,
    output_dir_lock,
    prepare_output_dir,
    run_started,
    write_json,
    written_then_renamed,
)
from .tokenizer import save_tokenizer
from .unet_stage import cached_text_encoders, check_compiler, frozen_dtype, train_unet_stage, vae_dtype
from .vae_stage import load_trained_vae, train_vae_stage

# The run's own text components, saved in <output_dir> when made from presets or captions (SDXL: all four).
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def train(config: Config, dry_run: bool = False) -> Path | None:
    """Run every configured stage; returns <output_dir>/pipeline, or <output_dir>/lora for a LoRA run (None for a
    dry run, or a run of the vae stage only)."""
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    if dry_run:  # everything a run checks before writing, without writing
        describe_dry_run(accelerator, config, prepare(accelerator, config, dry_run=True))
        return None
    with output_dir_lock(config.output_dir, hold=accelerator.is_main_process):  # one run per output_dir
        # Every input is checked before output_dir is written, so a refused run leaves nothing behind.
        out = Path(config.output_dir)
        check_output_dir(config)
        check_resume_checkpoints(config, accelerator.num_processes)
        started = run_started(out)
        prepared = prepare(accelerator, config, check_images=needs_image_check(config),
                           listed_in=out / SKIPPED_IMAGES_FILE)
        prepare_output_dir(accelerator, config)  # after the checks; overwrite_output_dir clears vae/ here
        if accelerator.is_main_process:
            if not started:
                drop_stale_latent_cache(config, prepared)
            if prepared.new_text_components:
                save_run_text_components(config, prepared)
            save_run_data(config, prepared)
        accelerator.wait_for_everyone()  # no process reads the latent cache before a stale one is gone
        if config.report_to not in (None, "none"):
            accelerator.init_trackers("ldm_pipeline")  # tensorboard: <output_dir>/logs/ldm_pipeline
        second = f"text_encoder_2: {prepared.text_encoder_2.num_parameters() / 1e6:.2f}M parameters, " \
            if prepared.text_encoder_2 is not None else ""
        accelerator.print(f"text_encoder: {prepared.text_encoder.num_parameters() / 1e6:.2f}M parameters, {second}"
                          f"vae: {prepared.vae.num_parameters() / 1e6:.2f}M parameters, "
                          f"{prepared.num_examples} training images")
        accelerator.print(describe_run(config, accelerator, {}, prepared.num_examples))
        vae = prepared.vae
        if "vae" in config.stages:
            vae = train_vae_stage(accelerator, config, prepared.train, vae)
        if "unet" not in config.stages:
            accelerator.end_training()
            return None
        return train_unet_stage(accelerator, config, prepared.train, prepared.tokenizer, prepared.text_encoder, vae,
                                prepared.tokenizer_2, prepared.text_encoder_2)


def build_accelerator(config: Config) -> Accelerator:
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        forget_other_precision(config.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to in (None, "none") else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=str(Path(config.output_dir) / "logs")),
        # One seeded permutation per epoch, the same at any process count (and after a resume).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=[process_group_kwargs(config.distributed_timeout)],
    )
    check_process_group(accelerator.num_processes)
    check_fsdp(accelerator.distributed_type)
    return accelerator


def forget_other_precision(mixed_precision: str) -> None:
    """Accelerate keeps one state per process and refuses a second Accelerator with another mixed_precision; a
    second train() in the same single-process Python session (a notebook, a test) with another one starts afresh.
    Accelerate has no public call for this: its own tests reset the state through these two private names."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()


@dataclass
class Prepared:
    """What a run, a dry run and a cache build set up the same way before anything is trained or written."""

    train: data_lib.TrainData | None  # None in a dry run before a plug-in has written the data
    captions: list[str]
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    new_text_components: bool  # made now from presets or captions: saved in output_dir when the run starts
    vae: AutoencoderKL  # the run's finished VAE (<output_dir>/vae), else built from its seed
    bucket_notes: list[str]  # small aspect-ratio buckets merged into others (data.buckets)
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second tokenizer and text encoder
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def num_examples(self) -> int:
        return len(self.captions)

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:  # one, or SDXL's two
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])


def prepare(accelerator: Accelerator, config: Config, dry_run: bool = False, check_images: bool = True,
            listed_in: Path | None = None) -> Prepared:
    """The data (written first by a plug-in that makes it; a dry run reads the captions it would write instead),
    the run's text components and its VAE, and every check that would otherwise fail only later.

    Every image is decoded when `check_images` (each process its share), else only opened: the latent cache build
    decodes each image once, after output_dir is written, and the headers catch most bad files before that.
    `listed_in`: the file the caller writes the skipped images to (data.skip_bad_images)."""
    train, data = None, config.data
    planned = plugins.planned_captions(config) if dry_run and not data_exists(config) else None
    if planned is None:
        if not dry_run:
            plugins.prepare_data(config, accelerator)
        with accelerator.main_process_first():  # the first load writes datasets' cache; others reuse it
            train = data_lib.load_train_data(config, check_images=False)
        train = data_lib.check_train_images(train, data, accelerator, decode=check_images, listed_in=listed_in)
    bucket_notes = []
    if train is not None and data.buckets is not None:
        train, bucket_notes = data_lib.with_buckets(train, config, accelerator.num_processes, listed_in)
    captions = train.captions if train else planned[:data.max_train_samples]
    tokenizer, text_encoder, new, second = run_text_components(config, captions, train.fingerprint if train else None)
    dreambooth.check_prompts(tokenizer, data)
    if data.class_data_dir:
        dreambooth.missing_class_images(config)  # too few, and no base model to make the rest: refused here
    for component in ("vae", "unet"):  # a missing or pickle-only model directory fails here, not mid-run
        resolve_source(config.model, component)
    if config.lora.rank:
        check_targets(config.model, config.lora)
    check_compiler(config, accelerator.device)  # here, not in the config: it depends on the run's device
    finished = finished_vae(config)
    vae = load_trained_vae(finished) if finished else seeded(config.seed, "vae", lambda: build_vae(config.model))
    check_sizes(config, vae, len(captions), accelerator.num_processes)
    if data.class_data_dir and train is not None and not dry_run:  # every input checked: the class images come last
        dreambooth.make_class_images(accelerator, config)
        train = dataclasses.replace(train, prior=dreambooth.load_class_data(config, accelerator, check_images))
    return Prepared(train, captions, tokenizer, text_encoder, new, vae, bucket_notes, *second)


def data_exists(config: Config) -> bool:
    return bool(config.data.dataset_name or config.data.webdataset) or Path(config.data.image_folder).is_dir()


def finished_vae(config: Config) -> Path | None:
    """<output_dir>/vae when it holds this run's finished VAE stage (not a run that overwrite_output_dir replaces)."""
    folder = Path(config.output_dir) / "vae"
    replaced = config.overwrite_output_dir and not config.resume_from_checkpoint
    return folder if (folder / "config.json").is_file() and not replaced else None


def run_text_components(config: Config, captions: list[str], fingerprint: str | None):
    """(tokenizer, text encoder, newly built?, (tokenizer_2, text_encoder_2)) for this run; the last pair is SDXL's
    second tokenizer and text encoder, (None, None) for Stable Diffusion.

    A tokenizer built from the captions and a randomly initialised text encoder are part of the run:
    they are saved in <output_dir> when it starts and read back on every resume (rebuilding them from
    the seed and captions could give others, which the trained UNet cannot read). A resume whose data
    no longer matches them is refused, before anything is written; a run that trained no step starts over, and
    makes them again from its data as it is now."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint and (out / "text_encoder" / "config.json").is_file() and run_started(out):
        record = json.loads((out / RUN_DATA_FILE).read_text()) if (out / RUN_DATA_FILE).is_file() else {}
        now = run_data_record(captions, fingerprint)
        changed = [key for key in ("num_examples", "captions") if key in record and record[key] != now[key]]
        if changed:
            raise ConfigError(f"data: the training data changed since {out} started ({', '.join(changed)} differ: "
                              f"{record['num_examples']} -> {now['num_examples']} examples); its tokenizer and "
                              "text encoder were made for the old data. Start a new output_dir for this data")
        saved = ModelConfig(**{name: str(out / name) for name in TEXT_COMPONENTS})
        tokenizer = load_tokenizer(saved, lambda: [])
        text_encoder = build_text_encoder(saved, tokenizer)
        second = (None, None)
        if (out / "text_encoder_2").is_dir():
            tokenizer_2 = load_tokenizer(saved, lambda: [], "tokenizer_2")
            second = (tokenizer_2, build_text_encoder(saved, tokenizer_2, "text_encoder_2"))
        return tokenizer, text_encoder, False, second
    tokenizer = load_tokenizer(config.model, lambda: captions)
    text_encoder = seeded(config.seed, "text_encoder", lambda: build_text_encoder(config.model, tokenizer))
    names = TEXT_COMPONENTS[:2]
    second = (None, None)
    if model_family(config.model) == "sdxl":
        names = TEXT_COMPONENTS
        tokenizer_2 = load_tokenizer(config.model, lambda: captions, "tokenizer_2")
        second = (tokenizer_2, seeded(config.seed, "text_encoder_2",
                                      lambda: build_text_encoder(config.model, tokenizer_2, "text_encoder_2")))
    from_run = any(resolve_source(config.model, name).preset for name in names)
    return tokenizer, text_encoder, bool(from_run), second


def run_data_record(captions: list[str], fingerprint: str | None) -> dict:
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    return {"num_examples": len(captions), "captions": digest, "fingerprint": fingerprint}


def save_run_text_components(config: Config, prepared: Prepared) -> None:
    out = Path(config.output_dir)
    for name in TEXT_COMPONENTS:
        component = getattr(prepared, name)
        if component is None:
            continue
        with written_then_renamed(out / name) as partial:
            if name.startswith("tokenizer"):
                save_tokenizer(component, partial)
            else:
                component.save_pretrained(partial, safe_serialization=True)


def save_run_data(config: Config, prepared: Prepared) -> None:
    """run_data.json, what the run (re)started with (a resume checks it against the run's own text components; the
    model card says where the captions came from), and the list of the images it skipped (data.skip_bad_images)."""
    out, train = Path(config.output_dir), prepared.train
    write_json(out / RUN_DATA_FILE, {**run_data_record(prepared.captions, train.fingerprint),
                                     "caption_source": train.caption_source, "skipped_images": len(train.skipped)})
    list_skipped_images(out, train.skipped)


def drop_stale_latent_cache(config: Config, prepared: Prepared) -> None:
    """A run that trained no step starts over. Its own latent cache (<output_dir>/latent_cache) stays when it was
    built, or half built, for the same data (the rerun finishes it), and goes when the data changed since (the user
    removed an image the build could not decode, say): it would only be refused as stale. The model hashes are left
    out of the comparison: the cache build hashes the models in the run's mixed precision. A cache elsewhere
    (data.latent_cache_dir) may serve other runs; it is never removed, only refused when stale."""
    if not config.data.cache_latents or config.data.latent_cache_dir is not None:
        return
    directory = latent_cache.latent_cache_dir(config)
    manifest = latent_cache.read_manifest(directory)
    if manifest is None:
        return
    key = latent_cache.cache_key(config, prepared.train, prepared.vae, None, prepared.tokenizers)
    changed = [name for name in key if name not in ("vae", "text_encoder") and manifest["key"].get(name) != key[name]]
    if changed:
        shutil.rmtree(directory)
        print(f"removed the latent cache {directory} that the run's earlier start built for other data or settings "
              f"({', '.join(changed)} differ); it is built again")


def needs_image_check(config: Config) -> bool:
    """Whether images are decoded before training: always when they are decoded in the loop (or by the VAE
    stage); with the latent cache alone, the cache build decodes each image once and checks it there (their
    headers are read before anything is written)."""
    return not config.data.cache_latents or "vae" in config.stages


def build_cache(config: Config) -> Path:
    """`ldm-pipeline cache`: build (or finish) the latent cache a training run with this config would use,
    on every process of `accelerate launch`, and stop. The VAE and text encoder are the ones the run would
    encode with: its finished VAE (<output_dir>/vae), else model.vae; the run's text components."""
    accelerator = build_accelerator(config)
    set_seed(config.seed)
    if "vae" in config.stages and not finished_vae(config):
        raise ConfigError(f"stages: {config.stages} trains a VAE first, and the cache holds that VAE's latents: "
                          "run the vae stage before caching (or train; with data.cache_latents it builds the "
                          "cache itself), or set model.vae to a finished VAE and stages: [unet]")
    # The rows the run will cache: it checks its images before the VAE stage, else the cache build checks them.
    prepared = prepare(accelerator, config, check_images="vae" in config.stages)
    weight_dtype = frozen_dtype(accelerator)
    prepared.vae.requires_grad_(False).eval().to(accelerator.device, vae_dtype(prepared.vae, weight_dtype))
    for encoder in prepared.text_encoders:
        encoder.requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    data_lib.warn_truncated(prepared.tokenizer, prepared.captions)
    cache = latent_cache.build_latent_cache(accelerator, config, prepared.train, prepared.vae,
                                            cached_text_encoders(config, prepared.text_encoders), prepared.tokenizers)
    accelerator.print(f"latent cache ready: {cache.directory} ({len(cache.rows)} images)")
    return cache.directory


def describe_dry_run(accelerator: Accelerator, config: Config, prepared: Prepared) -> None:
    components = {"text_encoder": prepared.text_encoder, "vae": prepared.vae,
                  "unet": build_unet(config.model, config.resolution, prepared.vae, prepared.text_encoder,
                                     prepared.text_encoder_2)}
    if prepared.text_encoder_2 is not None:
        components["text_encoder_2"] = prepared.text_encoder_2
    accelerator.print(to_yaml(config))
    accelerator.print(describe_run(config, accelerator, components, prepared.num_examples))
    if config.data.buckets is not None:
        unet = stage_settings(config, "unet")
        window = unet.train_batch_size * accelerator.num_processes * unet.gradient_accumulation_steps
        accelerator.print(bucket_table(prepared.train.buckets, window, prepared.bucket_notes) if prepared.train else
                          "buckets: assigned once the data is written (the first run writes it)")


def check_sizes(config: Config, vae: AutoencoderKL, num_examples: int, num_processes: int) -> None:
    """What would otherwise fail only after the VAE stage, checked before anything is written (and by
    --dry-run): the VAE's downsampling must divide the resolution, and every stage needs the examples
    for one optimizer step."""
    factor = vae_scale_factor(vae)
    if config.resolution % factor:
        raise ConfigError(f"resolution: {config.resolution} is not divisible by the VAE's downsampling "
                          f"factor {factor}; use a multiple of {factor}")
    stages = {"vae": ("vae_training.train_batch_size", config.vae_training.train_batch_size, 1,
                      config.vae_training.psnr_samples),
              "unet": ("train_batch_size", config.train_batch_size, config.gradient_accumulation_steps,
                       config.validation.num_heldout)}
    for stage in config.stages:
        key, batch, accumulation, heldout = stages[stage]
        rows = len(data_lib.split_heldout(num_examples, heldout, config.seed)[0])
        if rows < batch * num_processes * accumulation:
            raise ConfigError(
                f"{key}: one optimizer step of the {stage} stage takes {batch * num_processes * accumulation} "
                f"examples ({batch} per process x {num_processes} processes x {accumulation} accumulation), "
                f"but it trains on {rows} ({num_examples} minus {num_examples - rows} held out); lower {key} "
                "or add data")


def describe_run(config: Config, accelerator: Accelerator, components: dict, num_examples: int | None) -> str:
    global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    lines = [f"{name}: {module.num_parameters() / 1e6:.2f}M parameters" for name, module in components.items()]
    lines.append(f"effective batch size: {global_batch} = {config.train_batch_size} per process x "
                 f"{accelerator.num_processes} processes x {config.gradient_accumulation_steps} accumulation")
    if accelerator.num_processes > 1:
        lines.append(f"distributed_timeout: {config.distributed_timeout} s (a collective waits this long for a process "
                     "that stopped answering, then the run stops and names it)")
    if "unet" in config.stages:
        lines.append(f"unet stage: {config.max_train_steps} optimizer steps")
        if num_examples:
            lines[-1] += f" (~{config.max_train_steps * global_batch / num_examples:.1f} epochs of {num_examples})"
    if "vae" in config.stages:
        lines.append(f"vae stage: {config.vae_training.max_train_steps} steps of batch "
                     f"{config.vae_training.train_batch_size * accelerator.num_processes}")
        if config.vae_training.decoder_steps:
            lines[-1] += f", then {config.vae_training.decoder_steps} steps of its decoder on noisy latents"
    out = Path(config.output_dir)
    if config.lora.rank:
        lines.append(f"LoRA: rank {config.lora.rank} adapters on the UNet's {', '.join(config.lora.target_modules)}"
                     + ((" and both text encoders' attention" if model_family(config.model) == "sdxl" else
                         " and the text encoder's attention") if config.lora.train_text_encoder else "")
                     + f"; the rest of {config.model.pretrained_model_name_or_path} stays frozen")
    lines += dreambooth_lines(config)
    result = out / ("lora" if config.lora.rank else "pipeline")
    lines.append(f"writes: {result} (the {'LoRA' if config.lora.rank else 'model'}), {out / 'samples'} (image grids), "
                 f"{out / 'metrics.jsonl'}")
    return "\n".join(lines)


def dreambooth_lines(config: Config) -> list[str]:
    """What --dry-run and a run's first screen say of DreamBooth's data: the subject, its class, what is generated."""
    data = config.data
    if not data.instance_data_dir:
        return []
    lines = [f"DreamBooth: the pictures of {data.instance_data_dir}, captioned {data.instance_prompt!r}"
             + (f" (or by their {data.caption_extension} files)" if data.caption_extension else "")]
    if data.class_data_dir:
        have = dreambooth.class_images_in(Path(data.class_data_dir))
        missing = max(0, data.num_class_images - have)
        made = f"; {missing} to generate with {config.model.pretrained_model_name_or_path} before training" \
            if missing else ""
        lines.append(f"prior preservation: {data.num_class_images} class images from {data.class_data_dir} "
                     f"({have} there{made}), captioned {data.class_prompt!r}; each batch pairs every picture with "
                     f"one, loss = instance + {config.prior_loss_weight:g} x class (prior_loss_weight)")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a latent diffusion text-to-image model.")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_library_logs()
    try:
        config = load_config(args.config, args.overrides)
        set_up_cpu(config)
        train(config, dry_run=args.dry_run)
    except (ConfigError, data_lib.DataError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as error:  # a full or read-only disk: what failed, and the way out
        print(f"error: {os_error_message(error)}; a run resumes from its last complete checkpoint with "
              "resume_from_checkpoint: latest", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a collective outside the training loop (cache, validation, saving) gave up
        if not failed_collective(error):
            raise
        print(f"error: {peer_lost(config, error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
