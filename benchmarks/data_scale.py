"""Data at scale: the latent cache build and training from it, at growing data-set sizes.

    python benchmarks/data_scale.py [--sizes 10000 100000] [--processes 1 2] [--steps 200] [--workdir DIR]
                                    [--buckets]

For each size N it writes N synthetic shapes images (64 px), then, each as its own `accelerate launch`:
- builds the latent cache (`ldm-pipeline cache`) at each process count: images/s of encoding, peak RSS of
  every process, the cache's size on disk;
- trains the UNet for `--steps` steps from the cache, and (at the smallest size, or every size with
  --in-loop-all) with `cache_latents: false` (the frozen VAE encodes each batch): samples/s and peak RSS.
The models are the shapes config's (`train_configs/shapes.yaml`: small VAE, UNet and text encoder) at their
random initialisation: the speed and memory of a step do not depend on what the weights are. Prints one
Markdown table and writes it, with the raw rows, to <workdir>/data_scale.json. Nothing is asserted.
With --buckets the images come in three frame sizes (64x64, 96x64, 64x96) and train in aspect-ratio buckets:
each job then also reads every image's size from its header to assign its bucket, timed ("buckets_s").

Peak RSS is the process's high-water mark (`ru_maxrss`: start-up, data loading and the loop together) and,
separately, the highest RSS sampled every 50 ms during the training loop alone, in all and its anonymous part
(`RssAnon`: the process's own memory; the rest is pages of memory-mapped files such as the latent cache, which
count in RSS while mapped but are the kernel's page cache, dropped under memory pressure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.step_speed import cpu_model  # noqa: E402


def settings(data_dir: Path, out: Path, steps: int, cache: bool, threads: int | None) -> list[str]:
    """`--set` overrides of train_configs/shapes.yaml: the UNet stage alone, no validation or checkpoints."""
    source = [f"data.train_data_dir={data_dir}"] if data_dir.name.startswith("shapes") else \
        ["data.train_data_dir=null", f"data.dataset_name={data_dir}"]
    return [*source, f"output_dir={out}", "data.make_shapes=null", "stages=[unet]",
            f"data.cache_latents={'true' if cache else 'false'}", f"max_train_steps={steps}", "train_batch_size=32",
            "checkpointing_steps=0", "validation.num_heldout=64", "validation.seeds=[0]", "validation.prompts=[]",
            "sampling.num_inference_steps=1", "report_to=none", "logging_steps=10",
            f"cpu_threads={threads if threads else 'null'}",
            "resume_from_checkpoint=null", "data.dataloader_num_workers=0"]


def worker(job: str, config_path: str, overrides: list[str]) -> None:
    """Runs inside `accelerate launch`: one cache build or one training run; prints a JSON line per process."""

    import psutil

    from ldm_pipeline import data as data_lib
    from ldm_pipeline import latent_cache, training, unet_stage, vae_stage
    from ldm_pipeline.config import load_config
    from ldm_pipeline.cpu import set_up_cpu

    config = load_config(config_path, overrides)
    set_up_cpu(config)
    rank = int(os.environ.get("RANK", 0))
    timed, loop_peak, loop_anon, sampling = {}, [0], [0], threading.Event()

    def sample_rss():
        """Peak RSS of the loop, and its anonymous part (the process's own memory; the rest is pages of
        memory-mapped files, the cache's among them, which the kernel drops under memory pressure)."""
        process = psutil.Process()
        while not sampling.is_set():
            status = dict(line.split(":") for line in Path("/proc/self/status").read_text().splitlines()
                          if line.startswith("Rss"))
            loop_peak[0] = max(loop_peak[0], process.memory_info().rss)
            loop_anon[0] = max(loop_anon[0], int(status["RssAnon"].split()[0]) * 1024)
            time.sleep(0.05)

    assign = data_lib.with_buckets

    def timed_assign(*args, **kwargs):
        start = time.perf_counter()
        result = assign(*args, **kwargs)
        timed["buckets_s"] = time.perf_counter() - start
        return result

    data_lib.with_buckets = timed_assign  # training.prepare looks it up in its module
    if job == "cache":
        build = latent_cache.build_latent_cache

        def timed_build(*args, **kwargs):
            start = time.perf_counter()
            cache = build(*args, **kwargs)
            timed["encode_s"] = time.perf_counter() - start
            return cache

        latent_cache.build_latent_cache = timed_build
        training.build_cache(config)
    else:
        fit = unet_stage.fit  # loop.fit, which each stage's module imports

        def timed_fit(accelerator, config, stage):
            thread = threading.Thread(target=sample_rss, daemon=True)
            thread.start()
            start = time.perf_counter()
            state = fit(accelerator, config, stage)
            timed["train_s"] = time.perf_counter() - start
            sampling.set()
            thread.join()
            timed["samples"] = state.step * stage.settings.train_batch_size * accelerator.num_processes
            return state

        unet_stage.fit = vae_stage.fit = timed_fit
        training.train(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch

    print("DATA_SCALE " + json.dumps({"rank": rank, "peak_rss": peak, "loop_peak_rss": loop_peak[0] or None,
                                      "loop_peak_anon": loop_anon[0] or None,
                                      "threads": torch.get_num_threads(),
                                      **timed}), flush=True)


def launch(job: str, processes: int, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--multi_gpu"] if processes > 1 else []
    command += [__file__, "--worker", job, "--config", str(ROOT / "train_configs" / "shapes.yaml")]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, 2 // processes))}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{job} on {processes} process(es) failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("DATA_SCALE ")]
    for row in rows:
        row["wall_s"] = time.perf_counter() - started
    return sorted(rows, key=lambda row: row["rank"])


def write_hub_layout(folder: Path, out: Path, rows_per_file: int = 10000) -> None:
    """The image folder as a local hub-style data set: parquet files of image bytes and captions."""
    import datasets

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    files = -(-len(rows) // rows_per_file)
    for k in range(files):
        part = rows[k * rows_per_file:(k + 1) * rows_per_file]
        images = [{"bytes": (folder / row["file_name"]).read_bytes(), "path": row["file_name"]} for row in part]
        table = datasets.Dataset.from_dict({"image": images, "text": [row["text"] for row in part]}, features=features)
        (out / "data").mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(out / "data" / f"train-{k:05d}-of-{files:05d}.parquet"))


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--processes-after-first", type=int, nargs="+", default=None,
                        help="process counts of the cache build for sizes after the first (default: --processes)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workdir", default="/tmp/data_scale")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the run's own choice, free cores / processes)")
    parser.add_argument("--source", choices=["folder", "parquet"], default="folder",
                        help="read the images from the image folder, or from a hub-style parquet copy of it")
    parser.add_argument("--reuse-caches", action="store_true", help="keep caches built by an earlier run")
    parser.add_argument("--in-loop-all", action="store_true", help="in-loop encoding at every size, not the first")
    parser.add_argument("--buckets", action="store_true",
                        help="three frame sizes (64x64, 96x64, 64x96) trained in aspect-ratio buckets")
    parser.add_argument("--worker", choices=["cache", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.config, args.overrides)

    from ldm_pipeline.shapes.maker import make_shapes

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    results = []
    frames = [(64, 64), (96, 64), (64, 96)] if args.buckets else None
    extra = ["data.buckets={sizes: [[64, 64], [64, 96], [96, 64]]}"] if args.buckets else []
    kind = "buckets" if args.buckets else args.source
    for size in args.sizes:
        data_dir = work / (f"shapes-mixed-{size}" if args.buckets else f"shapes-{size}")
        if not data_dir.is_dir():
            start = time.perf_counter()
            make_shapes(data_dir, size, 64, seed=0, sizes=frames)
            print(f"made {size} images in {time.perf_counter() - start:.0f} s", flush=True)
        if args.source == "parquet":
            if not (work / f"parquet-{size}").is_dir():
                write_hub_layout(data_dir, work / f"parquet-{size}")
            data_dir = work / f"parquet-{size}"
        cache_dir = None
        counts = args.processes if size == args.sizes[0] else args.processes_after_first or args.processes
        for processes in counts:
            out = work / f"cache-{kind}-{size}-p{processes}"
            cache_dir = out / "latent_cache"
            if args.reuse_caches and (cache_dir / "manifest.json").is_file():
                print(f"reusing {cache_dir} (not timed again)", flush=True)
                continue
            shutil.rmtree(out, ignore_errors=True)
            rows = launch("cache", processes, settings(data_dir, out, args.steps, True, args.threads) + extra)
            cache_dir = out / "latent_cache"
            encode_s = max(row["encode_s"] for row in rows)
            results.append({"job": f"cache ({kind})", "images": size, "processes": processes,
                            "buckets_s": rows[0].get("buckets_s"),
                            "threads": rows[0]["threads"],
                            "images_per_s": size / encode_s, "images_per_s_per_process": size / encode_s / processes,
                            "peak_rss_mb": [row["peak_rss"] / 2**20 for row in rows],
                            "cache_mb": disk_size(cache_dir) / 1e6, "wall_s": rows[0]["wall_s"]})
            print(json.dumps(results[-1]), flush=True)
        for cache in (True, False):
            if not cache and size != args.sizes[0] and not args.in_loop_all:
                continue
            out = work / f"train-{kind}-{size}-{'cache' if cache else 'in_loop'}"
            shutil.rmtree(out, ignore_errors=True)
            overrides = settings(data_dir, out, args.steps, cache, args.threads) + extra
            if cache:
                overrides.append(f"data.latent_cache_dir={cache_dir}")
            (row,) = launch("train", 1, overrides)
            job = "train from cache" if cache else "train, in-loop encoding"
            results.append({"job": f"{job} ({kind})", "images": size, "buckets_s": row.get("buckets_s"),
                            "processes": 1, "threads": row["threads"], "samples_per_s": row["samples"] / row["train_s"],
                            "peak_rss_mb": [row["peak_rss"] / 2**20],
                            "loop_peak_rss_mb": row["loop_peak_rss"] / 2**20,
                            "loop_peak_anon_mb": row["loop_peak_anon"] / 2**20, "wall_s": row["wall_s"]})
            print(json.dumps(results[-1]), flush=True)

    lines = [f"CPU: {cpu_model()}, {cores} cores; {args.steps} training steps of batch 32 at 64 px", "",
             "| job | images | processes | images/s (per process) | samples/s | peak RSS per process (MB) | "
             "loop peak RSS: all / anonymous (MB) | cache on disk (MB) | bucket assignment (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r["job"], f"{r['images']:,}", str(r["processes"]),
                 f"{r['images_per_s']:.0f} ({r['images_per_s_per_process']:.0f})" if "images_per_s" in r else "",
                 f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else "",
                 " / ".join(f"{mb:.0f}" for mb in r["peak_rss_mb"]),
                 f"{r['loop_peak_rss_mb']:.0f} / {r['loop_peak_anon_mb']:.0f}" if "loop_peak_rss_mb" in r else "",
                 f"{r['cache_mb']:.1f}" if "cache_mb" in r else "",
                 f"{r['buckets_s']:.1f}" if r.get("buckets_s") is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    summary = {"cpu": cpu_model(), "cores": cores, "rows": results, "table": lines}
    (work / f"data_scale_{kind}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
