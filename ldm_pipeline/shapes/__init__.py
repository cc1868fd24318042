"""The embedded default as a plug-in: synthetic shapes (`maker.py`: one coloured shape on white, captioned
"a red circle in the top left") and a checker that reads those three back from an image (`checker.py`).

The core reaches it only through the hook of `ldm_pipeline.plugins` (the `shapes` entry point in pyproject.toml):
`data.make_shapes` writes the data, the VAE stage checks its reconstructions with the checker, and
`ldm-pipeline make-shapes` / `ldm-pipeline evaluate` are its commands. The modules are imported when a hook needs
them, so that `ldm-pipeline --help`, which loads every plug-in, stays fast.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


class ShapesPlugin:
    name = "shapes"

    def prepare_data(self, config, accelerator) -> None:
        """Write the shapes into data.train_data_dir when data.make_shapes asks for them and it is absent."""
        shapes, root = config.data.make_shapes, config.data.train_data_dir
        if shapes is None or Path(root).exists():
            return
        if accelerator.is_main_process:
            from .maker import make_shapes

            print(f"making {shapes.num_images} synthetic shapes images in {root}")
            make_shapes(root, shapes.num_images, config.resolution, shapes.seed, shapes.holdout, shapes.background)
        accelerator.wait_for_everyone()

    def planned_captions(self, config) -> list[str] | None:
        """The captions make_shapes will write, in its order: its first draws pick them."""
        shapes = config.data.make_shapes
        if shapes is None:
            return None
        from .maker import balanced_combinations, caption

        return [caption(*parts) for parts in
                balanced_combinations(shapes.num_images, random.Random(shapes.seed), shapes.holdout)]

    def reconstruction_checker(self, captions):
        from .checker import ReconstructionCheck, is_shapes_data

        return ReconstructionCheck() if is_shapes_data(captions) else None

    def add_commands(self, commands) -> None:
        ev = commands.add_parser("evaluate", help="score a shapes model: color / shape / position accuracy, clean "
                                 "images, VAE PSNR")
        ev.add_argument("--model", help="pipeline directory of a model trained on shapes")
        ev.add_argument("--lora", help="a LoRA directory to load into the model (default model: the LoRA's base)")
        ev.add_argument("--seeds-per-prompt", type=int, default=2, help="images per each of the 90 prompts")
        ev.add_argument("--first-seed", type=int, default=1000, help="seeds are first-seed, first-seed + 1, ...")
        ev.add_argument("--steps", type=int, default=None)
        ev.add_argument("--guidance", type=float, default=None)
        ev.add_argument("--batch-size", type=int, default=30)
        ev.add_argument("--psnr-images", type=int, default=256, help="held-out images for the VAE PSNR")
        ev.add_argument("--device", default=None)
        ev.add_argument("--out", default=None, help="JSON report path (default: next to the model)")
        ev.set_defaults(run=evaluate_command)

        shapes = commands.add_parser("make-shapes", help="write the synthetic shapes image folder")
        shapes.add_argument("--out", required=True)
        shapes.add_argument("--num-images", type=int, default=6000)
        shapes.add_argument("--resolution", type=int, default=64)
        shapes.add_argument("--seed", type=int, default=0)
        shapes.add_argument("--holdout", action="append", metavar="CAPTION",
                            help='a caption never drawn, e.g. "a red circle in the top left" (repeatable)')
        shapes.add_argument("--background", default="white",
                            help="white (the default) or dark; the captions are the same on either")
        shapes.add_argument("--sizes", default=None, metavar="WxH,...",
                            help="frames of several sizes, taken in turn, e.g. 64x64,96x64,64x96 (WIDTHxHEIGHT); "
                            "shapes keep their size relative to the short side and their place relative to the frame "
                            "(default: --resolution squares)")
        shapes.set_defaults(run=make_shapes_command)


def evaluate_command(args) -> int:
    from ..config import ConfigError
    from ..distributed import process_state
    from .checker import evaluate_model

    state = process_state()
    if args.model is None and args.lora is None:
        raise ConfigError("give --model (a pipeline directory) or --lora (a LoRA directory, evaluated on its base)")
    report = evaluate_model(args.model, seeds_per_prompt=args.seeds_per_prompt, num_inference_steps=args.steps,
                            guidance_scale=args.guidance, batch_size=args.batch_size,
                            psnr_images=args.psnr_images, device=args.device, first_seed=args.first_seed,
                            lora=args.lora)
    if not state.is_main_process:
        return 0
    out = Path(args.out or Path(args.lora or args.model).parent / "evaluation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    summary = {k: report[k] for k in ("color_accuracy", "shape_accuracy", "position_accuracy", "clean_accuracy",
                                       "all_accuracy", "cut_fraction", "dark_background_fraction", "vae_psnr_db")}
    print(json.dumps(summary, indent=2))
    print(f"wrote the full report to {out}")
    return 0


def make_shapes_command(args) -> int:
    from ..config import ConfigError
    from .maker import make_shapes, parse_sizes

    try:
        sizes = parse_sizes(args.sizes) if args.sizes else None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    path = make_shapes(args.out, args.num_images, args.resolution, args.seed, args.holdout or (), args.background,
                       sizes)
    frames = ", ".join(f"{w}x{h}" for w, h in sizes) if sizes else f"{args.resolution}x{args.resolution}"
    print(f"wrote {args.num_images} images ({frames}, {args.background} background) and metadata.jsonl to {path}")
    return 0


plugin = ShapesPlugin()
