"""Typed run configuration: YAML -> dataclasses, `--set a.b=c` overrides, validation.

Keys for the UNet stage follow diffusers' `examples/text_to_image/train_text_to_image.py` flags
(`train_batch_size`, `learning_rate`, `snr_gamma`, ...) so users of that script feel at home.
Defaults live here and nowhere else; YAML files hold only what differs.

Every field says what a resume does with it (its field metadata, read by `fields_with`):

- `fixed`: it shapes the model, the data it sees or the random draws of its steps; a resume refuses a change;
- `reapplied`: an optimizer or schedule setting; a resume applies the new value to the restored optimizer and
  says so (`all_stages`: shared by the VAE and UNet stages);
- `free`: read afresh at every (re)start.

Some fields also carry `vae_result` (fixed once <output_dir>/vae holds the finished VAE), `cache_key` (the
latent cache depends on it) and `card` (shown in the model card's settings).
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value a user can fix; the message names the key."""


FIXED, REAPPLIED, FREE = "fixed", "reapplied", "free"


def _setting(resume: str, default, factory, flags: dict):
    metadata = {"resume": resume, **flags}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def fixed(default=None, *, factory=None, **flags):
    return _setting(FIXED, default, factory, flags)


def reapplied(default=None, *, factory=None, **flags):
    return _setting(REAPPLIED, default, factory, flags)


def free(default=None, *, factory=None, **flags):
    return _setting(FREE, default, factory, flags)


def section(cls):
    """A nested group of settings; each of its fields carries its own policy."""
    return field(default_factory=cls, metadata={"section": True})


@dataclass
class ShapesDataConfig:
    """Generate the synthetic shapes dataset into `data.train_data_dir` when it is absent (the shapes plug-in)."""

    num_images: int = 6000
    seed: int = 0
    holdout: list[str] = field(default_factory=list)  # captions never drawn (generalization tests)
    background: Literal["white", "dark"] = "white"  # the captions stay the same on either


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (buckets.py): each image trains at the size nearest its aspect ratio. Either `sizes`, or
    sizes made from a pixel `area` with sides in steps of `step` between `min_side` and `max_side`, up to
    `max_aspect` (long side over short side). The whole section is fixed on resume: it decides every crop."""

    sizes: list[list[int]] | None = None  # explicit [height, width] pairs, each side a multiple of 8
    area: int | None = None  # pixels per image; null: resolution x resolution
    step: int = 64  # 8 x the VAE's factor: latents of whole 8-cell blocks
    min_side: int | None = None  # null: resolution / 2
    max_side: int | None = None  # null: 2 x resolution
    max_aspect: float = 2.0
    # A bucket holding fewer images than one global batch gives no optimizer step: its images are moved to the
    # nearest bucket by aspect ratio instead (none is dropped); --dry-run lists what moved.


@dataclass
class DataConfig:
    train_data_dir: str | None = fixed()  # image folder (metadata.jsonl captions or class subfolders)
    dataset_name: str | None = fixed()  # hub dataset id or local dataset script, loaded the same way
    dataset_config_name: str | None = fixed()
    # webdataset tar shards: a path or glob (shards/train-*.tar), or a list of them; each sample's image member
    # (<key>.png, .jpg ...) and its caption (<key>.txt), read by datasets' webdataset loader
    webdataset: str | list[str] | None = fixed()
    image_column: str = fixed("image")
    caption_column: str | None = fixed("text")  # null: unconditional (every prompt empty)
    caption_template: str = fixed("a photo of a {label}")  # class subfolders -> captions
    # e.g. ".txt": each image's caption from the file of its name with this extension beside it (kohya's layout)
    caption_extension: str | None = fixed()
    # Comma-separated tags ("1girl, red hair, smiling"): shuffled for each sample every epoch after the first
    # keep_tokens of them, and each of those others dropped with probability tag_dropout; drawn from
    # (seed, epoch, row), so a sample sees the same tags at any process count and after a resume.
    shuffle_tags: bool = fixed(False)
    keep_tokens: int = fixed(0)
    tag_dropout: float = fixed(0.0)
    caption_dropout: float = free(0.1)  # empty prompt this often, so classifier-free guidance works
    center_crop: bool = fixed(True, cache_key=True)  # false: random crop
    random_flip: bool = fixed(False, cache_key=True)  # off by default: a flip changes "left" into "right" in captions
    max_train_samples: int | None = fixed()
    # Images that fail to open or decode are left out, counted and listed in <output_dir>/skipped_images.txt,
    # instead of stopping the run (for large folders). on_bad_image: skip is its older spelling, still read.
    skip_bad_images: bool = fixed(False)
    on_bad_image: Literal["error", "skip"] = fixed("error")
    # Masked loss: train on the subject, not its background. Each image's mask (white trains, black is ignored) is
    # the file of its name in mask_dir, else its own alpha channel; it weights the loss on the latent grid.
    masked_loss: bool = fixed(False)
    mask_dir: str | None = fixed()
    # DreamBooth (Ruiz et al. 2023): teach a pretrained model one subject from a few pictures. instance_data_dir is
    # an image folder, read as train_data_dir is (in its place), whose pictures are all captioned instance_prompt
    # ("a photo of sks dog": a rare token for the subject, then its class); with caption_extension a caption file
    # beside a picture replaces it.
    instance_data_dir: str | None = fixed()
    instance_prompt: str | None = fixed()
    # Prior preservation: the first num_class_images pictures of class_data_dir, captioned class_prompt ("a photo of
    # a dog"), each paired with an instance picture in every batch, keep the base's class from collapsing onto the
    # subject (see prior_loss_weight). Missing ones are generated with the base model before training, written
    # into class_data_dir (with their prompt and seed as PNG metadata) and reused by the next run.
    class_data_dir: str | None = fixed()
    class_prompt: str | None = fixed()
    num_class_images: int = fixed(100)
    # Data a plug-in writes when train_data_dir is absent: the synthetic shapes (ldm_pipeline.shapes).
    make_shapes: ShapesDataConfig | None = fixed()
    # null: every image resized and cropped to one `resolution` square. A section (see BucketConfig): each image at
    # the bucket size nearest its aspect ratio, every optimizer step's batch from one bucket.
    buckets: BucketConfig | None = fixed()
    cache_latents: bool = free(False)  # encode the data once with the frozen VAE (and text encoder)
    latent_cache_dir: str | None = free()  # default: <output_dir>/latent_cache
    # Rows per cache shard (an Arrow folder), at most; each process encodes whole shards and a killed build
    # keeps its finished ones. A multiple of 32 (the VAE's batch) keeps the bytes the same at any process count.
    cache_shard_size: int = free(8192)
    cache_text_embeddings: bool = free(True)  # also cache the frozen text encoder's outputs (~118 KB a row at CLIP-L)
    # Read a hub-style data set (data.dataset_name) as a stream, split across processes by
    # datasets.distributed.split_dataset_by_node, straight into the latent cache (needs cache_latents).
    streaming: bool = fixed(False)
    dataloader_num_workers: int = free(0)

    @property
    def skips_bad_images(self) -> bool:
        return self.skip_bad_images or self.on_bad_image == "skip"

    @property
    def image_folder(self) -> str | None:
        """The image folder trained on: data.train_data_dir, or DreamBooth's data.instance_data_dir."""
        return self.train_data_dir or self.instance_data_dir

    @property
    def image_folder_key(self) -> str:
        return "data.instance_data_dir" if self.instance_data_dir else "data.train_data_dir"

    @property
    def source(self) -> str:
        """The data source as the config names it, for messages: the folder, the data set, or the shards."""
        return self.image_folder or self.dataset_name or str(self.webdataset)


@dataclass
class ModelConfig:
    """Each component is a preset name (see models.py), a local directory, or a hub id.

    Unset components come from `pretrained_model_name_or_path` (a diffusers pipeline directory
    or hub id) when it is given, else from the `tiny` preset; the tokenizer then defaults to one
    built from the training captions.
    """

    pretrained_model_name_or_path: str | None = fixed()
    # Read a hub repo's variant weight files, e.g. "fp16": *.fp16.safetensors (half the download; weights are
    # upcast to float32 for training). null: the plain files (diffusion_pytorch_model.safetensors, ...).
    variant: str | None = fixed()
    # "sd": Stable Diffusion 1.x/2.x layouts (one CLIP text encoder); "sdxl": SDXL's (two text encoders, a pooled
    # text embedding, size and crop micro-conditioning). null: the pretrained pipeline's, else "sdxl" when a
    # component preset is "sdxl", else "sd".
    family: Literal["sd", "sdxl"] | None = fixed()
    unet: str | None = fixed()
    vae: str | None = fixed()
    text_encoder: str | None = fixed()
    tokenizer: str | None = fixed()  # "captions": built offline from the training captions
    text_encoder_2: str | None = fixed()  # SDXL's second text encoder (CLIPTextModelWithProjection)
    tokenizer_2: str | None = fixed()  # SDXL's second tokenizer ("captions": the run's own, as tokenizer)
    unet_kwargs: dict = fixed(factory=dict)  # overrides on top of a preset
    vae_kwargs: dict = fixed(factory=dict)
    text_encoder_kwargs: dict = fixed(factory=dict)


# The attention projections of diffusers' UNet blocks: queries, keys, values and the output projection.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the attention projections of CLIP's layers


@dataclass
class LoraConfig:
    """LoRA (Hu et al. 2021): train low-rank adapters added to the pretrained UNet's layers instead of the UNet.

    Needs model.pretrained_model_name_or_path, the base the adapters are saved for; the result is
    <output_dir>/lora in diffusers' LoRA format. With train_text_encoder the CLIP text encoder's attention
    projections (q_proj, k_proj, v_proj, out_proj) get adapters too.
    """

    rank: int = fixed(0)  # 0: off (the whole UNet trains); 4-16 is usual
    alpha: float | None = fixed()  # the adapters' output is scaled by alpha / rank; null: alpha = rank
    dropout: float = fixed(0.0)
    target_modules: list[str] = fixed(factory=lambda: list(UNET_LORA_TARGETS))  # UNet module names
    train_text_encoder: bool = fixed(False)


@dataclass
class VAETrainingConfig:
    """The `vae` stage: AutoencoderKL trained on reconstruction + KL."""

    train_batch_size: int = free(32, vae_result=True)  # a resume keeps the global batch (checked with the position)
    max_train_steps: int = reapplied(1000, vae_result=True)
    learning_rate: float = reapplied(1e-3, vae_result=True)
    lr_scheduler: str = reapplied("cosine", vae_result=True)
    lr_warmup_steps: int = reapplied(50, vae_result=True)
    kl_weight: float = free(1e-6, vae_result=True)
    # Extra loss weight on pixels unlike the image's background (its median color): 4 turns a VAE that
    # paints red, orange and yellow shapes one orange into one that keeps all six shapes colors (see
    # losses.vae_loss). 0 weighs every pixel alike; useful for small objects on a plain background.
    foreground_weight: float = free(0.0, vae_result=True)
    # Then `decoder_steps` steps that train the decoder alone on noisy latents: each image's latent plus Gaussian
    # noise of a random strength up to `decoder_noise` times the latents' std (in the UNet's unit-variance latents,
    # noise of std up to `decoder_noise`; a quarter of the images get some), decoded back to the clean image.
    # The UNet's latents are never exact, and a decoder trained only on the encoder's own latents draws a slightly
    # wrong latent as a lumpy circle or a pinched square; this one draws it as the nearest clean shape. The encoder
    # is frozen, so the latents the UNet learns are unchanged. 0: no such steps.
    decoder_steps: int = free(0, vae_result=True)
    decoder_noise: float = free(0.3, vae_result=True)
    decoder_learning_rate: float = free(3e-4, vae_result=True)  # cosine to 0 over decoder_steps
    max_grad_norm: float = free(1.0, vae_result=True)
    checkpointing_steps: int = free(0)  # 0: only the finished VAE is saved
    scaling_samples: int = free(512, vae_result=True)  # images encoded to measure the latent scaling factor
    psnr_samples: int = fixed(256, vae_result=True)  # held-out images (never trained on) for the reconstruction check
    validation_steps: int = free(0)  # also check reconstructions every N steps (0: only at the end)
    # The check at the end: held-out PSNR, and where a plug-in's checker knows the data (the shapes) the fraction
    # of reconstructions whose color / shape it reads right. A VAE below a bar stops the run before the UNet stage
    # (on_check_failure: error) or is only reported (warn). null: no bar.
    min_psnr: float | None = free()
    min_recon_color: float | None = free()
    min_recon_shape: float | None = free()
    on_check_failure: Literal["error", "warn"] = free("error")


@dataclass
class SamplingConfig:
    """Default generation settings, used for validation and saved with the pipeline."""

    scheduler: Literal["dpmsolver++", "ddim", "euler", "ddpm"] = free("dpmsolver++")
    num_inference_steps: int = free(20)
    guidance_scale: float = free(5.0)
    # Rescale the guided prediction toward the unguided one's spread (Lin et al. 2024, eq. 16): with zero terminal
    # SNR a strong guidance otherwise over-exposes the image; 0.7 is the paper's. 0: off.
    guidance_rescale: float = free(0.0)


@dataclass
class ValidationConfig:
    prompts: list[str] = free(factory=list)
    seeds: list[int] = free(factory=lambda: [0, 1, 2, 3])  # one grid row per seed
    validation_steps: int = free(500)  # 0 disables mid-run validation; a final grid is always made
    num_heldout: int = fixed(64)  # held-out examples for the validation loss (not trained on): picks the training rows


@dataclass
class Config:
    output_dir: str = free("outputs/run")
    overwrite_output_dir: bool = free(False)
    seed: int = fixed(0, card=True)
    resolution: int = fixed(64, cache_key=True, card=True)
    stages: list[Literal["vae", "unet"]] = fixed(factory=lambda: ["unet"])
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    vae_training: VAETrainingConfig = section(VAETrainingConfig)
    validation: ValidationConfig = section(ValidationConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    # UNet stage, named as in diffusers' train_text_to_image.py
    train_batch_size: int = free(16)  # per process; a resume keeps the global batch (checked with the position)
    max_train_steps: int = reapplied(1000)  # optimizer steps, at any process count
    gradient_accumulation_steps: int = free(1)
    learning_rate: float = reapplied(1e-4)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = reapplied("constant_with_warmup")
    lr_warmup_steps: int = reapplied(0)
    adam_beta1: float = reapplied(0.9, all_stages=True)
    adam_beta2: float = reapplied(0.999, all_stages=True)
    adam_weight_decay: float = reapplied(1e-2, all_stages=True)
    adam_epsilon: float = reapplied(1e-8, all_stages=True)
    max_grad_norm: float = free(1.0)
    # The UNet stage's optimizer (the VAE stage keeps AdamW). adamw_8bit: AdamW with 8-bit moments (bitsandbytes,
    # `pip install "ldm_pipeline[8bit]"`: a quarter of AdamW's optimizer memory); adafactor: factored second moments
    # (transformers; a fraction of AdamW's, no first moment), at this learning_rate with no schedule of its own;
    # prodigy: learns its own step size (`pip install "ldm_pipeline[prodigy]"`; set learning_rate to 1.0). The adam_*
    # settings apply to adamw, adamw_8bit and prodigy; adam_weight_decay to all.
    optimizer: Literal["adamw", "adamw_8bit", "adafactor", "prodigy"] = fixed("adamw", card=True)
    mixed_precision: Literal["no", "fp16", "bf16"] = free("no", card=True)
    gradient_checkpointing: bool = free(False)  # the UNet (+ a trained text encoder) and the vae stage
    # NHWC weights and activations for the convolutions of the UNet and of the VAE stage: faster on
    # CPUs (oneDNN: 20% for the shapes VAE, 5% for its UNet) and on GPUs in mixed precision.
    channels_last: bool = free(True)
    # torch.compile the UNet for its training steps (Inductor: C++ kernels on a CPU, which need a C++ compiler;
    # triton on a GPU). The first step compiles (minutes on a CPU); validation and sampling run eagerly. Compiled
    # kernels sum in another order: the weights match an eager run's to ~1e-6 (tests/test_compile.py). Measured
    # on a CPU in docs/training.md#compile.
    compile: bool = free(False)
    use_ema: bool = fixed(False, card=True)
    ema_decay: float = reapplied(0.9999)
    snr_gamma: float | None = free(card=True)  # min-SNR weighting (Hang et al. 2023); 5.0 is the paper's
    noise_offset: float = free(0.0, card=True)  # offset noise (Guttenberg 2023); ~0.05 lets images get darker
    # DreamBooth's prior preservation (data.class_data_dir): the loss is the instance rows' loss plus this times the
    # class rows' loss, each the mean over its half of the batch. 0: the class rows train nothing.
    prior_loss_weight: float = free(1.0, card=True)
    # null: the pretrained pipeline's own (a v-prediction model stays v-prediction), else epsilon
    prediction_type: Literal["epsilon", "v_prediction"] | None = fixed(card=True)
    # Zero terminal SNR (Lin et al. 2024): rescale the noise schedule so the last timestep holds no signal, as the
    # pure noise sampling starts from; without it the model learns to read the noise's low frequencies (its mean
    # colour) as image. Needs v-prediction; sampling then takes trailing timesteps (saved in the scheduler config).
    rescale_betas_zero_terminal_snr: bool = fixed(False, card=True)
    # the whole text encoder; with LoRA use lora.train_text_encoder
    train_text_encoder: bool = fixed(False, card=True)
    text_encoder_learning_rate: float | None = reapplied()  # default: learning_rate
    lora: LoraConfig = section(LoraConfig)
    checkpointing_steps: int = free(500)
    checkpoints_total_limit: int | None = free()
    resume_from_checkpoint: str | None = free()  # "latest" or a checkpoint directory
    max_consecutive_bad_steps: int = free(5)  # non-finite losses in a row before training stops
    # Seconds a process waits in a collective (all-reduce, barrier) for the others before it stops the run, naming
    # the collective and the last checkpoint: a node lost without closing its connections (power, network) is
    # otherwise waited for until the job's time limit. 30 minutes, torch's own default for gloo: the longest waits a
    # healthy run has are the main process writing alone while the others wait at a barrier (an sd15 checkpoint is
    # ~14 GB: 23 min on a shared filesystem at 10 MB/s) and a first step under torch.compile (minutes); 10 minutes,
    # NCCL's default, would stop such runs. Raise it for a first `ldm-pipeline cache` of a big hub data set, which
    # the main process downloads while the others wait.
    distributed_timeout: int = free(1800)
    logging_steps: int = free(10)
    # Torch threads per process when training on CPU from the command line. null: the machine's physical
    # cores shared among its processes (accelerate launch would otherwise leave each process 1 thread).
    cpu_threads: int | None = free()
    # An Accelerate tracker: "tensorboard" (logs to <output_dir>/logs), "wandb", ...; "none" for none.
    # metrics.jsonl is always written.
    report_to: str | None = free("tensorboard")


# optimizer -> (the package it needs, the ldm_pipeline extra that installs it); adamw and adafactor need none extra
OPTIONAL_OPTIMIZERS = {"adamw_8bit": ("bitsandbytes", "8bit"), "prodigy": ("prodigyopt", "prodigy")}

def setting_fields(cls=Config, prefix: str = ""):
    """(dotted key, dataclasses.Field) of every setting, sections walked into."""
    for item in dataclasses.fields(cls):
        if item.metadata.get("section"):
            yield from setting_fields(typing.get_type_hints(cls)[item.name], f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", item


def fields_with(resume: str | None = None, **flags) -> list[str]:
    """Dotted keys of the settings with this resume policy (None: any) and these metadata flags."""
    return [key for key, item in setting_fields()
            if (resume is None or item.metadata.get("resume") == resume)
            and all(item.metadata.get(flag, False) == value for flag, value in flags.items())]


def get_setting(tree, dotted: str):
    """The value at a dotted key of a config or of its dict form (None where a level is missing)."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else getattr(tree, part, None)
    return tree


@dataclass(frozen=True)
class StageSettings:
    """What the loop, the checkpoints and the resume checks need to know of a training stage, from the config."""

    name: str
    key_prefix: str  # where its settings live: "vae_training." or "" (the top level)
    checkpoint_prefix: str  # checkpoints/<prefix>step-N
    train_batch_size: int  # per process, per micro-batch
    gradient_accumulation_steps: int
    max_train_steps: int
    max_grad_norm: float
    checkpointing_steps: int
    validation_steps: int
    log_offset: int  # tracker steps continue after earlier stages, so they only ever grow
    optimizer: str = "adamw"  # config.optimizer for the UNet stage

    @property
    def reapplied_keys(self) -> list[str]:
        """The reapplied settings of this stage: those of its own section, and those all stages share."""
        section = self.key_prefix.rstrip(".")
        own = [key for key in fields_with(REAPPLIED, all_stages=False) if key.rpartition(".")[0] == section]
        return own + fields_with(REAPPLIED, all_stages=True)


def stage_settings(config: Config, name: str) -> StageSettings:
    vae = config.vae_training
    if name == "vae":
        return StageSettings("vae", "vae_training.", "vae-", vae.train_batch_size, 1, vae.max_train_steps,
                             vae.max_grad_norm, vae.checkpointing_steps, vae.validation_steps, 0)
    if name == "vae-decoder":  # short, and repeated whole after an interruption: no checkpoints of its own
        return StageSettings("vae-decoder", "vae_training.", "vae-decoder-", vae.train_batch_size, 1,
                             vae.decoder_steps, vae.max_grad_norm, 0, 0, vae.max_train_steps)
    return StageSettings("unet", "", "", config.train_batch_size, config.gradient_accumulation_steps,
                         config.max_train_steps, config.max_grad_norm, config.checkpointing_steps,
                         config.validation.validation_steps,
                         vae.max_train_steps + vae.decoder_steps if "vae" in config.stages else 0, config.optimizer)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not one of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string; accept it as the number it spells
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(names)}"
        )
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set dotted.key=value`; the value is parsed as YAML (`1e-4`, `[a, b]`, `null`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set seed=1")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[leaf] = safe_yaml(raw, f"--set {assignment!r}")


class _Loader(yaml.SafeLoader):
    """Safe YAML whose booleans are only true/false: YAML 1.1 also reads yes/no/on/off as booleans,
    which would turn `mixed_precision: no` into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


# A config is a few hundred values; aliases (`*name`) that expand to more are an "alias bomb", which
# would otherwise hang whatever walks the loaded values (a few kB of YAML can stand for 10^9 strings).
MAX_YAML_VALUES = 100_000


def _expanded_size(node, sizes: dict) -> int:
    """Values under `node` with every alias expanded; each node is counted once (memoized), so this is
    linear in the YAML text however far its aliases expand."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a recursive alias counts once
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def safe_yaml(text: str, where: str):
    """YAML through a safe loader: tags that build Python objects (`!!python/...`) are refused, never run,
    and so are aliases that expand to more than MAX_YAML_VALUES values."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; "
                              "write the values out instead")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        hint = ("; only plain YAML is read: tags that build Python objects are refused"
                if isinstance(error, yaml.constructor.ConstructorError) else "")
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"{where}{at}: {problem}{hint}") from error
    finally:
        loader.dispose()


def os_error_message(error: Exception) -> str:
    """One line for a failed file operation: what failed where, and for a full or read-only disk or a
    missing permission, the way out."""
    message = f"{error.strerror}: {error.filename}" if getattr(error, "strerror", None) and error.filename \
        else " ".join(str(error).split())
    hints = {errno.ENOSPC: "the disk is full; free some space or choose a folder on another disk",
             errno.EDQUOT: "the disk quota is used up; free some space or choose a folder on another disk",
             errno.EROFS: "the filesystem is read-only; choose a writable folder",
             errno.EACCES: "no permission to write there; choose a folder you can write to",
             errno.EPERM: "no permission to write there; choose a folder you can write to"}
    code = getattr(error, "errno", None)
    if code is None and "No space left on device" in str(error):  # safetensors reports IO errors as text
        code = errno.ENOSPC
    return message + (f" ({hints[code]})" if code in hints else "")


def add_run_arguments(parser) -> None:
    """The options of a training run, shared by `accelerate launch train.py` and `ldm-pipeline train`."""
    parser.add_argument("--config", required=True, help="YAML config, e.g. train_configs/shapes.yaml, or the name of "
                        "a packaged one, e.g. shapes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set max_train_steps=100 or --set "
                        "data.train_data_dir=path/to/images (repeatable; the value is read as YAML)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parameter counts and batch sizes, and check that the data "
                        "fills a batch, then exit without writing anything")


def packaged_configs() -> dict:
    """name -> the YAML file of each config in train_configs/, which is installed with the package."""
    folder = resources.files("ldm_pipeline.train_configs")
    return {item.name.removesuffix(".yaml"): item for item in folder.iterdir() if item.name.endswith(".yaml")}


def config_text(path: str | Path) -> tuple[str, str]:
    """(YAML text, how to name it in messages) of a config file, or of a packaged config given by bare name
    (`shapes`, `shapes.yaml`): `--config shapes` works from any folder and from a non-editable install."""
    path = Path(path)
    if path.is_file():
        return path.read_text(), f"config file {path}"
    packaged = packaged_configs()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in packaged:
        return packaged[name].read_text(), f"packaged config {name} (train_configs/{name}.yaml)"
    raise ConfigError(f"config file {path} does not exist; give a YAML file or the name of a packaged config: "
                      f"{', '.join(sorted(packaged))}")


def load_config(path: str | Path | None = None, overrides: list[str] = (), **values) -> Config:
    """Load a YAML config (or none: all defaults), apply `--set` overrides and keyword values."""
    data = {}
    if path is not None:
        text, where = config_text(path)
        data = safe_yaml(text, where) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a mapping of keys, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    data.update(values)
    config = _build(Config, data)
    validate(config)
    return config


def config_from_dict(data: dict) -> Config:
    config = _build(Config, data)
    validate(config)
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Reject impossible values before any work starts; each message names the key."""
    c, d = config, config.data
    _require(c.resolution > 0 and c.resolution % 8 == 0,
             f"resolution: {c.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    _require(len(c.stages) > 0 and len(set(c.stages)) == len(c.stages),
             f"stages: {c.stages} must list 'vae' and/or 'unet' once each")
    _require(c.stages == sorted(c.stages, key=["vae", "unet"].index),
             f"stages: {c.stages}: the vae stage must come before the unet stage")
    for key in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "logging_steps",
                "max_consecutive_bad_steps", "distributed_timeout"):
        _require(getattr(c, key) >= 1, f"{key}: {getattr(c, key)} must be at least 1")
    for key in ("train_batch_size", "max_train_steps"):
        _require(getattr(c.vae_training, key) >= 1, f"vae_training.{key} must be at least 1")
    _require(c.learning_rate > 0, f"learning_rate: {c.learning_rate} must be positive")
    _require(c.lr_warmup_steps >= 0, "lr_warmup_steps must be >= 0")
    _require(c.checkpointing_steps >= 0, "checkpointing_steps must be >= 0 (0 disables)")
    _require(c.checkpoints_total_limit is None or c.checkpoints_total_limit >= 1,
             "checkpoints_total_limit must be at least 1 (or null for no limit)")
    _require(0.0 <= d.caption_dropout < 1.0, f"data.caption_dropout: {d.caption_dropout} must be in [0, 1)")
    _require(c.snr_gamma is None or c.snr_gamma > 0, "snr_gamma must be positive (or null to disable)")
    _require(0.0 <= c.ema_decay < 1.0, "ema_decay must be in [0, 1)")
    _require(c.noise_offset >= 0, "noise_offset must be >= 0")
    _require(c.sampling.num_inference_steps >= 1, "sampling.num_inference_steps must be at least 1")
    _require(c.sampling.guidance_scale >= 0, f"sampling.guidance_scale: {c.sampling.guidance_scale} must be >= 0 "
             "(values <= 1 turn classifier-free guidance off)")
    _require(0 <= c.sampling.guidance_rescale <= 1, f"sampling.guidance_rescale: {c.sampling.guidance_rescale} must be "
             "in [0, 1] (0.7 is Lin et al.'s; 0 turns it off)")
    _require(not c.rescale_betas_zero_terminal_snr or c.prediction_type == "v_prediction",
             f"rescale_betas_zero_terminal_snr: true needs prediction_type: v_prediction (it is "
             f"{c.prediction_type}): at the last timestep no signal is left, so an epsilon model would only copy "
             "its input there. Set prediction_type: v_prediction, or turn the rescaling off")
    _require(c.vae_training.foreground_weight >= 0, "vae_training.foreground_weight must be >= 0")
    _require(c.vae_training.decoder_steps >= 0, "vae_training.decoder_steps must be >= 0 (0: no decoder steps)")
    _require(c.vae_training.decoder_noise > 0, "vae_training.decoder_noise must be > 0 (a fraction of the latent std)")
    _require(c.vae_training.decoder_learning_rate > 0, "vae_training.decoder_learning_rate must be > 0")
    _require(c.vae_training.psnr_samples >= 0, "vae_training.psnr_samples must be >= 0")
    _require(c.vae_training.scaling_samples >= 1, "vae_training.scaling_samples must be at least 1")
    _require(c.vae_training.validation_steps >= 0, "vae_training.validation_steps must be >= 0 (0: at the end only)")
    for key in ("min_recon_color", "min_recon_shape"):
        bar = getattr(c.vae_training, key)
        _require(bar is None or 0 <= bar <= 1, f"vae_training.{key} is a fraction in [0, 1] (or null)")
    _require(c.validation.num_heldout >= 0, "validation.num_heldout must be >= 0")
    _require(c.validation.validation_steps >= 0, "validation.validation_steps must be >= 0 (0 disables)")
    sources = [f"data.{key}" for key in ("train_data_dir", "dataset_name", "webdataset", "instance_data_dir")
               if getattr(d, key)]
    _require(len(sources) == 1, "data: set exactly one of data.train_data_dir (an image folder), data.dataset_name "
             "(a hub data set, or a local one in the hub's layout), data.webdataset (tar shards) or "
             "data.instance_data_dir (DreamBooth: pictures of one subject)"
             + (f"; this config sets {' and '.join(sources)}" if sources else ""))
    _validate_dreambooth(c)
    if d.train_data_dir and d.make_shapes is None:
        path = Path(d.train_data_dir)
        _require(path.is_dir(),
                 f"data.train_data_dir: {path} does not exist or is not a directory; point it at an "
                 "image folder, or add data.make_shapes to generate the synthetic shapes there")
    if d.make_shapes is not None:
        _require(d.train_data_dir is not None, "data.make_shapes needs data.train_data_dir to write into")
        _require(d.make_shapes.num_images >= 1, "data.make_shapes.num_images must be at least 1")
    _require(not d.cache_latents or d.center_crop or d.buckets is not None,
             "data.cache_latents stores one crop per image; set data.center_crop: true, use data.buckets (whose "
             "random crops are drawn once per image), or turn data.cache_latents off")
    if d.mask_dir is not None:
        _require(d.masked_loss, f"data.mask_dir: {d.mask_dir} holds masks for data.masked_loss: true; set it, or "
                 "remove data.mask_dir")
        _require(Path(d.mask_dir).is_dir(), f"data.mask_dir: {d.mask_dir} does not exist or is not a directory")
    _require(not (d.masked_loss and d.cache_latents), "data.masked_loss reads each image's mask as it trains and "
             "the latent cache does not store masks yet; set data.cache_latents: false for a masked run")
    if d.buckets is not None:
        _validate_buckets(d.buckets)
        _require(not d.streaming, "data.buckets reads every image's size before training, which a stream (data."
                 "streaming) cannot give; download the data set, or train it at one square resolution")
    _require(d.cache_shard_size >= 1, f"data.cache_shard_size: {d.cache_shard_size} must be at least 1")
    if d.streaming:
        _require((d.dataset_name or d.webdataset) and d.cache_latents and "vae" not in c.stages,
                 "data.streaming reads a data set once, into the latent cache, and trains the UNet from that: "
                 "it needs data.dataset_name or data.webdataset, data.cache_latents: true and stages: [unet] (train "
                 "a VAE on a downloaded data set first, then set model.vae to it)")
    _validate_captions(d)
    _require("{label}" in d.caption_template,
             f"data.caption_template: {d.caption_template!r} must contain {{label}}")
    output = Path(c.output_dir)
    _require(not output.exists() or output.is_dir(),
             f"output_dir: {output} is a file; choose a directory path for the run's outputs")
    where = output.expanduser().resolve()
    for place, name in ((Path(where.anchor), "the filesystem root"), (Path.home().resolve(), "your home directory")):
        _require(where != place, f"output_dir: {c.output_dir} is {name}; a run writes there and, with "
                 "overwrite_output_dir, clears folders there. Give the run a folder of its own, e.g. outputs/my_run")
    for key in ("train_data_dir", "instance_data_dir", "class_data_dir"):
        if getattr(d, key):
            data = Path(getattr(d, key)).expanduser().resolve()
            overlap = ("is the data folder" if where == data else "is inside the data folder" if data in where.parents
                       else "holds the data folder" if where in data.parents else None)
            _require(overlap is None, f"output_dir: {c.output_dir} {overlap} (data.{key}: {getattr(d, key)}): "
                     "the run's images (samples/) would be read as training images on the next run, and the data "
                     "would sit among files the run replaces. Keep them apart, e.g. data/my_images and outputs/my_run")
    _validate_lora(c)
    extra = OPTIONAL_OPTIMIZERS.get(c.optimizer)
    if extra is not None:
        package, name = extra
        _require(importlib.util.find_spec(package) is not None,
                 f"optimizer: {c.optimizer} needs {package}, an optional extra: pip install \"ldm_pipeline[{name}]\" "
                 "(or optimizer: adamw)")
    if c.report_to not in (None, "none"):
        from accelerate.tracking import get_available_trackers  # here: the config itself loads without torch
        from accelerate.utils import LoggerType

        known = [tracker.value for tracker in LoggerType]
        installed = [tracker.value for tracker in get_available_trackers()]
        for name in [c.report_to] if isinstance(c.report_to, str) else c.report_to:
            guess = difflib.get_close_matches(name, known, n=1)
            _require(name in known, f"report_to: {name!r} is not a tracker Accelerate knows ({', '.join(known)}; "
                     "or none)"
                     + (f"; did you mean {guess[0]!r}?" if guess else ""))
            # Accelerate drops a tracker whose package is missing with only a warning, and the run logs nothing.
            # Each tracker's pip package has the tracker's name.
            _require(name == "all" or name in installed, f"report_to: {name!r} needs the {name} package: pip install "
                     f"{name} (or report_to: none)")


def _validate_captions(d: DataConfig) -> None:
    if d.caption_extension is not None:
        _require(d.image_folder is not None, f"data.caption_extension: {d.caption_extension!r} reads a caption file "
                 "beside each image of data.train_data_dir (or data.instance_data_dir); a data set or webdataset "
                 "shards carry their captions in a column (data.caption_column)")
        _require(re.fullmatch(r"\.[\w.-]+", d.caption_extension) is not None,
                 f"data.caption_extension: {d.caption_extension!r} must be a file extension with its dot, e.g. .txt")
    _require(d.keep_tokens >= 0, f"data.keep_tokens: {d.keep_tokens} must be >= 0 (the first N tags stay in place)")
    _require(0.0 <= d.tag_dropout < 1.0, f"data.tag_dropout: {d.tag_dropout} must be in [0, 1)")
    reshaped = d.shuffle_tags or d.tag_dropout > 0
    _require(reshaped or d.keep_tokens == 0, f"data.keep_tokens: {d.keep_tokens} keeps the first tags in place when "
             "others move or drop; set data.shuffle_tags: true or data.tag_dropout, or remove data.keep_tokens")
    # The cache holds each caption's token ids (and text-encoder output) once; tags that change every epoch cannot
    # be cached.
    _require(not (reshaped and d.cache_latents), "data.shuffle_tags / data.tag_dropout give each sample other tags "
             "every epoch, but data.cache_latents stores each caption's tokens once; turn data.cache_latents off "
             "(the captions are then tokenized per sample), or the tag options off")


def _validate_dreambooth(c: Config) -> None:
    d = c.data
    if d.instance_data_dir is not None:
        _require(Path(d.instance_data_dir).is_dir(), f"data.instance_data_dir: {d.instance_data_dir} does not exist or "
                 "is not a directory; point it at a folder of pictures of the subject")
        _require(bool(d.instance_prompt), f"data.instance_data_dir: {d.instance_data_dir} holds the subject's "
                 "pictures, all captioned data.instance_prompt; set it, e.g. 'a photo of sks dog' (a rare token, then "
                 "the class)")
    else:
        _require(d.instance_prompt is None, "data.instance_prompt captions the pictures of data.instance_data_dir; "
                 "set data.instance_data_dir to the subject's pictures, or remove data.instance_prompt")
    if d.class_data_dir is None:
        _require(d.class_prompt is None, "data.class_prompt captions the class images of data.class_data_dir (prior "
                 "preservation); set data.class_data_dir to a folder for them (it is filled with generated ones), or "
                 "remove data.class_prompt")
        return
    _require(d.instance_data_dir is not None, f"data.class_data_dir: {d.class_data_dir} pairs class images with the "
             "pictures of a subject (DreamBooth's prior preservation); set data.instance_data_dir and "
             "data.instance_prompt, or remove data.class_data_dir")
    _require(bool(d.class_prompt), f"data.class_data_dir: {d.class_data_dir} holds the class images, captioned and "
             "generated with data.class_prompt; set it, e.g. 'a photo of a dog' (the instance prompt without its rare "
             "token)")
    _require(not Path(d.class_data_dir).exists() or Path(d.class_data_dir).is_dir(),
             f"data.class_data_dir: {d.class_data_dir} is a file; give a folder for the class images")
    _require(Path(d.class_data_dir).resolve() != Path(d.instance_data_dir).resolve(),
             f"data.class_data_dir: {d.class_data_dir} is data.instance_data_dir: the subject's pictures would also "
             "train as its class; give the class images a folder of their own")
    _require(d.num_class_images >= 1, f"data.num_class_images: {d.num_class_images} must be at least 1 (100-200 is "
             "usual), or remove data.class_data_dir to train without prior preservation")
    _require(c.prior_loss_weight >= 0, f"prior_loss_weight: {c.prior_loss_weight} must be >= 0 (1.0 is usual)")
    _require(not d.cache_latents, "data.class_data_dir pairs each instance picture with a class image as it trains, "
             "and the latent cache holds the instance pictures only; set data.cache_latents: false")


def _validate_buckets(b: BucketConfig) -> None:
    for pair in b.sizes or []:
        _require(len(pair) == 2 and all(side > 0 and side % 8 == 0 for side in pair),
                 f"data.buckets.sizes: {pair} must be [height, width], each a positive multiple of 8 (the VAE's "
                 "factor), e.g. [512, 768]")
    _require(b.step > 0 and b.step % 8 == 0, f"data.buckets.step: {b.step} must be a positive multiple of 8")
    for key in ("area", "min_side", "max_side"):
        value = getattr(b, key)
        _require(value is None or value > 0, f"data.buckets.{key}: {value} must be positive (or null)")
    _require(b.max_aspect >= 1, f"data.buckets.max_aspect: {b.max_aspect} must be >= 1 (long side over short side)")


def _validate_lora(c: Config) -> None:
    lora, model = c.lora, c.model
    _require(lora.rank >= 0, f"lora.rank: {lora.rank} must be >= 0 (0 turns LoRA off)")
    if not lora.rank:
        _require(not lora.train_text_encoder, "lora.train_text_encoder needs lora.rank > 0 (e.g. lora.rank: 8); "
                 "to train the whole text encoder set train_text_encoder: true")
        return
    _require(lora.alpha is None or lora.alpha > 0, f"lora.alpha: {lora.alpha} must be positive (or null: the rank)")
    _require(0 <= lora.dropout < 1, f"lora.dropout: {lora.dropout} must be in [0, 1)")
    _require(bool(lora.target_modules), "lora.target_modules: give at least one UNet module name, e.g. "
             f"{UNET_LORA_TARGETS}")
    _require(bool(model.pretrained_model_name_or_path),
             f"lora.rank: {lora.rank} trains adapters for a pretrained pipeline; set "
             "model.pretrained_model_name_or_path to its directory or hub id (e.g. outputs/shapes/pipeline), or "
             "lora.rank: 0 to train a whole UNet")
    for key in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        _require(getattr(model, key) is None,
                 f"model.{key}: {getattr(model, key)!r} is set, but with lora.rank > 0 every component comes from "
                 "model.pretrained_model_name_or_path, the base the adapters are saved for; remove model."
                 f"{key} (or make a pipeline directory holding it and use that as the base)")
    _require(c.stages == ["unet"], f"stages: {c.stages}: a LoRA run adapts the pretrained UNet and keeps its VAE; "
             "set stages: [unet]")
    _require(not c.train_text_encoder, "train_text_encoder trains the whole text encoder, which a LoRA file cannot "
             "hold; with lora.rank > 0 set lora.train_text_encoder: true to give it adapters instead")
