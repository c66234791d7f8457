"""Clean-accuracy baselines on CK+48 (5 reference classes): resnet18 from scratch and
ImageNet mobilenet_v2, under the reference and subject (fold 0) protocols.

    .venv/bin/python bench/core_baselines.py [--data-root DIR] [--epochs 50] [--out results/core_baselines]

Writes OUT/results.json and OUT/results.md (one row per run, with its wall time) and keeps
each run's folder under runs/core_baselines/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = [
    ("resnet18", "scratch", 48),
    ("mobilenet_v2", "imagenet", 64),
]
PROTOCOLS = ["reference", "subject"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/core_baselines")
    parser.add_argument("--work", default="runs/core_baselines")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for backbone, weights, size in RUNS:
        for protocol in PROTOCOLS:
            run_dir = Path(args.work) / f"{backbone}-{weights}-{protocol}"
            cmd = [sys.executable, "-m", "emoshield", "train", "--dataset", "ckplus48",
                   "--classes", "happy,sad,surprise,disgust,fear", "--protocol", protocol, "--fold", "0",
                   "--backbone", backbone, "--weights", weights, "--input-size", str(size),
                   "--epochs", str(args.epochs), "--seed", str(args.seed), "--out", str(run_dir), "--quiet"]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            if (run_dir / "checkpoint.safetensors").is_file():
                cmd.append("--resume")
            started = time.perf_counter()
            subprocess.run(cmd, check=True)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append({k: metrics[k] for k in ("dataset", "protocol", "fold", "classes", "backbone", "weights",
                                                 "input_size", "epochs", "seed", "test_accuracy",
                                                 "balanced_accuracy", "per_class_accuracy", "best_epoch",
                                                 "num_images", "train_seconds", "git_commit")}
                        | {"wall_seconds": round(time.perf_counter() - started, 1),
                           "command": " ".join(["emoshield"] + cmd[3:])})
            print(f"{backbone} {weights} {protocol}: {metrics['test_accuracy']:.2%}", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Clean accuracy baselines: CK+48, 5 classes (disgust, fear, happy, sad, surprise)", "",
             f"SGD momentum 0.9, lr 0.01, batch 128, Algorithm 1 schedule, {args.epochs} epochs, seed {args.seed}, "
             "standard augmentation, best epoch on validation. Machine: 2 CPU cores.", "",
             "| backbone | weights | input | protocol | test images | accuracy | balanced | best epoch | wall time |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        proto = r["protocol"] + (" (fold 0/5)" if r["protocol"] == "subject" else " (1/1/1 frames per sequence)")
        lines.append(f"| {r['backbone']} | {r['weights']} | {r['input_size']} px | {proto} | {r['num_images']} | "
                     f"{r['test_accuracy']:.2%} | {r['balanced_accuracy']:.2%} | {r['best_epoch']} | "
                     f"{r['wall_seconds']:.0f} s |")
    lines += ["", f"Produced by `python bench/core_baselines.py --epochs {args.epochs}` at commit "
              f"`{rows[0]['git_commit']}`."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
