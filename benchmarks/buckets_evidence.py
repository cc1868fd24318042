"""Do aspect-ratio buckets matter? The shapes recipe trained on frames of three sizes, once in buckets and once
with today's square centre crop, then scored at each size by the project's checker.

    python benchmarks/buckets_evidence.py [--images 6000] [--workdir DIR] [--first-seed 1000] [--set key=value ...]

It writes `--images` shapes images in turn at 64x64, 96x64 and 64x96 (WIDTHxHEIGHT; `make-shapes --sizes`), trains
`train_configs/shapes.yaml` on them twice as the README's main command does (`accelerate launch train.py`): with
`data.buckets` at those three sizes, and without (every image resized and centre-cropped to 64x64, so a 96-px
side loses 16 px at each end). Then each model draws the 90 captions x 2 seeds at each size, and the checker
scores colour, shape, position and clean, and how often the shape runs past the frame ("cut"). Prints a Markdown
table per model with the run times, and writes it to <workdir>/buckets_evidence.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from shapes_benchmark import cpu_description, launch_training  # noqa: E402

FRAMES = [(64, 64), (96, 64), (64, 96)]  # (width, height)
BUCKETS = "data.buckets={sizes: [[64, 64], [64, 96], [96, 64]]}"  # [height, width]


def train(data: Path, out: Path, overrides: list[str], log: Path) -> float:
    return launch_training("train_configs/shapes.yaml", [f"data.train_data_dir={data}", "data.make_shapes=null",
                                                         f"output_dir={out}", *overrides], log)


def score(pipeline: Path, first_seed: int) -> list[dict]:
    from ldm_pipeline.generation import generate
    from ldm_pipeline.pipeline import load_pipeline
    from ldm_pipeline.shapes.checker import evaluation_prompts, score_images

    pipe = load_pipeline(pipeline, device="cpu")
    prompts, seeds = evaluation_prompts(2, first_seed)
    rows = []
    for width, height in FRAMES:
        images = generate(pipe, prompts, seeds, width=width, height=height, batch_size=30, show_progress=False)
        report = score_images(images, prompts)
        rows.append({"frame": f"{width}x{height}", **{key: report[key] for key in (
            "color_accuracy", "shape_accuracy", "position_accuracy", "clean_accuracy", "cut_fraction")}})
    return rows


def table(name: str, seconds: float, rows: list[dict]) -> list[str]:
    lines = [f"{name} (trained in {seconds:.0f} s)", "", "| frame (WxH) | color | shape | position | clean | cut |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['frame']} | {row['color_accuracy']:.1%} | {row['shape_accuracy']:.1%} | "
                     f"{row['position_accuracy']:.1%} | {row['clean_accuracy']:.1%} | {row['cut_fraction']:.1%} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--workdir", default="/tmp/buckets_evidence")
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of train_configs/shapes.yaml for both runs")
    args = parser.parse_args()

    from ldm_pipeline.shapes.maker import make_shapes

    work = Path(args.workdir)
    data = work / "mixed"
    if not data.is_dir():
        make_shapes(data, args.images, 64, seed=0, sizes=FRAMES)
    results, lines = {}, [f"machine: {cpu_description()}", ""]
    for name, overrides in (("buckets", [BUCKETS]), ("square centre crop", [])):
        out = work / name.split()[0]
        seconds = train(data, out, overrides + args.set, work / f"{name.split()[0]}.log")
        rows = score(out / "pipeline", args.first_seed)
        results[name] = {"train_s": seconds, "rows": rows}
        lines += table(name, seconds, rows)
        print("\n".join(table(name, seconds, rows)), flush=True)
    print("\n".join(lines))
    (work / "buckets_evidence.json").write_text(json.dumps({"machine": cpu_description(), "images": args.images,
                                                            "overrides": args.set, **results}, indent=2))


if __name__ == "__main__":
    main()
