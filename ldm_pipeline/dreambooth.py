"""DreamBooth (Ruiz et al. 2023): teach a pretrained model one subject from a few pictures, with prior preservation.

- The subject's pictures (data.instance_data_dir) are the run's training data, read as any image folder is (data.py),
  all captioned data.instance_prompt.
- `make_class_images` fills data.class_data_dir up to data.num_class_images before training: the missing images are
  generated from data.class_prompt by the base model (model.pretrained_model_name_or_path), split over the processes
  as `ldm-pipeline generate` splits its work, and written with their prompt and seed as PNG metadata. Image k of the
  folder is made from seed k, so a run stopped part-way is completed by the next with the images it would have made,
  and a full folder is only read.
- `load_class_data` reads the first num_class_images of them as rows captioned data.class_prompt; `PriorPairs` pairs
  every instance picture with a class image in one batch, and unet_stage.step_loss adds the class rows' loss times
  prior_loss_weight, which keeps the base's class from collapsing onto the subject.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from . import data as data_lib
from .config import Config, ConfigError, DataConfig
from .generation import ImageWriter, generate_batches
from .pipeline import load_pipeline


def check_prompts(tokenizer, data: DataConfig) -> None:
    """Refuse an instance or class prompt that the tokenizer would cut: the cut words (often the subject's rare token
    or its class) would silently not be trained on."""
    for key in ("instance_prompt", "class_prompt"):
        prompt = getattr(data, key)
        if prompt is None:
            continue
        ids = tokenizer(prompt, truncation=False, verbose=False)["input_ids"]
        if len(ids) > tokenizer.model_max_length:
            kept = tokenizer.decode(ids[1:tokenizer.model_max_length - 1])  # without the begin and end tokens
            raise ConfigError(f"data.{key}: {prompt!r} is {len(ids)} tokens, longer than the tokenizer's "
                              f"{tokenizer.model_max_length}, and would be cut to {kept!r}; shorten it")


def class_images_in(folder: Path) -> int:
    """The image files of `folder` as the image-folder loader finds them (0 when it does not exist yet)."""
    return data_lib.count_images(folder) if folder.is_dir() else 0


def missing_class_images(config: Config) -> int:
    """How many class images the run generates; refused when there are too few and no base model to make them."""
    data = config.data
    have = class_images_in(Path(data.class_data_dir))
    missing = max(0, data.num_class_images - have)
    if missing and not config.model.pretrained_model_name_or_path:
        lower = f"lower data.num_class_images to {have}, " if have else ""
        raise ConfigError(f"data.num_class_images: {data.num_class_images}, but data.class_data_dir: "
                          f"{data.class_data_dir} holds {have} images and there is no base model to generate the "
                          f"other {missing} from; add class images, {lower}or set "
                          "model.pretrained_model_name_or_path to the pipeline being fine-tuned")
    return missing


def make_class_images(accelerator: Accelerator, config: Config) -> int:
    """Generate the class images data.class_data_dir lacks (every process its share; the main one writes them);
    returns how many were made."""
    data = config.data
    folder = Path(data.class_data_dir)
    have = class_images_in(folder)
    seeds = list(range(have, data.num_class_images))  # image k of the folder comes from seed k
    if not seeds:
        return 0
    # The frozen base samples in the run's mixed precision on a GPU, as validation does; on a CPU in float32.
    dtype = None if accelerator.device.type == "cpu" else \
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_pipeline(config.model.pretrained_model_name_or_path, device=accelerator.device, dtype=dtype,
                         variant=config.model.variant)
    pipe.set_progress_bar_config(disable=True)
    writer = ImageWriter(folder) if accelerator.is_main_process else None
    accelerator.print(f"[dreambooth] {data.class_data_dir} holds {have} of data.num_class_images: "
                      f"{data.num_class_images} class images; generating {len(seeds)} with "
                      f"{config.model.pretrained_model_name_or_path} from {data.class_prompt!r}")
    for batch in generate_batches(pipe, [data.class_prompt] * len(seeds), seeds, height=config.resolution,
                                  width=config.resolution, state=accelerator,
                                  show_progress=accelerator.is_main_process):
        if writer is not None:
            for image, _ in batch:  # written as each batch is made: a stopped run keeps them, the next makes the rest
                writer.save(image)
    del pipe
    gc.collect()
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    return len(seeds)


def class_data_config(data: DataConfig) -> DataConfig:
    """The class folder read as an instance folder is: its first num_class_images pictures, captioned class_prompt,
    without masks, caption files or tags."""
    return dataclasses.replace(data, train_data_dir=None, instance_data_dir=data.class_data_dir,
                               instance_prompt=data.class_prompt, class_data_dir=None, class_prompt=None,
                               max_train_samples=data.num_class_images, caption_extension=None, masked_loss=False,
                               mask_dir=None, shuffle_tags=False, keep_tokens=0, tag_dropout=0.0, make_shapes=None)


def load_class_data(config: Config, accelerator=None, check_images: bool = True) -> data_lib.TrainData:
    """The class images as training rows (after `make_class_images`), checked as the instance pictures are."""
    data = class_data_config(config.data)
    train = data_lib.load_train_data(dataclasses.replace(config, data=data), check_images=False)
    return data_lib.check_train_images(train, data, accelerator, decode=check_images)


class PriorPairs(torch.utils.data.Dataset):
    """DreamBooth's training set: position i is instance picture i % I with class image i % C, its keys prefixed
    `class_`, so an epoch (max(I, C) positions) shows every picture and every class image at least once. With
    aspect-ratio buckets the class image is placed in its instance picture's bucket: one batch, one size."""

    def __init__(self, instances: data_lib.ImageTextDataset, classes: data_lib.ImageTextDataset):
        self.instances, self.classes = instances, classes
        self.copied_in_epoch = None

    def __len__(self):
        return max(len(self.instances), len(self.classes))

    def __getstate__(self):  # as ImageTextDataset's: a spawned DataLoader worker keeps the epoch it was copied in
        return {**self.__dict__, "copied_in_epoch": data_lib.loader_epoch(self)}

    def __getitem__(self, i):
        epoch = data_lib.loader_epoch(self)
        epoch = self.copied_in_epoch if epoch is None else epoch
        item = self.instances.item(i % len(self.instances), epoch)
        bucket = tuple(item["pixel_values"].shape[-2:]) if self.instances.buckets is not None else None
        prior = self.classes.item(i % len(self.classes), epoch, bucket)
        if "mask" in item:  # data.masked_loss: the class image trains whole
            prior["mask"] = torch.ones_like(prior["pixel_values"][:1])
        return {**item, **{f"class_{key}": value for key, value in prior.items()}}

    def bucket_of(self) -> np.ndarray | None:
        buckets = self.instances.bucket_of()
        return None if buckets is None else buckets[np.arange(len(self)) % len(self.instances)]


def with_class_rows(batch: dict) -> dict:
    """A batch of B pairs as 2B rows, the B instance rows first, with "prior": (2B,) True on the class rows."""
    classes = {key.removeprefix("class_"): value for key, value in batch.items() if key.startswith("class_")}
    rows = {key: torch.cat([value, classes[key]]) for key, value in batch.items() if key in classes}
    count = len(batch["input_ids"])
    rows["prior"] = torch.arange(2 * count, device=batch["input_ids"].device) >= count
    return rows
