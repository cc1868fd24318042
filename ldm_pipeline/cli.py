"""`ldm-pipeline` command line: generate, train, cache, export, demo, and the commands of the plug-ins (the shapes
plug-in's make-shapes and evaluate).

`generate` also runs under `accelerate launch -m ldm_pipeline.cli generate ...`: prompts are split
across processes and every image is written once, by the main process, identical at any process
count.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from . import plugins
from .config import ConfigError, add_run_arguments, load_config, os_error_message
from .console import quiet_library_logs


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT or a --prompts-file with one prompt per line")
    return prompts


def cmd_generate(args) -> int:
    from .distributed import process_state
    from .generation import ImageWriter, check_generation_settings, generate_batches, save_progress_gif
    from .pipeline import load_pipeline

    if args.num_images < 1:
        raise ConfigError("--num-images must be at least 1")
    if args.model is None and args.lora is None:
        raise ConfigError("give --model (a pipeline directory or hub id), or --lora (a LoRA directory; its base "
                          "model is loaded)")
    check_generation_settings(args.steps, args.guidance, args.height, args.width, args.batch_size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the images")
    prompts = _prompts(args)
    state = process_state()
    pipe = load_pipeline(args.model, device=args.device or state.device, scheduler=args.scheduler, lora=args.lora)
    # Image k of a prompt uses seed + k, whichever process makes it.
    jobs = [(prompt, args.seed + k) for prompt in prompts for k in range(args.num_images)]
    writer = ImageWriter(out) if state.is_main_process else None
    if writer:
        print(f"generating {len(jobs)} images on {state.num_processes} process(es) into {out}")
    paths = []
    # SIGTERM ends the run like Ctrl-C (a file being written is finished first): the written images stay.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for batch in generate_batches(
                pipe, [p for p, _ in jobs], [s for _, s in jobs], num_inference_steps=args.steps,
                guidance_scale=args.guidance, height=args.height, width=args.width, batch_size=args.batch_size,
                negative_prompt=args.negative_prompt,
                return_progress=args.save_progress, show_progress=state.is_main_process, state=state):
            if writer is None:
                continue
            for image, frames in batch:  # written as each batch finishes
                with _stops_held():  # each file written and counted whole
                    paths.append(writer.save(image))
                    if frames:
                        save_progress_gif(frames, paths[-1].with_suffix(".gif"))
    except KeyboardInterrupt:  # Ctrl+C: the finally below says what was kept, instead of a traceback
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if writer and len(paths) < len(jobs):
            print(_stopped_generating(paths, jobs, args, out), file=sys.stderr)
    if writer:
        extra = " (+ a denoising GIF each)" if args.save_progress else ""
        print(f"wrote {len(paths)} images{extra} to {out}: {paths[0].name} .. {paths[-1].name}")
    state.wait_for_everyone()
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def _stops_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl+C and SIGTERM until the block is done, then act on the first that came. Not pthread_sigmask: the
    kernel then hands the signal to another thread (tqdm's monitor, torch's), and Python still runs its handler in
    the main thread, in the middle of the block."""
    held = []
    previous = {number: signal.signal(number, lambda signum, frame: held.append(signum)) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])  # runs its handler before returning


def _stopped_generating(paths: list[Path], jobs: list[tuple[str, int]], args, out: Path) -> str:
    """One line: what a stopped generation kept, and how to make the rest (a rerun never overwrites: its images
    are numbered after the ones there, so rerunning the same command would make the kept ones a second time)."""
    kept = "" if not paths else f" ({paths[0].name})" if len(paths) == 1 else f" ({paths[0].name} .. {paths[-1].name})"
    if not paths:
        rest = "run the same command again to write them"
    elif len(jobs) == args.num_images:  # one prompt: the rest are its next seeds
        rest = (f"run the same command with --seed {args.seed + len(paths)} --num-images {len(jobs) - len(paths)} "
                "to write the rest")
    else:
        prompt, seed = jobs[len(paths)]
        rest = (f"the next was {prompt!r} seed {seed}; running the same command again writes all {len(jobs)}, "
                "numbered after these")
    return f"stopped after writing {len(paths)} of {len(jobs)} images to {out}{kept}; {rest}"


def cmd_train(args) -> int:
    from .training import main as train_main

    argv = ["--config", args.config] + [f"--set={item}" for item in args.overrides]
    return train_main(argv + (["--dry-run"] if args.dry_run else []))


def cmd_cache(args) -> int:
    from .cpu import set_up_cpu
    from .distributed import describe_failed_collective, failed_collective
    from .training import build_cache

    config = load_config(args.config, args.overrides)
    set_up_cpu(config)
    try:
        build_cache(config)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch every process gets the Ctrl+C
            print("stopped: the finished shards of the latent cache are kept (a shard being written is not); "
                  "run the same command again to encode only the rest", file=sys.stderr)
        return 130
    except RuntimeError as error:  # another process died or stopped answering
        if not failed_collective(error):
            raise
        print(f"error: {describe_failed_collective(error)}. Another process died or did not answer within "
              f"distributed_timeout ({config.distributed_timeout} s); the finished shards of the latent cache are "
              "kept: run the same command again on every node to encode only the rest", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    import torch

    from .export import export_single_file

    print(f"exporting {args.model} to the original single-file layout")
    summary = export_single_file(args.model, args.out, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    second = f", text encoder 2 {summary['text_encoder_2_tensors']}" if "text_encoder_2_tensors" in summary else ""
    print(f"wrote {summary['path']}: {summary['tensors']} tensors (UNet {summary['unet_tensors']}, VAE "
          f"{summary['vae_tensors']}, text encoder {summary['text_encoder_tensors']}{second}), "
          f"{summary['bytes'] / 1e6:.1f} MB, {args.dtype}")
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


def cmd_demo(args) -> int:
    from .demo import import_gradio, serve

    import_gradio()  # fail before the model loads when the extra is missing
    serve(args.model, host=args.host, port=args.port, device=args.device, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-pipeline", description="Latent diffusion text-to-image: train, "
                                     "generate and evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate PNGs (with prompt/seed/settings metadata) from a model")
    gen.add_argument("--model", help="pipeline directory (e.g. outputs/shapes/pipeline) or hub id (with --lora: "
                     "default the base the LoRA names)")
    gen.add_argument("--lora", help="a LoRA directory (<output_dir>/lora of a LoRA run) to load into the model")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale, >= 0 (default: the model's; values <= 1 turn it off)")
    gen.add_argument("--height", type=int, default=None,
                     help="image height in pixels, a multiple of 8 (default: the resolution the model was trained at)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (as --height)")
    gen.add_argument("--scheduler", choices=["dpmsolver++", "ddim", "euler", "ddpm"], default=None)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available)")
    gen.add_argument("--save-progress", action="store_true",
                     help="also write a GIF of the decoded latents at every denoising step")
    gen.add_argument("--out", default="generated", help="output directory (existing images are kept)")
    gen.set_defaults(run=cmd_generate)

    tr = commands.add_parser("train", help="train a model (on several processes: accelerate launch -m "
                             "ldm_pipeline.cli train ...)",
                             description="Train a latent diffusion text-to-image model in this process, or on every "
                             "process of `accelerate launch -m ldm_pipeline.cli train ...`; `accelerate launch "
                             "train.py` in a checkout takes the same options.")
    add_run_arguments(tr)
    tr.set_defaults(run=cmd_train)

    cache = commands.add_parser(
        "cache", help="encode the data set into the latent cache a training config uses (accelerate launch: "
        "every process encodes its share)",
        description="Encode the data set of a training config into its latent cache (data.latent_cache_dir, "
        "default <output_dir>/latent_cache): VAE latents, token ids and, with a frozen text encoder, its "
        "outputs, as Arrow shards. Finished shards are kept, so a killed or repeated run only does the rest. "
        "Run it on several processes with `accelerate launch -m ldm_pipeline.cli cache --config ...`.")
    cache.add_argument("--config", required=True, help="the training YAML config, e.g. train_configs/shapes.yaml, or "
                       "the name of a packaged one, e.g. shapes")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, as for train (repeatable)")
    cache.set_defaults(run=cmd_cache)

    ex = commands.add_parser("export", help="write a pipeline as one original-layout Stable Diffusion .safetensors")
    ex.add_argument("--model", required=True, help="pipeline directory (e.g. outputs/shapes/pipeline) or hub id")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.set_defaults(run=cmd_export)

    demo = commands.add_parser("demo", help='a local web page to generate from a model (pip install -e ".[demo]")')
    demo.add_argument("--model", required=True, help="pipeline directory (e.g. outputs/shapes/pipeline) or hub id")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860, help="TCP port to serve on, 1-65535")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available)")
    demo.add_argument("--out", default=None, help="directory the PNGs are added to (default: a temporary one)")
    demo.set_defaults(run=cmd_demo)
    plugins.add_commands(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl+C where a command has nothing to add about what it kept
        print("stopped (Ctrl+C)", file=sys.stderr)
        return 130
    except ValueError as error:  # ConfigError and the other bad-input errors
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full or read-only disk, a missing permission
        print(f"error: {os_error_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
