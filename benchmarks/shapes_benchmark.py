"""Benchmark of the embedded default: the README's main command from an empty data directory, then evaluation.

    python benchmarks/shapes_benchmark.py [--workdir DIR] [--set key=value ...] [--first-seed S]

Runs `accelerate launch train.py --config train_configs/shapes.yaml` with its data directory and output
directory redirected into a fresh work directory (so the shapes are generated, the VAE and the UNet are
trained from nothing), prints the wall-clock time, then runs `ldm-pipeline evaluate` on the result and
prints its accuracies. Targets (2 CPU cores): <= 600 s; color >= 90%, shape >= 85%, position >= 70%;
VAE PSNR >= 25 dB. The full report lands in <workdir>/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"wall_seconds": 600, "color_accuracy": 0.90, "shape_accuracy": 0.85, "position_accuracy": 0.70,
           "vae_psnr_db": 25.0}


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where data and outputs go (default: a new temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides passed to train.py, e.g. --set max_train_steps=500")
    parser.add_argument("--first-seed", type=int, default=1000, help="first evaluation seed (try others too)")
    parser.add_argument("--seeds-per-prompt", type=int, default=2)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shapes-benchmark-"))
    data_dir, output_dir = workdir / "data" / "shapes", workdir / "outputs" / "shapes"
    if data_dir.exists() or output_dir.exists():
        parser.error(f"{workdir} already holds data or outputs; the benchmark starts from nothing: give an "
                     "empty --workdir")
    overrides = [f"data.train_data_dir={data_dir}", f"output_dir={output_dir}", *args.set]
    train = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
             "--config", "train_configs/shapes.yaml"]
    for override in overrides:
        train += ["--set", override]
    wall = run(train)
    print(f"\nmain command: {wall:.1f} s wall-clock from an empty data directory\n", flush=True)

    report_path = workdir / "evaluation.json"
    evaluate_seconds = run([sys.executable, "-m", "ldm_pipeline.cli", "evaluate", "--model",
                            str(output_dir / "pipeline"), "--out", str(report_path),
                            "--first-seed", str(args.first_seed), "--seeds-per-prompt", str(args.seeds_per_prompt)])
    report = json.loads(report_path.read_text())
    result = {"wall_seconds": round(wall, 1), "evaluate_seconds": round(evaluate_seconds, 1),
              **{key: report[key] for key in TARGETS if key in report}, "overrides": args.set,
              "first_seed": args.first_seed}
    (workdir / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    for key, target in TARGETS.items():
        value = result.get(key)
        met = value is not None and (value <= target if key == "wall_seconds" else value >= target)
        print(f"{key:>18}: {value} (target {'<=' if key == 'wall_seconds' else '>='} {target}) "
              f"{'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
