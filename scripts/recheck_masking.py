"""Add the APGD-CE follow-up of the gradient-masking eps sweep to robustness reports made before
it existed (emoshield.pipeline.recheck_masking): only where PGD stayed above the floor at the
sweep's largest eps; nothing else is re-run. For a study unit folder (WORK/BACKBONE/foldF-seedS):

    python scripts/recheck_masking.py --out UNIT/robustness --model UNIT/defended --baseline UNIT/localization

then delete the unit's file under the study's OUT/units/ and re-run the study command: it finds
every step done and saves the unit again from the updated report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emoshield.errors import EmoshieldError
from emoshield.pipeline import recheck_masking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder holding robustness.json")
    parser.add_argument("--model", type=Path, required=True, help="the model the report evaluated")
    parser.add_argument("--baseline", type=Path, help="its baseline model, if the report has one")
    args = parser.parse_args(argv)
    try:
        changed = recheck_masking(args.out, args.model, args.baseline, log=print)
    except EmoshieldError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(changed) if changed else "nothing to add: every sweep reached the floor (or was rechecked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
