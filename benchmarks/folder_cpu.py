"""The CPU recipe for a folder of real captioned pictures (`train_configs/folder_cpu.yaml`), shown on real data that
a package ships and no one here made: scikit-learn's handwritten digits (1,797 scans of digits written by 43
people, UCI's "Optical Recognition of Handwritten Digits", 8x8 pixels of 17 grey levels).

    pip install scikit-learn
    python benchmarks/folder_cpu.py [--workdir DIR] [--resolution 64] [--per-digit 20] [--set key=value ...]

1. Writes the digits as a folder the way people keep pictures: `00000.png` with `00000.txt` beside it holding its
   caption ("a handwritten digit seven"); each 8x8 scan enlarged to `--resolution` (bicubic), dark ink on white.
2. Trains `train_configs/folder_cpu.yaml` on it as the README's main command does (`accelerate launch train.py`),
   timed.
3. Scores the model: the VAE's held-out PSNR (from its own check), and caption adherence: for each digit,
   `--per-digit` images generated from "a handwritten digit <name>", shrunk back to 8x8 and read by a classifier
   (logistic regression) trained on the real scans. Adherence is the fraction read as the digit asked for; the
   same classifier on real scans it never saw gives the ceiling, and a model that ignores its captions would score
   10%. Writes a grid of generated images under their captions to <workdir>/samples.png and the numbers to
   <workdir>/folder_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from shapes_benchmark import cpu_description, launch_training  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this benchmark reads scikit-learn's digits: pip install scikit-learn")
    data = load_digits()
    return data.images, data.target  # (1797, 8, 8) in 0..16, (1797,)


def caption(digit: int) -> str:
    return f"a handwritten digit {NAMES[digit]}"


def write_folder(folder: Path, resolution: int) -> None:
    from PIL import Image

    images, targets = digits()
    folder.mkdir(parents=True)
    for k, (scan, digit) in enumerate(zip(images, targets)):
        ink = Image.fromarray(np.uint8(255 - scan * 255 / 16), mode="L")  # dark ink on white, as on paper
        ink.resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{k:05d}.png")
        (folder / f"{k:05d}.txt").write_text(caption(int(digit)) + "\n")


def train(folder: Path, out: Path, overrides: list[str], log: Path) -> float:
    return launch_training("train_configs/folder_cpu.yaml",
                           [f"data.train_data_dir={folder}", f"output_dir={out}", *overrides], log)


def to_scan(image) -> np.ndarray:
    """A generated image as the classifier reads a scan: 8x8 box averages of its darkness, in 0..16."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    return (255 - grey) * 16 / 255


def adherence(pipeline: Path, per_digit: int, work: Path) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from ldm_pipeline.generation import captioned_grid, generate
    from ldm_pipeline.pipeline import load_pipeline

    images, targets = digits()
    flat = images.reshape(len(images), -1)
    seen, unseen, seen_y, unseen_y = train_test_split(flat, targets, test_size=0.3, random_state=0, stratify=targets)
    ceiling = LogisticRegression(max_iter=5000).fit(seen, seen_y).score(unseen, unseen_y)
    reader = LogisticRegression(max_iter=5000).fit(flat, targets)  # every real scan, for the generated images

    pipe = load_pipeline(pipeline, device="cpu")
    prompts = [caption(digit) for digit in range(10) for _ in range(per_digit)]
    generated = generate(pipe, prompts, seeds=1000, batch_size=50, show_progress=False)
    read = reader.predict(np.stack([to_scan(image).reshape(-1) for image in generated]))
    asked = np.repeat(np.arange(10), per_digit)
    per_class = {NAMES[d]: float(np.mean(read[asked == d] == d)) for d in range(10)}
    rows = min(per_digit, 4)
    grid = captioned_grid([generated[d * per_digit + r] for r in range(rows) for d in range(10)], rows=rows,
                          captions=[caption(d) for d in range(10)])
    grid.save(work / "samples.png")
    return {"adherence": float(np.mean(read == asked)), "per_digit": per_class, "classifier_on_real": ceiling,
            "images": len(generated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/folder_cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    work = Path(args.workdir)
    folder = work / f"digits-{args.resolution}"
    if not folder.is_dir():
        write_folder(folder, args.resolution)
    out = work / "outputs"
    seconds = train(folder, out, [f"resolution={args.resolution}", *args.set], work / "train.log")
    calibration = json.loads((out / "vae" / "calibration.json").read_text())
    report = {"machine": cpu_description(), "train_s": round(seconds, 1), "overrides": args.set,
              "vae_heldout_psnr_db": calibration.get("heldout_psnr_db"), **adherence(out / "pipeline",
                                                                                     args.per_digit, work)}
    (work / "folder_cpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
