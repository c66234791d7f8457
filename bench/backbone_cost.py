"""What a FER2013 cloud training costs per backbone, on one thread and on every core (issue 18):
the cloud recipe's training step (batch 64, 48 px, `--augment standard`, SGD, channels_last,
bfloat16 autocast where the CPU computes it natively, else float32) for each backbone, timed as
medians of interleaved rounds in one process (machine drift hits every row alike). From the step
it derives the seconds of training steps in one FER2013 epoch (28,709 faces: 449 steps; the
per-epoch validation pass comes on top, ~5%) and the hours of a 100- and a 300-epoch run, which
is how long the long runs and the published 300-epoch recipe would take here.

    .venv/bin/python bench/backbone_cost.py [--backbones smallcnn,widecnn,deepcnn,widedeepcnn]
        [--threads 1,all] [--repeats 5] [--steps 8] [--no-record]

Writes bench/results/backbone_cost.json, the keys backbone_cost_* in bench/results.json and the
"backbone_cost" section of BENCHMARKS.md (not with --no-record: a quick check of the script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from report import ROOT, interleaved_medians, machine, record  # noqa: E402

FER2013_TRAIN = 28_709
CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


def step_runner(backbone: str, batch: int, size: int, amp: bool, threads: int, steps: int):
    """A function that runs `steps` training steps of BACKBONE on `threads` threads, and the
    backbone's parameter count."""
    from emoshield.models import ModelConfig, build_model
    from emoshield.training import TrainConfig
    from emoshield.training.augment import augment_batch
    from emoshield.training.devices import autocast
    from emoshield.training.trainer import make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone, CLASSES, size)).train().to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, TrainConfig(lr=0.02, batch_size=batch))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator)
    y = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    cpu = torch.device("cpu")

    def run() -> None:
        torch.set_num_threads(threads)
        for _ in range(steps):
            seen = augment_batch(x, "standard", generator).contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast(cpu, amp):
                loss = torch.nn.functional.cross_entropy(model(seen).float(), y)
            loss.backward()
            optimizer.step()

    return run, sum(p.numel() for p in model.parameters())


def thread_counts(text: str) -> list[int]:
    counts = []
    for part in (p for p in text.split(",") if p):
        n = len(os.sched_getaffinity(0)) if part == "all" else int(part)
        if n < 1:
            raise ValueError(f"--threads: {part!r} is not a thread count")
        counts.append(n)
    if not counts:
        raise ValueError("--threads: no thread count")
    return sorted(set(counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="smallcnn,widecnn,deepcnn,widedeepcnn")
    parser.add_argument("--threads", default="1,all", help="thread counts to time ('all' = every core)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the median is kept)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed call")
    parser.add_argument("--no-record", action="store_true", help="print only (a check of the script)")
    args = parser.parse_args(argv)
    try:
        threads = thread_counts(args.threads)
    except ValueError as error:
        parser.error(str(error))
    if args.repeats < 1 or args.steps < 1 or args.batch_size < 2:
        parser.error("--repeats and --steps must be >= 1, --batch-size >= 2")
    from emoshield.training.devices import native_bfloat16

    amp = native_bfloat16()
    backbones = [b for b in args.backbones.split(",") if b]
    if not backbones:
        parser.error("--backbones: no backbone")
    threads_before = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's thread count and random state are left as they were
            return measure(args, backbones, threads, amp)
    finally:
        torch.set_num_threads(threads_before)


def measure(args: argparse.Namespace, backbones: list[str], threads: list[int], amp: bool) -> int:
    runners, parameters = {}, {}
    for backbone in backbones:
        for n in threads:
            runners[(backbone, n)], parameters[backbone] = step_runner(backbone, args.batch_size, args.input_size,
                                                                     amp, n, args.steps)
    for run in runners.values():  # warm-up: oneDNN picks its kernels on the first call of each shape
        run()
    medians = interleaved_medians(runners, args.repeats)
    steps_per_epoch = math.ceil(FER2013_TRAIN / args.batch_size)
    rows = []
    for backbone in backbones:
        for n in threads:
            step = medians[(backbone, n)] / args.steps
            epoch = step * steps_per_epoch
            rows.append({"backbone": backbone, "parameters": parameters[backbone], "threads": n,
                         "seconds_per_step": step, "vs_first_backbone": step / (medians[(backbones[0], n)] / args.steps),
                         "thread_speedup": medians[(backbone, threads[0])] / medians[(backbone, n)],
                         "epoch_step_seconds": epoch, "hours_100_epochs": 100 * epoch / 3600,
                         "hours_300_epochs": 300 * epoch / 3600})
    precision = "bfloat16" if amp else "float32"
    for r in rows:
        print(f"{r['backbone']:12} {r['parameters'] / 1e6:5.2f}M {r['threads']} thread(s): "
              f"{1000 * r['seconds_per_step']:7.1f} ms/step, x{r['vs_first_backbone']:.2f} {backbones[0]}, "
              f"{r['epoch_step_seconds']:5.0f} s of steps per epoch, 100 epochs {r['hours_100_epochs']:.1f} h, "
              f"300 epochs {r['hours_300_epochs']:.1f} h")
    if args.no_record:
        return 0
    info = machine()
    result = {"batch_size": args.batch_size, "input_size": args.input_size, "repeats": args.repeats,
              "steps": args.steps, "precision": precision, "torch": torch.__version__, "machine": info, "rows": rows}
    out = ROOT / "bench" / "results" / "backbone_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    most = threads[-1]
    keys = {f"backbone_cost_{r['backbone']}_epoch_seconds_{most}_threads": round(r["epoch_step_seconds"], 1)
            for r in rows if r["threads"] == most}
    md = ["## What a FER2013 cloud training costs per backbone (`python bench/backbone_cost.py`)", "",
          f"The cloud recipe's training step: batch {args.batch_size}, {args.input_size} px, `--augment standard`, SGD, "
          f"channels_last, {precision} training passes; median of {args.repeats} interleaved rounds of "
          f"{args.steps} steps ({info['cpus']} cores, {info['cpu_isa']}, native bfloat16: {info['cpu_bfloat16']}; "
          f"torch {torch.__version__}). Epoch = {steps_per_epoch} steps (FER2013's {FER2013_TRAIN:,} training "
          "faces), training steps only: the per-epoch PublicTest pass adds ~5%.", "",
          f"| backbone | parameters | threads | ms/step | vs {backbones[0]} | speedup over {threads[0]} thread(s) "
          "| s/epoch (steps) | 100 epochs, h | 300 epochs, h |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['backbone']} | {r['parameters'] / 1e6:.2f}M | {r['threads']} | {1000 * r['seconds_per_step']:.0f} "
                  f"| {r['vs_first_backbone']:.2f} | {r['thread_speedup']:.2f} | {r['epoch_step_seconds']:.0f} "
                  f"| {r['hours_100_epochs']:.1f} | {r['hours_300_epochs']:.1f} |")
    record("backbone_cost", keys, "\n".join(md))
    print(f"wrote {out.relative_to(ROOT)}, bench/results.json and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
