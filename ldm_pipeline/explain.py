"""Small, inspectable pieces behind notebooks/01_how_it_works.ipynb.

Each function measures something on the package's own components rather than quoting a number:
edge-detecting convolutions, layer parameter counts, the VAE's latent shape, the U-Net's tensor
shapes (recorded with forward hooks during a real forward pass) and the forward noising process.
matplotlib is imported only inside `draw_unet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from .config import ModelConfig
from .data import image_to_tensor
from .generation import decode_latents
from .models import build_vae

# Sobel kernels: a weighted difference across three rows (columns), so one pixel of noise does not
# look like an edge. "Vertical edges" are left-to-right brightness changes.
SOBEL_VERTICAL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_HORIZONTAL = SOBEL_VERTICAL.T.contiguous()


def edge_conv() -> torch.nn.Conv2d:
    """A 1 -> 2 channel 3x3 convolution whose two filters are the Sobel kernels (vertical, horizontal).
    Border pixels are repeated outward (not zero-padded), so the image frame is not an edge."""
    conv = torch.nn.Conv2d(1, 2, kernel_size=3, padding=1, padding_mode="replicate", bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([SOBEL_VERTICAL, SOBEL_HORIZONTAL])[:, None])  # (out=2, in=1, 3, 3)
    return conv


@torch.no_grad()
def edge_maps(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(vertical, horizontal) edge responses of the image's brightness, each (H, W)."""
    gray = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    maps = edge_conv()(gray)[0]  # (2, H, W)
    return maps[0].numpy(), maps[1].numpy()


def layer_parameter_counts(side: int = 256, in_channels: int = 1, out_channels: int = 1,
                           kernel_sizes=(3, 5)) -> dict[str, int]:
    """Parameters of layers that map a side x side image to same-size feature maps, counted on the
    torch modules themselves (the dense one lives on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        layers = {"fully connected": torch.nn.Linear(side * side * in_channels, side * side * out_channels)}
        layers.update({f"{k}x{k} convolution": torch.nn.Conv2d(in_channels, out_channels, k) for k in kernel_sizes})
    return {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}


def vae_latent_shape(preset: str, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent the `preset` VAE makes from a resolution x resolution RGB image.

    The encoder runs on the meta device: every layer computes its output shape, no arithmetic is
    done, so even the 83.7M-parameter `sd15` VAE at 512 px takes milliseconds.
    """
    with torch.device("meta"):
        vae = build_vae(ModelConfig(vae=preset))
        latents = vae.encode(torch.empty(1, 3, resolution, resolution)).latent_dist.mean
    return tuple(latents.shape[1:])


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The pipeline VAE's scaled latent of an image at the model's resolution: (1, 4, R/8, R/8),
    the tensor the U-Net is trained on (mean of the VAE posterior, times `scaling_factor`)."""
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = image_to_tensor(image.convert("RGB"), resolution)[None]  # (1, 3, R, R) in [-1, 1]
    latents = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return latents * pipe.vae.config.scaling_factor


# --- the U-Net's tensor shapes --------------------------------------------------------------------------


@dataclass
class BlockShapes:
    """What one top-level U-Net block received and returned, per example (batch dim dropped)."""

    name: str  # "conv_in", "down_blocks.0", "mid_block", "up_blocks.0", "conv_out"
    kind: str  # the diffusers class, e.g. "CrossAttnDownBlock2D"
    part: str  # "encoder", "bottleneck" or "decoder"
    input: tuple[int, ...]
    output: tuple[int, ...]
    skips_out: list[tuple[int, ...]] = field(default_factory=list)  # saved for the decoder
    skips_in: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (source block, shape)


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape[1:])


@torch.no_grad()
def record_unet_shapes(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> list[BlockShapes]:
    """Run `unet` once with forward hooks on its top-level blocks and return, in execution order,
    every block's input/output shape and the skip tensors it saves (encoder) or consumes (decoder).

    A skip is matched to the block that made it by tensor identity, so the arrows drawn from this
    record are what the forward pass did, not what the architecture is assumed to do.
    """
    records: list[BlockShapes] = []
    made_by: dict[int, str] = {}  # id(skip tensor) -> name of the block that produced it

    def hook(name: str, part: str):
        def record(module, args, kwargs, output):
            first = kwargs.get("hidden_states", args[0] if args else None)
            main = output[0] if isinstance(output, tuple) else output
            block = BlockShapes(name, type(module).__name__, part, _shape(first), _shape(main))
            if name == "conv_in":  # its output is the first skip (diffusers' down_block_res_samples)
                made_by[id(output)] = name
                block.skips_out.append(_shape(output))
            if isinstance(output, tuple):  # a down block: (hidden_states, skips)
                for skip in output[1]:
                    made_by[id(skip)] = name
                    block.skips_out.append(_shape(skip))
            for skip in kwargs.get("res_hidden_states_tuple", ()):  # an up block
                block.skips_in.append((made_by.get(id(skip), "?"), _shape(skip)))
            records.append(block)

        return record

    modules = [("conv_in", unet.conv_in, "encoder")]
    modules += [(f"down_blocks.{i}", block, "encoder") for i, block in enumerate(unet.down_blocks)]
    modules += [("mid_block", unet.mid_block, "bottleneck")]
    modules += [(f"up_blocks.{i}", block, "decoder") for i, block in enumerate(unet.up_blocks)]
    modules += [("conv_out", unet.conv_out, "decoder")]
    handles = [module.register_forward_hook(hook(name, part), with_kwargs=True) for name, module, part in modules]
    try:
        unet(sample, timestep, encoder_hidden_states)
    finally:
        for handle in handles:
            handle.remove()
    return records


def preset_unet_shapes(preset: str = "sd15", resolution: int = 512, cross_attention_dim: int = 768,
                       text_length: int = 77):
    """(records, parameter count) of a UNet `preset` at `resolution` pixels (latents of resolution/8),
    built and run on the meta device: real module graph and shapes, no weights, no arithmetic."""
    from diffusers import UNet2DConditionModel

    from .models import UNET_PRESETS

    side = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=side, cross_attention_dim=cross_attention_dim, **UNET_PRESETS[preset])
        records = record_unet_shapes(unet, torch.empty(1, 4, side, side), torch.tensor([500]),
                                     torch.empty(1, text_length, cross_attention_dim))
    return records, unet.num_parameters()


def _fmt(shape) -> str:
    return "×".join(str(s) for s in shape)


def _fmt_many(shapes) -> str:
    """(320, 64, 64) three times -> "3×(320×64×64)", keeping first-seen order."""
    counts = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    return ", ".join(_fmt(s) if n == 1 else f"{n}×({_fmt(s)})" for s, n in counts.items())


def draw_unet(records: list[BlockShapes], ax=None, title: str | None = None):
    """The recorded blocks as boxes laid out as a U (height = spatial size of the block's input),
    solid arrows for the main path, dashed arcs for the skip connections (source -> consumer)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    sizes = sorted({r.input[-1] for r in records}, reverse=True)
    level = {size: i for i, size in enumerate(sizes)}
    step_x, step_y, width, height = 1.85, 1.7, 1.7, 1.15
    if ax is None:
        _, ax = plt.subplots(figsize=(max(10, 1.25 * len(records)), 2.5 + 1.4 * len(sizes)))
    colors = {"encoder": "#cfe2f3", "bottleneck": "#f4cccc", "decoder": "#d9ead3"}
    centre = {}
    for x, record in enumerate(records):
        cx, cy = x * step_x, -step_y * level[record.input[-1]]
        centre[record.name] = (cx, cy)
        lines = [record.name, record.kind.replace("Block2D", ""), f"in  {_fmt(record.input)}",
                 f"out {_fmt(record.output)}"]
        if record.skips_out:
            lines.append(f"saves {len(record.skips_out)} skip{'s' if len(record.skips_out) > 1 else ''}")
        if record.skips_in:
            lines.append("+ " + _fmt_many([shape for _, shape in record.skips_in]))
        ax.add_patch(FancyBboxPatch((cx - width / 2, cy - height / 2), width, height, boxstyle="round,pad=0.02",
                                    facecolor=colors[record.part], edgecolor="0.3"))
        ax.text(cx, cy, "\n".join(lines), ha="center", va="center", fontsize=6.5, family="monospace")
    for a, b in zip(records, records[1:]):
        (xa, ya), (xb, yb) = centre[a.name], centre[b.name]
        ax.annotate("", xy=(xb - width / 2, yb), xytext=(xa + width / 2, ya),
                    arrowprops=dict(arrowstyle="->", color="0.2"))
    for record in records:
        for source in dict.fromkeys(name for name, _ in record.skips_in):  # one arc per source block
            if source in centre:
                (xa, ya), (xb, yb) = centre[source], centre[record.name]
                ax.annotate("", xy=(xb, yb + height / 2), xytext=(xa, ya + height / 2),
                            arrowprops=dict(arrowstyle="->", color="tab:orange", linestyle="--", lw=1,
                                            connectionstyle="arc3,rad=-0.2"))
    xs = [c[0] for c in centre.values()]
    ys = [c[1] for c in centre.values()]
    ax.set_xlim(min(xs) - step_x / 2 - 0.1, max(xs) + step_x / 2 + 0.1)
    ax.set_ylim(min(ys) - height, max(ys) + height / 2 + 0.12 * (max(xs) - min(xs)) + 0.3)
    ax.set_yticks([-step_y * i for i in range(len(sizes))], [f"{s}×{s}" for s in sizes])
    ax.set_ylabel("spatial size of the block's input")
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or "U-Net blocks with their tensor shapes (C×H×W)", fontsize=11)
    ax.text(0.5, -0.02, "blue: encoder · red: bottleneck · green: decoder · dashed: skip connections · "
            "'+': the skip tensors a decoder block concatenates", transform=ax.transAxes, ha="center", va="top",
            fontsize=8)
    return ax


# --- the forward (noising) process ------------------------------------------------------------------


@dataclass
class Noising:
    timesteps: list[int]
    signal: list[float]  # sqrt(alpha_bar_t): the fraction of the clean image left in x_t
    latent_images: list[Image.Image]  # the noisy latent at each timestep, decoded by the VAE
    pixel_images: list[Image.Image]  # the same noise schedule applied to the pixels directly


@torch.no_grad()
def forward_noising(pipe, image: Image.Image, timesteps, seed: int = 0) -> Noising:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise at each timestep, with the training
    schedule (a DDPMScheduler built from the pipeline's scheduler config) and one fixed noise draw."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = image_to_tensor(image.convert("RGB"), resolution)[None].to(pipe.vae.device, pipe.vae.dtype)
    latents = encode_image(pipe, image)
    generator = torch.Generator().manual_seed(seed)
    latent_noise = torch.randn(latents.shape, generator=generator).to(latents)
    pixel_noise = torch.randn(pixels.shape, generator=generator).to(pixels)
    result = Noising([], [], [], [])
    for t in timesteps:
        step = torch.tensor([int(t)])
        result.timesteps.append(int(t))
        result.signal.append(scheduler.alphas_cumprod[int(t)].sqrt().item())
        result.latent_images += decode_latents(pipe, scheduler.add_noise(latents, latent_noise, step))
        noisy_pixels = scheduler.add_noise(pixels, pixel_noise, step)
        result.pixel_images += pipe.image_processor.postprocess(noisy_pixels.clamp(-1, 1), output_type="pil")
    return result
