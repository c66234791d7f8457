"""APGD-CE before and after its step-size fix (issue 17), on the same models and faces.

The committed studies made before the fix (results/reproduce/apgd_before_fix.json) and their
re-runs (-v2) trained different models, so their APGD-CE figures cannot be compared one to one.
This bench loads the APGD of commit 5a1e4b3 (the last before the fix, read from git, never copied
into the package) beside today's and runs both, with PGD-10, on every study model that is still
here: each finished unit's defended and undefended (localization head) model under
runs/reproduce/*/, on its own held-out test faces (split.json), eps 0.01 and 8/255, 50 steps, seed 0.
With --seeds, both APGDs run once per seed (random start and restarts) and the table shows the mean
over seeds, each seed's figures in results.json: one face apart on one seed may be a seed's luck.

    .venv/bin/python bench/apgd_fix.py [--work runs/reproduce] [--out results/apgd_fix] [--steps 50]
        [--seeds 0,1,2] [--study 'ckplus48-reference-v2']
    .venv/bin/python bench/apgd_fix.py --out results/apgd_fix --render   # report.md from results.json

Writes OUT/results.json and OUT/report.md; the fixed APGD-CE must not be weaker on any model.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_FIX = "5a1e4b3"  # the commit whose emoshield/attacks/apgd.py the pre-fix studies ran
EPS = (0.01, 8 / 255)


def apgd_before_fix():
    """The pre-fix APGD class, imported from git's copy as a module of emoshield.attacks (its
    relative imports of .base resolve to today's base, whose interface it used unchanged)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_FIX}:emoshield/attacks/apgd.py"],
                            check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="apgd-before-fix-"))
    path = folder / "apgd_before_fix.py"
    path.write_text(source)
    name = "emoshield.attacks._apgd_before_fix"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.APGD


def models(work: Path) -> list[tuple[str, str, str, Path]]:
    """(study, unit, training folder) of every finished unit's defended and undefended model."""
    found = []
    for robustness in sorted(work.glob("*/*/fold*-seed*/robustness/robustness.json")):
        unit = robustness.parents[1]
        for variant, run in (("defended", "defended"), ("undefended", "localization")):
            if (unit / run / "model.safetensors").is_file():
                found.append((unit.parents[1].name, f"{unit.parent.name}-{unit.name}", variant, unit / run))
    return found


def markdown(result: dict) -> str:
    """OUT/report.md from OUT/results.json: every row says its data, split protocol, backbone,
    input size, training epochs and seed (the unit name ends in the training seed)."""
    rows, seeds, steps = result["rows"], result.get("seeds") or [result["seed"]], result["steps"]
    lines = ["# APGD-CE before and after the step-size fix, same models and faces", "",
             f"`python bench/apgd_fix.py`: every study model still under {result['work']} (each unit's defended and "
             "undefended localization-head model, its own held-out test faces from split.json), APGD-CE with "
             f"{steps} steps, {result.get('restarts', 1)} restart, "
             + (f"seed {seeds[0]}" if len(seeds) == 1
                else f"mean over seeds {', '.join(map(str, seeds))} (PGD-10: seed 0)")
             + f"; 'before fix' = emoshield/attacks/apgd.py at {result['before_fix_commit']}. Robust accuracy in % "
             "(lower = stronger attack). 'data' = dataset, split protocol; 'input, epochs' = the model's "
             "training.", "",
             "| study | unit | data | backbone | input, epochs | model | eps | faces | clean | PGD-10 | "
             "APGD-CE before fix | APGD-CE fixed | fixed - before |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['study']} | {r['unit']} | {r['dataset']}, {r['protocol']} | {r['backbone']} | "
                     f"{r['input_size']} px, {r['epochs']} | {r['model']} | {r['eps']:.4g} | {r['images']} | "
                     f"{r['clean'] * 100:.1f} | {r['pgd10'] * 100:.1f} | {r['apgd_before_fix'] * 100:.1f} | "
                     f"{r['apgd_fixed'] * 100:.1f} | {(r['apgd_fixed'] - r['apgd_before_fix']) * 100:+.1f} |")
    lines += ["", f"Fixed APGD-CE weaker than before on: {', '.join(result['fixed_weaker_on']) or 'no model'}"
              + (" (mean over seeds)." if len(seeds) > 1 else "."), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from emoshield.paths import study_work_root

    parser.add_argument("--work", default=str(study_work_root()),
                        help="the folder holding the studies' work folders (default: scripts/studies.py's, %(default)s)")
    parser.add_argument("--out", default="results/apgd_fix")
    parser.add_argument("--steps", type=int, default=50, help="APGD iterations (the studies' apgd_steps)")
    parser.add_argument("--seeds", default="0", help="comma-separated APGD seeds (default: %(default)s)")
    parser.add_argument("--study", default="*", help="only the study folders matching this glob (default: all)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite OUT/report.md from OUT/results.json (no attack is run)")
    args = parser.parse_args()
    if args.render:
        try:
            result = json.loads((Path(args.out) / "results.json").read_text())
            (Path(args.out) / "report.md").write_text(markdown(result))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"cannot render {Path(args.out) / 'report.md'}: {error}", file=sys.stderr)
            return 1
        print(f"wrote {Path(args.out) / 'report.md'}")
        return 0
    import torch

    from emoshield.attacks import make_attack
    from emoshield.attacks.registry import correct_under
    from emoshield.data.images import to_model_input
    from emoshield.pipeline import _decode_for, model_test_data

    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    if not seeds:
        parser.error("--seeds needs at least one seed")
    OldAPGD = apgd_before_fix()
    found = [m for m in models(Path(args.work)) if fnmatch.fnmatch(m[0], args.study)]
    if not found:
        print(f"no finished study unit with its models under {args.work}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for study, unit, variant, folder in found:
        model, records, root, meta = model_test_data(folder)
        model.eval()
        test, _ = _decode_for(model, records, root, meta["classes"])
        x, y = to_model_input(test.pixels), test.labels
        clean = correct_under(model, x, y).float().mean().item()
        for eps in EPS:
            row = {"study": study, "unit": unit, "model": variant, "eps": round(eps, 7), "images": len(y),
                   "clean": clean, "dataset": meta["dataset"], "protocol": meta["protocol"],
                   "backbone": meta["backbone"], "input_size": meta["input_size"], "epochs": meta["epochs"],
                   "seed": meta["seed"]}
            started = time.perf_counter()
            pgd = make_attack("pgd", eps, steps=10, seed=0)
            row["pgd10"] = correct_under(model, x, y, pgd, 128).float().mean().item()
            row["pgd10_seconds"] = round(time.perf_counter() - started, 2)
            for name, make in (("apgd_before_fix", lambda seed: OldAPGD(eps, steps=args.steps, seed=seed)),
                               ("apgd_fixed", lambda seed: make_attack("apgd", eps, steps=args.steps, seed=seed))):
                started = time.perf_counter()
                by_seed = [correct_under(model, x, y, make(seed), 128).float().mean().item() for seed in seeds]
                row[name], row[f"{name}_by_seed"] = sum(by_seed) / len(by_seed), by_seed
                row[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
            rows.append(row)
            print(f"{study} {unit} {variant} eps {eps:.4g}: PGD-10 {row['pgd10']:.2%}, APGD-CE before fix "
                  f"{row['apgd_before_fix']:.2%}, fixed {row['apgd_fixed']:.2%}", flush=True)
    weaker = [r for r in rows if r["apgd_fixed"] > r["apgd_before_fix"] + 1e-9]
    result = {"what": __doc__.splitlines()[0], "before_fix_commit": BEFORE_FIX, "steps": args.steps, "work": args.work,
              "restarts": 1, "seed": seeds[0] if len(seeds) == 1 else None, "seeds": seeds,
              "torch": torch.__version__, "rows": rows,
              "fixed_weaker_on": [f"{r['study']} {r['unit']} {r['model']} eps {r['eps']:g}" for r in weaker]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(markdown(result))
    print(f"wrote {out / 'report.md'}; fixed weaker on {len(weaker)} of {len(rows)} model x eps")
    return 1 if weaker else 0


if __name__ == "__main__":
    sys.exit(main())
