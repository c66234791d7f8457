"""Markdown summaries of a model's results."""

from __future__ import annotations


def describe_run(meta: dict) -> str:
    """One line naming the data, protocol, backbone, input size, epochs and seed of a result."""
    from ..data.splits import nested_label

    fold = f", fold {meta['fold']}/{meta['folds']}" if meta.get("fold") is not None else ""
    fold += nested_label(meta.get("nested_in"))  # an inner fold: the people outside an outer fold's test part
    defense = meta.get("defense")
    defended = (f", defended ({'+'.join(f'{k}:{v:g}' for k, v in defense['methods'].items())}, "
                f"beta0 {defense['beta0']:g}, eps {defense['eps']:g})") if defense else ""
    absent = meta.get("classes_absent_from_dataset")
    no_images = f"; no images of {', '.join(absent)}" if absent else ""
    library = (f", library entry {meta['library_entry']} as shipped (pretrained on "
               f"{meta.get('pretrained_on') or '?'}, not fine-tuned)") if meta.get("library_entry") else ""
    epochs = "epochs unknown" if meta.get("epochs") is None else f"{meta['epochs']} epochs"
    extra = f" (+ {', '.join(meta['extra_train'])} faces in training)" if meta.get("extra_train") else ""
    return (f"{meta['dataset']}{extra} ({len(meta['classes'])} classes: {', '.join(meta['classes'])}{no_images}), "
            f"{meta['protocol']} protocol{fold}, {meta['backbone']} + {meta['head']} head "
            f"(weights: {meta['weights']}){library}, input {meta['input_size']} px{_preprocessing(meta)}, "
            f"{epochs}, seed {meta['seed']}{defended}")


def _preprocessing(meta: dict) -> str:
    """Face alignment and test-time augmentation, named only when they are on."""
    parts = [f"faces aligned ({meta['align']})" if meta.get("align", "none") != "none" else "",
             f"test-time {meta['tta']}" if meta.get("tta", "none") != "none" else ""]
    return "".join(f", {p}" for p in parts if p)


def metrics_markdown(metrics: dict, title: str = "Evaluation") -> str:
    """A summary: what was measured, overall accuracy, per-class accuracy and the confusion matrix."""
    classes = metrics["classes"]
    lines = [f"# {title}", "", describe_run(metrics), "",
             f"- test images: {metrics['num_images']}",
             f"- accuracy: **{metrics['test_accuracy']:.2%}** (balanced: {metrics['balanced_accuracy']:.2%})",
             f"- git commit: `{metrics.get('git_commit', 'unknown')}`", "",
             "| class | images | accuracy |", "|---|---:|---:|"]
    for c in classes:
        acc = metrics["per_class_accuracy"][c]
        lines.append(f"| {c} | {metrics['support'][c]} | {'n/a' if acc is None else f'{acc:.2%}'} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for c, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    if metrics.get("confusion_matrix_png"):
        lines += ["", f"![confusion matrix]({metrics['confusion_matrix_png']})"]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _arrow(delta: dict | None) -> str:
    if not delta:
        return ""
    if delta.get("relative_percent") is None:  # baseline at 0%: no relative change, give points
        points = delta.get("points")
        return "" if points is None else f" ({'↑' if points > 0 else '='} {points:.1f} pts over 0%)"
    rel = delta["relative_percent"]
    return f" ({'↑' if rel > 0 else '↓' if rel < 0 else '='} {abs(rel):.1f}%)"


def robustness_markdown(report: dict, meta: dict, comparison: dict | None = None, baseline_meta: dict | None = None,
                        plots: dict | None = None) -> str:
    """report.md in the form of SPEC §7: rows FGSM, R+FGSM, Average (+ PGD, APGD, worst case),
    columns eps_test, with "↑ x%" relative improvements over the baseline when given."""
    from ..attacks.registry import LABELS

    attacks = report["attacks"]
    eps_keys = sorted({e for by_eps in attacks.values() for e in by_eps}, key=float)
    settings = report["settings"]
    lines = ["# Robustness report", "", describe_run(meta), "",
             f"Test images: {report['num_images']}. Attacks: L-inf on [0, 1] images, model in eval mode; "
             f"PGD {settings['pgd_steps']} steps of 2.5*eps/steps from a random start, APGD-CE "
             f"{settings['apgd_steps']} steps, {settings['restarts']} restart(s), R+FGSM alpha = eps/2, "
             f"seed {settings['seed']}.", ""]
    if baseline_meta:
        lines += [f"Baseline: {describe_run(baseline_meta)}", "",
                  "Cells: this model's accuracy, with the relative change over the baseline (↑ x%).", ""]
    clean_cmp = comparison["clean"] if comparison else None
    base_clean = f" (baseline {_pct(clean_cmp['baseline_accuracy'])}){_arrow(clean_cmp)}" if clean_cmp else ""
    lines += [f"**Clean accuracy: {_pct(report['clean_accuracy'])}**{base_clean}", ""]
    if attacks:
        lines += ["| attack | " + " | ".join(f"eps {e}" for e in eps_keys) + " |",
                  "|---|" + "---:|" * len(eps_keys)]

        def row(label: str, name: str) -> str:
            cells = []
            for e in eps_keys:
                value = attacks.get(name, {}).get(e)
                delta = comparison["attacks"].get(name, {}).get(e) if comparison else None
                cells.append(_pct(value["accuracy"]) + _arrow(delta) if value else "")
            return f"| {label} | " + " | ".join(cells) + " |"

        for name in ("fgsm", "rfgsm"):
            if name in attacks:
                lines.append(row(LABELS[name], name))
        if "fgsm" in attacks and "rfgsm" in attacks:
            cells = []
            for e in eps_keys:
                pair = [attacks[n][e]["accuracy"] for n in ("fgsm", "rfgsm") if e in attacks[n]]
                avg = sum(pair) / len(pair) if len(pair) == 2 else None
                text = _pct(avg)
                if comparison and avg is not None:
                    base = [comparison["attacks"].get(n, {}).get(e, {}).get("baseline_accuracy") for n in ("fgsm", "rfgsm")]
                    if all(b is not None for b in base) and sum(base):
                        text += _arrow({"relative_percent": (avg - sum(base) / 2) / (sum(base) / 2) * 100})
                cells.append(text)
            lines.append("| Average | " + " | ".join(cells) + " |")
        for name in ("pgd", "apgd"):
            if name in attacks:
                steps = settings["pgd_steps"] if name == "pgd" else settings["apgd_steps"]
                lines.append(row(f"{LABELS[name]}-{steps}", name))
        for name in ("apgdt", "fabt", "square"):
            if name in attacks:
                lines.append(row(LABELS[name] + (f" ({settings.get('square_queries')} queries)" if name == "square"
                                                 else ""), name))
        if "autoattack" in attacks:
            lines.append(row("**AutoAttack** (standard)", "autoattack"))
        if report["worst_case"]:
            cells = []
            for e in eps_keys:
                value = report["worst_case"].get(e)
                delta = comparison["worst_case"].get(e) if comparison else None
                cells.append(_pct(value["accuracy"]) + _arrow(delta) if value else "")
            lines.append("| **Worst case** (all attacks) | " + " | ".join(cells) + " |")
        lines.append("")
    if report["corruptions"]:
        lines += ["## Camera corruptions", "", "| corruption | " + " | ".join(f"severity {s}" for s in range(1, 6))
                  + " | mean |", "|---|" + "---:|" * 6]
        for name, by_sev in report["corruptions"].items():
            accs = [by_sev[str(s)]["accuracy"] for s in range(1, 6)]
            lines.append(f"| {name} | " + " | ".join(_pct(a) for a in accs) + f" | {_pct(sum(accs) / 5)} |")
        lines.append("")
    if attacks:
        mid = eps_keys[len(eps_keys) // 2]
        conditions = [("clean", report["per_class_accuracy"]["clean"])] + [
            (f"{LABELS[n]} {mid}", attacks[n][mid]["per_class_accuracy"]) for n in attacks if mid in attacks[n]]
        lines += [f"## Per-class accuracy (eps {mid})", "",
                  "| class | " + " | ".join(c for c, _ in conditions) + " |", "|---|" + "---:|" * len(conditions)]
        for cls in report["classes"]:
            lines.append(f"| {cls} | " + " | ".join(_pct(values[cls]) for _, values in conditions) + " |")
        lines.append("")
    timed = {(n, e): v for n, by_eps in attacks.items() for e, v in by_eps.items() if "seconds" in v}
    if timed:  # what each attack cost on this machine (reports made before timings were kept have none)
        lines += ["## Attack cost", "", "Wall-clock seconds over all test images, this machine, this run "
                  "(compare within one report; absolute times drift between machines)."]
        lines += [""] + [f"- {LABELS[n]} eps {e}: {v['seconds']:.1f} s" + (
            " (" + ", ".join(f"{k} {t:.1f} s" for k, t in v["stage_seconds"].items()) + ")"
            if v.get("stage_seconds") else "") for (n, e), v in timed.items()] + [""]
    checks = report.get("masking_checks", {})
    if checks:
        lines += ["## Gradient-masking checks", ""]
        if checks.get("sweep"):
            lines += ["PGD accuracy as eps grows (must reach ~0): "
                      + ", ".join(f"eps {e}: {_pct(a)}" for e, a in checks["sweep"].items()), ""]
        if checks.get("sweep_apgd"):
            lines += ["PGD's fixed step stayed above the floor there, so APGD-CE (adaptive step) was run at that eps: "
                      + ", ".join(f"eps {e}: {_pct(a)}" for e, a in checks["sweep_apgd"].items()), ""]
        if checks.get("transfer"):
            lines += ["PGD made on the baseline, transferred to this model (must not beat white-box PGD): "
                      + ", ".join(f"eps {e}: {_pct(v['accuracy'])}" for e, v in checks["transfer"].items()), ""]
    lines += ["## Sanity flags", ""]
    lines += [f"- ⚠ {flag}" for flag in report["sanity_flags"]] or ["- none raised"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", f"git commit: `{meta.get('evaluated_by') or meta.get('git_commit', 'unknown')}`"]
    return "\n".join(lines) + "\n"
