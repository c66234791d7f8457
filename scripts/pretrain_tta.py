"""A cloud library entry's FER2013 PrivateTest accuracy with each test-time augmentation (one
crop, flip, ten-crop), saved beside its pretraining results so RESULTS.md's cloud-tier table can
show the multi-crop figures published FER2013 numbers are often quoted with.

    .venv/bin/python scripts/pretrain_tta.py --model library:smallcnn-fer2013-48px \
        --into results/cloud_pretrain/smallcnn-fer2013-48px-amp [--data-root DIR]

Each mode is `emoshield evaluate --model M --dataset fer2013 --protocol official --tta MODE` (the
library call). The one-crop figure must equal the run's own metrics.json (the same model on the
same images), else nothing is written: a library entry and a results folder that do not belong
together are refused. Writes INTO/tta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emoshield.errors import EmoshieldError  # noqa: E402
from emoshield.views import TTA_MODES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="library:NAME (or a training folder) pretrained on FER2013")
    parser.add_argument("--into", required=True, help="its results/cloud_pretrain/RUN folder (has metrics.json)")
    parser.add_argument("--data-root", help="folder holding fer2013/ (default: $EMOSHIELD_DATA)")
    parser.add_argument("--limit-per-class", type=int, help="only ~N test faces per class (tests, quick looks)")
    args = parser.parse_args(argv)
    from emoshield.pipeline import DataOptions, evaluate_model
    from emoshield.provenance import git_commit

    into = Path(args.into)
    try:  # checked before hours of evaluation, not after
        own = json.loads((into / "metrics.json").read_text())
        if not isinstance(own.get("test_accuracy"), float):
            raise ValueError("no test_accuracy")
    except (OSError, ValueError, RecursionError, AttributeError) as exc:
        print(f"pretrain_tta: {into}/metrics.json is not a finished run's metrics ({exc})", file=sys.stderr)
        return 2
    data = DataOptions(dataset="fer2013", data_root=args.data_root, protocol="official",
                       limit_per_class=args.limit_per_class)
    accuracy = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for mode in TTA_MODES:
                metrics = evaluate_model(Path(args.model), Path(tmp) / mode, data, tta=mode)
                accuracy[mode] = metrics["test_accuracy"]
                print(f"{mode}: {accuracy[mode]:.2%} of {metrics['num_images']} PrivateTest faces", flush=True)
    except EmoshieldError as exc:
        print(f"pretrain_tta: {exc}", file=sys.stderr)
        return 2
    if abs(accuracy["none"] - own["test_accuracy"]) > 1e-9:
        print(f"pretrain_tta: {args.model} scores {accuracy['none']:.4%} with one crop, {into} says "
              f"{own['test_accuracy']:.4%}: not the same model or images; nothing written", file=sys.stderr)
        return 2
    record = {"model": args.model, "dataset": "fer2013", "split": "PrivateTest (official test split)",
              "num_images": metrics["num_images"], "limit_per_class": args.limit_per_class, "accuracy": accuracy,
              "git_commit": git_commit(),
              "command": " ".join(["scripts/pretrain_tta.py", *(argv if argv is not None else sys.argv[1:])])}
    (into / "tta.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {into / 'tta.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
