"""RESULTS.md from the committed study folders (results/reproduce/*/results.json): our numbers
beside the reference's, a headline table and one table per claim; plus the cloud tier's FER2013
pretraining runs (results/cloud_pretrain/*/, copied there by scripts/collect_pretrain.py) and its
lever ablation (results/cloud_levers/, bench/cloud_levers.py).

    .venv/bin/python scripts/results_md.py [--studies results/reproduce] [--pretrain results/cloud_pretrain]
        [--levers results/cloud_levers] [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emoshield.evaluation.masking import MASKING_FLOOR, MASKING_SWEEP, sweep_followup_eps  # noqa: E402

SWEEP = [f"{eps:g}" for eps in MASKING_SWEEP]  # the masking sweep's eps as the reports key them
LARGEST = SWEEP[-1]

WHAT_DIFFERS = """## What differs from the reference
| | reference (SPEC §7) | here |
|---|---|---|
| data | LIRIS-CSE: 208 videos of 12 children, 5 classes, 22,474 frames | CK+48 (5 of its 7 classes: the reference's happy, sad, surprise, disgust, fear; 3 frames per sequence) and JAFFE (7 classes, 10 subjects, 213 images) |
| split | per-video frame split (80/10/10) | CK+48 under SPEC §3's reading of it (1 train / 1 val / 1 test frame per sequence) AND subject-independent 5-fold; JAFFE subject 5-fold only (it has no sequences) |
| backbones | VGG16 and AlexNet, ImageNet-pretrained, 480 px | the VGG-style SmallCNN pretrained by our cloud tier on FER2013 and MobileNetV2 (ImageNet), both at 48 px (the superseded first studies: ResNet18 pretrained here); no ImageNet VGG16/AlexNet weights can be downloaded here |
| hardware | V100 GPU | 2 CPU cores |
| recipe | batch 128, SGD lr 0.01, Algorithm 1, 50 epochs | the same schedule, optimizer and epochs; batch 32 and `--augment strong` (our measured defaults, README "Training") |
| attacks | FGSM, R+FGSM, PGD (unseen) | the same, plus APGD-CE-50 (unseen) to rule out gradient masking and camera corruptions |
"""


LINK_BASE = [Path.cwd()]  # links are relative to the page's folder (main sets it)


def _link(folder: Path) -> str:
    return Path(os.path.relpath(Path(folder).resolve(), LINK_BASE[0])).as_posix()


def _pct(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean'] * 100:.1f}"
    return text + (f" ± {stat['std'] * 100:.1f}" if stat.get("n", 1) > 1 else "")


BEST_PUBLISHED_FER2013 = 73.28  # single-network PrivateTest accuracy quoted in issue 4


class DamagedResults(Exception):
    """A results file that does not read as JSON, or whose JSON is not of the shape its writer gives."""


def read_json(path: Path):
    """A results file's JSON; DamagedResults naming it when it is cut short, not UTF-8 or not JSON."""
    from emoshield.errors import EmoshieldError
    from emoshield.paths import read_json as read_file

    try:
        return read_file(path)
    except EmoshieldError as error:
        raise DamagedResults(str(error)) from None


def _tta_accuracy(path: Path, one_crop: float) -> dict | None:
    """scripts/pretrain_tta.py's figures for a run, only when they are the whole test set's and of
    the run's own model (its one-crop figure is the run's); anything else shows as '—'."""
    try:
        value = json.loads(path.read_text())
        accuracy = value["accuracy"]
        if value.get("limit_per_class") is not None or accuracy["none"] != one_crop:
            return None
        out = {mode: float(accuracy[mode]) for mode in ("flip", "tencrop")}
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    return out if all(0 <= v <= 1 for v in out.values()) else None  # NaN fails too


def _recipe_words(cfg: dict, run: dict) -> str:
    """What a run changed beyond batch, lr, schedule and augmentation (the levers of issue 18)."""
    words = []
    if cfg.get("optimizer", "sgd") != "sgd":
        words.append(f"{cfg['optimizer']} (weight decay {cfg.get('weight_decay')})")
    if cfg.get("mix", "none") != "none":
        words.append(f"{cfg['mix']} alpha {cfg.get('mix_alpha')}")
    if cfg.get("label_smoothing"):
        words.append(f"label smoothing {cfg['label_smoothing']}")
    if run.get("pooling", "global") != "global":
        words.append(f"head pooling {run['pooling']}")
    return "".join(f", {w}" for w in words)


def pretraining_table(root: Path) -> list[str]:
    """The cloud library's FER2013 runs: how each was trained and its PrivateTest accuracy."""
    rows = []
    for path in sorted(root.glob("*/metrics.json")):
        m, run = read_json(path), read_json(path.parent / "run.json")
        cfg = run["train_config"]
        history = read_json(path.parent / "history.json")
        best = max(history, key=lambda e: e["val_accuracy"])
        tta = _tta_accuracy(path.parent / "tta.json", m["test_accuracy"])
        multi = f"{tta['flip'] * 100:.1f} / {tta['tencrop'] * 100:.1f}" if tta else "—"
        recipe = f" ([recipe]({_link(path.parent)}/recipe.md))" if (path.parent / "recipe.md").is_file() else ""
        rows.append(
            f"| [{path.parent.name}]({_link(path.parent)}/report.md){recipe} | {m['backbone']} | {m['weights']} | "
            f"{m['input_size']} px | {m['epochs']} | {cfg['batch_size']}, lr {cfg['lr']}, {cfg['schedule']}, "
            f"`--augment {cfg['augment']}`{_recipe_words(cfg, run)} | "
            f"{'bfloat16 (`--amp`)' if cfg.get('amp') else 'float32'} | "
            f"{m['train_seconds'] / 3600:.1f} h | {best['val_accuracy'] * 100:.1f} (epoch {best['epoch']}) | "
            f"**{m['test_accuracy'] * 100:.1f}** | {multi} | {m['balanced_accuracy'] * 100:.1f} |")
    if not rows:
        return []
    return ["## The cloud tier: backbones pretrained on FER2013", "",
            "`emoshield cloud pretrain` on FER2013's official split (train 28,709; PublicTest 3,589 picks the "
            "epoch; PrivateTest 3,589 is the test), 7 classes, seed 0, 2 CPU cores, one crop at test time; "
            "'flip / ten-crop' = the same model averaged over the face and its mirror / over the four corner "
            "and centre crops (90% of the side) and their mirrors (`scripts/pretrain_tta.py`). "
            f"Best published single model: {BEST_PUBLISHED_FER2013} (Khaireddin & Chen 2021, a tuned VGG variant at 48 px).", "",
            "| run | backbone | from | input | epochs | batch, lr, schedule, augmentation | precision | training "
            "time | PublicTest (best epoch) | PrivateTest | PrivateTest flip / ten-crop | balanced |",
            "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|", *rows, ""]


def _study_name(result: dict) -> str:
    """'ckplus48 subject v3': re-runs of one study sit in the same tables, so its folder's version is
    named, '(+ ckplus48 faces)' when another dataset's faces joined its training parts, and
    '(fine-tuned at lr 0.001)' when its pretrained runs trained at another lr (`--finetune-lr`), and
    '(defended run 100 epochs)' when the defended run trained its own length (`--defended-epochs`)."""
    base = f"{result['dataset']}-{result['protocol']}"
    folder = Path(str(result.get("folder", ""))).name
    version = folder[len(base):].strip("-") if folder.startswith(base) else ""
    options = result.get("options") or {}
    extra = options.get("extra_train") or []  # another dataset's faces in its training
    extra = f" (+ {', '.join(map(str, extra))} faces)" if isinstance(extra, list) and extra else ""
    lr = options.get("finetune_lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        extra += f" (fine-tuned at lr {lr:g})"
    defended_epochs = options.get("defended_epochs")
    if isinstance(defended_epochs, int) and not isinstance(defended_epochs, bool):
        extra += f" (defended run {defended_epochs} epochs)"
    return f"{result['dataset']} {result['protocol']}" + (f" {version}" if version else "") + extra


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}"


def _units_done(result: dict) -> str:
    done = sum(len(u) for u in result["units"].values())
    return f"{done} of {done + len(result['pending_units'])}" if result.get("pending_units") else str(done)


def load_studies(root: Path) -> tuple[list[dict], list[dict]]:
    """(current studies, superseded ones): NAME is superseded once NAME-v2 (its re-run on current
    code, issue 17) has a report, complete or partial; quick runs are code-path checks, left out."""
    studies = []
    for path in sorted(root.glob("*/results.json")):
        result = read_json(path)
        if result["options"].get("quick"):
            continue
        result["folder"] = path.parent
        studies.append(result)
    names = {r["folder"].name for r in studies}
    current = [r for r in studies if f"{r['folder'].name}-v2" not in names]
    return current, [r for r in studies if r not in current]


def headline_table(studies: list[dict]) -> list[str]:
    lines = ["| study | backbone (weights) | units | localization head | own head | defended clean | FGSM 0.01 "
             "def. (undef.) | PGD-10 0.01 def. (undef.) | APGD-CE 0.01 def. (undef.) | **AutoAttack 0.01** def. "
             "(undef.) | AutoAttack 8/255 def. (undef.) | claims held | compute |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in studies:
        for backbone, s in r["summary"].items():
            d, u = s["defended"], s["undefended"]
            held = [c for c in r["claims"] if c["claim"].startswith(backbone + ":")]

            def both(key: str) -> str:
                return f"{_pct(d.get(key))} ({_pct(u.get(key))})"

            lines.append(
                f"| [{_study_name(r)}]({_link(r['folder'])}/report.md) | {backbone} (`{r['weights'][backbone]}`) | "
                f"{_units_done({'units': {backbone: r['units'][backbone]}, 'pending_units': [p for p in r.get('pending_units', []) if p.startswith(backbone + '-')]})} | "
                f"{_pct(s['runs']['localization']['test_accuracy'])} | {_pct(s['runs']['own-head']['test_accuracy'])} | "
                f"{_pct(d['clean'])} | {both('fgsm@0.01')} | {both('pgd@0.01')} | {both('apgd@0.01')} | "
                f"**{_pct(d.get('autoattack@0.01'))}** ({_pct(u.get('autoattack@0.01'))}) | {both('autoattack@0.0313725')} | "
                f"{sum(c['holds'] for c in held)}/{len(held)} | {r.get('compute_seconds', 0) / 60:.0f} min |")
    return lines


def levers_section(folder: Path) -> list[str]:
    """The FER2013 lever ablation (bench/cloud_levers.py's levers.md, under its own heading), with
    how many levers have a row while it is still running; nothing before its first lever."""
    page = folder / "levers.md"
    try:
        table, text = json.loads((folder / "levers.json").read_text()), page.read_text()
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(table, dict) or not isinstance(table.get("runs"), list) or not table["runs"]:
        return []
    body = text.partition("\n")[2].strip()  # without its own title
    done, levers = len(table["runs"]), table.get("levers") or []
    state = "" if table.get("complete") else f" ({done} of {len(levers)} levers so far; still to run: " \
        f"{', '.join(table.get('pending', []))})"
    return [f"## The cloud tier's levers, one at a time{state}", "",
            f"[levers.md]({_link(folder)}/levers.md), every run's history in levers.json, "
            f"![PublicTest accuracy per epoch]({_link(folder)}/levers.png)", "", body, ""]


def masking_table(studies: list[dict]) -> list[str]:
    """The checks behind 'AutoAttack accuracy is believed', per study x backbone (defended models,
    mean over units): PGD must reach ~0 as eps grows, PGD from the undefended twin must not beat
    white-box PGD, and Square (gradient-free, last in AutoAttack) must find nothing APGD missed."""
    rows = []
    for r in studies:
        for backbone, units in r["units"].items():
            checks = [u.get("masking_checks", {}) for u in units.values()]
            if not any(checks):
                continue
            sweep = {e: _mean([c.get("sweep", {}).get(e) for c in checks]) for e in SWEEP}
            transfer = _mean([c.get("transfer", {}).get("0.01", {}).get("accuracy") for c in checks])
            white = _mean([u["defended"].get("pgd@0.01") for u in units.values()])
            square_found = sum(1 for u in units.values() for eps in u.get("autoattack", {}).get("defended", {}).values()
                               if (st := eps.get("stages") or {}).get("square", 1) < st.get("fab-t", 1) - 1e-9)
            followup = [c["sweep_apgd"][LARGEST] for c in checks if LARGEST in c.get("sweep_apgd", {})]
            missing = sum(1 for u in units.values() if sweep_followup_eps(u) is not None)
            apgd = (f"{_f(_mean(followup))} ({len(followup)} of {len(units)})" if followup else
                    "not needed" if not missing else "") + (f"; not run on {missing}" if missing else "")
            apgd = apgd.lstrip("; ")
            flags = sorted({f for u in units.values() for f in u.get("sanity_flags", [])})
            rows.append(f"| {_study_name(r)} | {backbone} | {len(units)} | "
                        + "".join(f"{_f(sweep[e])} | " for e in SWEEP)
                        + f"{apgd} | {_f(transfer)} vs {_f(white)} | {square_found} | "
                        f"{'; '.join(flags) or 'none'} |")
    if not rows:
        return []
    return ["## Is the robustness real? Gradient-masking checks", "",
            "Defended models, mean over units, accuracy in %. PGD-10 must reach ~0 as eps grows; PGD-10 transferred "
            "from the undefended twin at eps 0.01 must not beat white-box PGD-10; Square (5000 queries, "
            "gradient-free) must not find what APGD-CE, APGD-T and FAB-T missed (count of unit x eps where it did). "
            f"Where PGD-10's fixed step leaves more than {MASKING_FLOOR:.0%} at eps {LARGEST}, APGD-CE-50 (adaptive "
            f"step) is run there (mean over those units); only both staying above {MASKING_FLOOR:.0%} raises the "
            "masking flag. "
            "Sanity flags: the evaluator's own checks (training mode, accuracy rising with eps, ...).", "",
            "| study | backbone | units | " + "".join(f"PGD eps {e} | " for e in SWEEP) + f"APGD-CE eps {LARGEST} (units) "
            "| transfer vs white-box PGD (0.01) | Square found more | sanity flags |",
            "|---|---|---:|" + "---:|" * (len(SWEEP) + 3) + "---|", *rows, ""]


def apgd_fix_table(before_file: Path, studies: list[dict], same_models: Path) -> list[str]:
    """APGD-CE before the step-size fix (issue 17) beside the fixed one: on the same models and faces
    (bench/apgd_fix.py, the verdict), and study by study (the pre-fix studies' own models vs the
    re-runs' retrained ones: context, not a verdict)."""
    lines = ["## APGD-CE before and after its step-size fix", ""]
    if same_models.is_file():
        bench = read_json(same_models)
        groups: dict = {}
        for r in bench["rows"]:
            groups.setdefault((r["study"], r["backbone"], r["model"], f"{r['eps']:.4g}"), []).append(r)
        lines += [f"Same models, same faces (`python bench/apgd_fix.py`, [report]({_link(same_models.parent)}/report.md)): "
                  f"APGD-CE-{bench['steps']} of commit {bench['before_fix_commit']} and today's, 1 restart, seed 0, on "
                  "every study model that was still on disk, mean over units, %. Fixed APGD-CE weaker than the old "
                  f"on: **{', '.join(bench['fixed_weaker_on']) or 'no model'}**.", "",
                  "| study | backbone | model | eps | units | PGD-10 | APGD-CE before fix | APGD-CE fixed |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for (study, backbone, model, eps), rows in groups.items():
            lines.append(f"| {study} | {backbone} | {model} | {eps} | {len(rows)} | "
                         f"{_f(_mean([r['pgd10'] for r in rows]))} | {_f(_mean([r['apgd_before_fix'] for r in rows]))} | "
                         f"{_f(_mean([r['apgd_fixed'] for r in rows]))} |")
        lines.append("")
    if before_file.is_file():
        before = read_json(before_file)["studies"]
        by_name = {r["folder"].name: r for r in studies}
        rows = []
        for name, old in before.items():
            new = by_name.get(f"{name}-v2")
            for backbone, units in old["units"].items():
                s = (new or {}).get("summary", {}).get(backbone)
                if s is None:
                    continue
                for variant in ("defended", "undefended"):
                    o_pgd = _mean([u[variant]["pgd@0.01"] for u in units.values()])
                    o_apgd = _mean([u[variant]["apgd@0.01"] for u in units.values()])
                    n_pgd, n_apgd = s[variant]["pgd@0.01"]["mean"], s[variant]["apgd@0.01"]["mean"]
                    rows.append(f"| {name} | {backbone} | {variant} | {_f(o_pgd)} | {_f(o_apgd)} | "
                                f"{(o_apgd - o_pgd) * 100:+.1f} | {_f(n_pgd)} | {_f(n_apgd)} | {(n_apgd - n_pgd) * 100:+.1f} |")
        if rows:
            lines += ["Study by study, eps 0.01, mean over units: the pre-fix studies' APGD-CE-50 on their own models "
                      "(results/reproduce/apgd_before_fix.json) and the re-run's on its retrained models; margin = "
                      "APGD-CE minus PGD-10 on the same models. Backbones in both only.", "",
                      "| study | backbone | model | before: PGD-10 | APGD-CE | margin | re-run: PGD-10 | APGD-CE | margin |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows, ""]
    return lines if len(lines) > 2 else []


def _study_start(study: dict, backbone: str) -> str:
    """', from `entry`, aligned': what a cross table's study models were fine-tuned from."""
    start = str((study.get("weights") or {}).get(backbone, "")).removeprefix("library:")
    aligned = ", aligned" if (study.get("options") or {}).get("align") else ""
    return (f", from `{start}`" if start else "") + aligned


def cross_table(root: Path) -> list[str]:
    """Issue 17 item 5 and issue 18 item 4: each study's models on every face of the other dataset,
    and the cloud backbone as shipped on both (results/cross/*)."""
    tables = sorted(((read_json(p), p) for p in root.glob("*/results.json")),
                    key=lambda t: ("library_entry" in t[0], t[1]))  # the studies' models first
    library = any("library_entry" in c for c, _ in tables)
    rows = []
    for c, path in tables:
        eps = f"{c['options']['eps'][0]:g}"
        for backbone, variants in c["summary"].items():
            for variant, s in variants.items():
                src, dst = s["source"], s["target"]
                if isinstance(c.get("library_entry"), dict):  # which entry: several long runs are tested
                    variant = f"{variant}, `{c['library_entry'].get('name')}`"
                elif isinstance(c.get("study"), dict):  # which study: re-runs differ in start weights, alignment
                    variant += _study_start(c["study"], backbone)
                rows.append(f"| [{c['source']} → {c['target']}]({_link(path.parent)}/report.md) | {backbone} | "
                            f"{variant} | {src['clean']['n']} | {_pct(src['clean'])} | {_pct(src.get(f'autoattack@{eps}'))} "
                            f"| {_pct(dst['clean'])} | {_pct(dst.get(f'pgd@{eps}'))} | {_pct(dst.get(f'autoattack@{eps}'))} |")
    if not rows:
        return []
    shipped = (" 'no fine-tuning' = the cloud library's FER2013 backbone as shipped (7 outputs, 48 px), on every face "
               "of the other dataset of the classes it knows (CK+48: all but contempt, angry included; JAFFE: all 7); "
               "its 'own' figure is its FER2013 PrivateTest accuracy (7 classes), which no study attacked."
               if library else "")
    return ["## Across datasets: what survives a change of faces", "",
            "Every finished unit of a subject study (its defended and undefended localization-head models) tested on "
            "every face of the other dataset, of the classes both have (CK+48 has no angry or neutral faces in our "
            "5-class set; a 7-class JAFFE model keeps its 7 outputs). 'Own' = the study's held-out people. eps 0.01; "
            "AutoAttack = the standard sequence (Square 5000 queries). Units whose models were lost with an earlier "
            "session are not in these tables (each report names them)." + shipped, "",
            "| models → faces | backbone | model | units | own clean | own AutoAttack | other clean | other PGD-10 "
            "| other AutoAttack |", "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows, ""]


README_BEGIN, README_END = "<!-- results:begin (scripts/results_md.py) -->", "<!-- results:end -->"


def readme_block(studies: list[dict]) -> list[str]:
    """README's headline: the current studies' defended vs undefended figures, AutoAttack first."""
    lines = [README_BEGIN,
             "| study (subject folds: no test person seen in training) | backbone | units | clean def. (undef.) | "
             "PGD-10 0.01 | **AutoAttack 0.01** | AutoAttack 8/255 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in [r for r in studies if r["protocol"] == "subject"]:
        for backbone, s in r["summary"].items():
            d, u = s["defended"], s["undefended"]
            pending = [p for p in r.get("pending_units", []) if p.startswith(backbone + "-")]

            def both(key: str) -> str:
                return f"{_pct(d.get(key))} ({_pct(u.get(key))})"

            lines.append(f"| [{_study_name(r)}]({_link(r['folder'])}/report.md) | {backbone} | "
                         f"{_units_done({'units': {backbone: r['units'][backbone]}, 'pending_units': pending})} | "
                         f"{both('clean')} | {both('pgd@0.01')} | **{_pct(d.get('autoattack@0.01'))}** "
                         f"({_pct(u.get('autoattack@0.01'))}) | {both('autoattack@0.0313725')} |")
    lines += ["", "Defended (undefended) accuracy in %, mean ± std over units; AutoAttack = APGD-CE, APGD-T, FAB-T, "
                  "Square (5000 queries), per-face worst case; every number with its data, protocol, input size (48 px), "
                  "epochs (50; a defended run's own where its study's name gives one) and seed (0) in the linked report. Gradient-masking checks, the cross-dataset table and "
                  "each claim: [RESULTS.md](RESULTS.md).", README_END]
    return lines


def write_readme(path: Path, block: list[str]) -> None:
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path} has no {README_BEGIN} ... {README_END} block to replace")
    head, rest = text.split(README_BEGIN, 1)
    path.write_text(head + "\n".join(block) + rest.split(README_END, 1)[1])


def main() -> int:
    """Exit 2 with one line, RESULTS.md and README untouched, when a results file is damaged (a study
    killed mid-write, a hand edit): the page is written whole from sound files or not at all."""
    try:
        return _main()
    except DamagedResults as error:
        print(f"results_md: {error}; RESULTS.md and README left as they were", file=sys.stderr)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
        print(f"results_md: a results file is not of the shape its writer gives ({type(error).__name__}: "
              f"{str(error)[:120]}); RESULTS.md and README left as they were", file=sys.stderr)
    return 2


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="results/reproduce")
    parser.add_argument("--pretrain", default="results/cloud_pretrain")
    parser.add_argument("--cross", default="results/cross")
    parser.add_argument("--apgd-fix", default="results/apgd_fix", help="bench/apgd_fix.py's output")
    parser.add_argument("--levers", default="results/cloud_levers", help="bench/cloud_levers.py's output")
    parser.add_argument("--out", default="RESULTS.md")
    parser.add_argument("--readme", default="README.md", help="its results block is rewritten too ('' = leave it)")
    args = parser.parse_args()
    LINK_BASE[0] = Path(args.out).resolve().parent  # README (--readme) sits beside RESULTS.md
    studies, superseded = load_studies(Path(args.studies))
    if not studies:
        print(f"no results.json under {args.studies}", file=sys.stderr)
        return 1
    lines = ["# Results: the reference's claims, checked on real data", "",
             "Every number below comes from `emoshield reproduce` (its command, options and git commit are in each "
             "study's results.json and report.md). Figures are mean ± standard deviation over subject folds where a "
             "study has several; accuracy in %. Regenerate this page with `python scripts/results_md.py`.", ""]
    lines += ["## Headline", ""] + headline_table(studies)
    lines += ["", "Reference (LIRIS-CSE, VGG16): localization head 95.67, own head 88.32, defended clean 94.97, "
                  "FGSM 0.01 85.76 (undefended 7.22), R+FGSM 0.01 90.84, PGD 83.29 (undefended 0.41); no AutoAttack. "
                  "AutoAttack = APGD-CE, APGD-T, FAB-T (100 steps each), Square (5000 queries), each on the faces the "
                  "earlier ones left, per-face worst case. Units 'k of n': a study still running (its figures are over "
                  "the finished units). Compute = the study's training and evaluation time on 2 CPU cores (per study, "
                  "both backbones).", ""]
    lines += masking_table(studies)
    lines += cross_table(Path(args.cross))
    lines += apgd_fix_table(Path(args.studies) / "apgd_before_fix.json", studies, Path(args.apgd_fix) / "results.json")
    lines += pretraining_table(Path(args.pretrain))
    lines += levers_section(Path(args.levers))
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
    if superseded:
        lines += ["## Earlier studies (superseded)", "",
                  "Made before issue 17's attack fixes and without AutoAttack; kept for the APGD-CE before/after table "
                  "above: " + ", ".join(f"[{r['folder'].name}]({_link(r['folder'])}/report.md) (backbones "
                                        f"{', '.join(r['summary'])})" for r in superseded) + ".", ""]
    lines.append(WHAT_DIFFERS)
    block = readme_block(studies) if args.readme else None  # everything read before anything is written
    Path(args.out).write_text("\n".join(lines))
    if block is not None:
        write_readme(Path(args.readme), block)
    print(f"wrote {args.out} from {len(studies)} studies ({len(superseded)} superseded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
