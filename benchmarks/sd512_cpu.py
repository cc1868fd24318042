"""The real-size path on a CPU: train_configs/sd_512.yaml shrunk only by `--set`, at 512 px, in bf16, both stages.

    python benchmarks/sd512_cpu.py [--steps 4] [--set key=value ...] [--threads N]
    python benchmarks/sd512_cpu.py --estimate [sd15|sdxl]

Writes a few 512x512 captioned images, trains the config with dummy widths (the sd15 block layouts),
batch 1 and local text components (tests/test_sd512.py runs the same overrides), and prints for each
stage the seconds per optimizer step (the first step, which allocates, left out) and the peak resident
memory of its training loop (Linux VmHWM, reset when the stage starts), then the whole run's peak.

`--estimate` prints instead the arithmetic behind the GPU batches and memory of docs/gpus.md, for the unshrunk
sd15 components at 512 px (sd_512.yaml's per-GPU batches) or, with `--estimate sdxl`, SDXL 1.0's at 1024 px
(the `sdxl` presets; sdxl_finetune.yaml and sdxl_lora.yaml): parameter counts, training FLOPs per sample (torch's
FlopCounterMode) and activation memory per sample with and without gradient checkpointing (SDXL: for the whole
UNet and for a rank-16 LoRA on its attention). Those are counted on the meta device (no memory, no compute):
every tensor a training step keeps for its backward pass, in bf16, with attention counted as flash attention
keeps it (q, k, v, output, log-sum-exp), and the weights left out (they are held once, not per sample). An
estimate, not a measurement: autocast keeps norms in fp32, and allocators fragment.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path[:0] = [str(ROOT), str(BENCHMARKS)]

from step_speed import cpu_model  # noqa: E402

import ldm_pipeline.loop as loop_module  # noqa: E402
import ldm_pipeline.training as train_module  # noqa: E402
import ldm_pipeline.unet_stage as unet_stage  # noqa: E402
import ldm_pipeline.vae_stage as vae_stage  # noqa: E402
from ldm_pipeline.config import ModelConfig, load_config  # noqa: E402
from ldm_pipeline.models import build_text_encoder, build_unet, build_vae, micro_conditioning  # noqa: E402
from ldm_pipeline.tokenizer import build_tokenizer  # noqa: E402

CONFIG = ROOT / "train_configs" / "sd_512.yaml"
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220)}


def write_images(root: Path, count: int = 6, size: int = 512) -> Path:
    """`count` size x size images of a colored square on white, captioned in metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as handle:
        for i in range(count):
            name, left = list(COLORS)[i % 2], (i // 2) % 2 == 0
            image = Image.new("RGB", (size, size), "white")
            x0 = size // 8 if left else size // 2 + size // 8
            ImageDraw.Draw(image).rectangle([x0, size // 4, x0 + size // 4, size // 2], fill=COLORS[name])
            image.save(root / f"{i:03d}.png")
            caption = f"a {name} square on the {'left' if left else 'right'}"
            handle.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return root


def shrink_overrides(data_dir: Path, output_dir: Path, steps: int = 2) -> list[str]:
    """sd_512.yaml at dummy widths with the sd15 block layouts (4 VAE blocks; 4 UNet blocks, cross-attention in
    3), batch 1, local text components; resolution, stages, bf16, EMA and gradient checkpointing stay."""
    return [
        f"data.train_data_dir={data_dir}", f"output_dir={output_dir}", "data.dataloader_num_workers=0",
        "model.text_encoder=tiny", "model.tokenizer=captions",
        "model.vae_kwargs={block_out_channels: [8, 16, 16, 16], layers_per_block: 1, norm_num_groups: 4}",
        "model.unet_kwargs={block_out_channels: [16, 16, 32, 32], layers_per_block: 1, attention_head_dim: 2, "
        "norm_num_groups: 8}",
        "vae_training.train_batch_size=1", f"vae_training.max_train_steps={steps}", "vae_training.scaling_samples=4",
        "vae_training.psnr_samples=1", "train_batch_size=1", f"max_train_steps={steps}", "validation.num_heldout=1",
        "validation.seeds=[0]", "sampling.num_inference_steps=2",
    ]


def peak_rss_bytes() -> int:
    """The process's peak resident memory since start or the last reset_peak_rss (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: this measurement needs Linux")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM restarts from the current RSS


def measure_stages(config) -> tuple[dict, int]:
    """Train `config`. Per stage: seconds per step after the first and the training loop's peak RSS; and the
    whole run's peak RSS (ru_maxrss cannot give it: resetting VmHWM resets it too)."""
    stages, fit, after_step, whole = {}, loop_module.fit, loop_module.after_step, [0]

    def measured_fit(accelerator, config, stage):
        whole[0] = max(whole[0], peak_rss_bytes())
        reset_peak_rss()
        stages[stage.settings.name] = {"step_times": []}
        state = fit(accelerator, config, stage)
        stages[stage.settings.name]["peak_rss_bytes"] = peak_rss_bytes()
        return state

    def timed_after_step(accelerator, config, stage, *args):
        stages[stage.settings.name]["step_times"].append(time.perf_counter())
        return after_step(accelerator, config, stage, *args)

    # Each stage calls fit from its own module; fit calls after_step from the loop's.
    unet_stage.fit = vae_stage.fit = measured_fit
    loop_module.after_step = timed_after_step
    try:
        train_module.train(config)
    finally:
        unet_stage.fit = vae_stage.fit = fit
        loop_module.after_step = after_step
    for row in stages.values():
        times = row.pop("step_times")
        row["s_per_step"] = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return stages, max(whole[0], peak_rss_bytes())


def count_activation_bytes(model, step, checkpointing: bool) -> int:
    """Bytes of the tensors one forward pass of `step()` keeps for backward, on the meta device. With
    checkpointing: what is kept outside the checkpointed blocks, their inputs, and the largest block's own
    activations (recomputed during backward). The model's weights, which a layer saves to compute its input's
    gradient, are not counted: they are held once, whatever the batch (autocast's bf16 copies of fp32 weights
    likewise, once per step)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, kept, largest_block = set(weights), [0], [0]

    def new_bytes(tensor, seen):
        storage = tensor.untyped_storage()
        if storage._cdata in seen:  # views share a storage
            return 0
        seen.add(storage._cdata)
        return storage.nbytes()

    def keep(tensor):
        kept[0] += new_bytes(tensor, seen)
        return tensor

    def checkpoint(module, *args):
        kept[0] += sum(new_bytes(a, seen) for a in args if isinstance(a, torch.Tensor))
        block, block_seen = [0], set(weights)

        def pack(tensor):
            block[0] += new_bytes(tensor, block_seen)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = module(*args)
        largest_block[0] = max(largest_block[0], block[0])
        return output

    class FlashAttention(torch.autograd.Function):
        """Keeps what flash attention keeps; the meta device would count the (L, L) attention matrix."""

        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
            return out

    if checkpointing:
        model.enable_gradient_checkpointing(checkpoint)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: FlashAttention.apply(q, k, v)
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            step()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        if checkpointing:
            model.disable_gradient_checkpointing()
    return kept[0] + largest_block[0]


@contextmanager
def quiet_diffusers():
    """.to(bf16) warns about modules to keep in fp32: there are none."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def meta_components(model: ModelConfig, resolution: int, dtype=torch.bfloat16) -> dict:
    """`model`'s VAE, text encoder(s) (float32) and UNet for `resolution` px on the meta device, the VAE and UNet
    in `dtype`."""
    with torch.device("meta"), quiet_diffusers():
        tokenizer = build_tokenizer(["a photo"])
        parts = {"vae": build_vae(model).to(dtype), "text_encoder": build_text_encoder(model, tokenizer)}
        if model.family == "sdxl":
            parts["text_encoder_2"] = build_text_encoder(model, tokenizer, "text_encoder_2")
        parts["unet"] = build_unet(model, resolution, parts["vae"], parts["text_encoder"],
                                   parts.get("text_encoder_2")).to(dtype)
    return parts


def training_row(component: str, model, step, parameters: int) -> dict:
    """Training FLOPs of one `step()` (forward and backward) and the activations it keeps, with and without
    gradient checkpointing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        step().backward()
    return {"component": component, "parameters_M": parameters / 1e6,
            "tflop_per_sample": flops.get_total_flops() / 1e12,
            "activations_gib": count_activation_bytes(model, step, False) / 2**30,
            "activations_checkpointed_gib": count_activation_bytes(model, step, True) / 2**30}


def encode_row(component: str, vae, resolution: int) -> dict:
    """The frozen VAE encoding one image (the UNet stage without a latent cache)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops, torch.no_grad():
        vae.encode(torch.empty(1, 3, resolution, resolution, device="meta", dtype=vae.dtype))
    return {"component": component, "parameters_M": vae.num_parameters() / 1e6,
            "tflop_per_sample": flops.get_total_flops() / 1e12}


def estimate_sd15(resolution: int = 512) -> list[dict]:
    """Parameters, training FLOPs and activation memory per sample of the sd15 VAE and UNet at `resolution`."""
    dtype, side = torch.bfloat16, resolution // 8
    parts = meta_components(ModelConfig(vae="sd15", text_encoder="sd15", unet="sd15"), resolution, dtype)
    vae, text_encoder, unet = parts["vae"], parts["text_encoder"], parts["unet"]

    def vae_step():
        pixels = torch.empty(1, 3, resolution, resolution, device="meta", dtype=dtype)
        posterior = vae.encode(pixels).latent_dist
        return (vae.decode(posterior.mean + posterior.std).sample - pixels).abs().mean()

    def unet_step():
        latents = torch.empty(1, 4, side, side, device="meta", dtype=dtype)
        text = torch.empty(1, 77, text_encoder.config.hidden_size, device="meta", dtype=dtype)
        return unet(latents, torch.zeros(1, dtype=torch.long, device="meta"), text).sample.float().pow(2).mean()

    return [training_row("sd15 vae", vae, vae_step, vae.num_parameters()),
            training_row("sd15 unet", unet, unet_step, unet.num_parameters()),
            encode_row("sd15 vae encode (no grad)", vae, resolution),
            {"component": "sd15 text encoder (CLIP ViT-L/14 text)",
             "parameters_M": text_encoder.num_parameters() / 1e6}]


def estimate_sdxl(resolution: int = 1024, lora_rank: int = 16) -> list[dict]:
    """Parameters, training FLOPs and activation memory per sample of SDXL 1.0's UNet at `resolution` (the `sdxl`
    presets), trained whole and as sdxl_lora.yaml's rank-`lora_rank` LoRA on its attention projections."""
    from ldm_pipeline.config import UNET_LORA_TARGETS, LoraConfig
    from ldm_pipeline.lora import add_adapters, trainable

    dtype, side = torch.bfloat16, resolution // 8
    parts = meta_components(ModelConfig(family="sdxl", vae="sdxl", text_encoder="sdxl", text_encoder_2="sdxl",
                                        unet="sdxl"), resolution, dtype)
    unet, pooled = parts["unet"], parts["text_encoder_2"].config.projection_dim

    def unet_step():
        latents = torch.empty(1, 4, side, side, device="meta", dtype=dtype)  # (1, 4, 128, 128) at 1024 px
        text = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta", dtype=dtype)  # (1, 77, 2048)
        added = {"text_embeds": torch.empty(1, pooled, device="meta", dtype=dtype),  # (1, 1280)
                 "time_ids": micro_conditioning(torch.full((1, 2), resolution, device="meta"),
                                                torch.zeros(1, 2, device="meta"), (resolution, resolution))}
        return unet(latents, torch.zeros(1, dtype=torch.long, device="meta"), text,
                    added_cond_kwargs=added).sample.float().pow(2).mean()

    rows = [training_row("sdxl unet", unet, unet_step, unet.num_parameters())]
    add_adapters(unet, LoraConfig(rank=lora_rank), UNET_LORA_TARGETS)  # the base frozen: its layers keep less
    with quiet_diffusers():
        unet.to(dtype)  # autocast runs the fp32 adapters in bf16 too
    rows.append(training_row(f"sdxl unet, rank-{lora_rank} LoRA on {', '.join(UNET_LORA_TARGETS)}", unet, unet_step,
                             sum(p.numel() for p in trainable(unet))))
    rows.append(encode_row("sdxl vae encode (no grad)", parts["vae"], resolution))
    for name, what in (("text_encoder", "CLIP ViT-L/14 text"), ("text_encoder_2", "OpenCLIP ViT-bigG/14 text")):
        rows.append({"component": f"sdxl {name} ({what})", "parameters_M": parts[name].num_parameters() / 1e6})
    return rows


def print_estimate(family: str) -> None:
    size, rows = ("sd15 at 512 px", estimate_sd15()) if family == "sd15" else ("SDXL at 1024 px", estimate_sdxl())
    print(f"{size}, per sample (counted on the meta device; activations in bf16, weights not counted):")
    for row in rows:
        cells = [f"{row['parameters_M']:.1f}M {'trainable ' if 'LoRA' in row['component'] else ''}parameters"]
        if "tflop_per_sample" in row:
            cells.append(f"{row['tflop_per_sample']:.2f} TFLOP")
        if "activations_gib" in row:
            cells.append(f"activations {row['activations_gib']:.2f} GiB, "
                         f"{row['activations_checkpointed_gib']:.2f} GiB with gradient checkpointing")
        print(f"  {row['component']}: " + ", ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage (default 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="further overrides, e.g. --set mixed_precision=\"'no'\"")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--estimate", nargs="?", const="sd15", choices=["sd15", "sdxl"],
                        help="only print the size arithmetic of sd15 at 512 px (default) or SDXL at 1024 px")
    args = parser.parse_args(argv)
    if args.estimate:
        print_estimate(args.estimate)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        data_dir = write_images(Path(work) / "data")
        config = load_config(CONFIG, shrink_overrides(data_dir, Path(work) / "out", args.steps) + args.overrides)
        start = time.perf_counter()
        stages, whole = measure_stages(config)
        wall = time.perf_counter() - start
    print(f"\n{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"sd_512.yaml shrunk, {config.resolution} px, mixed_precision {config.mixed_precision}, batch 1")
    print(f"{'stage':>6} {'s/step':>8} {'peak RSS (training loop)':>26}")
    for name, row in stages.items():
        print(f"{name:>6} {row['s_per_step']:8.2f} {row['peak_rss_bytes'] / 2**20:22.0f} MiB")
    print(f"whole run ({args.steps} steps per stage, loading, calibration, validation, saving): {wall:.1f} s, "
          f"peak RSS {whole / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
