"""Test-time augmentation's effect on accuracy: every `--tta` mode (none, flip, tencrop) on a
subject study's defended and undefended models, on their own held-out people and on every face of
another dataset (JAFFE by default: never seen). Clean accuracy only (attacks: `emoshield evaluate
--tta ... --attacks ...`); the device's cost of each mode is bench/device.py --only tta.

    python bench/tta.py [--work runs/reproduce/ckplus48-subject-v2] [--backbone smallcnn]
        [--cross jaffe | --cross ''] [--out results/tta] [--name STEM]

`--cross ''` skips the other dataset (e.g. for a study that trained on it with --extra-train).
Writes OUT/STEM.{json,md} (default STEM: DATASET-PROTOCOL-BACKBONE, e.g. ckplus48-subject-smallcnn);
the same numbers as
`emoshield evaluate --model M [--dataset jaffe --protocol all] --tta MODE` (the library calls it
makes)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emoshield.evaluation.study_report import epochs_words  # noqa: E402
from emoshield.views import TTA_MODES  # noqa: E402

VARIANTS = {"defended": "defended", "undefended (localization head)": "localization"}


def accuracy(model_dir: Path, data, mode: str) -> tuple[float, int]:
    from emoshield.models.tta import with_tta
    from emoshield.pipeline import _decode_for, model_test_data
    from emoshield.training import predict_logits

    model, records, root, meta = model_test_data(model_dir, data)
    test, _ = _decode_for(model, records, root, meta["classes"])
    model.eval()
    predicted = predict_logits(with_tta(model, mode), test.pixels).argmax(1)
    return (predicted == test.labels).float().mean().item(), len(test.labels)


def main() -> int:
    from emoshield.paths import study_work_root
    from emoshield.pipeline import DataOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(study_work_root() / "ckplus48-subject-v2"),
                        help="the study's work folder (default: scripts/studies.py's, %(default)s)")
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--cross", default="jaffe", help="every face of this dataset, never seen; '' for none")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="results/tta")
    parser.add_argument("--name", help="file stem of the results (default: DATASET-PROTOCOL-BACKBONE)")
    args = parser.parse_args()
    work = Path(args.work)
    study = json.loads((work / "study.json").read_text())
    units = sorted(p for p in (work / args.backbone).glob("fold*-seed*")
                   if all((p / v / "metrics.json").is_file() for v in VARIANTS.values()))
    if not units:
        print(f"no finished trainings under {work / args.backbone}", file=sys.stderr)
        return 2
    own, other = "own held-out people", f"{args.cross} all (cross-dataset)"
    places = [(own, "held-out people", None)]  # (row key, column title, images: None = the unit's own test split)
    if args.cross:
        places.append((other, f"{args.cross} faces",
                       DataOptions(dataset=args.cross, data_root=args.data_root, protocol="all")))
    rows = []
    for unit in units:
        for label, folder in VARIANTS.items():
            row = {"unit": unit.name, "model": label}
            for name, _, data in places:
                for mode in TTA_MODES:
                    row[f"{name}|{mode}"], row[f"{name}|images"] = accuracy(unit / folder, data, mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
    opts = study["options"]
    what = (f"{work}/{args.backbone}/fold*-seed*/{{defended,localization}}: {args.backbone} "
            f"({study.get('weights', {}).get(args.backbone)}), localization head, {opts['input_size']} px, "
            f"{epochs_words(opts)}, {opts['dataset']} {opts['protocol']} protocol, classes {opts['classes'] or 'all'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{opts['dataset']}-{opts['protocol']}-{args.backbone}"
    (out / f"{stem}.json").write_text(json.dumps({"what": "clean accuracy per --tta mode", "models": what,
                                                  "command": " ".join(["python", *sys.argv]), "rows": rows},
                                                 indent=1))
    lines = [f"# Test-time augmentation on {opts['dataset']} {opts['protocol']}-fold models", "", what, "",
             f"Command: `python {' '.join(sys.argv)}` (clean accuracy, the library calls of "
             "`emoshield evaluate --tta MODE`).", "",
             "| unit | model | " + " | ".join(f"{title} | " + " | ".join(TTA_MODES) for _, title, _ in places) + " |",
             "|---|---|" + ("---:|" * (1 + len(TTA_MODES))) * len(places)]
    for r in rows:
        lines.append(f"| {r['unit']} | {r['model']} | " + " | ".join(
            f"{r[where + '|images']} | " + " | ".join(f"{r[f'{where}|{m}'] * 100:.1f}" for m in TTA_MODES)
            for where, _, _ in places) + " |")
    lines += ["", f"Mean over the {len(units)} units (the study's targets read these):", "",
              "| model | " + " | ".join(f"{title}: " + " | ".join(TTA_MODES) for _, title, _ in places) + " |",
              "|---|" + "---:|" * len(TTA_MODES) * len(places)]
    for label in VARIANTS:
        mine = [r for r in rows if r["model"] == label]
        lines.append(f"| {label} | " + " | ".join(
            f"{sum(r[f'{where}|{m}'] for r in mine) / len(mine) * 100:.1f}" for where, _, _ in places for m in TTA_MODES)
            + " |")
    mean = {where: {m: sum(r[f"{where}|{m}"] - r[f"{where}|none"] for r in rows) / len(rows) * 100
                    for m in TTA_MODES[1:]} for where, _, _ in places}
    lines += ["", f"Mean change over {len(rows)} models, on their held-out people: "
              + ", ".join(f"{m} {v:+.1f} points" for m, v in mean[own].items())
              + (f"; on {args.cross}: " + ", ".join(f"{m} {v:+.1f} points" for m, v in mean[other].items())
                 + f" (one {args.cross} face = {100 / rows[0][other + '|images']:.2f} points)" if args.cross else "")
              + "."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
