"""report.md and PNGs of a reproduction study (emoshield.reproduce): SPEC §7's tables and plots,
as mean ± std over folds x seeds, with the claims check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .masking import MASKING_FLOOR

AA_STAGES = ("clean", "apgd-ce", "apgd-t", "fab-t", "square")
RUN_LABELS = {"localization": "localization head", "own-head": "backbone's own head", "scratch": "scratch",
              "imagenet": "ImageNet", "defended": "defended (localization)"}


def _pm(stat: dict | None, pct: bool = True, digits: int = 1) -> str:
    """'95.2 ± 1.3' (percent) or 'n/a'; the ± part only when there is more than one value."""
    if not stat or stat.get("mean") is None:
        return "n/a" if not stat or not stat.get("values") else "never"
    scale = 100 if pct else 1
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    if stat["n"] < len(stat.get("values", [])):  # some units never reached a threshold
        text += f" ({stat['n']}/{len(stat['values'])} reached)"
    return text


def _eps_keys(summary: dict) -> list[str]:
    return sorted({k.split("@")[1] for k in summary["defended"] if k.startswith("fgsm@")}, key=float)


def _mid_eps(result: dict) -> str:
    """The reference's middle eps (0.01): bars, box plots and the claims use it."""
    eps = result["options"]["eps"]
    return f"{eps[len(eps) // 2]:g}"


def _eps_label(eps: str) -> str:
    return f"{eps} (8/255)" if abs(float(eps) - 8 / 255) < 1e-6 else eps


def _units_label(result: dict) -> str:
    opts = result["options"]
    folds = opts["fold_list"]
    if result["protocol"] == "subject":
        where = f"subject protocol, folds {', '.join(map(str, folds))} of {opts['folds']}"
    else:
        where = "reference protocol (SPEC §3 frame split)"
    return f"{where}, seeds {', '.join(map(str, opts['seeds']))}"


def _extra_train(opts: dict) -> str:
    """' + ckplus48 faces in training' when other datasets' faces joined every training part, else ''."""
    extra = opts.get("extra_train") or []
    return f" + {', '.join(extra)} faces in training" if extra else ""


def epochs_words(opts: dict, flag: bool = False) -> str:
    """'50 epochs', or '50 epochs (100 for the defended run)' when a study's defended run trained
    its own length (`--defended-epochs`, named when FLAG)."""
    own = opts.get("defended_epochs")
    return f"{opts['epochs']} epochs" + (
        f" ({own} for the defended run{', `--defended-epochs`' if flag else ''})" if own else "")


def _context(result: dict) -> str:
    """What every plot title says: data, protocol, input size, epochs, seeds."""
    opts = result["options"]
    aligned = ", faces aligned (eyes level)" if opts.get("align", "none") != "none" else ""
    return (f"{result['dataset']}{_extra_train(opts)}, {result['protocol']} protocol, {opts['input_size']} px{aligned}, "
            f"{epochs_words(opts)}, seed {','.join(map(str, opts['seeds']))}")


def study_plots(result: dict, out: Path) -> dict[str, str]:
    """Write the PNGs; returns title -> file name."""
    from .plots import _pyplot, plot_condition_bars, plot_confusion_matrix, plot_per_class_boxes

    out = Path(out)
    context = _context(result)
    plots: dict[str, str] = {}
    classes = result["classes"]
    chance = 1 / len(classes)
    for backbone, units in result["units"].items():
        summary = result["summary"][backbone]
        for run in ("localization", "own-head"):
            matrix = np.sum([u["runs"][run]["confusion_matrix"] for u in units.values()], axis=0)
            name = f"confusion_{backbone}_{run}.png"
            plot_confusion_matrix(matrix.tolist(), classes, out / name,
                                  f"{backbone}, {RUN_LABELS[run]}: test counts summed over {len(units)} unit(s); {context}")
            plots[f"{backbone} {RUN_LABELS[run]} confusion matrix"] = name
        plots[f"{backbone} convergence"] = _plot_convergence(backbone, units, out / f"convergence_{backbone}.png",
                                                             context)
        mid = _mid_eps(result)
        bars = {}
        for variant in ("undefended", "defended"):
            s = summary[variant]
            bars[variant] = {"benign": s["clean"]["mean"],
                             **{f"{label} {mid}": s[f"{key}@{mid}"]["mean"] for key, label in
                                (("fgsm", "FGSM"), ("rfgsm", "R+FGSM"), ("pgd", "PGD"), ("apgd", "APGD"),
                                 ("autoattack", "AutoAttack"))
                                if f"{key}@{mid}" in s}}
        plot_condition_bars(bars, out / f"bars_{backbone}.png", f"{backbone}: mean over {len(units)} unit(s); {context}")
        plots[f"{backbone} accuracy bars"] = f"bars_{backbone}.png"
        boxes = {}
        for variant in ("undefended", "defended"):
            conditions = next(iter(units.values()))["per_class"][variant]
            boxes[variant] = {cond: {c: _mean([u["per_class"][variant][cond][c] for u in units.values()])
                                     for c in classes} for cond in conditions}
        plot_per_class_boxes(boxes, out / f"per_class_{backbone}.png",
                             f"{backbone}: per-class accuracy, mean over {len(units)} unit(s); {context}")
        plots[f"{backbone} per-class accuracy"] = f"per_class_{backbone}.png"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, (backbone, summary) in enumerate(result["summary"].items()):
        eps = [0.0] + [float(e) for e in summary["sweep"]]
        acc = [summary["runs"]["localization"]["test_accuracy"]["mean"]] + [v["mean"] for v in summary["sweep"].values()]
        ax.plot(eps, [a * 100 for a in acc], marker="o", markersize=3, color=f"C{k}", linestyle="--",
                label=f"{backbone} undefended")
        deps = _eps_keys(summary)
        ax.plot([0.0] + [float(e) for e in deps],
                [summary["defended"]["clean"]["mean"] * 100] + [summary["defended"][f"fgsm@{e}"]["mean"] * 100 for e in deps],
                marker="s", markersize=3, color=f"C{k}", label=f"{backbone} defended")
    ax.axhline(chance * 100, color="gray", linewidth=0.8, linestyle=":", label="chance")
    ax.axvline(0.006, color="gray", linewidth=0.6, linestyle="-.", label="eps 0.006 (reference)")
    ax.set_xlabel("FGSM eps (L-inf, images in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"FGSM accuracy vs eps, mean over units; {context}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fgsm_vs_eps.png", dpi=110)
    plt.close(fig)
    plots["FGSM accuracy vs eps"] = "fgsm_vs_eps.png"
    return plots


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _plot_convergence(backbone: str, units: dict, path: Path, context: str) -> str:
    """Training loss and accuracy per epoch (mean over units) for pretrained vs scratch (vs ImageNet)."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    first = next(iter(units.values()))
    for k, run in enumerate(r for r in ("localization", "imagenet", "scratch") if r in first["runs"]):
        histories = [u["runs"][run]["history"] for u in units.values()]
        key = first["runs"][run]["accuracy_curve"]
        epochs = [h["epoch"] for h in histories[0]]
        label = f"{first['runs'][run]['weights'].split('@')[0]}"
        left.plot(epochs, np.mean([[h["train_loss"] for h in hist] for hist in histories], axis=0),
                  color=f"C{k}", label=label)
        right.plot(epochs, np.mean([[h.get(key, np.nan) * 100 for h in hist] for hist in histories], axis=0),
                   color=f"C{k}", label=f"{label} ({key.replace('_', ' ')})")
    left.axhline(1.0, color="gray", linewidth=0.6, linestyle=":")
    right.axhline(95, color="gray", linewidth=0.6, linestyle=":")
    for axis, ylabel in ((left, "training loss"), (right, "accuracy (%)")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"{backbone} + localization head: pretrained vs scratch, mean over {len(units)} unit(s); {context}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _relative(ours: float | None, base: float | None) -> str:
    if ours is None or base is None:
        return ""
    if not base:
        return f" (↑ {(ours - base) * 100:.1f} pts over 0%)" if ours > base else ""
    rel = (ours - base) / base * 100
    return f" ({'↑' if rel > 0 else '↓' if rel < 0 else '='} {abs(rel):.1f}%)"


def settings_line(result: dict) -> str:
    """The report's second line: data, protocol, units and how every model was trained."""
    opts, classes = result["options"], result["classes"]
    return (f"{result['dataset']} ({len(classes)} classes: {', '.join(classes)}), {_units_label(result)}; "
            + (f"every training part also holds {', '.join(opts['extra_train'])}'s faces of these classes "
               "(`--extra-train`: its people never appear in validation or test); " if opts.get("extra_train") else "")
            + f"input {opts['input_size']} px"
            + (", faces aligned (eyes levelled, `--align eyes`)" if opts.get("align", "none") != "none" else "")
            + f", {epochs_words(opts, flag=True)}, batch 32, SGD lr "
            + (f"{opts['finetune_lr']:g} from pretrained weights (`--finetune-lr`), 0.01 from scratch,"
               if opts.get("finetune_lr") is not None else "0.01") + " with Algorithm 1 "
            "(SPEC §4), `--augment strong`; defense S = {FGSM, R+FGSM}, beta 0.5 each, beta0 0.5, eps 0.01, "
            f"eval-mode perturbations made with the current model in every batch. {os.cpu_count()} CPU cores, no GPU."
            + (" **--quick: a tiny slice; these numbers check the code path, not the claims.**" if opts["quick"] else ""))


def study_markdown(result: dict, plots: dict[str, str]) -> str:
    classes = result["classes"]
    partial = " (partial)" if result.get("pending_units") else ""
    lines = [f"# Reproduction of the reference study: {result['dataset']}, {result['protocol']} protocol{partial}", "",
             settings_line(result),
             "", "Backbones and their pretrained weights: " +
             "; ".join(f"{b}: `{w}`" for b, w in result["weights"].items()) + ".",
             "Figures are mean ± standard deviation over the units (folds x seeds) where there is more than one.", ""]
    if result.get("pending_units"):
        done = sum(len(units) for units in result["units"].values())
        lines += [f"**Partial: {done} of {done + len(result['pending_units'])} units finished**; these figures are "
                  f"over the finished ones only (pending: {', '.join(result['pending_units'])}). Re-run the command "
                  "below to go on.", ""]
    lines += _counts_table(result)
    lines += ["## Clean test accuracy (%)", "", "| backbone | " + " | ".join(RUN_LABELS[r] for r in RUN_LABELS) +
              " |", "|---|" + "---:|" * len(RUN_LABELS)]
    for backbone, s in result["summary"].items():
        lines.append(f"| {backbone} | " + " | ".join(_pm(s["runs"].get(r, {}).get("test_accuracy")) for r in RUN_LABELS) + " |")
    lines += ["", "Reference (LIRIS-CSE, per-video frame split): VGG16 95.67 / 88.32 / defended 94.97; "
                  "AlexNet 95.09 / 87.29 / 93.60.", ""]
    lines += [f"![{t}]({p})" for t, p in plots.items() if "confusion" in t] + [""]
    lines += ["## Convergence: pretrained vs scratch", "",
              "| backbone | run | weights | epochs to training loss < 1 | epochs to accuracy >= 95% | s/epoch |",
              "|---|---|---|---:|---:|---:|"]
    for backbone, s in result["summary"].items():
        first = next(iter(result["units"][backbone].values()))["runs"]
        for run in ("localization", "imagenet", "scratch", "own-head", "defended"):
            if run in s["runs"]:
                r = s["runs"][run]
                lines.append(f"| {backbone} | {RUN_LABELS[run]} | `{first[run]['weights']}` | "
                             f"{_pm(r['epochs_to_loss_below_1'], False)} | {_pm(r['epochs_to_accuracy_95'], False)} | "
                             f"{_pm(r['seconds_per_epoch'], False)} |")
    lines += ["", "Accuracy = validation accuracy where the split has a validation part, else training accuracy. "
                  "Reference: pretrained <= 2 epochs for both; scratch >= 17 (loss) and >= 20 (accuracy).", ""]
    lines += [f"![{t}]({p})" for t, p in plots.items() if "convergence" in t] + [""]
    lines += ["## Undefended model: FGSM accuracy vs eps (%)", ""]
    sweep_eps = list(next(iter(result["summary"].values()))["sweep"])
    lines += ["| backbone | clean | " + " | ".join(sweep_eps) + " |", "|---|---:|" + "---:|" * len(sweep_eps)]
    for backbone, s in result["summary"].items():
        lines.append(f"| {backbone} | {_pm(s['runs']['localization']['test_accuracy'])} | " +
                     " | ".join(_pm(s["sweep"][e]) for e in sweep_eps) + " |")
    lines += ["", f"Chance: {100 / len(classes):.0f}%. Reference: below chance (20%) once eps > 0.006.", "",
              f"![FGSM accuracy vs eps]({plots['FGSM accuracy vs eps']})", ""]
    for n, (backbone, s) in enumerate(result["summary"].items()):
        lines += _robustness_table(backbone, s, n, result)
        lines += [f"![{t}]({p})" for t, p in plots.items() if t.startswith(backbone + " ") and
                  ("bars" in t or "per-class" in t)] + [""]
    lines += _autoattack_section(result)
    lines += ["## Camera corruptions (mean accuracy over 5 severities, %)", "",
              "| corruption | " + " | ".join(f"{b} undefended | {b} defended" for b in result["summary"]) + " |",
              "|---|" + "---:|" * (2 * len(result["summary"]))]
    names = [k for k in next(iter(result["summary"].values()))["defended"] if k.startswith("corruption:")]
    for key in names:
        lines.append(f"| {key.split(':', 1)[1]} | " + " | ".join(
            f"{_pm(s['undefended'][key])} | {_pm(s['defended'][key])}" for s in result["summary"].values()) + " |")
    lines += ["", "## The reference's claims, checked", "", "| claim | reference | ours | holds? | rule |",
              "|---|---|---|:---:|---|"]
    for c in result["claims"]:
        lines.append(f"| {c['claim']} | {c['reference']} | {c['ours']} | {'✓' if c['holds'] else '✗'} | {c['rule']} |")
    flags = sorted({f for units in result["units"].values() for u in units.values() for f in u["sanity_flags"]})
    lines += ["", "## Sanity flags (defended models)", ""] + ([f"- ⚠ {f}" for f in flags] or ["- none raised"])
    lines += ["", "## Provenance", "", f"- command: `{' '.join(result['command'])}`",
              f"- git commit: `{result['git_commit']}`",
              f"- compute time: {result['compute_seconds'] / 60:.1f} min over all steps "
              f"(this invocation: {result['wall_seconds_this_invocation'] / 60:.1f} min wall)",
              f"- units: {', '.join(f'{b}/{k}' for b, units in result['units'].items() for k in units)}",
              "- every number per unit, with per-epoch histories: results.json", ""]
    return "\n".join(lines)


def _autoattack_section(result: dict) -> list[str]:
    """AutoAttack's robust accuracy after each of its attacks (mean over units), and the masking checks."""
    lines = []
    for backbone, units in result["units"].items():
        first = next(iter(units.values()))
        if not first.get("autoattack", {}).get("defended"):
            continue
        if not lines:
            lines += ["## AutoAttack, attack by attack (%)", "",
                      "Robust accuracy after each attack of the standard sequence (each runs only on the images "
                      "still robust), mean over units.", "",
                      "| backbone | model | eps | " + " | ".join(
                          ["clean", "APGD-CE", "APGD-T", "FAB-T", "Square"]) + " |", "|---|---|---|" + "---:|" * 5]
        for variant in ("defended", "undefended"):
            for eps in first["autoattack"][variant]:
                stage_lists = [u["autoattack"][variant][eps]["stages"] for u in units.values()]
                means = [_mean([st.get(name) for st in stage_lists]) for name in AA_STAGES]
                lines.append(f"| {backbone} | {variant} | {_eps_label(eps)} | " +
                             " | ".join("skipped" if m is None else f"{m * 100:.1f}" for m in means) + " |")
    if lines:
        lines += ["", "Gradient-masking checks (defended models, mean over units): PGD accuracy as eps grows "
                      "(must reach ~0), and PGD transferred from the undefended twin (must not beat white-box PGD).",
                  "", "| backbone | " + " | ".join(f"PGD eps {e}" for e in _sweep_keys(result)) +
                  " | transfer PGD eps " + _mid_eps(result) + " | white-box PGD |",
                  "|---|" + "---:|" * (len(_sweep_keys(result)) + 2)]
        followup = _sweep_followup_lines(result)
        mid = _mid_eps(result)
        for backbone, units in result["units"].items():
            checks = [u.get("masking_checks", {}) for u in units.values()]
            sweep = [_mean([c.get("sweep", {}).get(e) for c in checks]) for e in _sweep_keys(result)]
            transfer = _mean([c.get("transfer", {}).get(mid, {}).get("accuracy") for c in checks])
            white = result["summary"][backbone]["defended"].get(f"pgd@{mid}", {}).get("mean")
            lines.append(f"| {backbone} | " + " | ".join("n/a" if v is None else f"{v * 100:.1f}" for v in sweep) +
                         f" | {'n/a' if transfer is None else f'{transfer * 100:.1f}'} | "
                         f"{'n/a' if white is None else f'{white * 100:.1f}'} |")
        lines += [""] + followup
    return lines


def _sweep_followup_lines(result: dict) -> list[str]:
    """The units where PGD's fixed step stayed above the floor at the sweep's largest eps, with
    what APGD-CE (adaptive step) left there: tells a weak attack from masked gradients."""
    rows = [f"{backbone} {name}: PGD {u['masking_checks']['sweep'][eps] * 100:.1f}%, APGD-CE {acc * 100:.1f}% "
            f"at eps {eps}"
            for backbone, units in result["units"].items() for name, u in units.items()
            for eps, acc in u.get("masking_checks", {}).get("sweep_apgd", {}).items()]
    if not rows:
        return []
    return [f"Where PGD's fixed step left more than {MASKING_FLOOR:.0%} at the sweep's largest eps, APGD-CE was "
            f"run there (the flag is raised only if it stays above {MASKING_FLOOR:.0%} too): " + "; ".join(rows) + ".",
            ""]


def _sweep_keys(result: dict) -> list[str]:
    keys = {e for units in result["units"].values() for u in units.values()
            for e in u.get("masking_checks", {}).get("sweep", {})}
    return sorted(keys, key=float)


def _counts_table(result: dict) -> list[str]:
    """Table II: images per class and split (first unit; subject folds differ, totals per fold below)."""
    units = next(iter(result["units"].values()))
    first_key, first = next(iter(units.items()))
    table = first["class_counts"]
    extra = sum(row.get("extra_train", 0) for row in table.values())
    names = ", ".join((result.get("options") or {}).get("extra_train") or []) or "other datasets"
    extra_cell = (lambda n: f" {n} |") if extra else (lambda n: "")
    lines = [f"## Table II: images per class ({first_key.split('-')[0]})", "",
             "| class | train |" + extra_cell(f"+ train ({names})") + " val | test |",
             "|---|---:|" + ("---:|" if extra else "") + "---:|---:|"]
    for c in result["classes"]:
        row = table.get(c, {})
        lines.append(f"| {c} | {row.get('train', 0)} |" + extra_cell(row.get("extra_train", 0))
                     + f" {row.get('val', 0)} | {row.get('test', 0)} |")
    counts = first["counts"]
    lines.append(f"| **all** | {counts.get('train', 0) - extra} |" + extra_cell(extra)
                 + f" {counts.get('val', 0)} | {counts.get('test', 0)} |")
    if len({k.split("-")[0] for k in units}) > 1:
        lines += ["", f"Per fold (train{f' with {names} faces' if extra else ''}/val/test): " + "; ".join(
            f"{k.split('-')[0]} {u['counts']['train']}/{u['counts']['val']}/{u['counts']['test']}"
            for k, u in units.items() if k.endswith(f"seed{first['seed']}"))]
    return lines + [""]


def _robustness_table(backbone: str, s: dict, n: int, result: dict) -> list[str]:
    """Table III (n = 0) / IV: defended accuracy (undefended in brackets) with relative improvement."""
    eps = _eps_keys(s)
    d, u = s["defended"], s["undefended"]
    opts = result["options"]
    lines = [f"## Table {'III' if n == 0 else 'IV' if n == 1 else n + 3}: {backbone}, defended vs undefended (%)", "",
             "Cells: defended (undefended) and the relative change of the mean. PGD: "
             f"{opts['pgd_steps']} steps, step 2.5*eps/steps; APGD-CE: {opts['apgd_steps']} steps; AutoAttack "
             f"(standard: APGD-CE, APGD-T, FAB-T at {opts.get('autoattack_steps', 100)} steps, Square at "
             f"{opts.get('square_queries', 5000)} queries) at eps {', '.join(f'{e:g}' for e in opts.get('autoattack_eps', []))}; "
             "worst case: per image, over every attack run at that eps.", "",
             "| attack | " + " | ".join(f"eps {_eps_label(e)}" for e in eps) + " |", "|---|" + "---:|" * len(eps)]

    def cell(key: str) -> str:
        if key not in d:
            return ""
        return f"{_pm(d[key])} ({_pm(u.get(key))}){_relative(d[key]['mean'], (u.get(key) or {}).get('mean'))}"

    for key, label in (("fgsm", "FGSM"), ("rfgsm", "R+FGSM")):
        lines.append(f"| {label} | " + " | ".join(cell(f"{key}@{e}") for e in eps) + " |")
    avg = []
    for e in eps:
        dm = _mean([d[f"fgsm@{e}"]["mean"], d[f"rfgsm@{e}"]["mean"]])
        um = _mean([u[f"fgsm@{e}"]["mean"], u[f"rfgsm@{e}"]["mean"]])
        avg.append(f"{dm * 100:.1f} ({um * 100:.1f}){_relative(dm, um)}")
    lines.append("| Average | " + " | ".join(avg) + " |")
    for key, label in (("pgd", "PGD (unseen)"), ("apgd", "APGD-CE (unseen)"), ("autoattack", "AutoAttack (unseen)"),
                       ("worst", "worst case")):
        if not any(f"{key}@{e}" in d for e in eps):
            continue
        lines.append(f"| {label} | " + " | ".join(cell(f"{key}@{e}") for e in eps) + " |")
    lines += ["", f"Clean: defended {_pm(d['clean'])}, undefended {_pm(u['clean'])}. Reference VGG16 defended: "
                  "FGSM 90.84/85.76/82.75, R+FGSM 93.31/90.84/87.99, PGD 83.29 (undefended 0.41); AlexNet FGSM "
                  "85.10/75.94/67.40, R+FGSM 89.31/85.10/80.93.", ""]
    return lines
