"""Ablations of the defense's training recipe on CK+48 (5 classes), one protocol and fold:
each variant is the SPEC §6 defense (S = {FGSM, R+FGSM}, beta0 0.5, eps 0.01, batch 128,
`--augment standard`: the recipe before the defaults changed) plus extra
`emoshield train` options, evaluated on the same test images with FGSM, R+FGSM, PGD-10 and
APGD-CE-50 at eps 0.01.

    .venv/bin/python bench/defense_variants.py --variant base= --variant strong="--augment strong" \
        [--protocol subject --fold 0 --epochs 50] [--out results/defense_variants]

Variants already trained (metrics.json in runs/defense_variants/<protocol>-f<fold>-<name>) are
not retrained; an interrupted training resumes. Writes <out>/results.{json,md}; every row
names its full command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from defense_ckplus48 import CLASSES, _headline, emoshield

# the SPEC §4/§6 recipe each variant starts from (a variant's options come later and win)
DEFENSE = ["--defense", "fgsm:0.5,rfgsm:0.5", "--beta0", "0.5", "--eps", "0.01", "--batch-size", "128",
           "--augment", "standard"]
KEYS = ["clean", "fgsm@0.01", "rfgsm@0.01", "pgd@0.01", "apgd@0.01", "worst@0.01"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=OPTIONS",
                        help="a variant's name and its extra train options (repeatable)")
    parser.add_argument("--data-root")
    parser.add_argument("--protocol", default="subject", choices=["reference", "subject"])
    parser.add_argument("--fold", default="0")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--input-size", default="64")
    parser.add_argument("--epochs", default="50")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--out", default="results/defense_variants")
    parser.add_argument("--work", default="runs/defense_variants")
    args = parser.parse_args()
    data = ["--data-root", args.data_root] if args.data_root else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        run_dir = Path(args.work) / f"{args.protocol}-f{args.fold}-{name}"
        train = ["train", "--dataset", "ckplus48", *data, "--classes", CLASSES, "--protocol", args.protocol,
                 "--fold", args.fold, "--backbone", args.backbone, "--weights", args.weights,
                 "--input-size", args.input_size, "--epochs", args.epochs, "--seed", args.seed,
                 *DEFENSE, *shlex.split(extra), "--quiet", "--out", str(run_dir)]
        started = time.perf_counter()
        if not (run_dir / "metrics.json").is_file():
            resume = ["--resume"] if (run_dir / "checkpoint.safetensors").is_file() else []
            emoshield(*train, *resume)
        train_seconds = time.perf_counter() - started
        eval_dir = out / f"{args.protocol}-f{args.fold}-{name}"
        emoshield("evaluate", "--model", str(run_dir), "--attacks", "fgsm,rfgsm,pgd,apgd", "--eps", "0.01",
                  "--out", str(eval_dir))
        report = json.loads((eval_dir / "robustness.json").read_text())["robustness"]
        history = json.loads((run_dir / "history.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = {"variant": name, "options": extra, "protocol": args.protocol, "fold": int(args.fold),
               "command": "emoshield " + shlex.join(train), "best_epoch": metrics.get("best_epoch"),
               "seconds_per_epoch": sum(r["seconds"] for r in history) / len(history),
               "train_seconds_this_run": train_seconds, **_headline(report)}
        rows = [r for r in rows if (r["variant"], r["protocol"], r["fold"]) != (name, row["protocol"], row["fold"])]
        rows.append(row)
        results_path.write_text(json.dumps(rows, indent=1))
        (out / "results.md").write_text(_markdown(rows, args))
        print(f"{name}: " + " ".join(f"{k} {row[k]:.1%}" for k in KEYS), flush=True)
    print((out / "results.md").read_text())
    return 0


def _markdown(rows: list[dict], args) -> str:
    lines = ["# Defense recipe ablations: CK+48, 5 classes", "",
             f"{args.backbone} ({args.weights}) + localization head, {args.input_size} px, {args.epochs} epochs, "
             f"seed {args.seed}; defense S = {{FGSM, R+FGSM}}, beta_s 0.5, beta0 0.5, eps 0.01, alpha 0.005, batch 128, "
             "`--augment standard`, "
             "plus each variant's options. Test: PGD-10 (random start), APGD-CE-50; worst = robust to all four. "
             "2 CPU cores.", "",
             "| protocol | fold | variant | options | best epoch | " + " | ".join(KEYS) + " | s/epoch |",
             "|---|---:|---|---|---:|" + "---:|" * (len(KEYS) + 1)]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['fold']} | {r['variant']} | `{r['options']}` | {r['best_epoch']} | "
                     + " | ".join(f"{r[k]:.1%}" for k in KEYS) + f" | {r['seconds_per_epoch']:.1f} |")
    lines += ["", "Commands: see results.json (`command` of each row); produced by `bench/defense_variants.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
