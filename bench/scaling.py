"""How training cost grows (issue 6d): seconds per epoch against the number of training images
and against the input size, clean and defended, through the trainer's real epoch loop
(augmentation, defense, optimizer). Images are random uint8 faces: cost does not depend on
their content. A log-log plot and the fitted exponents tell users what bigger data and bigger
inputs will cost.

    .venv/bin/python bench/scaling.py [--backbone mobilenet_v2] [--images 256,512,1024,2048] \
        [--sizes 32,48,64,96] [--base-images 512] [--base-size 48]

Writes bench/results/scaling.{json,png}, the keys epoch_seconds_exponent_images and
epoch_seconds_exponent_input_size in bench/results.json and the "scaling" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, machine, record  # noqa: E402

CLASSES = ["disgust", "fear", "happy", "sad", "surprise"]


def epoch_seconds(backbone: str, images: int, size: int, defended: bool) -> float:
    from emoshield.models import ModelConfig, build_model
    from emoshield.training import DefenseConfig, TrainConfig, Trainer
    from emoshield.training.trainer import MEMORY_FORMATS, TensorData, make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone, CLASSES, size))
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, 256, (images, 1, size, size), generator=g, dtype=torch.uint8),
                      torch.randint(0, len(CLASSES), (images,), generator=g))
    config = TrainConfig(epochs=1)
    model.to(memory_format=MEMORY_FORMATS[config.memory_format])  # as Trainer.fit does
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, config, Path(tmp), progress=False, defense=DefenseConfig() if defended else None)
        optimizer = make_optimizer(model, config)
        started = time.perf_counter()
        trainer._train_epoch(data, optimizer, torch.Generator().manual_seed(0), 1)
        return time.perf_counter() - started


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent b of y = a * x^b."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--images", default="256,512,1024,2048")
    parser.add_argument("--sizes", default="32,48,64,96")
    parser.add_argument("--base-images", type=int, default=512)
    parser.add_argument("--base-size", type=int, default=48)
    args = parser.parse_args()
    images = [int(v) for v in args.images.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    for defended in (False, True):
        for n in images:
            rows.append({"axis": "images", "images": n, "input_size": args.base_size, "defended": defended,
                         "seconds": epoch_seconds(args.backbone, n, args.base_size, defended)})
            print(rows[-1], flush=True)
        for s in sizes:
            rows.append({"axis": "input_size", "images": args.base_images, "input_size": s, "defended": defended,
                         "seconds": epoch_seconds(args.backbone, args.base_images, s, defended)})
            print(rows[-1], flush=True)
    exponents = {}
    for axis, key in (("images", "images"), ("input_size", "input_size")):
        for defended in (False, True):
            pts = [r for r in rows if r["axis"] == axis and r["defended"] == defended]
            exponents[f"{axis}_{'defended' if defended else 'clean'}"] = slope([r[key] for r in pts],
                                                                               [r["seconds"] for r in pts])
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (out / "scaling.json").write_text(json.dumps({"backbone": args.backbone, "machine": info,
                                                  "threads": torch.get_num_threads(), "batch_size": 32,
                                                  "rows": rows, "exponents": exponents}, indent=1))
    _plot(rows, args, out / "scaling.png")
    md = [f"## How training cost grows (`python bench/scaling.py --backbone {args.backbone}`)", "",
          f"Seconds for one training epoch of the real epoch loop (default batch 32, `--augment strong`, "
          f"channels_last model; defended = S {{FGSM, R+FGSM}}, eval-BN), {args.backbone}, {torch.get_num_threads()} threads, {info['cpus']} cores, "
          f"one run per point. Left: {args.base_size} px, more images; right: {args.base_images} images, bigger "
          "inputs. Exponent b of seconds ~ x^b fitted on log-log axes. Plot: "
          "[bench/results/scaling.png](bench/results/scaling.png).", "",
          "| images | clean s | defended s | | input px | clean s | defended s |", "|---:|---:|---:|---|---:|---:|---:|"]
    by = {(r["axis"], r["images"] if r["axis"] == "images" else r["input_size"], r["defended"]): r["seconds"]
          for r in rows}
    for i in range(max(len(images), len(sizes))):
        left = (f"| {images[i]} | {by[('images', images[i], False)]:.1f} | {by[('images', images[i], True)]:.1f} |"
                if i < len(images) else "| | | |")
        right = (f" | {sizes[i]} | {by[('input_size', sizes[i], False)]:.1f} | "
                 f"{by[('input_size', sizes[i], True)]:.1f} |" if i < len(sizes) else " | | | |")
        md.append(left + right)
    md += ["", "Exponents: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items())
           + " (1.0 for images = linear; 2.0 for input size = proportional to pixels)."]
    record("scaling", {"epoch_seconds_exponent_images": exponents["images_defended"],
                       "epoch_seconds_exponent_input_size": exponents["input_size_defended"]}, "\n".join(md))
    print("\n".join(md))
    return 0


def _plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in ((axes[0], "images", "training images"), (axes[1], "input_size", "input size (px)")):
        for defended, style in ((False, "o-"), (True, "s-")):
            pts = [r for r in rows if r["axis"] == axis and r["defended"] == defended]
            ax.loglog([r[axis] for r in pts], [r["seconds"] for r in pts], style,
                      label="defended" if defended else "clean")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("seconds per epoch (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.backbone}: epoch time vs data and input size (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
