"""Copy the small result files of finished `emoshield cloud pretrain` trainings into
results/cloud_pretrain/NAME/ (report, metrics, run configuration, per-epoch history, plots;
never weights), so RESULTS.md can report the cloud tier's FER2013 accuracy.

    .venv/bin/python scripts/collect_pretrain.py runs/pretrain/resnet18-fer2013-48px [...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

FILES = ("report.md", "metrics.json", "run.json", "history.json", "training_curves.png", "confusion_matrix.png")


def collect(work: Path, target: Path) -> None:
    """Copies a finished training's result files (FILES, those it has) from WORK to TARGET."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (work / name).is_file():
            shutil.copy2(work / name, target / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="+", help="training folders of finished pretraining runs")
    parser.add_argument("--out", default="results/cloud_pretrain")
    args = parser.parse_args()
    for work in map(Path, args.work):
        if not (work / "metrics.json").is_file():
            print(f"{work}: no metrics.json (not a finished training)", file=sys.stderr)
            return 1
        target = Path(args.out) / work.name
        collect(work, target)
        print(f"{work} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
