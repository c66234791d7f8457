"""The cloud tier's long run (issue 18, item 1): the levers that beat the baseline in the ablation
(bench/cloud_levers.py), combined into one recipe, trained longer, then scored on FER2013
PrivateTest with one crop, flip and ten-crop.

    python bench/cloud_final.py [--levers results/cloud_levers/levers.json] [--epochs 100]
        [--margin 0.8] [--name fer2013-48px-final] [--library DIR] [--work runs/cloud_final]
        [--out results/cloud_pretrain] [--device auto] [--data-root DIR] [--also LEVER,...]
        [--pending LEVER,...] [--dry-run]

The rule that picks the recipe was written before the ablation's results were in:
- a lever is taken when its PublicTest accuracy (best epoch) beats the baseline's by more than
  --margin points (0.8: about the standard error of a 3,589-image accuracy near 68%). PublicTest
  picks; PrivateTest, the test, is never looked at for the choice.
- mixup and CutMix change the same thing: of the two, only the one with the higher PublicTest.
- wider and deeper both taken: WideDeepCNN (both changes; 4.4M parameters).
- schedule-2x is no flag: the run's length is --epochs, and recipe.md says whether the ablation
  found a longer schedule paid. float32 is taken like any lever (it costs ~1.8x the time).

`--also LEVER,...` trains a variant registered beside the rule's recipe: the rule's recipe plus
those levers' flags, whatever the ablation said of them. It answers what a 30-epoch ablation
cannot: a regulariser that under-fits in 30 epochs may pay in a long run. It needs its own
--name; a lever that would undo one the rule took is refused, and so is a variant whose levers
the rule took (SameAsRule: it would be the rule's recipe).

Writes OUT/NAME/recipe.json and recipe.md (every lever's PublicTest gain and whether it was
taken) before training (and removes the result files of a run of another recipe from there), then
trains `emoshield cloud pretrain` in WORK/NAME (re-running the command resumes it from its last
epoch; a WORK begun with another recipe, length or slice of the data is refused), adds the entry
to the library (the user's, where `--weights library:NAME` and the studies find it), copies the
run's report, metrics, history and plots to OUT/NAME (as scripts/collect_pretrain.py does) and its
one-crop / flip / ten-crop figures to OUT/NAME/tta.json (scripts/pretrain_tta.py), which
RESULTS.md's cloud-tier table reads, and the entry's sha256 and size (whether it fits the 15 MB of
an embedded default) to OUT/NAME/entry.json. `--pending LEVER,...` starts the run before those ablation rows
are in (only those; recipe.md names them): once they are in, re-running keeps a scored run whose
flags the rule still gives (rewriting its recipe) and trains anew, the old run moved aside, when the
flags changed. One process per run: a second is refused (an flock on WORK/NAME.lock). `--dry-run` prints the
recipe and stops (it also reads an ablation still in progress: levers not yet trained are 'not
measured')."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

from cloud_levers import BASELINE, LEVERS, SEED_ROWS, _flag, lever_flags, pretrain_command, run_logged, seed_spread  # noqa: E402

# levers that change the same setting: at most one of a group is taken (the higher PublicTest)
EXCLUSIVE = [("mixup", "cutmix")]
# taken together, these two become one backbone that has both changes
BOTH_BACKBONES = {frozenset({"wider", "deeper"}): "widedeepcnn"}
# the baseline is the start; the length is --epochs; the baseline's other seeds measure noise
NOT_A_FLAG = {"baseline", "schedule-2x", *SEED_ROWS}
EMBED_LIMIT_BYTES = 15_000_000  # issue 18: the embedded default's weights stay within 15 MB


class RecipeError(Exception):
    """The ablation table cannot give a recipe (missing, damaged, or incomplete), or a folder holds
    another recipe's run."""


class SameAsRule(RecipeError):
    """An --also variant the rule's recipe already is (the rule took its levers): nothing of its own
    to train (scripts/studies.py counts such a variant stage done)."""


def parse_also(text: str) -> tuple[str, ...]:
    """--also's LEVER,... as a tuple (empty and repeated names dropped); the driver reads its
    stages' with it too."""
    return tuple(dict.fromkeys(n for n in text.split(",") if n))


def _options(flags: list[str]) -> set[str]:
    return {f for f in flags if f.startswith("--")}


def read_levers(path: Path, partial: bool = False, quick: bool = False,
                pending: tuple[str, ...] = ()) -> tuple[dict, dict[str, dict]]:
    """The ablation's table and its rows by lever name, each with a PublicTest accuracy in [0, 1];
    refuses a table that is damaged, lacks the baseline, is not complete (unless `partial`: a dry
    run; or only the `pending` levers are missing) or is of a slice of the data (unless `quick`: a
    quick run on a slice itself)."""
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
    unknown = [n for n in pending if n not in LEVERS or n == "baseline"]
    if unknown:
        raise RecipeError(f"--pending {','.join(unknown)}: not a lever of the ablation")
    missing = [n for n in LEVERS if n not in rows and n not in pending]
    if not partial and (missing or (table.get("complete") is not True and not pending)):
        raise RecipeError(f"{path}: the ablation is not complete (still to train: {', '.join(missing) or '?'})")
    return table, rows


def choose(rows: dict[str, dict], margin: float, also: tuple[str, ...] = (), pending: tuple[str, ...] = ()) -> dict:
    """The recipe: which levers are taken and why, and the pretrain flags they make; `also`:
    levers added whatever the rule says (a registered variant, RecipeError for one it took);
    `pending`: levers whose rows are not in yet, named as such."""
    base = rows["baseline"]["public_test"]
    gains = {n: 100 * (rows[n]["public_test"] - base) for n in LEVERS if n in rows and n != "baseline"}
    winners = {n for n, g in gains.items() if g > margin and n not in NOT_A_FLAG}
    reasons = {n: (f"{g:+.2f} > {margin:g} points" if n in winners else f"{g:+.2f} <= {margin:g} points")
               for n, g in gains.items()}
    reasons.update({n: "not measured" for n in LEVERS if n not in rows and n != "baseline"})
    waiting = [n for n in LEVERS if n in pending and n not in rows]
    reasons.update({n: "not measured yet: the run starts without its row (--pending)" for n in waiting})
    for group in EXCLUSIVE:
        taken = sorted((n for n in group if n in winners), key=lambda n: -gains[n])
        for loser in taken[1:]:
            winners.discard(loser)
            reasons[loser] += (f", but {taken[0]} gained more" if gains[loser] < gains[taken[0]] else
                               f", a tie with {taken[0]}, which is taken") + " (they change the same thing)"
    flags = list(BASELINE)
    for name in (n for n in LEVERS if n in winners):  # the ablation's order: later flags override
        flags += lever_flags(name)[0]
    for name in also:
        if name not in LEVERS or name in NOT_A_FLAG:
            raise RecipeError(f"--also {name}: not a lever with flags (choose from "
                              f"{', '.join(n for n in LEVERS if n not in NOT_A_FLAG)})")
    if also and set(also) <= winners:
        raise SameAsRule(f"--also {','.join(also)}: the rule took {'it' if len(also) == 1 else 'them'} already "
                         "(that variant is the rule's recipe)")
    merged = {n for pair in BOTH_BACKBONES for n in pair}  # their --backbone flags combine, not clash
    for name in also:
        if name in winners:
            continue
        partners = {m for group in EXCLUSIVE if name in group for m in group} - {name}
        clash = sorted(n for n in winners | (set(also) - {name})
                       if n in partners or ((_options(lever_flags(n)[0]) & _options(lever_flags(name)[0]))
                                            and not {n, name} <= merged))
        if clash:
            raise RecipeError(f"--also {name}: it changes what {', '.join(clash)} changes "
                              "(one would undo the other)")
        flags += lever_flags(name)[0]
    used = winners | set(also)
    for pair, backbone in BOTH_BACKBONES.items():
        if pair <= used:  # one --backbone flag, the merged one (the command should read as the run)
            flags = [f for i, f in enumerate(flags) if f != "--backbone" and (i == 0 or flags[i - 1] != "--backbone")]
            flags += ["--backbone", backbone]
            for n in pair:
                reasons[n] += f" (with {', '.join(sorted(pair - {n}))}: {backbone})"
    base_precision = rows["baseline"].get("precision")
    for n in gains:  # another machine (no native bfloat16) trained it: its gain includes the precision's
        if n != "float32" and rows[n].get("precision") != base_precision:
            reasons[n] += f" (trained in {rows[n].get('precision')}, the baseline in {base_precision})"
    for n in also:
        if n not in winners:
            reasons[n] += " (added: --also, a registered variant)"
    if "schedule-2x" in gains:
        reasons["schedule-2x"] = (f"{gains['schedule-2x']:+.2f} points: a longer schedule "
                                  f"{'paid' if gains['schedule-2x'] > margin else 'did not pay'} (the length is --epochs)")
    for seed in (n for n in SEED_ROWS if n in gains):
        noise = abs(gains[seed])
        reasons[seed] = (f"{gains[seed]:+.2f} points: the baseline's own seed-to-seed "
                         f"difference, {'inside' if noise <= margin else 'OVER'} the {margin:g}-point margin"
                         + ("" if noise <= margin else ": gains of that size may be noise"))
    return {"baseline_public_test": base, "margin_points": margin, "gains_points": gains,
            "taken": [n for n in LEVERS if n in winners], "also": list(also), "pending": waiting,
            "reasons": reasons, "flags": flags,
            "seconds_per_epoch": _pace(rows, used & set(rows)),
            "baseline_seconds_per_epoch": _pace(rows, set()),
            "seconds_per_epoch_but_backbone": _pace(rows, {n for n in used & set(rows) if "--backbone" not in lever_flags(n)[0]}),
            "seed_spread_points": seed_spread(rows)}


def _pace(rows: dict[str, dict], taken: set[str]) -> float | None:
    """The recipe's seconds per epoch at the ablation's pace: the baseline's, times each taken
    lever's slowdown over it (a guess: the slowdowns are measured one at a time). None when a row
    lacks its pace."""
    def pace(name: str) -> float | None:
        value = rows[name].get("seconds_per_epoch")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None

    seconds = pace("baseline")
    for name in sorted(taken):  # a fixed order: the same product to the last digit on every start
        if seconds is None or pace(name) is None:
            return None
        seconds *= pace(name) / pace("baseline")
    return seconds


def recipe_for(levers: Path, epochs: int, margin: float, limit_per_class: int | None = None,
               partial: bool = False, also: tuple[str, ...] = (), pending: tuple[str, ...] = ()) -> dict:
    """The long run's recipe from the ablation table LEVERS (RecipeError when it cannot give one);
    `also`: a registered variant's added levers; `pending`: levers it may be trained without."""
    table, rows = read_levers(levers, partial=partial, quick=limit_per_class is not None, pending=tuple(pending))
    return {**choose(rows, margin, tuple(also), tuple(pending)), "epochs": epochs, "levers": str(levers), "ablation_epochs": table.get("epochs"),
            "limit_per_class": limit_per_class}


RUN_KEYS = ("flags", "epochs", "limit_per_class")  # what makes two runs the same run


def _recorded(path: Path) -> dict | None:
    """A recipe.json's content (None when there is none); RecipeError when it is damaged."""
    if not path.exists():
        return None
    try:
        had = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise RecipeError(f"{path} is unreadable ({type(error).__name__}); move it away") from None
    if not isinstance(had, dict):
        raise RecipeError(f"{path} is not a recipe; move it away")
    return had


def same_run(had: dict | None, recipe: dict) -> bool:
    return had is not None and all(had.get(k) == recipe[k] for k in RUN_KEYS)


def scored(out: Path, recipe: dict) -> bool:
    """OUT (results/cloud_pretrain/NAME) holds this recipe's run, trained and scored: its
    recipe.json is this recipe, its entry.json names the library entry (sha256) and its tta.json has
    every test-time figure, of the same data. Damaged files are "not scored". scripts/studies.py
    asks this too."""
    try:
        had = _recorded(out / "recipe.json")
        tta = json.loads((out / "tta.json").read_text())
        complete = isinstance(tta, dict) and isinstance(tta.get("accuracy"), dict) and "tencrop" in tta["accuracy"]
        entry = json.loads((out / "entry.json").read_text())
        complete = complete and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
    except (RecipeError, OSError, ValueError, RecursionError):
        return False
    return complete and same_run(had, recipe) and tta.get("limit_per_class") == recipe["limit_per_class"]


def measured_pace(path: Path = ROOT / "bench" / "results" / "backbone_cost.json") -> tuple[int, dict[str, float]] | None:
    """(threads, {backbone: seconds of training steps per FER2013 epoch}) at the recipe's batch 64
    and 48 px, at the most threads bench/backbone_cost.py timed SmallCNN (the baseline's backbone)
    with, on the machine that ran it (the committed file is this project's 2-core one); None
    without a readable one."""
    try:
        result = json.loads(path.read_text())
        if result.get("batch_size") != 64 or result.get("input_size") != 48:
            return None
        timed = [(r["threads"], r["backbone"], float(r["epoch_step_seconds"])) for r in result["rows"]
                 if isinstance(r.get("backbone"), str) and type(r.get("threads")) is int and r["threads"] > 0]
    except (OSError, ValueError, RecursionError, AttributeError, TypeError, KeyError, OverflowError):
        return None
    timed = [t for t in timed if 0 < t[2] < float("inf")]
    threads = max((t for t, b, _ in timed if b == "smallcnn"), default=None)
    if threads is None:
        return None
    return threads, {b: s for t, b, s in timed if t == threads}


def recipe_markdown(recipe: dict, name: str, measured: tuple[int, dict[str, float]] | None = None) -> str:
    """recipe.md; `measured`: measured_pace(), for the expected time on every core."""
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
        taken = "yes" if n in recipe["taken"] else "added" if n in recipe.get("also", ()) else "no"
        lines.append(f"| {n} | {'' if gain is None else f'{gain:+.2f}'} | {taken} "
                     f"| {recipe['reasons'].get(n, '')} |")
    if recipe.get("seed_spread_points") is not None:
        seeds = 1 + sum(n in recipe["gains_points"] for n in SEED_ROWS)
        lines += ["", f"The baseline's PublicTest over {seeds} seeds has a sample standard deviation of "
                  f"{recipe['seed_spread_points']:.2f} points (the margin is {recipe['margin_points']:g})."]
    if recipe.get("also") and recipe.get("why"):
        lines += ["", f"A variant registered beside the rule's recipe: the rule's recipe plus "
                  f"{', '.join(recipe['also'])} (`--also`), whatever the ablation said of "
                  f"{'it' if len(recipe['also']) == 1 else 'them'}. Why (`--why`): {recipe['why']}"]
    elif recipe.get("also"):  # the first variant's words (fer2013-48px-final-strong), kept for its re-runs
        lines += ["", f"A variant registered beside the rule's recipe, before either long run's result: the rule's "
                  f"recipe plus {', '.join(recipe['also'])} (`--also`), whatever the ablation said of "
                  f"{'it' if len(recipe['also']) == 1 else 'them'}. A 30-epoch ablation reads a regulariser while "
                  "it still under-fits; this run asks whether it pays over a long schedule."]
    if recipe.get("pending"):
        lines += ["", f"Trained before the ablation's {', '.join(recipe['pending'])} "
                  f"row{'' if len(recipe['pending']) == 1 else 's'} (`--pending`): the run fits one session only when "
                  "it starts at the session's start. Once the rows are in and this run is scored, re-running the command "
                  "re-reads the rule: the same flags keep this run (this page is rewritten), other flags train anew "
                  "(the old run is moved aside)."]
    lines += ["", f"Training: `emoshield cloud pretrain {' '.join(recipe['flags'])} --epochs {recipe['epochs']}` "
              f"({recipe['epochs']} epochs{'' if recipe['limit_per_class'] is None else ', on a slice of the data: not a result'})."]
    if recipe.get("seconds_per_epoch"):
        lines += ["", f"Expected time: ~{recipe['seconds_per_epoch'] * recipe['epochs'] / 3600:.1f} h at the ablation's "
                  f"pace ({recipe['seconds_per_epoch']:.0f} s/epoch: the baseline's, times each taken lever's slowdown; "
                  "the levers ran one thread each beside another run; the long run has every core, and on this "
                  "2-core machine two threads made a SmallCNN training step 1.8x faster than one)."]
        if measured and recipe.get("baseline_seconds_per_epoch"):
            threads, steps = measured
            backbone = _flag(recipe["flags"], "--backbone") if "--backbone" in recipe["flags"] else "smallcnn"
            if backbone in steps and recipe.get("seconds_per_epoch_but_backbone"):  # the backbone's own step, timed
                epoch = steps[backbone] * 1.05 * recipe["seconds_per_epoch_but_backbone"] / recipe["baseline_seconds_per_epoch"]
                how = (f"{backbone}'s training steps, {steps[backbone]:.0f} s, times the other levers' "
                       "slowdowns at the ablation's pace")
            else:
                epoch = steps["smallcnn"] * 1.05 * recipe["seconds_per_epoch"] / recipe["baseline_seconds_per_epoch"]
                how = f"SmallCNN's training steps, {steps['smallcnn']:.0f} s, times the same slowdowns"
            lines[-1] += (f" On {threads} threads at the step cost `bench/backbone_cost.py` measured "
                          f"(bench/results/backbone_cost.json): ~{epoch * recipe['epochs'] / 3600:.1f} h "
                          f"({epoch:.0f} s/epoch: {how}, plus ~5% for the PublicTest pass).")
    lines.append("")
    return "\n".join(lines)


def prepare(work: Path, out: Path, recipe: dict, name: str) -> None:
    """Refuses a WORK begun with another run; records the recipe in WORK and OUT, first removing
    from OUT the result files of another recipe's run (they must not be read as this one's)."""
    from collect_pretrain import FILES

    had = _recorded(work / "recipe.json")
    if had is not None and not same_run(had, recipe) and had.get("pending") and (work / "run").exists():
        # trained before some rows were in (--pending), which changed the rule's flags: train anew
        aside = work / f"run.superseded-{time.strftime('%Y%m%dT%H%M%S')}"
        (work / "run").rename(aside)
        print(f"{work / 'run'}: its recipe changed once the pending rows came in; moved to {aside.name}", flush=True)
    elif had is not None and not same_run(had, recipe):
        raise RecipeError(f"{work} was begun with another recipe, length or slice of the data "
                          f"({work / 'recipe.json'}); pass another --work")
    if (work / "run").exists() and had is None:
        raise RecipeError(f"{work / 'run'} holds a training of no recorded recipe; pass another --work")
    if not same_run(_recorded(out / "recipe.json"), recipe):
        for stale in (*FILES, "tta.json", "entry.json"):
            (out / stale).unlink(missing_ok=True)
    record(work, out, recipe, name)


def record(work: Path, out: Path, recipe: dict, name: str) -> None:
    """Writes the recipe to WORK and OUT (recipe.json) and its page to OUT (recipe.md)."""
    from emoshield.paths import write_atomic

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(recipe, indent=1).encode()
    write_atomic(work / "recipe.json", text)
    write_atomic(out / "recipe.json", text)
    write_atomic(out / "recipe.md", recipe_markdown(recipe, name, measured_pace()).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default="results/cloud_levers/levers.json", help="the ablation's table")
    parser.add_argument("--epochs", type=int, default=100, help="length of the long run (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.8,
                        help="PublicTest points a lever must gain to be taken (default: %(default)s)")
    parser.add_argument("--name", default="fer2013-48px-final", help="library entry and results folder name")
    parser.add_argument("--library", help="library folder (default: $EMOSHIELD_LIBRARY or the cache)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=os.environ.get("EMOSHIELD_DATA"))
    parser.add_argument("--limit-per-class", type=int, help="a quick run on a slice (tests; not a result)")
    parser.add_argument("--work", default="runs/cloud_final")
    parser.add_argument("--out", default="results/cloud_pretrain")
    parser.add_argument("--also", default="", help="LEVER,...: a registered variant, the rule's recipe plus these "
                        "levers' flags (needs its own --name)")
    parser.add_argument("--why", default="", help="a registered variant's reason, written into its recipe.md "
                        "(say when it was registered and what results were in by then)")
    parser.add_argument("--pending", default="", help="LEVER,...: train before these levers' ablation rows are "
                        "in (recipe.md says so; re-run once they are to re-read the rule)")
    parser.add_argument("--dry-run", action="store_true", help="print the recipe and stop")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.margin < 0:
        parser.error("--epochs must be >= 1 and --margin >= 0")
    also = parse_also(args.also)
    if args.why.strip() and not also:
        parser.error("--why gives a registered variant's reason: it needs --also")
    if also and args.name == parser.get_default("name"):
        parser.error("--also trains a variant: give it its own --name (the default is the rule's run)")
    from emoshield.errors import EmoshieldError
    from emoshield.models.library import check_name

    work, out = Path(args.work) / args.name, Path(args.out) / args.name
    try:
        check_name(args.name)
        recipe = recipe_for(Path(args.levers), args.epochs, args.margin, args.limit_per_class, partial=args.dry_run,
                            also=also, pending=parse_also(args.pending))
        # a re-run without --why keeps the reason its run was registered with: the work folder's, else
        # the committed results' (a machine whose work folder was lost starts the run again)
        why = " ".join(args.why.split()) or next(
            (saved for recorded in (work / "recipe.json", out / "recipe.json")
             if isinstance(saved := (_recorded(recorded) or {}).get("why"), str) and saved), None)
        if isinstance(why, str) and why:
            recipe["why"] = why
        if args.dry_run:
            print(recipe_markdown(recipe, args.name, measured_pace()))
            return 0
        for recorded in (work / "recipe.json", out / "recipe.json"):  # damaged: one line before any folder is made
            _recorded(recorded)
    except (RecipeError, EmoshieldError, OSError) as error:
        print(f"cloud_final: {error}", file=sys.stderr)
        return 2
    from emoshield.reproduce import step_lock

    with step_lock(work) as mine:  # one process per run: a second would train in the same folder
        if not mine:
            print(f"cloud_final: another process is training {work} (it holds {work}.lock); nothing started",
                  file=sys.stderr)
            return 2
        return _train_and_score(args, recipe, work, out)


def _train_and_score(args: argparse.Namespace, recipe: dict, work: Path, out: Path) -> int:
    from emoshield.errors import EmoshieldError

    try:
        if scored(out, recipe):
            had = _recorded(out / "recipe.json")
            if had.get("pending") and had != recipe:  # the same run; the rows it was trained without are in
                record(work, out, recipe, args.name)
                print(f"{out}: trained and scored already; recipe.md rewritten from the whole ablation")
            else:
                print(f"{out}: trained and scored already (tta.json); nothing to do")
            return 0
        prepare(work, out, recipe, args.name)
    except (RecipeError, EmoshieldError, OSError) as error:
        print(f"cloud_final: {error}", file=sys.stderr)
        return 2
    command = pretrain_command([*recipe["flags"], "--epochs", str(args.epochs)], args.name, work / "run", args,
                               library=Path(args.library) if args.library else None)
    print(f"{time.strftime('%H:%M:%S')} {args.name}: taken {', '.join(recipe['taken']) or 'nothing (the baseline)'}"
          f"{''.join(f', added {n}' for n in recipe['also'])}; "
          f"training {args.epochs} epochs (log: {work / 'train.log'})", flush=True)
    rc = run_logged(command, work / "train.log")
    if rc != 0:
        print(f"cloud_final: the training failed (exit {rc}); see {work / 'train.log'}", file=sys.stderr)
        return 1
    from collect_pretrain import collect
    import pretrain_tta

    collect(work / "run", out)
    from emoshield.models.library import read_entry
    from emoshield.paths import write_atomic

    try:  # which entry these figures are of: its sha256 (the driver's cross-dataset stages check it)
        meta, weights = read_entry(args.name, Path(args.library) if args.library else None)
    except EmoshieldError as error:
        print(f"cloud_final: {error}", file=sys.stderr)
        return 1
    write_atomic(out / "entry.json", json.dumps({"name": args.name, "sha256": meta["sha256"],
                                                 "bytes": weights.stat().st_size, "backbone": meta.get("backbone"),
                                                 "embeddable": weights.stat().st_size <= EMBED_LIMIT_BYTES},
                                                indent=1).encode())
    tta = ["--model", str(work / "run"), "--into", str(out)]
    if args.data_root:
        tta += ["--data-root", args.data_root]
    if args.limit_per_class:
        tta += ["--limit-per-class", str(args.limit_per_class)]
    if pretrain_tta.main(tta) != 0:
        return 1
    print(f"wrote {out}: recipe.md, report.md, metrics.json, entry.json, tta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
