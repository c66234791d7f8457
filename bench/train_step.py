"""Cost of one training step, side by side in one process: clean vs defended (S = {FGSM, R+FGSM},
eval-mode attack passes, the default) vs defended with the fused clean+FGSM pass (train-mode
BN) vs PGD-7 adversarial training, and clean / defended with `--amp` (training passes in
bfloat16, attack passes still float32). Ratios of medians over repeated interleaved runs, so
machine drift cancels.

    .venv/bin/python bench/train_step.py [--backbone resnet18] [--input-size 48] [--batch-size 128] [--repeats 7] \
        [--layout-backbones mobilenet_v2,smallcnn]

The model trains in channels_last memory (Trainer's default); the contiguous rows time the
layout used before, and --layout-backbones adds that comparison for other backbones.

Writes bench/results/train_step.json, the key defended_step_ratio (the default, eval-mode BN)
in bench/results.json and the "train_step" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import interleaved_medians, machine, record  # noqa: E402


DEFAULT = "defended (eval-mode BN, the default)"
REBUILT = "the same, folded copy rebuilt every step (before it was refreshed in place)"
CLEAN_AMP = "clean, --amp (bfloat16 training pass)"
DEFENDED_AMP = "defended, --amp (attack passes float32, training passes bfloat16)"
CLEAN_CONTIGUOUS = "clean, contiguous layout (`--memory-format contiguous`, the layout before channels_last)"
DEFENDED_CONTIGUOUS = "defended, contiguous layout"


def layout_medians(backbone: str, size: int, batch: int, repeats: int) -> dict:
    """Median seconds of a clean float32 SGD step, contiguous vs channels_last model."""
    from emoshield.models import ModelConfig, build_model
    from emoshield.training import TrainConfig
    from emoshield.training.trainer import make_optimizer

    torch.manual_seed(0)
    built = build_model(ModelConfig(backbone, ["disgust", "fear", "happy", "sad", "surprise"], size)).train()
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 5, (batch,))
    runners = {}
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = copy.deepcopy(built).to(memory_format=fmt)
        optimizer = make_optimizer(model, TrainConfig())

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        runners[layout] = step
    for run in runners.values():  # warm-up
        run()
    return interleaved_medians(runners, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/train_step.json")
    parser.add_argument("--layout-backbones", default="mobilenet_v2,smallcnn",
                        help="also time a clean step of these backbones in both memory layouts ('' = none)")
    args = parser.parse_args()

    from emoshield.models import ModelConfig, build_model
    from emoshield.training import DefenseConfig, TrainConfig, Trainer
    from emoshield.training.trainer import make_optimizer

    torch.manual_seed(0)
    built = build_model(ModelConfig(args.backbone, ["disgust", "fear", "happy", "sad", "surprise"], args.input_size))
    # the layout Trainer.fit trains in (channels_last), and the one it used before (contiguous)
    models = {"channels_last": built.to(memory_format=torch.channels_last),
              "contiguous": copy.deepcopy(built).to(memory_format=torch.contiguous_format)}
    x = torch.rand(args.batch_size, 3, args.input_size, args.input_size)
    y = torch.randint(0, 5, (args.batch_size,))
    variants = {  # name -> (defense, amp, layout)
        "clean": (None, False, "channels_last"),
        "defended (fused FGSM, train-mode BN)": (DefenseConfig(attack_bn="train"), False, "channels_last"),
        DEFAULT: (DefenseConfig(attack_bn="eval"), False, "channels_last"),
        REBUILT: (DefenseConfig(attack_bn="eval"), False, "channels_last"),
        "PGD-7 adversarial training": (DefenseConfig(methods={"pgd": 1.0}, beta0=0.5, pgd_steps=7), False,
                                       "channels_last"),
        CLEAN_AMP: (None, True, "channels_last"),
        DEFENDED_AMP: (DefenseConfig(attack_bn="eval"), True, "channels_last"),
        CLEAN_CONTIGUOUS: (None, False, "contiguous"),
        DEFENDED_CONTIGUOUS: (DefenseConfig(attack_bn="eval"), False, "contiguous"),
    }
    trainers = {name: Trainer(models[layout], TrainConfig(augment="none", amp=amp, memory_format=layout), Path("/tmp"),
                              progress=False, defense=d)
                for name, (d, amp, layout) in variants.items()}
    optimizers = {layout: make_optimizer(m, TrainConfig()) for layout, m in models.items()}
    for m in models.values():
        m.train()

    from emoshield.attacks.folding import _CACHE

    def step(name: str) -> None:
        trainer = trainers[name]
        model, optimizer = trainer.model, optimizers[variants[name][2]]
        if name == REBUILT:
            _CACHE.clear()
        optimizer.zero_grad(set_to_none=True)
        if trainer.defense is None:
            with trainer._autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
        else:
            trainer._defended_backward(x, y, seed=0)
        optimizer.step()

    runners = {name: functools.partial(step, name) for name in variants}
    for run in runners.values():  # warm-up
        run()
    medians = interleaved_medians(runners, args.repeats)
    result = {
        "backbone": args.backbone, "input_size": args.input_size, "batch_size": args.batch_size,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "median_seconds": medians,
        "ratio_to_clean": {name: m / medians["clean"] for name, m in medians.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    info = machine()
    md = [f"## Training step cost (`python bench/train_step.py --backbone {args.backbone} --input-size "
          f"{args.input_size} --batch-size {args.batch_size}`)", "",
          f"{args.backbone}, {args.input_size} px, batch {args.batch_size}, SGD step included, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved steps ({info['cpus']} cores; "
          f"torch {info.get('torch')}). Defended = S {{FGSM, R+FGSM}}: perturbations made with the current model, "
          "then one forward/backward on clean + both perturbed batches (SPEC §6). Eval-mode attack passes run on "
          "a BatchNorm-folded channels_last copy of the current weights. The model trains in channels_last "
          "memory (Trainer's default; the contiguous rows are the layout it used before). `--amp` runs the "
          "training passes under bfloat16 autocast (weights and attack passes stay float32); it pays off only on CPUs with "
          f"native bfloat16 (this one: {info['cpu_bfloat16']}).", "",
          "| step | median s | x clean |", "|---|---:|---:|"]
    md += [f"| {name} | {m:.3f} | {m / medians['clean']:.2f} |" for name, m in medians.items()]
    if args.layout_backbones:
        layouts = {b: layout_medians(b, args.input_size, args.batch_size, args.repeats)
                   for b in args.layout_backbones.split(",")}
        result["clean_step_by_layout"] = layouts
        Path(args.out).write_text(json.dumps(result, indent=1))
        md += ["", f"Clean float32 training step by memory layout, other backbones ({args.input_size} px, batch "
               f"{args.batch_size}, same run):", "", "| backbone | contiguous s | channels_last s | speed-up |",
               "|---|---:|---:|---:|"]
        md += [f"| {b} | {t['contiguous']:.3f} | {t['channels_last']:.3f} | "
               f"{t['contiguous'] / t['channels_last']:.2f}x |" for b, t in layouts.items()]
    ratios = result["ratio_to_clean"]
    record("train_step", {"defended_step_ratio": ratios[DEFAULT],
                          "defended_step_ratio_train_bn": ratios["defended (fused FGSM, train-mode BN)"],
                          "pgd7_step_ratio": ratios["PGD-7 adversarial training"],
                          "defended_amp_step_ratio": ratios[DEFENDED_AMP],
                          "defended_amp_vs_clean_amp": medians[DEFENDED_AMP] / medians[CLEAN_AMP],
                          "channels_last_clean_step_speedup": medians[CLEAN_CONTIGUOUS] / medians["clean"],
                          "channels_last_defended_step_speedup": medians[DEFENDED_CONTIGUOUS] / medians[DEFAULT]},
           "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
