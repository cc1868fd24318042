"""Benchmark of the embedded default across training seeds: the README's main command from an empty data
directory, then `ldm-pipeline evaluate` at two sets of evaluation seeds.

    python benchmarks/shapes_benchmark.py --seeds 0 1 2 [--workdir DIR] [--set key=value ...]
                                          [--first-seeds 1000 7000 | --first-seeds]

For each training seed it runs `accelerate launch train.py --config train_configs/shapes.yaml --set seed=N` with
its data and output directories redirected into a fresh work directory (so the shapes are generated, the VAE and
the UNet are trained from nothing), then evaluates the pipeline. It prints one row per seed (wall-clock, VAE and
UNet steps/s, held-out PSNR, reconstruction color, and color / shape / position accuracy at each evaluation seed
set, by the strict checker, with "clean": no speck beside the shape), the worst value of each column, which
targets are met, and the machine it ran on. Rows are appended to
<workdir>/benchmark.jsonl as they finish. Runs are sequential: timings are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Issue 19: every training seed, both evaluation seed sets, judged by the strict checker (shapes/checker.py).
TARGETS = {"wall_s": ("<=", 450), "recon_color": (">=", 1.0), "recon_shape": (">=", 1.0), "color": (">=", 0.98),
           "shape": (">=", 0.95), "position": (">=", 0.98), "clean": (">=", 0.95)}


def cpu_description() -> str:
    """CPU model with family/model numbers (a VM may report only "AMD EPYC"), vector ISA and core count."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} logical cores"
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    model = fields.get("model name", "unknown CPU")
    family = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    isa = "AVX-512" if "avx512f" in cpuinfo else "AVX2" if "avx2" in cpuinfo else "no AVX2"
    return f"{model} ({family}, {isa}), {os.cpu_count()} logical cores"


def run(command: list[str], log: Path) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(command, cwd=ROOT, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def launch_training(config: str, settings: list[str], log: Path) -> float:
    """`accelerate launch train.py --config <config> --set ...` as the README runs it (one process, fp32), its output
    into `log`; the seconds it took."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "--config", config]
    for setting in settings:
        command += ["--set", setting]
    return run(command, log)


def stage_speed(metrics: list[dict], stage: str, batch: int) -> float | None:
    """Optimizer steps per second of a stage, from the last samples/s it logged."""
    rates = [row["samples_per_s"] for row in metrics if row.get("stage") == stage and "samples_per_s" in row]
    return rates[-1] / batch if rates else None


def benchmark_seed(seed: int, workdir: Path, overrides: list[str], first_seeds: list[int]) -> dict:
    from ldm_pipeline.config import load_config

    data_dir, output_dir = workdir / f"seed{seed}" / "data" / "shapes", workdir / f"seed{seed}" / "outputs"
    settings = [f"data.train_data_dir={data_dir}", f"output_dir={output_dir}", f"seed={seed}", *overrides]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    wall = launch_training("train_configs/shapes.yaml", settings, output_dir.parent / "train.log")
    config = load_config(ROOT / "train_configs" / "shapes.yaml", settings)
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    calibration = json.loads((output_dir / "vae" / "calibration.json").read_text())
    row = {"seed": seed, "wall_s": round(wall, 1),
           "vae_steps_s": stage_speed(metrics, "vae", config.vae_training.train_batch_size),
           "unet_steps_s": stage_speed(metrics, "unet", config.train_batch_size),
           "psnr_db": calibration.get("heldout_psnr_db"), "recon_color": calibration.get("recon_color_accuracy"),
           "recon_shape": calibration.get("recon_shape_accuracy"),
           # the VAE's margin: the first check (every vae_training.validation_steps) with every color right
           "color_ok_at": next((row["step"] for row in metrics if row.get("stage") == "vae"
                                and row.get("recon_color_accuracy") == 1.0), None)}
    for first in first_seeds:
        report_path = output_dir.parent / f"evaluation-{first}.json"
        run([sys.executable, "-m", "ldm_pipeline.cli", "evaluate", "--model", str(output_dir / "pipeline"),
             "--out", str(report_path), "--first-seed", str(first)], output_dir.parent / f"evaluate-{first}.log")
        report = json.loads(report_path.read_text())
        for field in ("color", "shape", "position", "clean"):
            row[f"{field}@{first}"] = report[f"{field}_accuracy"]
    return row


def worst(rows: list[dict]) -> dict:
    """The worst value of every column: the minimum, or the maximum for wall-clock."""
    keys = [key for key in rows[0] if key != "seed"]
    values = {key: [row[key] for row in rows if row[key] is not None] for key in keys}
    highest_is_worst = ("wall_s", "color_ok_at")
    return {"seed": "worst", **{key: (max(v) if key in highest_is_worst else min(v)) if v else None
                                for key, v in values.items()}}


def verdicts(row: dict) -> list[str]:
    misses = []
    for key, value in row.items():
        name = key.split("@")[0]
        if name in TARGETS and value is not None:
            sign, bar = TARGETS[name]
            if (value > bar) if sign == "<=" else (value < bar):
                misses.append(f"{key} {value} (target {sign} {bar})")
    return misses


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    def cell(value):
        if isinstance(value, float):
            return f"{value:.1%}" if value <= 1.0 else f"{value:.2f}"
        return "-" if value is None else str(value)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (--set seed=N)")
    parser.add_argument("--first-seeds", type=int, nargs="*", default=[1000, 7000],
                        help="first evaluation seed of each evaluation run (none: time the training only)")
    parser.add_argument("--workdir", help="where data and outputs go (default: a new temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides passed to train.py, e.g. --set max_train_steps=500")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shapes-benchmark-"))
    taken = [seed for seed in args.seeds if (workdir / f"seed{seed}").exists()]
    if taken:
        parser.error(f"{workdir} already holds runs for seeds {taken}; the benchmark starts from nothing: give an "
                     "empty --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    print(f"machine: {cpu_description()}\nwork directory: {workdir}", flush=True)
    rows = []
    for seed in args.seeds:
        rows.append(benchmark_seed(seed, workdir, args.set, args.first_seeds))
        with open(workdir / "benchmark.jsonl", "a") as handle:
            handle.write(json.dumps({**rows[-1], "overrides": args.set, "machine": cpu_description()}) + "\n")
        print(format_table(rows[-1:]), flush=True)
    table = rows + [worst(rows)] if len(rows) > 1 else rows
    print(f"\nmachine: {cpu_description()}\n{format_table(table)}\n")
    misses = verdicts(table[-1])
    print("all targets met" if not misses else "targets NOT met: " + "; ".join(misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
