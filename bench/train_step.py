"""Cost of one training step, side by side in one process: clean vs defended (S = {FGSM, R+FGSM},
eval-mode attack passes, the default) vs defended with the fused clean+FGSM pass (train-mode
BN) vs PGD-7 adversarial training, and clean / defended with `--amp` (training passes in
bfloat16, attack passes still float32). Ratios of medians over repeated interleaved runs, so
machine drift cancels.

    .venv/bin/python bench/train_step.py [--backbone resnet18] [--input-size 48] [--batch-size 128] [--repeats 7]

Writes bench/results/train_step.json, the key defended_step_ratio (the default, eval-mode BN)
in bench/results.json and the "train_step" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()

    from emoshield.models import ModelConfig, build_model
    from emoshield.training import DefenseConfig, TrainConfig, Trainer
    from emoshield.training.trainer import make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(args.backbone, ["disgust", "fear", "happy", "sad", "surprise"], args.input_size))
    x = torch.rand(args.batch_size, 3, args.input_size, args.input_size)
    y = torch.randint(0, 5, (args.batch_size,))
    variants = {
        "clean": None,
        "defended (fused FGSM, train-mode BN)": DefenseConfig(attack_bn="train"),
        DEFAULT: DefenseConfig(attack_bn="eval"),
        REBUILT: DefenseConfig(attack_bn="eval"),
        "PGD-7 adversarial training": DefenseConfig(methods={"pgd": 1.0}, beta0=0.5, pgd_steps=7),
        CLEAN_AMP: None,
        DEFENDED_AMP: DefenseConfig(attack_bn="eval"),
    }
    trainers = {name: Trainer(model, TrainConfig(augment="none", amp=name in (CLEAN_AMP, DEFENDED_AMP)), Path("/tmp"),
                              progress=False, defense=d)
                for name, d in variants.items()}
    optimizer = make_optimizer(model, TrainConfig())
    model.train()

    from emoshield.attacks.folding import _CACHE

    def step(name: str) -> None:
        trainer = trainers[name]
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
          "a BatchNorm-folded channels_last copy of the current weights. `--amp` runs the training passes "
          "under bfloat16 autocast (weights and attack passes stay float32); it pays off only on CPUs with "
          f"native bfloat16 (this one: {info['cpu_bfloat16']}).", "",
          "| step | median s | x clean |", "|---|---:|---:|"]
    md += [f"| {name} | {m:.3f} | {m / medians['clean']:.2f} |" for name, m in medians.items()]
    ratios = result["ratio_to_clean"]
    record("train_step", {"defended_step_ratio": ratios[DEFAULT],
                          "defended_step_ratio_train_bn": ratios["defended (fused FGSM, train-mode BN)"],
                          "pgd7_step_ratio": ratios["PGD-7 adversarial training"],
                          "defended_amp_step_ratio": ratios[DEFENDED_AMP],
                          "defended_amp_vs_clean_amp": medians[DEFENDED_AMP] / medians[CLEAN_AMP]}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
