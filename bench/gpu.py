"""The reference-scale configuration on a GPU (issue 7): VGG16 at 224 px, batch 128, clean and
defended (S = {FGSM, R+FGSM}) training steps, float32 and --amp, with time per step, the epoch
time it implies for the reference's 22,474 frames, and peak GPU memory.

    .venv/bin/python bench/gpu.py [--device cuda] [--backbone vgg16] [--input-size 224] [--batch-size 128]

Runs the real Trainer step (`Trainer._train_epoch` on synthetic uint8 faces; data loading is
not what is measured). Writes bench/results.json keys gpu_* and the "gpu" section of
BENCHMARKS.md. `--device cpu --backbone smallcnn --input-size 32 --batch-size 16 --steps 2`
checks the script itself on a machine without a GPU (not recorded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from emoshield.models import ModelConfig, build_model  # noqa: E402
from emoshield.training import DefenseConfig, TensorData, TrainConfig, Trainer  # noqa: E402

REFERENCE_FRAMES = 22_474


def measure(args, defended: bool, amp: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, classes=["a", "b", "c", "d", "e"],
                                    input_size=args.input_size))
    n = args.batch_size * args.steps
    g = torch.Generator().manual_seed(0)
    data = TensorData((torch.rand(n, 3, args.input_size, args.input_size, generator=g) * 255).to(torch.uint8),
                      torch.randint(0, 5, (n,), generator=g))
    config = TrainConfig(epochs=1, batch_size=args.batch_size, device=args.device, amp=amp, augment="standard")
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model, config, Path(folder), progress=False, log=lambda m: None,
                          defense=DefenseConfig() if defended else None)
        model.to(trainer.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        generator = torch.Generator().manual_seed(0)
        cuda = trainer.device.type == "cuda"
        trainer._train_epoch(TensorData(data.pixels[:args.batch_size], data.labels[:args.batch_size]),
                             optimizer, generator, 1)  # warm-up (cuDNN autotuning, allocator)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer._train_epoch(data, optimizer, generator, 1)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        memory = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return {"seconds_per_step": seconds, "epoch_seconds_reference": seconds * REFERENCE_FRAMES / args.batch_size,
            "peak_memory_gib": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows = {}
    for defended in (False, True):
        for amp in (False, True):
            label = f"{'defended' if defended else 'clean'}{' amp' if amp else ''}"
            rows[label] = measure(args, defended, amp)
            r = rows[label]
            print(f"{label:14s} {r['seconds_per_step']:.3f} s/step, reference epoch {r['epoch_seconds_reference']:.0f} s"
                  + (f", peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""), flush=True)
    if not args.device.startswith("cuda"):
        print("not recorded (no GPU)")
        return 0
    from bench.report import record

    name = torch.cuda.get_device_name()
    keys = {"gpu_device": name, **{f"gpu_{k.replace(' ', '_')}_epoch_s": round(v["epoch_seconds_reference"], 1)
                                   for k, v in rows.items()},
            **{f"gpu_{k.replace(' ', '_')}_peak_gib": round(v["peak_memory_gib"], 2) for k, v in rows.items()}}
    lines = [f"`python bench/gpu.py` on {name}: {args.backbone} at {args.input_size} px, batch {args.batch_size}, "
             f"the Trainer's real step on synthetic faces ({args.steps} timed steps after one warm-up); epoch = the "
             f"reference's {REFERENCE_FRAMES} frames.", "",
             "| step | s/step | epoch (s) | peak GPU memory (GiB) |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['seconds_per_step']:.3f} | {v['epoch_seconds_reference']:.0f} | {v['peak_memory_gib']:.1f} |"
              for k, v in rows.items()]
    record("gpu", keys, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
