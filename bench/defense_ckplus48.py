"""Undefended vs defended (SPEC §6: S = {FGSM, R+FGSM}, beta0 0.5, eps 0.01) on CK+48, 5 classes,
same backbone, epochs and seed, under the reference and subject (fold 0) protocols; each
defended model is evaluated against its undefended twin with FGSM/R+FGSM/PGD/APGD, AutoAttack
(at 0.01 and 8/255) and the camera corruptions.

    .venv/bin/python bench/defense_ckplus48.py [--data-root DIR] [--epochs 50] [--protocols reference,subject]
    (also --protocols prototype: reference frames split 2 train / 0 val / 1 test, last epoch kept)

Writes results/defense_ckplus48/<protocol>/ (report.md, robustness.json, PNGs) and
results/defense_ckplus48/summary.{json,md} (after each protocol); training folders stay under
--work (not committed). Interrupted runs resume: trainings from their checkpoints, the evaluation
from its last attack batch, and a protocol whose row is already in the summary with AutoAttack and
these settings is skipped (--force re-runs it), so a run that spans sessions does each once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emoshield.reproduce import headline as _headline  # noqa: E402

CLASSES = "happy,sad,surprise,disgust,fear"
# "prototype": the reference frame split without validation frames (2 train / 1 test per CK+
# sequence, last epoch kept), as the prototype quoted in issue 3 did
PROTOCOL_ARGS = {"prototype": ["--protocol", "reference", "--val-fraction", "0"]}
AUTOATTACK_EPS = "0.01,0.0313725"  # the defense's eps and RobustBench's 8/255


def emoshield(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "emoshield", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--input-size", default="64")
    parser.add_argument("--epochs", default="50")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--protocols", default="reference,subject")
    parser.add_argument("--attack-bn", default="eval", choices=["train", "eval"],
                        help="BatchNorm mode that generates the training perturbations")
    parser.add_argument("--out", default="results/defense_ckplus48")
    parser.add_argument("--work", default="runs/defense_ckplus48")
    parser.add_argument("--force", action="store_true",
                        help="re-evaluate protocols whose row (with AutoAttack, same settings) is already in OUT "
                             "(their models are retrained only if their work folders are gone)")
    args = parser.parse_args()
    data = ["--data-root", args.data_root] if args.data_root else []
    summary_path = Path(args.out) / "summary.json"  # rows of other protocols are kept
    summary = _read_summary(summary_path)
    for protocol in args.protocols.split(","):
        if not args.force and _finished(summary, protocol, args):
            print(f"{protocol}: already in {summary_path} with AutoAttack (--force re-runs it)", flush=True)
            continue
        split = PROTOCOL_ARGS.get(protocol, ["--protocol", protocol])
        common = ["--dataset", "ckplus48", *data, "--classes", CLASSES, *split, "--fold", "0",
                  "--backbone", args.backbone, "--weights", args.weights, "--input-size", args.input_size,
                  "--epochs", args.epochs, "--seed", args.seed, "--quiet"]
        dirs = {}
        defended = ["--defense", "fgsm:0.5,rfgsm:0.5", "--beta0", "0.5", "--eps", "0.01",
                    "--attack-bn", args.attack_bn]
        for variant, extra in (("undefended", []), ("defended", defended)):
            suffix = "-evalbn" if variant == "defended" and args.attack_bn == "eval" else ""
            # the settings in the name: a work folder kept across runs never hands over a model
            # trained with other epochs, input size, weights or seed
            settings = f"{args.backbone}-{args.weights}-{args.input_size}px-{args.epochs}ep-seed{args.seed}"
            run_dir = Path(args.work) / f"{protocol}-{settings}-{variant}{suffix}"
            dirs[variant] = run_dir
            if not (run_dir / "metrics.json").is_file():
                resume = ["--resume"] if (run_dir / "checkpoint.safetensors").is_file() else []
                started = time.perf_counter()
                emoshield("train", *common, *extra, "--out", str(run_dir), *resume)
                print(f"{protocol} {variant}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        out = Path(args.out) / protocol
        started = time.perf_counter()
        # attack checkpoints beside the models (WORK), not under OUT in the checkout: a fresh checkout
        # on the same machine resumes a stopped evaluation too
        emoshield("evaluate", "--model", str(dirs["defended"]), "--baseline", str(dirs["undefended"]),
                  "--attacks", "fgsm,rfgsm,pgd,apgd,autoattack", "--eps", "0.005,0.01,0.015",
                  "--autoattack-eps", AUTOATTACK_EPS, "--corruptions", "all", "--out", str(out),
                  "--checkpoints", str(Path(args.work) / f"evaluation-{protocol}-{settings}"))
        evaluation_seconds = time.perf_counter() - started
        result = json.loads((out / "robustness.json").read_text())
        epoch_seconds = {v: [r["seconds"] for r in json.loads((d / "history.json").read_text())]
                         for v, d in dirs.items()}
        summary = [row for row in summary if row["protocol"] != protocol]
        summary.append({
            "protocol": protocol, "model": result["model"], "baseline": result["baseline"],
            "defended": _headline(result["robustness"]), "undefended": _headline(result["baseline_robustness"]),
            "masking_checks": result["robustness"].get("masking_checks"),
            "sanity_flags": result["robustness"].get("sanity_flags", []),
            "seconds_per_epoch": {v: sum(s) / len(s) for v, s in epoch_seconds.items()},
            "evaluation_seconds": evaluation_seconds,
        })
        _write(summary, args)  # after each protocol: a run cut off later keeps this one
    _write(summary, args)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def _short_commit(commit: str | None) -> str:
    sha, _, dirty = str(commit or "unknown").partition("+")
    return sha[:12] + ("+" + dirty if dirty else "")  # keep '+dirty': uncommitted code made that row


def _read_summary(path: Path) -> list[dict]:
    """The rows written so far; a missing, damaged or foreign file counts as none (the protocols
    are run again), never as a crash that would stop the stage for good."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return []
    ok = lambda r: (isinstance(r, dict) and isinstance(r.get("protocol"), str)  # noqa: E731
                    and all(isinstance(r.get(k), dict) for k in ("model", "defended", "undefended")))
    return [r for r in rows if ok(r)] if isinstance(rows, list) else []


def _write(summary: list[dict], args: argparse.Namespace) -> None:
    from emoshield.paths import write_atomic

    Path(args.out).mkdir(parents=True, exist_ok=True)  # whole files only: a stop mid-write leaves the old one
    write_atomic(Path(args.out) / "summary.json", json.dumps(summary, indent=1).encode())
    write_atomic(Path(args.out) / "summary.md", _markdown(summary, args).encode())


def _finished(summary: list[dict], protocol: str, args: argparse.Namespace) -> bool:
    """A protocol's row made with these settings and the current attack set: a run that spans
    sessions does each protocol once (its training folders may be gone, its row is committed)."""
    row = next((r for r in summary if r["protocol"] == protocol), None)
    if row is None or "autoattack@0.01" not in row["defended"]:
        return False
    model, defense = row["model"], row["model"].get("defense")
    attack_bn = defense.get("attack_bn") if isinstance(defense, dict) else None
    return ((model.get("backbone"), str(model.get("input_size")), str(model.get("epochs")), str(model.get("seed")),
             str(model.get("weights", "")).split(":")[0], attack_bn)
            == (args.backbone, args.input_size, args.epochs, args.seed, args.weights.split(":")[0], args.attack_bn))


def _markdown(summary: list[dict], args) -> str:
    keys = ["clean", "fgsm@0.005", "fgsm@0.01", "fgsm@0.015", "rfgsm@0.005", "rfgsm@0.01", "rfgsm@0.015",
            "pgd@0.01", "apgd@0.01", "autoattack@0.01", "worst@0.01", "autoattack@0.0313725"]
    lines = ["# Undefended vs defended: CK+48, 5 classes", "",
             f"{args.backbone} ({args.weights}) + localization head, {args.input_size} px, {args.epochs} epochs, "
             f"seed {args.seed}, SGD 0.01 + Algorithm 1, emoshield's default batch 32 and `--augment strong` "
             "(both models). Defense: S = {FGSM, R+FGSM}, "
             "beta_s = 0.5 each, beta0 = 0.5, eps 0.01, alpha eps/2, perturbations made with the current model "
             f"in every batch ({args.attack_bn}-mode BatchNorm), model selection on the mean of clean, FGSM and R+FGSM "
             "validation accuracy. PGD-10 (random start), APGD-CE-50 and AutoAttack (APGD-CE, APGD-T, FAB-T "
             "100 steps, Square 5000 queries; at eps 0.01 and 8/255 = 0.0314) are unseen in training. "
             "2 CPU cores.", "",
             "| protocol | model | " + " | ".join(keys) + " | s/epoch |", "|---|---|" + "---:|" * (len(keys) + 1)]
    for s in summary:
        for variant in ("undefended", "defended"):
            row = s[variant]
            lines.append(f"| {s['protocol']} | {variant} | " + " | ".join(
                f"{row[k]:.1%}" if k in row else "" for k in keys) + f" | {s['seconds_per_epoch'][variant]:.1f} |")
    if any(s.get("masking_checks") for s in summary):
        lines += ["", "Gradient-masking checks of the defended models: PGD-10 at eps 0.03 / 0.05 / 0.1 (must reach "
                      "~0; where it leaves more than 10% at 0.1, APGD-CE-50 is run there and shown beside it), PGD-10 "
                      "transferred from the undefended twin at 0.01 (must not beat white-box PGD), sanity flags.", "",
                  "| protocol | PGD 0.03 | PGD 0.05 | PGD 0.1 | transfer 0.01 | flags |",
                  "|---|---:|---:|---:|---:|---|"]
        for s in (s for s in summary if s.get("masking_checks")):  # rows of earlier runs had no checks
            checks = s["masking_checks"]
            sweep, transfer = checks.get("sweep", {}), checks.get("transfer", {}).get("0.01", {})
            cells = [f"{sweep[e]:.1%}" if e in sweep else "" for e in ("0.03", "0.05", "0.1")]
            if "0.1" in checks.get("sweep_apgd", {}):  # PGD stayed above 10% there: what APGD-CE left
                cells[2] += f" (APGD-CE {checks['sweep_apgd']['0.1']:.1%})"
            cells.append(f"{transfer['accuracy']:.1%}" if "accuracy" in transfer else "")
            flags = "; ".join(s.get("sanity_flags") or []) or "none"
            lines.append(f"| {s['protocol']} | " + " | ".join(cells) + f" | {flags} |")
    if any(s["protocol"] == "prototype" for s in summary):
        lines += ["", "prototype = the reference frame split without validation frames (CK+48: 2 train / 1 test "
                      "frames per sequence, as the prototype in issue 3), so the last epoch is kept."]
    lines += ["", "Full reports: " + ", ".join(f"[{s['protocol']}]({s['protocol']}/report.md)" for s in summary),
              "", f"Produced by `python bench/defense_ckplus48.py --epochs {args.epochs} --attack-bn {args.attack_bn}"
              f" --out {args.out}`, each protocol's row at its own commit: " + ", ".join(
                  f"{s['protocol']} `{_short_commit(s['model'].get('evaluated_by'))}`" for s in summary)
              + " (rows without AutoAttack columns are from before it was added)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
