"""The cloud tier's levers, one at a time (issue 18, items 1 and 5): each variant is the shipped
FER2013 recipe with one change, trained with the same seed and epochs on FER2013's official split
(PublicTest picks the epoch, PrivateTest is the test), so the table shows what each lever is worth.

    python bench/cloud_levers.py [--epochs 30] [--only baseline,cutmix,...] [--device auto]
        [--limit-per-class N] [--work runs/cloud_levers] [--out results/cloud_levers]

The baseline is the recipe of the shipped `smallcnn-fer2013-48px` (RESULTS.md "The cloud tier"):
SmallCNN from scratch, 48 px, batch 64, SGD lr 0.02 momentum 0.9, weight decay 5e-4, cosine,
`--augment standard`, `--amp` (bfloat16 where the CPU has it natively, else float32: the table
says which ran). Each variant is one `emoshield cloud pretrain` run in WORK/NAME: re-running the
same command resumes the interrupted one and skips finished ones, so the set can span sessions
(about an hour per 30-epoch SmallCNN variant on 2 CPU cores; wider/deeper nets and 2x schedules
cost more). A run made with other epochs or data than asked is refused, not mixed in. Several
processes may run the same command side by side (scripts/studies.py's workers do): each variant
is trained by one of them (lock file WORK/NAME.lock), the others move on to the next.

Writes OUT/levers.json (every run's settings, per-epoch history and figures), OUT/levers.md (the
ablation table) and OUT/levers.png (PublicTest accuracy per epoch) after every finished variant,
with every lever finished in WORK (`--only` picks what this process trains, not the table's rows):
while some are still to train, levers.json says complete false and names them under pending. The
table's rows are results: a lever with a row is not trained again, even when its work folder is
gone (another machine, another session), and rows are never dropped; OUT must be of the same
epochs and data."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = ["--backbone", "smallcnn", "--weights", "scratch", "--input-size", "48", "--batch-size", "64",
            "--lr", "0.02", "--schedule", "cosine", "--augment", "standard", "--optimizer", "sgd",
            "--amp", "--seed", "0"]

# name -> (what changes, the flags that change it; later flags override the baseline's)
LEVERS: dict[str, tuple[str, list[str]]] = {  # trained in this order: the likeliest gains first
    "baseline": ("the shipped recipe", []),
    "wider": ("WideCNN: 1.5x the channels (2.6M parameters)", ["--backbone", "widecnn"]),
    "schedule-2x": ("twice the epochs (same cosine shape)", ["--epochs-factor", "2"]),
    "augment-strong": ("`--augment strong` (+ light jitter, random erasing)", ["--augment", "strong"]),
    # the head sees where on the face a feature is (the 3x3 map of a 48 px face), not only its average
    "spatial-head": ("localization head on the 3x3 feature map (`--pooling grid:3`)", ["--pooling", "grid:3"]),
    "deeper": ("DeepCNN: 3 conv layers per block (2.0M parameters)", ["--backbone", "deepcnn"]),
    "mixup": ("mixup, alpha 0.2", ["--mix", "mixup", "--mix-alpha", "0.2"]),
    # not a lever: the baseline again with another seed, the run-to-run spread every difference in
    # this table carries (one seed each); bench/cloud_final.py reports it beside the margin, takes
    # nothing. Before the remaining levers, so the noise they are read against is known first.
    "baseline-seed1": ("the baseline again, seed 1 (run-to-run noise)", ["--seed", "1"]),
    "cutmix": ("CutMix, alpha 1.0", ["--mix", "cutmix", "--mix-alpha", "1.0"]),
    "label-smoothing": ("label smoothing 0.1", ["--label-smoothing", "0.1"]),
    "adamw": ("AdamW lr 0.001, weight decay 0.05", ["--optimizer", "adamw", "--lr", "0.001",
                                                    "--weight-decay", "0.05"]),
    # bfloat16's price in accuracy (the baseline's --amp; on a CPU without native bfloat16 both run
    # float32 and the precision column says so)
    "float32": ("float32 training (`--no-amp`)", ["--no-amp"]),
    # a third seed of the baseline (added 2026-12-06 for the core float32's run leaves idle): two
    # seeds are one difference, three give the spread; like seed 1 it is reported, never taken
    "baseline-seed2": ("the baseline again, seed 2 (run-to-run noise)", ["--seed", "2"]),
}
# the rows that are the baseline with another seed: the noise, not levers
SEED_ROWS = tuple(n for n in LEVERS if n.startswith("baseline-seed"))


def seed_spread(rows: dict[str, dict], key: str = "public_test") -> float | None:
    """Sample standard deviation, in points, of KEY over the baseline and its other-seed rows
    (None with fewer than two): the run-to-run noise every one-seed difference carries."""
    values = [rows[n][key] for n in ("baseline", *SEED_ROWS)
              if n in rows and isinstance(rows[n].get(key), (int, float)) and not isinstance(rows[n][key], bool)]
    return 100 * statistics.stdev(values) if len(values) >= 2 else None


def lever_flags(name: str) -> tuple[list[str], int]:
    """A lever's own pretrain flags, and the factor it multiplies the epochs by."""
    flags = list(LEVERS[name][1])
    factor = 1
    if "--epochs-factor" in flags:
        i = flags.index("--epochs-factor")
        factor = int(flags[i + 1])
        del flags[i:i + 2]
    return flags, factor


def variant_args(name: str, epochs: int) -> list[str]:
    """The pretrain flags of one variant: the baseline's, then the lever's (argparse keeps the last)."""
    flags, factor = lever_flags(name)
    return [*BASELINE, "--epochs", str(epochs * factor), *flags]


def _flag(args: list[str], name: str) -> str:
    return args[len(args) - 1 - args[::-1].index(name) + 1]


def _finished(name: str, args: argparse.Namespace) -> bool:
    return (Path(args.work) / name / "metrics.json").is_file() and \
        (Path(args.work) / "library" / f"lever-{name}").is_dir()


def check_settings(name: str, args: argparse.Namespace) -> None:
    """Refuses a variant's folder made with other epochs or data than asked: resumed, it would mix
    two runs; in the table, it would be another ablation's row."""
    work = Path(args.work) / name
    if (work / "run.json").is_file():
        run = json.loads((work / "run.json").read_text())
        asked = {"epochs": int(_flag(variant_args(name, args.epochs), "--epochs")),
                 "limit_per_class": args.limit_per_class}
        had = {"epochs": run["train_config"]["epochs"], "limit_per_class": run["data_options"].get("limit_per_class")}
        if had != asked:
            raise SystemExit(f"{work} was trained with {had}, not {asked}: pass another --work or delete it")


def pretrain_command(flags: list[str], name: str, work: Path, args: argparse.Namespace,
                     library: Path | None = None) -> list[str]:
    """`emoshield cloud pretrain FLAGS` as library entry NAME (into LIBRARY; None: the user's
    library) trained in WORK, on args' device, data root and slice."""
    command = [sys.executable, "-m", "emoshield", "cloud", "pretrain", *flags, "--name", name, "--work", str(work),
               "--force", "--quiet", "--device", args.device]
    if library is not None:
        command += ["--library", str(library)]
    if args.data_root:
        command += ["--data-root", args.data_root]
    if args.limit_per_class:
        command += ["--limit-per-class", str(args.limit_per_class)]
    return command


def run_logged(command: list[str], log: Path) -> int:
    """Runs COMMAND with its output appended to LOG; the child dies with this process (and so with
    any lock this process holds for it)."""
    from emoshield.reproduce import tied_to_this_process

    with open(log, "a") as out:
        return subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              preexec_fn=tied_to_this_process()).returncode


def train_variant(name: str, args: argparse.Namespace) -> bool:
    """Train (or resume) one variant unless it is finished (then False); refuses a run of other
    epochs or data."""
    command = pretrain_command(variant_args(name, args.epochs), f"lever-{name}", Path(args.work) / name, args,
                               library=Path(args.work) / "library")
    check_settings(name, args)
    if _finished(name, args):
        return False
    print(f"{time.strftime('%H:%M:%S')} {name}: {' '.join(command[3:])}", flush=True)
    rc = run_logged(command, Path(args.work) / f"{name}.log")
    if rc != 0:
        raise subprocess.CalledProcessError(rc, command)
    return True


def variant_row(name: str, args: argparse.Namespace) -> dict:
    """A finished variant's row of the table, read from its training folder."""
    work = Path(args.work) / name
    metrics = json.loads((work / "metrics.json").read_text())
    run = json.loads((work / "run.json").read_text())
    history = json.loads((work / "history.json").read_text())
    from emoshield.models import load_model

    model = load_model(work)
    parameters = sum(p.numel() for p in model.parameters())
    return {"name": name, "change": LEVERS[name][0], "flags": variant_args(name, args.epochs), "backbone": run["backbone"],
            "parameters": parameters, "epochs": run["train_config"]["epochs"], "seed": run["train_config"]["seed"],
            "train_config": run["train_config"], "counts": run["counts"], "device": run.get("device"),
            "precision": metrics.get("precision", "not recorded"),
            "best_epoch": metrics.get("best_epoch"), "public_test": metrics.get("best_val_score"),
            "private_test": metrics["test_accuracy"], "private_test_balanced": metrics["balanced_accuracy"],
            "train_seconds": metrics.get("train_seconds"),
            # the median: an epoch that spanned a pause (SIGSTOP for a test run, a suspended session) is not speed
            "seconds_per_epoch": statistics.median(h["seconds"] for h in history),
            "history": [{k: h.get(k) for k in ("epoch", "train_loss", "train_accuracy", "val_accuracy", "seconds")} for h in history],
            "git_commit": metrics.get("git_commit")}


def table_rows(args: argparse.Namespace) -> dict[str, dict]:
    """The rows OUT's levers.json already has, by lever ({} when there is none or it is
    unreadable). They are results: kept whether or not their training folders are still here (a
    session on another machine adds the levers it trains to them). A table of other epochs or data
    is refused, not mixed with."""
    path = Path(args.out) / "levers.json"
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:  # a damaged table is not "no rows": they would be lost
        raise SystemExit(f"{path} is unreadable ({type(error).__name__}); repair or move it") from None
    if not isinstance(table, dict) or not isinstance(table.get("runs"), list) or \
            not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in table["runs"]):
        raise SystemExit(f"{path} is not a lever table; repair or move it")
    made = {"epochs": table.get("epochs"), "limit_per_class": table.get("limit_per_class")}
    asked = {"epochs": args.epochs, "limit_per_class": args.limit_per_class}
    if made != asked:
        raise SystemExit(f"{path} is a table of {made}, not {asked}: pass another --out")
    return {r["name"]: r for r in table["runs"]}  # levers dropped from LEVERS since keep their rows


def write_outputs(args: argparse.Namespace, only_if_changed: bool = False) -> list[dict]:
    """levers.json/.md/.png: the rows OUT already has plus every lever finished in WORK (by this
    process or another, whatever --only this one was given), under a lock in OUT, so the last
    writer sees every variant finished before it wrote; rows are never dropped. 'complete' says
    whether every lever has a row ('pending' names the rest). With `only_if_changed`, nothing is
    written when WORK has no lever the table lacks (an idle worker re-runs this every minute)."""
    from emoshield.paths import write_atomic
    from emoshield.reproduce import report_lock

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with report_lock(out / "levers"):
        rows = table_rows(args)
        new = [n for n in LEVERS if _finished(n, args) and n not in rows]
        if not rows and not new or only_if_changed and not new:
            return []
        for name in [n for n in LEVERS if _finished(n, args)]:  # this WORK's trainings: their rows are fresh
            check_settings(name, args)
            rows[name] = variant_row(name, args)
        ordered = [rows[n] for n in LEVERS if n in rows] + [r for n, r in rows.items() if n not in LEVERS]
        pending = [n for n in LEVERS if n not in rows]
        write_atomic(out / "levers.json", json.dumps(
            {"epochs": args.epochs, "limit_per_class": args.limit_per_class, "levers": list(LEVERS),
             "complete": not pending, "pending": pending, "baseline_flags": BASELINE, "runs": ordered},
            indent=1).encode())
        write_atomic(out / "levers.md", markdown(ordered, args, pending).encode())
        plot(ordered, out / "levers.png")
    return ordered


def markdown(rows: list[dict], args: argparse.Namespace, pending: list[str] = ()) -> str:
    base = next((r for r in rows if r["name"] == "baseline"), None)
    counts = rows[0]["counts"]
    lines = ["# The cloud tier's levers on FER2013, one at a time", "",
             f"FER2013 official split: train {counts['train']}, PublicTest {counts['val']} (picks the epoch), "
             f"PrivateTest {counts['test']} (the test){'' if not args.limit_per_class else f', at most about {args.limit_per_class} images per class (a quick run, not a result)'}; "
             f"7 classes, 48 px, one crop, seed {rows[0]['seed']}, {args.epochs} epochs unless the lever changes it. "
             "Baseline = the shipped `smallcnn-fer2013-48px` recipe (SmallCNN from scratch, batch 64, SGD lr 0.02, "
             "cosine, `--augment standard`). Every other row changes one thing. Command: "
             f"`python bench/cloud_levers.py --epochs {args.epochs} --work {shown_path(args.work)} --out {args.out}`.", "",
             "| lever | change | backbone | parameters | epochs | PublicTest (best epoch) | vs baseline | PrivateTest | "
             "vs baseline | balanced | train (last epoch) | s/epoch | precision | device |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        def delta(key: str) -> str:
            return "" if base is None or r is base else f"{100 * ((r[key] or 0) - (base[key] or 0)):+.1f}"

        lines.append(f"| {r['name']} | {r['change']} | {r['backbone']} | {r['parameters'] / 1e6:.2f}M | {r['epochs']} | "
                     f"{100 * (r['public_test'] or 0):.1f} ({r['best_epoch']}) | {delta('public_test')} | "
                     f"**{100 * r['private_test']:.1f}** | {delta('private_test')} | "
                     f"{100 * r['private_test_balanced']:.1f} | {last_train_accuracy(r)} | {r['seconds_per_epoch']:.0f} | "
                     f"{r['precision']} | {r['device']} |")
    mixed = [r["name"] for r in rows if base is not None and r["name"] not in ("baseline", "float32")
             and r["precision"] != base["precision"]]
    if mixed:  # another machine (no native bfloat16) trained them: their difference includes the precision's
        lines += ["", f"**Trained in another precision than the baseline ({base['precision']}): {', '.join(mixed)}**; "
                  "their 'vs baseline' includes the precision's effect (the float32 row measures it)."]
    if pending:
        lines += ["", f"Still training (re-run the command to go on): {', '.join(pending)}."]
    lines += ["", "train (last epoch): accuracy on the training batches as trained (augmented; a mixed image counts "
              "each of its two labels by its weight), beside PublicTest's it shows how far a lever overfits.", "",
              "s/epoch: median wall seconds per epoch of each run (an epoch that spanned a pause does not "
              "count); the runs do not share a process, so compare them "
              "only roughly (shared machines drift). One seed: differences under ~0.8 points (the standard error "
              "of a 3,589-image accuracy near 68%) are noise. bench/cloud_final.py picks levers by the PublicTest "
              "difference (more than 0.8 points); PrivateTest is the test.", ""]
    by_name = {r["name"]: r for r in rows}
    spread = {k: seed_spread(by_name, k) for k in ("public_test", "private_test")}
    if all(v is not None for v in spread.values()):
        seeds = [n for n in ("baseline", *SEED_ROWS) if n in by_name]
        lines[-1:] = [f"Run-to-run spread measured: the baseline with {len(seeds)} seeds ({', '.join(seeds)}) has a "
                      f"sample standard deviation of {spread['public_test']:.2f} points on PublicTest and "
                      f"{spread['private_test']:.2f} on PrivateTest.", ""]
    return "\n".join(lines)


def shown_path(path) -> str:
    """A path as a reader can re-type it on their own machine: the home folder as '~'."""
    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + "/") else text


def last_train_accuracy(row: dict) -> str:
    """The last epoch's training accuracy in percent ('' for a row saved before it was kept)."""
    value = (row.get("history") or [{}])[-1].get("train_accuracy")
    return "" if value is None else f"{100 * value:.1f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.plot([h["epoch"] for h in r["history"]], [100 * (h["val_accuracy"] or 0) for h in r["history"]],
                label=f"{r['name']} ({100 * r['private_test']:.1f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("PublicTest accuracy (%)")
    ax.set_title("FER2013: one lever at a time (legend: PrivateTest %)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.{os.getpid()}.png")  # whole files only, as levers.json
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every run (schedule-2x: twice)")
    parser.add_argument("--only", default="", help=f"comma-separated levers (default: all: {', '.join(LEVERS)})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=os.environ.get("EMOSHIELD_DATA"))
    parser.add_argument("--limit-per-class", type=int, help="a quick run on a slice (not a result)")
    parser.add_argument("--work", default="runs/cloud_levers")
    parser.add_argument("--out", default="results/cloud_levers")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(LEVERS)
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {', '.join(unknown)}; levers: {', '.join(LEVERS)}")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    table_rows(args)  # before any training: a damaged table, or one of other epochs or data, is refused
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from emoshield.reproduce import step_lock

    busy = []
    for name in names:  # one process per variant (lock WORK/NAME.lock): several workers share the set
        if name in table_rows(args) and not _finished(name, args):  # read again: another WORK may have added it
            print(f"{name}: in {args.out}/levers.json already (trained in an earlier work folder)", flush=True)
            continue
        with step_lock(Path(args.work) / name) as mine:
            if not mine:
                busy.append(name)
                print(f"{name}: training in another process", flush=True)
                continue
            try:
                trained = train_variant(name, args)
            except subprocess.CalledProcessError as exc:
                print(f"{name}: the training failed (exit {exc.returncode}); see "
                      f"{Path(args.work) / (name + '.log')}", file=sys.stderr)
                return 1
        row = variant_row(name, args)
        print(f"{name}: PrivateTest {100 * row['private_test']:.1f}% (best epoch {row['best_epoch']})", flush=True)
        if trained:
            write_outputs(args)  # the table grows variant by variant
    rows = write_outputs(args, only_if_changed=True)  # an idle re-run (a waiting worker) writes nothing
    if rows:
        print(f"wrote {Path(args.out) / 'levers.md'}, levers.json, levers.png ({len(rows)} of {len(LEVERS)} levers)")
    if busy:
        print(f"left to other processes: {', '.join(busy)}; re-run when they are done for the whole table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
