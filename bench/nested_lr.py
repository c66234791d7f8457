"""The fine-tuning learning rate chosen by nested cross-validation (issue 18, item 4): for each
outer subject fold K, every candidate lr is trained on inner subject folds made of fold K's
training people only (`--nested-in K/N`) and scored on their inner held-out people; the lr with
the best inner mean is fold K's choice, and fold K's own test people score it. Their mean is the
accuracy of "fine-tune at the lr inner folds choose", a figure no test person took part in choosing.

Why not the validation part: a subject fold's validation part is one person (21 JAFFE faces), the
same person in 4 of the 5 folds, and the best epoch is picked on it, so a jumpy lr looks best there.

    python bench/nested_lr.py [--dataset jaffe] [--lrs 0.01,0.003,0.001] [--inner-folds 4]
        [--weights library:fer2013-48px-final-strong] [--align eyes] [--epochs 50]
        [--work ~/.cache/emoshield/studies/nested_lr-jaffe] [--out results/nested_lr]

Every run is `emoshield train`'s library call (localization head, undefended, seed 0, the study's
other defaults) in WORK/outerK/lrX/{innerJ,outer}; re-running resumes and skips finished runs
(WORK/options.json: a WORK of other settings is refused; another lr only adds its runs).
Writes OUT/DATASET-subject-BACKBONE.{json,md} after every outer fold."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train(folder: Path, data, model, epochs: int, lr: float, seed: int) -> float:
    """Test accuracy of one run (trained here unless its metrics.json is there)."""
    from emoshield.pipeline import train_model
    from emoshield.training import TrainConfig

    done = folder / "metrics.json"
    if not done.is_file():
        started = time.time()
        train_model(data, model, TrainConfig(epochs=epochs, seed=seed, lr=lr), folder,
                    resume=(folder / "checkpoint.safetensors").is_file(), progress=False, log=lambda m: None)
        print(f"  {folder}: {time.time() - started:.0f} s", flush=True)
    return json.loads(done.read_text())["test_accuracy"]


def main(argv: list[str] | None = None) -> int:
    from emoshield.paths import study_work_root
    from emoshield.pipeline import DataOptions, ModelOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="jaffe")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--weights", default="library:fer2013-48px-final-strong")
    parser.add_argument("--align", default="eyes")
    parser.add_argument("--input-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5, help="outer subject folds (default: %(default)s)")
    parser.add_argument("--inner-folds", type=int, default=4, help="inner folds per outer fold (default: %(default)s)")
    parser.add_argument("--lrs", default="0.01,0.003,0.001", help="candidate lrs; ties go to the first listed")
    parser.add_argument("--limit-per-class", type=int, help="a tiny slice (tests)")
    parser.add_argument("--work", default=None, help="default: the studies' work root / nested_lr-DATASET")
    parser.add_argument("--out", default="results/nested_lr")
    args = parser.parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x]
    except ValueError:
        lrs = []
    if not lrs or any(not 0 < lr <= 1 for lr in lrs) or len({f"{lr:g}" for lr in lrs}) < len(lrs):
        parser.error(f"--lrs must be different numbers in (0, 1], got {args.lrs!r}")
    work = Path(args.work) if args.work else study_work_root() / f"nested_lr-{args.dataset}"
    settings = {k: getattr(args, k) for k in ("dataset", "backbone", "weights", "align", "input_size", "epochs",
                                               "seed", "folds", "inner_folds", "limit_per_class")}
    saved = work / "options.json"
    if saved.is_file() and _json(saved) != settings:  # finished runs are reused: same settings only
        parser.error(f"{work} holds runs made with other settings ({saved}); pass another --work")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=1))
    model = ModelOptions(backbone=args.backbone, weights=args.weights, head="localization",
                         input_size=args.input_size, align=args.align)

    def data(fold: int, folds: int, nested_in=None) -> DataOptions:
        return DataOptions(dataset=args.dataset, data_root=args.data_root, protocol="subject", fold=fold,
                           folds=folds, limit_per_class=args.limit_per_class, nested_in=nested_in)

    rows = []
    for outer in range(args.folds):
        row = {"outer_fold": outer, "inner": {}, "outer": {}}
        for lr in lrs:
            place = work / f"outer{outer}" / f"lr{lr:g}"
            row["inner"][f"{lr:g}"] = [train(place / f"inner{j}", data(j, args.inner_folds, (outer, args.folds)),
                                             model, args.epochs, lr, args.seed) for j in range(args.inner_folds)]
        means = {lr: statistics.mean(scores) for lr, scores in row["inner"].items()}
        row["chosen_lr"] = max(means, key=means.get)  # the first listed wins a tie
        for lr in lrs:  # fold K's test people: the chosen lr's score, and the others' for comparison only
            row["outer"][f"{lr:g}"] = train(work / f"outer{outer}" / f"lr{lr:g}" / "outer",
                                            data(outer, args.folds), model, args.epochs, lr, args.seed)
        row["nested_accuracy"] = row["outer"][row["chosen_lr"]]
        rows.append(row)
        write(rows, args, lrs, work, argv if argv is not None else sys.argv[1:])
    return 0


def write(rows: list[dict], args, lrs: list[float], work: Path, argv: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.dataset}-subject-{args.backbone}"
    what = (f"{args.dataset}, subject protocol, {args.folds} outer folds x {args.inner_folds} inner folds "
            f"(`--nested-in K/{args.folds}`), {args.backbone} + localization head from `{args.weights}`, "
            f"input {args.input_size} px, faces aligned ({args.align}), {args.epochs} epochs, seed {args.seed}, "
            f"undefended, SGD with Algorithm 1 at each lr; clean test accuracy")
    command = " ".join(["python", "bench/nested_lr.py", *argv])
    complete = len(rows) == args.folds
    (out / f"{stem}.json").write_text(json.dumps({"what": what, "command": command, "work": str(work),
                                                  "lrs": [f"{lr:g}" for lr in lrs], "complete": complete,
                                                  "rows": rows}, indent=1))
    keys = [f"{lr:g}" for lr in lrs]
    lines = [f"# The fine-tuning lr, chosen by nested cross-validation{'' if complete else ' (partial)'}", "",
             what + ".", "", f"Command: `{command}`", "",
             "| outer fold | " + " | ".join(f"inner mean, lr {k}" for k in keys) + " | chosen | "
             + " | ".join(f"outer test, lr {k}" for k in keys) + " | nested |",
             "|---:|" + "---:|" * len(keys) + "---:|" + "---:|" * len(keys) + "---:|"]
    for r in rows:
        lines.append(f"| {r['outer_fold']} | " + " | ".join(f"{statistics.mean(r['inner'][k]) * 100:.1f}" for k in keys)
                     + f" | {r['chosen_lr']} | " + " | ".join(f"{r['outer'][k] * 100:.1f}" for k in keys)
                     + f" | **{r['nested_accuracy'] * 100:.1f}** |")
    nested = [r["nested_accuracy"] * 100 for r in rows]
    spread = f" ± {statistics.stdev(nested):.1f}" if len(nested) > 1 else ""
    lines += ["", f"Nested estimate over {len(rows)} outer fold(s): **{statistics.mean(nested):.1f}{spread}%** "
              "(each outer fold scored at the lr its own inner folds chose). The 'outer test' columns of the "
              "other lrs are shown for comparison; they did not take part in any choice, and picking the best of "
              "them would choose on test people."]
    for k in keys:
        lines.append(f"- lr {k}: outer test mean {statistics.mean(r['outer'][k] for r in rows) * 100:.1f}%, "
                     f"chosen by {sum(r['chosen_lr'] == k for r in rows)} of {len(rows)} outer folds")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(keys) - 1:]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
