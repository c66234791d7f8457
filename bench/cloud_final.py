"""The cloud tier's long run (issue 18, item 1): the levers that beat the baseline in the ablation
(bench/cloud_levers.py), combined into one recipe, trained longer, then scored on FER2013
PrivateTest with one crop, flip and ten-crop.

    python bench/cloud_final.py [--levers results/cloud_levers/levers.json] [--epochs 100]
        [--margin 0.8] [--name fer2013-final] [--work runs/cloud_final] [--out results/cloud_pretrain]
        [--device auto] [--data-root DIR] [--dry-run]

The rule that picks the recipe was written before the ablation's results were in:
- a lever is taken when its PublicTest accuracy (best epoch) beats the baseline's by more than
  --margin points (0.8: about the standard error of a 3,589-image accuracy near 68%). PublicTest
  picks; PrivateTest, the test, is never looked at for the choice.
- mixup and CutMix change the same thing: of the two, only the one with the higher PublicTest.
- wider and deeper both taken: WideDeepCNN (both changes; 4.4M parameters).
- schedule-2x is no flag: the run's length is --epochs, and recipe.md says whether the ablation
  found a longer schedule paid. float32 is taken like any lever (it costs ~1.8x the time).

Writes OUT/NAME/recipe.json and recipe.md (every lever's PublicTest gain and whether it was
taken) before training, then trains `emoshield cloud pretrain` in WORK/NAME (re-running the command
resumes it from its last epoch; a WORK made with another recipe is refused), adds the entry to
WORK/library, copies the run's report, metrics, history and plots to OUT/NAME (as
scripts/collect_pretrain.py does) and its one-crop / flip / ten-crop figures to OUT/NAME/tta.json
(scripts/pretrain_tta.py), which RESULTS.md's cloud-tier table reads. `--dry-run` prints the
recipe and stops (it also reads an ablation still in progress: levers not yet trained are 'not
measured')."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

from cloud_levers import BASELINE, LEVERS, lever_flags  # noqa: E402

# levers that change the same setting: at most one of a group is taken (the higher PublicTest)
EXCLUSIVE = [("mixup", "cutmix")]
# taken together, these two become one backbone that has both changes
BOTH_BACKBONES = {frozenset({"wider", "deeper"}): "widedeepcnn"}
NOT_A_FLAG = {"baseline", "schedule-2x"}  # the baseline is the start; the length is --epochs


class RecipeError(Exception):
    """The ablation table cannot give a recipe (missing, damaged, or incomplete)."""


def read_levers(path: Path, partial: bool = False, quick: bool = False) -> dict[str, dict]:
    """The ablation's rows by lever name, each with a numeric public_test; refuses a table that is
    damaged, lacks the baseline, is not complete (unless `partial`: a dry run) or is of a slice of
    the data (unless `quick`: a quick run on a slice itself)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise RecipeError(f"{path}: not a readable lever table ({type(error).__name__})") from None
    runs = table.get("runs") if isinstance(table, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in runs):
        raise RecipeError(f"{path}: not a lever table (no list of named runs)")
    rows = {}
    for r in runs:
        score = r.get("public_test")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
            raise RecipeError(f"{path}: lever {r['name']!r} has no PublicTest accuracy in [0, 1]")
        rows[r["name"]] = r
    if "baseline" not in rows:
        raise RecipeError(f"{path}: no baseline row")
    if table.get("limit_per_class") is not None and not (partial or quick):
        raise RecipeError(f"{path}: an ablation on a slice (limit_per_class {table['limit_per_class']}), not a result")
    if not partial and (table.get("complete") is not True or not set(LEVERS) <= set(rows)):
        missing = [n for n in LEVERS if n not in rows]
        raise RecipeError(f"{path}: the ablation is not complete (still to train: {', '.join(missing) or '?'})")
    return rows


def choose(rows: dict[str, dict], margin: float) -> dict:
    """The recipe: which levers are taken and why, and the pretrain flags they make."""
    base = rows["baseline"]["public_test"]
    gains = {n: 100 * (rows[n]["public_test"] - base) for n in LEVERS if n in rows and n != "baseline"}
    winners = {n for n, g in gains.items() if g > margin and n not in NOT_A_FLAG}
    reasons = {n: (f"+{g:.1f} > {margin:g} points" if n in winners else f"{g:+.1f} <= {margin:g} points")
               for n, g in gains.items()}
    for group in EXCLUSIVE:
        taken = sorted((n for n in group if n in winners), key=lambda n: -gains[n])
        for loser in taken[1:]:
            winners.discard(loser)
            reasons[loser] += f", but {taken[0]} gained more (they change the same thing)"
    flags = list(BASELINE)
    for name in (n for n in LEVERS if n in winners):  # the ablation's order: later flags override
        flags += lever_flags(name)[0]
    for pair, backbone in BOTH_BACKBONES.items():
        if pair <= winners:
            flags += ["--backbone", backbone]
            for n in pair:
                reasons[n] += f" (with {', '.join(sorted(pair - {n}))}: {backbone})"
    for n in LEVERS:
        if n not in rows and n != "baseline":
            reasons[n] = "not measured"
    if "schedule-2x" in gains:
        reasons["schedule-2x"] = (f"{gains['schedule-2x']:+.1f} points: a longer schedule "
                                  f"{'paid' if gains['schedule-2x'] > margin else 'did not pay'} (the length is --epochs)")
    return {"baseline_public_test": base, "margin_points": margin, "gains_points": gains,
            "taken": [n for n in LEVERS if n in winners], "reasons": reasons, "flags": flags}


def recipe_markdown(recipe: dict, name: str) -> str:
    lines = [f"# {name}: the cloud tier's long run, its recipe", "",
             f"Chosen by `bench/cloud_final.py` from `{recipe['levers']}` (FER2013 official split, SmallCNN baseline, "
             f"{recipe['ablation_epochs']} epochs per lever, seed 0): a lever is taken when its PublicTest accuracy "
             f"(best epoch) beats the baseline's ({100 * recipe['baseline_public_test']:.1f}%) by more than "
             f"{recipe['margin_points']:g} points; PrivateTest was not looked at.", "",
             "| lever | PublicTest vs baseline (points) | taken | why |", "|---|---:|---|---|"]
    for n in LEVERS:
        if n == "baseline":
            continue
        gain = recipe["gains_points"].get(n)
        lines.append(f"| {n} | {'' if gain is None else f'{gain:+.1f}'} | {'yes' if n in recipe['taken'] else 'no'} "
                     f"| {recipe['reasons'].get(n, '')} |")
    lines += ["", f"Training: `emoshield cloud pretrain {' '.join(recipe['flags'])} --epochs {recipe['epochs']}` "
              f"({recipe['epochs']} epochs).", ""]
    return "\n".join(lines)


def check_work(work: Path, recipe: dict) -> None:
    """Refuses a work folder begun with another recipe or length: resumed, it would mix two runs."""
    path = work / "recipe.json"
    if path.is_file():
        try:
            had = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RecipeError(f"{path} is unreadable ({type(error).__name__}); delete {work} or pass another --work")
        if not isinstance(had, dict) or (had.get("flags"), had.get("epochs")) != (recipe["flags"], recipe["epochs"]):
            raise RecipeError(f"{work} was begun with another recipe ({path}); pass another --work")


def finished(out: Path, recipe: dict) -> bool:
    """OUT/NAME holds this recipe's scored run: its recipe.json is this one and tta.json is there."""
    try:
        had = json.loads((out / "recipe.json").read_text())
        json.loads((out / "tta.json").read_text())["accuracy"]["tencrop"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return False
    return isinstance(had, dict) and (had.get("flags"), had.get("epochs")) == (recipe["flags"], recipe["epochs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default="results/cloud_levers/levers.json", help="the ablation's table")
    parser.add_argument("--epochs", type=int, default=100, help="length of the long run (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.8,
                        help="PublicTest points a lever must gain to be taken (default: %(default)s)")
    parser.add_argument("--name", default="fer2013-48px-final", help="library entry and results folder name")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=os.environ.get("EMOSHIELD_DATA"))
    parser.add_argument("--limit-per-class", type=int, help="a quick run on a slice (tests; not a result)")
    parser.add_argument("--work", default="runs/cloud_final")
    parser.add_argument("--out", default="results/cloud_pretrain")
    parser.add_argument("--dry-run", action="store_true", help="print the recipe and stop")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.margin < 0:
        parser.error("--epochs must be >= 1 and --margin >= 0")
    from emoshield.models.library import check_name
    from emoshield.errors import EmoshieldError

    try:
        check_name(args.name)
        rows = read_levers(Path(args.levers), partial=args.dry_run, quick=args.limit_per_class is not None)
        recipe = {**choose(rows, args.margin), "epochs": args.epochs, "levers": args.levers,
                  "ablation_epochs": json.loads(Path(args.levers).read_text()).get("epochs"),
                  "limit_per_class": args.limit_per_class}
        work, out = Path(args.work) / args.name, Path(args.out) / args.name
        if args.dry_run:
            print(recipe_markdown(recipe, args.name))
            return 0
        check_work(work, recipe)
        if finished(out, recipe):
            print(f"{out}: trained and scored already (tta.json); nothing to do")
            return 0
    except (RecipeError, EmoshieldError) as error:
        print(f"cloud_final: {error}", file=sys.stderr)
        return 2
    from emoshield.paths import write_atomic
    from emoshield.reproduce import tied_to_this_process

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record = json.dumps(recipe, indent=1).encode()
    write_atomic(work / "recipe.json", record)
    write_atomic(out / "recipe.json", record)
    write_atomic(out / "recipe.md", recipe_markdown(recipe, args.name).encode())
    command = [sys.executable, "-m", "emoshield", "cloud", "pretrain", *recipe["flags"], "--epochs", str(args.epochs),
               "--name", args.name, "--library", str(Path(args.work) / "library"), "--work", str(work / "run"),
               "--force", "--quiet", "--device", args.device]
    if args.data_root:
        command += ["--data-root", args.data_root]
    if args.limit_per_class:
        command += ["--limit-per-class", str(args.limit_per_class)]
    print(f"{time.strftime('%H:%M:%S')} {args.name}: taken {', '.join(recipe['taken']) or 'nothing (the baseline)'}; "
          f"training {args.epochs} epochs (log: {work / 'train.log'})", flush=True)
    with open(work / "train.log", "a") as log:  # the training dies with this process
        rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=tied_to_this_process()).returncode
    if rc != 0:
        print(f"cloud_final: the training failed (exit {rc}); see {work / 'train.log'}", file=sys.stderr)
        return 1
    from collect_pretrain import FILES
    import pretrain_tta

    for name in FILES:
        if (work / "run" / name).is_file():
            shutil.copy2(work / "run" / name, out / name)
    tta = ["--model", str(work / "run"), "--into", str(out)]
    if args.data_root:
        tta += ["--data-root", args.data_root]
    if args.limit_per_class:
        tta += ["--limit-per-class", str(args.limit_per_class)]
    if pretrain_tta.main(tta) != 0:
        return 1
    print(f"wrote {out}: recipe.md, report.md, metrics.json, tta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
