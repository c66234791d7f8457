"""How much accuracy and robustness survive a change of faces: every finished unit of a study
(`emoshield reproduce`'s work folder) has its defended and undefended (localization head) model
tested on every image of another dataset (the model's classes; JAFFE face-cropped as always),
clean and under PGD and AutoAttack, beside the same models' figures on their own held-out people.

Resumable unit by unit: each unit's numbers go to OUT/units/BACKBONE-foldF-seedS.json (small,
committed; a later session without the work folder keeps them), its full robustness report to
the unit's work folder (cross-TARGET/). OUT/results.json and OUT/report.md are mean ± std over
the units evaluated so far."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EmoshieldError
from .paths import write_json


@dataclass
class CrossOptions:
    """What the target evaluation runs; a unit file made with other options is refused, not mixed."""

    target: str
    data_root: str | None = None
    eps: list[float] = field(default_factory=lambda: [0.01])
    pgd_steps: int = 10
    autoattack_steps: int = 100
    square_queries: int = 5000
    limit_per_class: int | None = None


VARIANTS = {"defended": "defended", "undefended": "localization"}  # table row -> training folder


def finished_units(work: Path) -> list[tuple[str, str, Path]]:
    """(backbone, 'foldF-seedS', folder) of every unit the study has finished: its defended and
    localization trainings and its own robustness evaluation (the table's 'own' columns)."""
    work = Path(work)
    if not (work / "study.json").is_file():
        raise EmoshieldError(f"{work} is not a study's work folder (no study.json; see `emoshield reproduce --work`)")
    units = []
    for folder in sorted(p for p in work.glob("*/fold*-seed*") if p.is_dir()):
        if (all((folder / run / "metrics.json").is_file() for run in VARIANTS.values())
                and (folder / "robustness" / "robustness.json").is_file()):
            units.append((folder.parent.name, folder.name, folder))
    return units


def cross_evaluate(work: Path, out: Path, options: CrossOptions, log=None) -> dict:
    """Evaluate every finished unit not yet in OUT, then write OUT's results and report."""
    from .reproduce import step_lock

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    study = json.loads((Path(work) / "study.json").read_text()) if (Path(work) / "study.json").is_file() else {}
    source = (study.get("options") or {}).get("dataset")
    if options.target == "fer2013" and any(str(w).startswith("library:") for w in study.get("weights", {}).values()):
        raise EmoshieldError("--dataset fer2013: the study's backbones were pretrained on FER2013 (the cloud "
                             "library), so its images are not new faces to these models")
    if source == options.target:
        raise EmoshieldError(f"--dataset {options.target} is the study's own dataset: its held-out people are in "
                             "the study's report; cross-dataset means another dataset")
    if options.target in ((study.get("options") or {}).get("extra_train") or []):
        raise EmoshieldError(f"--dataset {options.target}: the study's models trained on its faces (--extra-train), "
                             "so they are not new faces to them")
    units = finished_units(work)
    out = Path(out)
    if not units and not any((out / "units").glob("*.json")):
        raise EmoshieldError(f"no unit of {work} has finished yet (trainings and the study's own evaluation)")
    busy = []
    for i, (backbone, unit, folder) in enumerate(units, 1):
        tag = f"[{i}/{len(units)}] {backbone} {unit} on {options.target}"
        path = out / "units" / f"{backbone}-{unit}.json"
        if _saved(path, options, study) is not None:
            log(f"{tag}: already done ({path})")
            continue
        # Lock and work folder are per target *and* options: a concurrent run with other options
        # works on its own files instead of being told this one is 'running'.
        with step_lock(folder / unit_folder_name(options)) as mine:
            if not mine:
                log(f"{tag}: running in another process (left pending here)")
                busy.append(f"{backbone}-{unit}")
                continue
            log(f"{tag}: evaluating")
            if _saved(path, options, study) is None:  # not finished by another process meanwhile
                _evaluate_unit(backbone, unit, folder, path, options, study, log)
    result = collect(out, options, study)
    done = set(result["units"])
    # a unit another process was busy with may have finished meanwhile: then it is in the table
    result["pending"] = sorted(({f"{b}-{u}" for b, u, _ in units} | set(busy)) - done)
    write_report(out, result)
    return result


def unit_folder_name(options: CrossOptions) -> str:
    """cross-TARGET-HASH: the unit's work folder (full robustness report) and lock for these options."""
    digest = hashlib.sha256(json.dumps(asdict(options) | {"data_root": None}, sort_keys=True).encode())
    return f"cross-{options.target}-{digest.hexdigest()[:10]}"


def _identity(options: CrossOptions, study: dict) -> dict:
    """What a unit file must match to be reused: these options (not the data path) and the study
    (its options and weights), so one OUT never mixes settings or studies."""
    from .reproduce import with_later_options

    return {"options": asdict(options) | {"data_root": None}, "study": with_later_options(study)}


def _saved(path: Path, options: CrossOptions, study: dict) -> dict | None:
    from .reproduce import with_later_options

    return _read_matching(path, _identity(options, study), "from another study",
                          normalize=lambda saved: {**saved, "study": with_later_options(saved.get("study"))})


def _read_matching(path: Path, identity: dict, other: str, normalize=None) -> dict | None:
    """The saved result at PATH (None if there is none) when its identity keys match (after
    `normalize`, if given); a result made otherwise is refused, never mixed or overwritten."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise EmoshieldError(f"{path} is not a readable result file ({type(exc).__name__}); "
                             "delete it to re-evaluate") from None
    compared = normalize(saved) if normalize and isinstance(saved, dict) else saved
    if not isinstance(saved, dict) or {k: compared.get(k) for k in identity} != identity:
        raise EmoshieldError(f"{path} was made with other options or {other}; pass another --out or delete it")
    return saved


def _evaluate_unit(backbone: str, unit: str, folder: Path, path: Path, options: CrossOptions,
                   study: dict, log) -> None:
    from .paths import write_atomic
    from .pipeline import evaluate_model
    from .provenance import git_commit
    from .reproduce import headline

    data, robustness = _target_evaluation(options)
    result = evaluate_model(folder / VARIANTS["defended"], folder / unit_folder_name(options), data, robustness,
                            baseline_dir=folder / VARIANTS["undefended"], log=lambda m: log(f"  {m}"))
    own = json.loads((folder / "robustness" / "robustness.json").read_text())  # on the fold's held-out people
    record = {**_identity(options, study), "backbone": backbone, "unit": unit,
              "source": study["options"]["dataset"], "target": options.target, "git_commit": git_commit(),
              "num_images": result["robustness"]["num_images"], "classes": result["model"]["classes"],
              "input_size": result["model"]["input_size"], "epochs": result["model"]["epochs"],
              "seed": result["model"]["seed"]}
    for variant, key in (("defended", "robustness"), ("undefended", "baseline_robustness")):
        record[variant] = {"target": headline(result[key]), "source": headline(own[key]),
                           "autoattack_stages": _autoattack_stages(result[key]),
                           "sanity_flags": result[key]["sanity_flags"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1).encode())


def _target_evaluation(options: CrossOptions):
    """(data, robustness options) of a cross-dataset evaluation: every image of the target of the
    model's classes, PGD and AutoAttack at the options' eps."""
    from .pipeline import DataOptions, RobustnessOptions

    data = DataOptions(dataset=options.target, data_root=options.data_root, protocol="all",
                       limit_per_class=options.limit_per_class)
    robustness = RobustnessOptions(["pgd", "autoattack"], list(options.eps), pgd_steps=options.pgd_steps,
                                   square_queries=options.square_queries, autoattack_steps=options.autoattack_steps)
    return data, robustness


def _autoattack_stages(report: dict) -> dict:
    """Accuracy after each AutoAttack stage, per eps, of one robustness report."""
    return {e: v.get("stages") for e, v in report["attacks"].get("autoattack", {}).items()}


def collect(out: Path, options: CrossOptions, study: dict) -> dict:
    """mean ± std per backbone and variant of every figure, over this study's unit files under OUT."""
    from .reproduce import mean_std

    records = [_saved(p, options, study) for p in sorted((Path(out) / "units").glob("*.json"))]
    source = study["options"]["dataset"]
    summary: dict = {}
    for r in records:
        for variant in VARIANTS:
            for where in ("source", "target"):
                for key, value in r[variant][where].items():
                    (summary.setdefault(r["backbone"], {}).setdefault(variant, {}).setdefault(where, {})
                     .setdefault(key, []).append(value))
    summary = {b: {v: {w: {k: mean_std(vals) for k, vals in keys.items()} for w, keys in by_where.items()}
                   for v, by_where in by_variant.items()} for b, by_variant in summary.items()}
    first = records[0] if records else {}
    return {"source": source, "target": options.target, **_identity(options, study),
            "num_images": first.get("num_images"), "classes": first.get("classes"),
            "input_size": first.get("input_size"), "epochs": first.get("epochs"),
            "units": {f"{r['backbone']}-{r['unit']}": r for r in records}, "summary": summary, "pending": [],
            "unit_commits": sorted({r["git_commit"] for r in records})}


def _autoattack_words(steps, queries) -> str:
    """How the reports name the AutoAttack settings they ran (one wording for every table)."""
    return f"AutoAttack standard (APGD-CE, APGD-T, FAB-T {steps} steps, Square {queries} queries)"


def cross_markdown(result: dict) -> str:
    """The table RESULTS.md quotes: own held-out people vs the other dataset, per backbone and model."""
    from .evaluation.study_report import _pm, epochs_words

    o = result["options"]
    so = (result.get("study") or {}).get("options") or {}
    held_out = ("its fold's held-out people" if so.get("protocol") == "subject"
                else f"its {so.get('protocol', 'own')}-protocol test split")
    images = (f"all {result['num_images']}" if o.get("limit_per_class") is None
              else f"{result['num_images']} (at most {o['limit_per_class']} per class)")
    lines = [f"# {result['source']} models on {result['target']}: what survives a change of faces", "",
             f"Every finished unit (fold x seed) of the {result['source']} {so.get('protocol', '')} study; each unit's "
             f"defended and undefended (localization head) model tested on {images} {result['target']} images of "
             f"its classes ({', '.join(result['classes'] or [])}), {result['input_size']} px, "
             f"{epochs_words(so) if 'epochs' in so else str(result['epochs']) + ' epochs'} of training. "
             "mean ± std over units. "
             f"Commits: {', '.join(c[:12] for c in result['unit_commits'])}.", "",
             f"- 'own' = the study's figures on {held_out}, with the study's settings: "
             f"{_autoattack_words(so.get('autoattack_steps'), so.get('square_queries'))} "
             f"at eps {', '.join(f'{e:g}' for e in so.get('autoattack_eps', []))}.",
             f"- {result['target']} = this table's settings: "
             f"{_autoattack_words(o['autoattack_steps'], o['square_queries'])} and PGD-{o['pgd_steps']}.", ""]
    if result.get("pending"):
        lines += [f"Not in the table yet (pending or being evaluated by another process): "
                  f"{', '.join(result['pending'])}.", ""]
    for eps in (f"{e:g}" for e in o["eps"]):
        lines += [f"## eps {eps}", "",
                  "| backbone | model | units | own clean | own AutoAttack | "
                  f"{result['target']} clean | {result['target']} PGD-{o['pgd_steps']} | {result['target']} AutoAttack |",
                  "|---|---|---|---|---|---|---|---|"]
        for backbone, variants in result["summary"].items():
            for variant, s in variants.items():
                n = s["target"]["clean"]["n"]
                lines.append(f"| {backbone} | {variant} | {n} | {_pm(s['source'].get('clean'))} | "
                             f"{_pm(s['source'].get(f'autoattack@{eps}'))} | {_pm(s['target']['clean'])} | "
                             f"{_pm(s['target'].get(f'pgd@{eps}'))} | {_pm(s['target'].get(f'autoattack@{eps}'))} |")
        lines.append("")
    flags = sorted({f for r in result["units"].values() for v in VARIANTS for f in r[v]["sanity_flags"]})
    lines += ["## Sanity flags", "", *(f"- {f}" for f in flags or ["none raised"]), ""]
    return "\n".join(lines)


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    (out / "report.md").write_text(cross_markdown(result))


LIBRARY_VARIANT = "no fine-tuning"  # the table's 'model' column for a cloud library entry as shipped


def library_cross(entry: str, out: Path, options: CrossOptions, log=None) -> dict:
    """A cloud library entry as it is shipped (e.g. FER2013 -> CK+48 with no fine-tuning) on every
    face of the target of the classes it has: clean, PGD and AutoAttack, beside its own test
    accuracy from the library metadata (FER2013 PrivateTest; clean only). OUT/evaluation holds
    the full robustness report; OUT/results.json has the shape `collect` gives a study, so
    RESULTS.md's cross-dataset table shows it as one more row. Re-running returns the saved result
    when entry (sha256) and options match, and refuses an OUT made otherwise."""
    from .models.library import exact_weights, read_weights_spec
    from .paths import write_atomic
    from .pipeline import evaluate_model
    from .provenance import git_commit
    from .reproduce import headline, mean_std, step_lock

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    meta, _ = read_weights_spec(f"library:{entry}")  # NAME, or NAME@SHA: those exact weights
    entry = meta["name"]
    source = str(meta.get("data", "")).split(" ")[0] or "?"
    if source == options.target:
        raise EmoshieldError(f"library:{entry} was pretrained on {source}: test it on its own test split with "
                             f"`emoshield evaluate --model library:{entry} --dataset {source} --protocol official`")
    identity = {"options": asdict(options) | {"data_root": None},
                "library_entry": {"name": meta.get("name"), "sha256": meta.get("sha256")}}
    out = Path(out)
    path = out / "results.json"
    if (saved := _read_matching(path, identity, "from another library entry")) is not None:
        log(f"library:{entry} on {options.target}: already done ({path})")
        return saved
    data, robustness = _target_evaluation(options)
    with step_lock(out / "evaluation") as mine:
        if not mine:
            raise EmoshieldError(f"{out} is being evaluated by another process")
        saved = _read_matching(path, identity, "from another library entry")  # finished elsewhere meanwhile?
        if saved is not None:
            return saved
        log(f"library:{entry} on {options.target}: evaluating")
        result = evaluate_model(Path(exact_weights(meta)), out / "evaluation", data, robustness,
                                log=lambda m: log(f"  {m}"))
    report = result["robustness"]
    own = {"clean": (meta.get("accuracy") or {}).get("test")}
    target = headline(report)
    record = {"source": source, "target": options.target, **identity, "num_images": report["num_images"],
              "classes": result["model"]["classes"], "input_size": meta.get("input_size"),
              "epochs": meta.get("epochs"), "seed": meta.get("seed"), "own_test": meta.get("data"),
              "summary": {meta.get("backbone", "?"): {LIBRARY_VARIANT: {
                  "source": {k: mean_std([v]) for k, v in own.items()},
                  "target": {k: mean_std([v]) for k, v in target.items()}}}},
              "autoattack_stages": _autoattack_stages(report),
              "sanity_flags": report["sanity_flags"], "units": {}, "pending": [], "unit_commits": [git_commit()]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(library_markdown(record, entry))
    write_atomic(path, json.dumps(record, indent=1).encode())  # last: its presence means done
    return record


def library_markdown(record: dict, entry: str) -> str:
    """The library entry's cross-dataset row: its own test figure vs the other dataset's faces."""
    from .evaluation.study_report import _pm

    o = record["options"]
    backbone, variants = next(iter(record["summary"].items()))
    s = variants[LIBRARY_VARIANT]
    lines = [f"# library:{entry} ({record['source']}) on {record['target']} with no fine-tuning", "",
             f"The cloud library entry as shipped ({backbone}, {record['input_size']} px, {record['epochs']} epochs, "
             f"seed {record['seed']}, sha256 {record['library_entry']['sha256'][:12]}), tested on "
             f"{record['num_images']} {record['target']} images of the classes it has "
             f"({', '.join(record['classes'])}); its outputs stay all of its classes. 'Own' = its test accuracy "
             f"from the library metadata ({record['own_test']}). "
             f"{_autoattack_words(o['autoattack_steps'], o['square_queries'])} and PGD-{o['pgd_steps']}. "
             f"Full report: [evaluation/report.md](evaluation/report.md). Commit {record['unit_commits'][0][:12]}.", ""]
    for eps in (f"{e:g}" for e in o["eps"]):
        lines += [f"## eps {eps}", "", f"| backbone | own clean | {record['target']} clean | "
                  f"{record['target']} PGD-{o['pgd_steps']} | {record['target']} AutoAttack |", "|---|---|---|---|---|",
                  f"| {backbone} | {_pm(s['source'].get('clean'))} | {_pm(s['target']['clean'])} | "
                  f"{_pm(s['target'].get(f'pgd@{eps}'))} | {_pm(s['target'].get(f'autoattack@{eps}'))} |", ""]
    lines += ["## Sanity flags", "", *(f"- {f}" for f in record["sanity_flags"] or ["none raised"]), ""]
    return "\n".join(lines)
