"""Add the APGD-CE follow-up of the gradient-masking eps sweep to robustness reports made before
it existed (emoshield.pipeline.recheck_masking): only where PGD stayed above the floor at the
sweep's largest eps; nothing else is re-run, and the model must be the one the report names, on
the images it was evaluated on. A report of another dataset than the model's own (cross-dataset)
needs the dataset options it was evaluated with (--dataset, --protocol, --limit-per-class).

For a study unit folder (WORK/BACKBONE/foldF-seedS) and its saved unit file:

    python scripts/recheck_masking.py --out UNIT/robustness --model UNIT/defended \\
        --baseline UNIT/localization --unit OUT/units/BACKBONE-foldF-seedS.json

--unit updates that file's masking checks and sanity flags in place (its commit and every other
number stay); the study's report is rewritten from the unit files by the study's next run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emoshield.errors import EmoshieldError
from emoshield.pipeline import DataOptions, recheck_masking


def update_unit(unit_file: Path, robustness_file: Path) -> None:
    """A study unit's masking checks and sanity flags from its (rechecked) robustness.json."""
    from emoshield.paths import write_atomic

    from emoshield.reproduce import headline

    unit = json.loads(unit_file.read_text())
    report = json.loads(robustness_file.read_text())["robustness"]
    if unit["record"]["defended"] != headline(report):
        raise EmoshieldError(f"{unit_file} is another unit's file: its numbers are not {robustness_file}'s")
    unit["record"]["masking_checks"] = report.get("masking_checks", {})
    unit["record"]["sanity_flags"] = report["sanity_flags"]
    write_atomic(unit_file, json.dumps(unit, indent=1, default=str).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder holding robustness.json")
    parser.add_argument("--model", type=Path, required=True, help="the model the report evaluated")
    parser.add_argument("--baseline", type=Path, help="its baseline model, if the report has one")
    parser.add_argument("--dataset", help="the dataset it was evaluated on, when not the model's own test split")
    parser.add_argument("--data-root", help="where the dataset is now, if it moved since the evaluation")
    parser.add_argument("--protocol", default="all")
    parser.add_argument("--limit-per-class", type=int)
    parser.add_argument("--unit", type=Path, help="a study's unit file to update from the rechecked report")
    args = parser.parse_args(argv)
    data = DataOptions(dataset=args.dataset, data_root=args.data_root, protocol=args.protocol,
                       limit_per_class=args.limit_per_class) if args.dataset or args.data_root else None
    try:
        if args.unit is not None and not args.unit.is_file():
            raise EmoshieldError(f"{args.unit}: no such unit file")
        changed = recheck_masking(args.out, args.model, args.baseline, data, log=print)
        if args.unit is not None:
            update_unit(args.unit, args.out / "robustness.json")
    except (EmoshieldError, OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(changed) if changed else "nothing to add: every sweep reached the floor (or was rechecked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
