"""RESULTS.md from the committed study folders (results/reproduce/*/results.json): our numbers
beside the reference's, a headline table and one table per claim; plus the cloud tier's FER2013
pretraining runs (results/cloud_pretrain/*/, copied there by scripts/collect_pretrain.py).

    .venv/bin/python scripts/results_md.py [--studies results/reproduce] [--pretrain results/cloud_pretrain] [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WHAT_DIFFERS = """## What differs from the reference
| | reference (SPEC §7) | here |
|---|---|---|
| data | LIRIS-CSE: 208 videos of 12 children, 5 classes, 22,474 frames | CK+48 (5 of its 7 classes: the reference's happy, sad, surprise, disgust, fear; 3 frames per sequence) and JAFFE (7 classes, 10 subjects, 213 images) |
| split | per-video frame split (80/10/10) | CK+48 under SPEC §3's reading of it (1 train / 1 val / 1 test frame per sequence) AND subject-independent 5-fold; JAFFE subject 5-fold only (it has no sequences) |
| backbones | VGG16 and AlexNet, ImageNet-pretrained, 480 px | ResNet18 pretrained by our cloud tier on FER2013 (48 px) and MobileNetV2 (ImageNet), both at 48 px; no ImageNet VGG16/AlexNet weights can be downloaded here |
| hardware | V100 GPU | 2 CPU cores |
| recipe | batch 128, SGD lr 0.01, Algorithm 1, 50 epochs | the same schedule, optimizer and epochs; batch 32 and `--augment strong` (our measured defaults, README "Training") |
| attacks | FGSM, R+FGSM, PGD (unseen) | the same, plus APGD-CE-50 (unseen) to rule out gradient masking and camera corruptions |
"""


def _pct(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean'] * 100:.1f}"
    return text + (f" ± {stat['std'] * 100:.1f}" if stat.get("n", 1) > 1 else "")


BEST_PUBLISHED_FER2013 = 73.28  # single-network PrivateTest accuracy quoted in issue 4


def pretraining_table(root: Path) -> list[str]:
    """The cloud library's FER2013 runs: how each was trained and its PrivateTest accuracy."""
    rows = []
    for path in sorted(root.glob("*/metrics.json")):
        m, run = json.loads(path.read_text()), json.loads((path.parent / "run.json").read_text())
        cfg = run["train_config"]
        history = json.loads((path.parent / "history.json").read_text())
        best = max(history, key=lambda e: e["val_accuracy"])
        rows.append(
            f"| [{path.parent.name}]({path.parent.as_posix()}/report.md) | {m['backbone']} | {m['weights']} | "
            f"{m['input_size']} px | {m['epochs']} | {cfg['batch_size']}, lr {cfg['lr']}, {cfg['schedule']}, "
            f"`--augment {cfg['augment']}` | {'bfloat16 (`--amp`)' if cfg.get('amp') else 'float32'} | "
            f"{m['train_seconds'] / 3600:.1f} h | {best['val_accuracy'] * 100:.1f} (epoch {best['epoch']}) | "
            f"**{m['test_accuracy'] * 100:.1f}** | {m['balanced_accuracy'] * 100:.1f} |")
    if not rows:
        return []
    return ["## The cloud tier: backbones pretrained on FER2013", "",
            "`emoshield cloud pretrain` on FER2013's official split (train 28,709; PublicTest 3,589 picks the "
            "epoch; PrivateTest 3,589 is the test), 7 classes, seed 0, 2 CPU cores, one crop at test time. "
            f"Best published single model: {BEST_PUBLISHED_FER2013} (Khaireddin & Chen 2021, a tuned VGG variant at 48 px).", "",
            "| run | backbone | from | input | epochs | batch, lr, schedule, augmentation | precision | training "
            "time | PublicTest (best epoch) | PrivateTest | balanced |",
            "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|", *rows, ""]


def _study_name(result: dict) -> str:
    return f"{result['dataset']} {result['protocol']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="results/reproduce")
    parser.add_argument("--pretrain", default="results/cloud_pretrain")
    parser.add_argument("--out", default="RESULTS.md")
    args = parser.parse_args()
    studies = []
    for path in sorted(Path(args.studies).glob("*/results.json")):
        result = json.loads(path.read_text())
        if result["options"].get("quick"):
            continue  # a code-path check, not a result
        result["folder"] = path.parent
        studies.append(result)
    if not studies:
        print(f"no results.json under {args.studies}", file=sys.stderr)
        return 1
    lines = ["# Results: the reference's claims, checked on real data", "",
             "Every number below comes from `emoshield reproduce` (its command, options and git commit are in each "
             "study's results.json and report.md). Figures are mean ± standard deviation over subject folds where a "
             "study has several; accuracy in %. Regenerate this page with `python scripts/results_md.py`.", ""]
    lines += ["## Headline", "",
              "| study | backbone (weights) | units | localization head | own head | defended clean | FGSM 0.01 "
              "def. (undef.) | R+FGSM 0.01 def. (undef.) | PGD-10 0.01 def. (undef.) | APGD 0.01 def. | claims held | "
              "compute |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in studies:
        for backbone, s in r["summary"].items():
            d, u = s["defended"], s["undefended"]
            n = s["runs"]["localization"]["test_accuracy"]["n"]
            held = [c for c in r["claims"] if c["claim"].startswith(backbone + ":")]
            lines.append(
                f"| [{_study_name(r)}]({r['folder'].as_posix()}/report.md) | {backbone} (`{r['weights'][backbone]}`) | {n} | "
                f"{_pct(s['runs']['localization']['test_accuracy'])} | {_pct(s['runs']['own-head']['test_accuracy'])} | "
                f"{_pct(d['clean'])} | {_pct(d['fgsm@0.01'])} ({_pct(u['fgsm@0.01'])}) | "
                f"{_pct(d['rfgsm@0.01'])} ({_pct(u['rfgsm@0.01'])}) | {_pct(d['pgd@0.01'])} ({_pct(u['pgd@0.01'])}) | "
                f"{_pct(d['apgd@0.01'])} | {sum(c['holds'] for c in held)}/{len(held)} | "
                f"{r.get('compute_seconds', 0) / 60:.0f} min |")
    lines += ["", "Reference (LIRIS-CSE, VGG16): localization head 95.67, own head 88.32, defended clean 94.97, "
                  "FGSM 0.01 85.76 (undefended 7.22), R+FGSM 0.01 90.84, PGD 83.29 (undefended 0.41). "
                  "Compute = the study's training and evaluation time on 2 CPU cores (per study, both backbones).", ""]
    lines += pretraining_table(Path(args.pretrain))
    reading = Path(args.studies) / "reading.md"  # the hand-written interpretation, kept beside the studies
    if reading.is_file():
        lines += [reading.read_text().strip(), ""]
    claims: dict[str, list] = {}
    for r in studies:
        for c in r["claims"]:
            backbone, _, claim = c["claim"].partition(": ")
            claims.setdefault(claim, []).append((r, backbone, c))
    lines += ["## The claims, one table each", ""]
    for claim, rows in claims.items():
        held = sum(c["holds"] for _, _, c in rows)
        lines += [f"### {claim[0].upper() + claim[1:]}", "", f"Reference: {rows[0][2]['reference']}. "
                  f"Rule: {rows[0][2]['rule']}. Holds in {held} of {len(rows)} study x backbone cases.", "",
                  "| study | backbone | ours | holds? |", "|---|---|---|:---:|"]
        for r, backbone, c in rows:
            lines.append(f"| {_study_name(r)} | {backbone} | {c['ours']} | {'✓' if c['holds'] else '✗'} |")
        lines.append("")
    lines.append(WHAT_DIFFERS)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out} from {len(studies)} studies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
