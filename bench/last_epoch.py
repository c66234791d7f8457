"""Best epoch on validation vs the last epoch, on a study's held-out people (issue 18, item 4).

A subject fold's validation part is one person (21 JAFFE faces), the same person in 4 of 5 folds,
and each run keeps the epoch that scores best on it. This reads every finished run of a study
twice on its own test people: the kept model (model.safetensors) and the last epoch's weights
(the resume checkpoint, checkpoint.safetensors, which every finished run leaves). It trains
nothing: it shows how much the one-person choice of epoch moves the figures.

    python bench/last_epoch.py --work ~/.cache/emoshield/studies/jaffe-subject-v6 [--backbone smallcnn]
        [--runs localization,defended] [--out results/last_epoch] [--name jaffe-subject-v6-smallcnn]

Writes OUT/NAME.json and OUT/NAME.md (per unit and run: best epoch and its test accuracy, last
epoch and its test accuracy; the means over units)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from emoshield.evaluation.study_report import epochs_words  # noqa: E402


def accuracies(run_dir: Path) -> dict:
    """Test accuracy of the kept (best-validation) model and of the last epoch's weights."""
    from safetensors import safe_open

    from emoshield.pipeline import _decode_for, model_test_data
    from emoshield.training import predict_logits
    from emoshield.training.checkpoint import CHECKPOINT

    model, records, root, meta = model_test_data(run_dir)
    test, _ = _decode_for(model, records, root, meta["classes"])
    model.eval()
    best = (predict_logits(model, test.pixels).argmax(1) == test.labels).float().mean().item()
    with safe_open(str(run_dir / CHECKPOINT), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        weights = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    model.load_state_dict(weights)
    last = (predict_logits(model, test.pixels).argmax(1) == test.labels).float().mean().item()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if abs(best - metrics["test_accuracy"]) > 1e-6:  # the kept model, read here, is the one the run scored
        raise SystemExit(f"{run_dir}: the kept model scores {best:.4f} here, its metrics.json "
                         f"{metrics['test_accuracy']:.4f}")
    return {"images": len(test.labels), "best_epoch": metrics.get("best_epoch"), "best": best,
            "last_epoch": state.get("epoch"), "last": last, "epochs": meta.get("epochs")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a study's work folder (emoshield reproduce --work)")
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--runs", default="localization,defended")
    parser.add_argument("--out", default="results/last_epoch")
    parser.add_argument("--name", help="file stem (default: the work folder's name and the backbone)")
    args = parser.parse_args(argv)
    work, runs = Path(args.work), [r for r in args.runs.split(",") if r]
    units = sorted(p for p in (work / args.backbone).glob("fold*-seed*")
                   if all((p / r / "metrics.json").is_file() and (p / r / "checkpoint.safetensors").is_file()
                          for r in runs))
    if not units:
        parser.error(f"{work}/{args.backbone}: no unit with finished {', '.join(runs)} runs and their checkpoints")
    rows = []
    for unit in units:
        for run in runs:
            row = {"unit": unit.name, "run": run, **accuracies(unit / run)}
            if row["last_epoch"] != row["epochs"]:
                parser.error(f"{unit / run}: its checkpoint is of epoch {row['last_epoch']}, not the last "
                             f"({row['epochs']})")
            rows.append(row)
            print(json.dumps(row), flush=True)
    study = json.loads((work / "study.json").read_text())
    opts = study.get("options", {})
    what = (f"{opts.get('dataset')} {opts.get('protocol')} protocol, {args.backbone} "
            f"({study.get('weights', {}).get(args.backbone)}), {opts.get('input_size')} px, "
            f"{epochs_words(opts) if 'epochs' in opts else 'epochs as each run says'}, "
            f"{len(units)} units (fold x seed: {', '.join(u.name for u in units)}), "
            f"runs {', '.join(runs)}; test accuracy on each unit's held-out people")
    name = args.name or f"{work.name}-{args.backbone}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {run: {key: statistics.mean(r[key] for r in rows if r["run"] == run) for key in ("best", "last")}
               for run in runs}
    (out / f"{name}.json").write_text(json.dumps({"what": what, "command": " ".join(["python", *sys.argv]),
                                                  "rows": rows, "mean": summary}, indent=1))
    lines = [f"# Best epoch on one validation person vs the last epoch: {work.name}", "", what + ".", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| unit | run | test images | best epoch | its test % | last epoch | its test % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['unit']} | {r['run']} | {r['images']} | {r['best_epoch']} | {r['best'] * 100:.1f} | "
              f"{r['last_epoch']} | {r['last'] * 100:.1f} |" for r in rows]
    lines += ["", "Mean over units, %:", "", "| run | best epoch (kept) | last epoch |", "|---|---:|---:|"]
    lines += [f"| {run} | {s['best'] * 100:.1f} | {s['last'] * 100:.1f} |" for run, s in summary.items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
