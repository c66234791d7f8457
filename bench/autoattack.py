"""emoshield's AutoAttack against torchattacks' on the same trained model and images, side by
side in one run (issue 17): robust accuracy after each attack of the standard sequence
(APGD-CE, APGD-T, FAB-T, Square) and in total, and the time each implementation takes.

torchattacks' own `AutoAttack` runs APGD and FAB with 10 steps (its defaults), not the
standard 100, so the reference here is torchattacks' `MultiAttack` of its APGD, APGDT, FAB
and Square with the standard settings: the same sequence, each attack on what the earlier ones
left. Both run on one thread, interleaved (ours, theirs).

    .venv/bin/python bench/autoattack.py --model runs/demo/edge/jobs/1/run [--images 64] [--eps 0.01]

Writes bench/results/autoattack.json and the "autoattack" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, machine, record  # noqa: E402

sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs/demo/edge/jobs/1/run"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--data-root", help="where the model's dataset lives (default: as trained)")
    args = parser.parse_args()

    import torchattacks

    from emoshield.attacks import AutoAttack
    from emoshield.data.images import to_model_input
    from emoshield.pipeline import _decode_for, model_test_data

    torch.set_num_threads(1)
    model, records, root, meta = model_test_data(Path(args.model))
    classes = list(model.config.classes)
    test, _ = _decode_for(model, records[:args.images], root, classes)
    x, y = to_model_input(test.pixels), test.labels
    model.eval()
    eps, steps, queries, n = args.eps, args.steps, args.queries, len(classes)

    def correct(adv):
        with torch.no_grad():
            return model(adv).argmax(1) == y

    ours = AutoAttack(eps, steps=steps, queries=queries)
    t0 = time.perf_counter()
    ours_correct = correct(ours(model, x, y))
    ours_seconds = time.perf_counter() - t0
    parts = [torchattacks.APGD(model, eps=eps, steps=steps, n_restarts=1, loss="ce"),
             torchattacks.APGDT(model, eps=eps, steps=steps, n_restarts=1, n_classes=n),
             torchattacks.FAB(model, eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=n),
             torchattacks.Square(model, eps=eps, n_queries=queries, n_restarts=1)]
    theirs_stages, remaining, adv = {}, correct(x), x.clone()
    theirs_stages["clean"] = remaining.float().mean().item()
    t0 = time.perf_counter()
    for name, attack in zip(("apgd-ce", "apgd-t", "fab-t", "square"), parts):
        todo = remaining.nonzero()[:, 0]
        if len(todo):
            candidate = attack(x[todo], y[todo])
            with torch.no_grad():
                broken = model(candidate).argmax(1) != y[todo]
            adv[todo[broken]] = candidate[broken]
            remaining[todo[broken]] = False
        theirs_stages[name] = remaining.float().mean().item()
    theirs_seconds = time.perf_counter() - t0
    result = {"model": str(args.model), "dataset": meta.get("dataset"), "protocol": meta.get("protocol"),
              "fold": meta.get("fold"), "backbone": meta.get("backbone"), "input_size": meta.get("input_size"),
              "defense": meta.get("defense"), "images": len(y), "eps": eps, "steps": steps, "square_queries": queries,
              "ours": {"stages": ours.stages(), "robust_accuracy": ours_correct.float().mean().item(),
                       "seconds": ours_seconds},
              "torchattacks": {"stages": theirs_stages, "robust_accuracy": theirs_stages["square"],
                               "seconds": theirs_seconds},
              "speedup": theirs_seconds / ours_seconds, "machine": machine()}
    out = ROOT / "bench" / "results" / "autoattack.json"
    out.write_text(json.dumps(result, indent=1))
    d = result["defense"] or {}
    defense = ("+".join(f"{k}:{v:g}" for k, v in d["methods"].items()) + f", eps {d['eps']:g}") if d else "none"
    rows = "\n".join(f"| {stage} | {result['ours']['stages'][stage]:.1%} | {theirs_stages[stage]:.1%} |"
                     for stage in ("clean", "apgd-ce", "apgd-t", "fab-t", "square"))
    markdown = f"""## AutoAttack: emoshield vs torchattacks (`python bench/autoattack.py`)
{result['backbone']} {result['input_size']} px, {result['dataset']} {result['protocol']} protocol fold {result['fold']},
defended ({defense}); first {len(y)} test faces, L-inf eps {eps}, standard settings (APGD-CE and APGD-T
{steps} steps, {n - 1} targets, FAB-T {steps} steps, Square {queries} queries), one thread, side by side.
torchattacks: MultiAttack of APGD, APGDT, FAB, Square with the same settings (its AutoAttack class uses 10 steps).

| robust accuracy after | emoshield | torchattacks 3.5.1 |
|---|---:|---:|
{rows}

Time: emoshield {ours_seconds:.0f} s, torchattacks {theirs_seconds:.0f} s: **{result['speedup']:.2f}x**.
CPU: {result['machine']['cpu_isa']}.
"""
    record("autoattack", {"autoattack_speedup_vs_torchattacks": round(result["speedup"], 2),
                          "autoattack_robust_accuracy_gap_points": round(
                              (result["ours"]["robust_accuracy"] - theirs_stages["square"]) * 100, 2)}, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
