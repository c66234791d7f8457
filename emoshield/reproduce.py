"""The reference study, end to end (`emoshield reproduce`): every table, plot and claim of SPEC §7
on one dataset under one split protocol, over folds and seeds, into one folder.

For each backbone, fold and seed it trains (resumably, under WORK):
  localization  pretrained weights + localization head (the reference's model)
  own-head      the same weights + the backbone's own classifier (the reference's baseline)
  scratch       random weights + localization head (convergence curves)
  imagenet      ImageNet weights + localization head, when the pretrained weights came from the
                cloud library and torchvision ImageNet weights are cached (convergence curves)
  defended      pretrained + localization head + SPEC §6 defense (S = {FGSM, R+FGSM})
then evaluates the defended model against its undefended twin (FGSM, R+FGSM, PGD, APGD at
each eps, camera corruptions) and sweeps FGSM's eps on the undefended one.

OUT gets report.md (tables inline, plots linked), results.json (every number, per run and
aggregated as mean ± std over folds x seeds, the claims check, the command, options and git
commit) and PNGs. Training folders, checkpoints and per-run reports stay under WORK.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EmoshieldError, one_line
from .paths import write_json

# SPEC §3: the reference's 5 classes; CK+48 has all of them
REFERENCE_CLASSES = "happy,sad,surprise,disgust,fear"
DEFAULT_CLASSES = {"ckplus48": REFERENCE_CLASSES}
ATTACKS = ["fgsm", "rfgsm", "pgd", "apgd", "autoattack"]
ROBUSTBENCH_EPS = 0.0313725  # 8/255 to 7 digits (it round-trips through the CLI): RobustBench's L-inf budget
UNIT_OPTIONS = ("backbones", "seeds", "fold_list")  # choose units, not how each unit runs
PINS_FILE = "pins.json"  # in WORK: backbone -> library:NAME@SHA12 its runs were trained from
# options added after studies were saved: a saved study without one ran with its default
LATER_OPTIONS = {"align": "none", "start_weights": None, "extra_train": [], "finetune_lr": None,
                 "defended_epochs": None}


def with_later_options(record):
    """A saved study record ({"options": ..., ...}) with the options added since it was saved at
    their defaults: an older study and a re-run of it are the same study. Anything else as is."""
    if not isinstance(record, dict) or not isinstance(record.get("options", {}), dict):
        return record
    return {**record, "options": {**copy.deepcopy(LATER_OPTIONS), **(record.get("options") or {})}}
MAX_EPOCHS = 10_000  # a typo's 10**9 would build a schedule that long before training its last run
SWEEP_EPS = [0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03]


@dataclass
class StudyOptions:
    dataset: str
    protocol: str = "reference"
    data_root: str | None = None
    classes: str | None = None
    backbones: list[str] = field(default_factory=lambda: ["resnet18", "mobilenet_v2"])
    input_size: int = 48
    epochs: int = 50
    seeds: list[int] = field(default_factory=lambda: [0])
    folds: int = 5
    fold_list: list[int] | None = None  # subject protocol: which folds (default: all)
    eps: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.015])  # the reference's (claims)
    extra_eps: list[float] = field(default_factory=lambda: [ROBUSTBENCH_EPS])  # every attack, no claim
    autoattack_eps: list[float] = field(default_factory=lambda: [0.01, ROBUSTBENCH_EPS])
    autoattack_steps: int = 100
    square_queries: int = 5000
    sweep_eps: list[float] = field(default_factory=lambda: list(SWEEP_EPS))
    pgd_steps: int = 10
    apgd_steps: int = 50
    limit_per_class: int | None = None
    quick: bool = False
    align: str = "none"  # "eyes": every face crop rotated so its eyes are level (emoshield.data.faces)
    start_weights: str | None = None  # every backbone's starting weights (default: the best here, per backbone)
    extra_train: list[str] = field(default_factory=list)  # other datasets' faces in every training part
    finetune_lr: float | None = None  # lr of the runs from pretrained weights (None: TrainConfig's, as scratch)
    defended_epochs: int | None = None  # the defended run's epochs (None: --epochs, as every other run)

    def resolved(self) -> "StudyOptions":
        """--quick: the same code path on a tiny slice (2 epochs, ~12 images per class, 2 folds)."""
        if self.protocol not in ("reference", "subject"):
            raise EmoshieldError(f"--protocol must be reference or subject, got {self.protocol!r}")
        if not self.backbones:
            raise EmoshieldError("--backbones is empty")
        from .data.faces import ALIGN_MODES

        if self.align not in ALIGN_MODES:
            raise EmoshieldError(f"--align is one of {', '.join(ALIGN_MODES)}, not {self.align!r}")
        from .pipeline import DataOptions, check_extra_train

        check_extra_train(DataOptions(dataset=self.dataset, extra_train=list(self.extra_train)))
        if self.finetune_lr is not None:
            if isinstance(self.finetune_lr, bool) or not isinstance(self.finetune_lr, (int, float)) \
                    or not 0 < self.finetune_lr <= 1:
                raise EmoshieldError(f"--finetune-lr must be in (0, 1], got {self.finetune_lr!r}")
            if self.start_weights == "scratch":
                raise EmoshieldError("--finetune-lr sets the lr of runs from pretrained weights, and --weights "
                                     "scratch makes every run start from scratch (they train at 0.01)")
        for flag, value in (("--epochs", self.epochs), ("--defended-epochs", self.defended_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_EPOCHS):
                raise EmoshieldError(f"{flag} must be a whole number from 1 to {MAX_EPOCHS}, got {value!r}")
        out = StudyOptions(**asdict(self))
        if out.defended_epochs == out.epochs:  # the same study as without it (its work folder resumes)
            out.defended_epochs = None
        out.classes = out.classes or DEFAULT_CLASSES.get(out.dataset)
        if out.quick:
            out.epochs = min(out.epochs, 2)
            out.defended_epochs = None if out.defended_epochs is None else min(out.defended_epochs, 2)
            out.limit_per_class = out.limit_per_class or 12
            out.folds = min(out.folds, 2) if out.protocol == "subject" else out.folds
            out.seeds = out.seeds[:1]
            out.eps = [0.005, 0.01, 0.015]
            out.sweep_eps = [0.002, 0.006, 0.01]
            out.pgd_steps, out.apgd_steps = 3, 5
            out.autoattack_eps, out.autoattack_steps, out.square_queries = [0.01], 3, 30
        if out.protocol == "reference":
            out.fold_list = [0]
        elif out.fold_list is None:
            out.fold_list = list(range(out.folds))
        bad = [f for f in out.fold_list if not 0 <= f < out.folds]
        if bad:
            raise EmoshieldError(f"folds {bad} out of range for --folds {out.folds}")
        return out


def pretrained_weights(backbone: str, input_size: int) -> str:
    """The best starting point here: the cloud library's entry for this backbone and input size
    (highest test accuracy), else cached ImageNet weights, else scratch."""
    from .models.backbones import imagenet_available
    from .models.library import list_entries

    entries = [e for e in list_entries() if e["backbone"] == backbone and e["input_size"] == input_size]
    if entries:
        best = max(entries, key=lambda e: (e.get("accuracy") or {}).get("test") or 0)
        return f"library:{best['name']}"
    return "imagenet" if imagenet_available(backbone) else "scratch"


def chosen_weights(backbone: str, input_size: int, asked: str | None) -> str:
    """The starting weights of a backbone: ASKED (`--weights`: library:NAME of this backbone and
    input size, imagenet where cached, or scratch), else the best available (pretrained_weights)."""
    from .models.backbones import imagenet_available
    from .models.library import read_weights_spec

    if asked is None:
        return pretrained_weights(backbone, input_size)
    if asked == "scratch" or (asked == "imagenet" and imagenet_available(backbone)):
        return asked
    if asked.startswith("library:"):
        meta, _ = read_weights_spec(asked, verify=False)  # NAME@SHA: only while the entry is those weights
        if (meta.get("backbone"), meta.get("input_size")) != (backbone, input_size):
            raise EmoshieldError(f"--weights {asked} is a {meta.get('backbone')} at {meta.get('input_size')} px, "
                                 f"not {backbone} at {input_size} px")
        return f"library:{meta['name']}"  # the study names the entry; its runs and WORK/pins.json the sha
    raise EmoshieldError(f"--weights is library:NAME, imagenet (where its weights are cached) or scratch, "
                         f"not {asked!r} for {backbone}")


def _pinned(weights: str) -> str:
    """library:NAME -> library:NAME@SHA12, the exact weights its runs record."""
    from .models.library import exact_weights, read_weights_spec

    return exact_weights(read_weights_spec(weights, verify=False)[0])


def _run_plan(backbone: str, weights: str) -> dict[str, tuple[str, str, bool]]:
    """run name -> (weights, head, defended)."""
    from .models.backbones import imagenet_available

    plan = {"localization": (weights, "localization", False), "own-head": (weights, "backbone", False)}
    if weights != "scratch":
        plan["scratch"] = ("scratch", "localization", False)
    if weights.startswith("library:") and imagenet_available(backbone):
        plan["imagenet"] = ("imagenet", "localization", False)
    plan["defended"] = (weights, "localization", True)
    return plan


class Study:
    """Runs (or resumes) the study and writes OUT; `log` gets one line per step."""

    def __init__(self, options: StudyOptions, out: Path, work: Path, command: list[str] | None = None, log=None):
        self.options = options.resolved()
        self.out, self.work = Path(out), Path(work)
        self.command = command or []
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.weights = {b: chosen_weights(b, self.options.input_size, self.options.start_weights)
                        for b in self.options.backbones}
        asked = self.options.start_weights or ""
        # library:NAME -> the exact weights its runs train from: the asked NAME@SHA (which may be an
        # embedded entry a user entry of the same name shadows), else the entry NAME loads now
        self.pins = {b: _pinned(asked if asked.startswith(w + "@") else w)
                     for b, w in self.weights.items() if w.startswith("library:")}

    def _check_work(self) -> None:
        """A work folder belongs to one set of options: resuming with others would mix results.
        Backbones, folds and seeds are free: each unit has its own folder, so several processes
        can fill one study (e.g. --fold-list 0,1 and 2,3,4 side by side) and a last run collects."""
        self.work.mkdir(parents=True, exist_ok=True)
        marker = self.work / "study.json"
        options = {k: v for k, v in asdict(self.options).items() if k not in UNIT_OPTIONS}
        saved = json.loads(marker.read_text()) if marker.is_file() else {"options": options, "weights": {}}
        clash = [b for b, w in self.weights.items() if saved["weights"].get(b, w) != w]
        if with_later_options(saved)["options"] != options or clash:
            raise EmoshieldError(f"{self.work} holds a study with other options or weights ({marker}); "
                                 "pass another --work or delete it")
        pins = self._work_pins()
        replaced = sorted({pin for b, pin in pins.items() if self.pins.get(b, pin) != pin})
        if replaced:
            raise EmoshieldError(f"{self.work} holds runs trained from {', '.join(replaced)}; that entry was "
                                 f"replaced since ({', '.join(sorted(set(self.pins.values())))}): "
                                 "pass another --work or delete it")
        saved["weights"].update(self.weights)
        marker.write_text(json.dumps(saved, indent=1))
        if self.pins:
            (self.work / PINS_FILE).write_text(json.dumps({**pins, **self.pins}, indent=1))

    def _work_pins(self) -> dict[str, str]:
        """backbone -> the exact library weights (library:NAME@SHA12) WORK's runs were trained from:
        WORK/pins.json, or for a work folder from before it, what its runs' run.json files record.
        (Kept out of study.json: cross-dataset units are keyed on that file's content.)"""
        path = self.work / PINS_FILE
        if path.is_file():
            try:
                pins = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise EmoshieldError(f"{path}: unreadable ({one_line(exc, 80)}); delete it or pass another --work") from None
            if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
                raise EmoshieldError(f"{path}: not a backbone -> library:NAME@SHA map; delete it or pass another --work")
            return pins
        pins = {}
        for backbone in self.pins:
            for run in sorted((self.work / backbone).glob("fold*-seed*/*/run.json")):
                try:
                    weights = json.loads(run.read_text()).get("weights")
                except (OSError, ValueError, AttributeError):
                    continue  # a damaged run is retrained or refused by its own step
                if isinstance(weights, str) and weights.startswith("library:"):
                    pins[backbone] = weights
                    if weights != self.pins[backbone]:
                        break
        return pins

    def units(self) -> list[tuple[str, int, int]]:
        return [(b, f, s) for b in self.options.backbones for f in self.options.fold_list for s in self.options.seeds]

    def run(self, until_unit: bool = False) -> dict | None:
        """Every step not done yet, then the report; None while steps are left to other processes.
        until_unit: return (None) as soon as this process has finished one unit's evaluation, so a
        driver can run what needs that unit's models (cross-dataset) before the next training."""
        started = time.time()
        self._check_work()
        for b, w in self.weights.items():
            self.log(f"{b}: pretrained weights {w}")
        # unit by unit (its trainings, then its evaluation): each finished unit is saved under OUT
        steps = [(b, f, s, name) for b, f, s in self.units() for name in [*_run_plan(b, self.weights[b]), "evaluate"]]
        total = len(steps)
        timings_dir = self.work / "timings"  # one file per step: processes sharing WORK do not clash
        timings_dir.mkdir(exist_ok=True)
        # passes over the steps not done yet, while one makes progress: a step another process
        # finished (or whose trainings it finished) during our pass is collected (or run) by the next
        pending = list(enumerate(steps, 1))
        self.evaluated_here = 0
        while pending:
            left = []
            for i, step in pending:
                if not self._step(i, total, *step, timings_dir):
                    left.append((i, step))
                if until_unit and self.evaluated_here:
                    self.log("stopping after one evaluated unit (--until-unit); re-run to go on")
                    self.write_partial(started)
                    return None
            if len(left) == len(pending):
                break
            pending = left
        if pending:
            self.log(f"{len(pending)} step(s) are running in other processes or wait for them; run this command "
                     "again when they are done to write the whole report")
            self.write_partial(started)
            return None
        return self._report(started)

    def _report(self, started: float) -> dict:
        """results.json, report.md and the plots from the units saved so far (complete or not)."""
        from .provenance import git_commit

        result = self.collect()
        result.update(command=self.command, options=asdict(self.options), weights=self.weights,
                      git_commit=git_commit(), compute_seconds=sum(result["step_seconds"].values()),
                      wall_seconds_this_invocation=time.time() - started)
        with report_lock(self.work):
            self.write(result)
        return result

    def write_partial(self, started: float) -> None:
        """The report of the units finished so far, so a study that spans sessions shows its numbers
        (and RESULTS.md can) before its last unit: results.json says complete false and names the
        pending units."""
        if any(self._saved_unit(*u) is not None for u in self.units()):
            self._report(started)

    def _step(self, i: int, total: int, backbone: str, fold: int, seed: int, name: str, timings_dir: Path) -> bool:
        """Run one step unless it is done or another process holds it; True when it is done."""
        folder = self.unit_dir(backbone, fold, seed)
        tag = f"[{i}/{total}] {backbone} fold {fold} seed {seed} {name}"
        if self._saved_unit(backbone, fold, seed) is not None:
            self.log(f"{tag}: already done (results in {self.unit_file(backbone, fold, seed)})")
            return True
        step_started = time.perf_counter()
        with step_lock(folder / name) as mine:
            if not mine:
                state = "running in another process"
            elif name == "evaluate":
                state = self._evaluate(folder, tag)
            else:
                state = self._train(backbone, fold, seed, name, folder / name, tag)
        seconds = time.perf_counter() - step_started
        if state == "finished":  # interrupted steps count from their last resume
            (timings_dir / f"{backbone}-fold{fold}-seed{seed}-{name}.json").write_text(json.dumps(seconds))
        if name == "evaluate" and state in ("finished", "already done"):
            self._save_unit(backbone, fold, seed, timings_dir)
            self.evaluated_here += state == "finished"
        self.log(f"{tag}: {state}" + (f" in {seconds:.0f} s" if state == "finished" else ""))
        return state in ("finished", "already done")

    def unit_dir(self, backbone: str, fold: int, seed: int) -> Path:
        return self.work / backbone / f"fold{fold}-seed{seed}"

    def unit_file(self, backbone: str, fold: int, seed: int) -> Path:
        """A finished unit's every number, under OUT: a later session (a fresh checkout without WORK's
        checkpoints) resumes the study from these files, so a study can span sessions unit by unit."""
        return self.out / "units" / f"{backbone}-fold{fold}-seed{seed}.json"

    def _study_identity(self, backbone: str) -> dict:
        return {"options": {k: v for k, v in asdict(self.options).items() if k not in UNIT_OPTIONS},
                "weights": self.weights[backbone]}

    def _saved_unit(self, backbone: str, fold: int, seed: int) -> dict | None:
        """The saved unit, or None; one saved under other options or weights is an error, not a result."""
        path = self.unit_file(backbone, fold, seed)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EmoshieldError(f"{path}: unreadable ({one_line(exc, 80)}); delete it to redo the unit") from None
        if not isinstance(saved, dict):
            raise EmoshieldError(f"{path}: not a unit record; delete it to redo the unit")
        if {k: with_later_options(saved).get(k) for k in ("options", "weights")} != self._study_identity(backbone):
            raise EmoshieldError(f"{path} was made with other options or weights than this study's; "
                                 "pass another --out or delete it")
        # a unit names its library entry, its runs the exact weights (library:NAME@SHA12): one trained
        # from an entry since replaced under the same name is not this study's
        runs = saved.get("record", {}).get("runs", {}) if isinstance(saved.get("record"), dict) else {}
        used = {r["weights"] for r in runs.values() if isinstance(r, dict) and isinstance(r.get("weights"), str)
                } if isinstance(runs, dict) else set()
        stale = sorted(w for w in used if w.startswith("library:") and w != self.pins.get(backbone))
        if stale:
            raise EmoshieldError(f"{path} was trained from {', '.join(stale)}, not {self.pins.get(backbone)} "
                                 "(the entry was replaced since); pass another --out or delete it")
        return saved

    def _save_unit(self, backbone: str, fold: int, seed: int, timings_dir: Path) -> None:
        from .paths import write_atomic
        from .provenance import git_commit

        folder = self.unit_dir(backbone, fold, seed)
        prefix = f"{backbone}-fold{fold}-seed{seed}-"
        meta = json.loads((folder / "localization" / "run.json").read_text())
        unit = {**self._study_identity(backbone), "backbone": backbone, "fold": fold, "seed": seed,
                "git_commit": git_commit(), "dataset": meta["dataset"], "classes": meta["classes"],
                "step_seconds": {p.stem: json.loads(p.read_text()) for p in sorted(timings_dir.glob(prefix + "*.json"))},
                "record": self._unit_record(backbone, fold, seed)}
        path = self.unit_file(backbone, fold, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(unit, indent=1, default=str).encode())

    def _data(self, fold: int):
        from .pipeline import DataOptions

        o = self.options
        return DataOptions(dataset=o.dataset, data_root=o.data_root, protocol=o.protocol, fold=fold, folds=o.folds,
                           classes=o.classes, limit_per_class=o.limit_per_class, extra_train=list(o.extra_train))

    def _train(self, backbone: str, fold: int, seed: int, name: str, folder: Path, tag: str) -> str:
        from .pipeline import ModelOptions, train_model
        from .training import DefenseConfig, TrainConfig

        if (folder / "metrics.json").is_file():
            return "already done"
        weights, head, defended = _run_plan(backbone, self.weights[backbone])[name]
        weights = self.pins.get(backbone, weights) if weights.startswith("library:") else weights
        resume = (folder / "checkpoint.safetensors").is_file()
        epochs = self._epochs(defended)
        self.log(f"{tag}: {'resuming' if resume else 'training'} ({weights}, {head} head"
                 f"{', defended' if defended else ''}, {epochs} epochs)")
        train_model(self._data(fold), ModelOptions(backbone=backbone, weights=weights, head=head,
                                                   input_size=self.options.input_size, align=self.options.align),
                    TrainConfig(epochs=epochs, seed=seed, **self._lr(weights)), folder,
                    resume=resume, progress=False, log=lambda m: self.log(f"  {m}"),
                    defense=DefenseConfig() if defended else None)
        return "finished"

    def _epochs(self, defended: bool) -> int:
        """--defended-epochs for the defended run, --epochs for every other."""
        return (self.options.defended_epochs or self.options.epochs) if defended else self.options.epochs

    def _lr(self, weights: str) -> dict:
        """--finetune-lr for a run from pretrained weights; nothing (TrainConfig's lr) otherwise."""
        lr = self.options.finetune_lr
        return {"lr": lr} if lr is not None and weights != "scratch" else {}

    def _evaluate(self, folder: Path, tag: str) -> str:
        from .pipeline import RobustnessOptions, evaluate_model, sweep_model

        o = self.options
        if not all((folder / run / "metrics.json").is_file() for run in ("defended", "localization")):
            return "waiting for its trainings (another process)"
        done = True
        if not (folder / "robustness" / "robustness.json").is_file():
            done = False
            evaluate_model(folder / "defended", folder / "robustness", None,
                           RobustnessOptions(ATTACKS, o.eps + o.extra_eps, _all_corruptions(), o.pgd_steps,
                                             o.apgd_steps, square_queries=o.square_queries,
                                             autoattack_steps=o.autoattack_steps,
                                             attack_eps={"autoattack": o.autoattack_eps}),
                           baseline_dir=folder / "localization", log=lambda m: self.log(f"  {m}"))
        if not (folder / "sweep" / "sweep.json").is_file():
            done = False
            sweep_model(folder / "localization", "fgsm", o.sweep_eps, folder / "sweep", log=lambda m: None)
        return "already done" if done else "finished"

    # ---- collecting -------------------------------------------------------------------------

    def collect(self) -> dict:
        """Every number of every unit (from the saved unit files), and their mean ± std over folds x seeds."""
        per_unit: dict = {}
        saved = {u: unit for u in self.units() if (unit := self._saved_unit(*u)) is not None}
        pending = [f"{b}-fold{f}-seed{s}" for b, f, s in self.units() if (b, f, s) not in saved]
        if not saved:
            raise EmoshieldError(f"{self.out}: no finished unit to report yet")
        for (backbone, fold, seed), unit in saved.items():
            per_unit.setdefault(backbone, {})[f"fold{fold}-seed{seed}"] = unit["record"]
        summary = {b: summarize(units) for b, units in per_unit.items()}
        first = next(iter(saved.values()))
        return {"dataset": first["dataset"], "classes": first["classes"], "protocol": self.options.protocol,
                "complete": not pending, "pending_units": pending, "units": per_unit, "summary": summary,
                "unit_commits": sorted({u["git_commit"] for u in saved.values()}),
                "step_seconds": {k: v for u in saved.values() for k, v in u["step_seconds"].items()},
                "claims": check_claims(summary, len(first["classes"]), self.options)}

    def _unit_record(self, backbone: str, fold: int, seed: int) -> dict:
        """One unit's numbers, read from its training and evaluation folders under WORK."""
        folder = self.unit_dir(backbone, fold, seed)
        runs = {}
        for name in _run_plan(backbone, self.weights[backbone]):
            metrics = json.loads((folder / name / "metrics.json").read_text())
            history = json.loads((folder / name / "history.json").read_text())
            runs[name] = {
                "weights": metrics["weights"], "head": metrics["head"], "test_accuracy": metrics["test_accuracy"],
                "balanced_accuracy": metrics["balanced_accuracy"], "best_epoch": metrics.get("best_epoch"),
                "confusion_matrix": metrics["confusion_matrix"], "per_class_accuracy": metrics["per_class_accuracy"],
                "num_images": metrics["num_images"], "history": history,
                "seconds_per_epoch": sum(h["seconds"] for h in history) / max(len(history), 1),
                **convergence(history)}
        robustness = json.loads((folder / "robustness" / "robustness.json").read_text())
        sweep = json.loads((folder / "sweep" / "sweep.json").read_text())
        counts = json.loads((folder / "localization" / "run.json").read_text())["counts"]
        mid = f"{self.options.eps[len(self.options.eps) // 2]:g}"
        return {"fold": fold, "seed": seed, "runs": runs, "counts": counts,
                "class_counts": _class_counts(folder / "localization" / "split.json"),
                "defended": headline(robustness["robustness"]), "undefended": headline(robustness["baseline_robustness"]),
                "per_class": {"defended": _per_class_conditions(robustness["robustness"], mid),
                              "undefended": _per_class_conditions(robustness["baseline_robustness"], mid)},
                "autoattack": {v: _autoattack_stages(robustness[k]) for v, k in
                               (("defended", "robustness"), ("undefended", "baseline_robustness"))},
                "masking_checks": robustness["robustness"].get("masking_checks", {}),
                "sweep": sweep["points"], "sanity_flags": robustness["robustness"]["sanity_flags"]}

    def write(self, result: dict) -> None:
        from .evaluation.study_report import study_markdown, study_plots

        self.out.mkdir(parents=True, exist_ok=True)
        plots = study_plots(result, self.out)
        result["plots"] = plots
        write_json(self.out / "results.json", result)
        (self.out / "report.md").write_text(study_markdown(result, plots))
        (self.out / "command.txt").write_text(" ".join(self.command) + "\n")


@contextlib.contextmanager
def report_lock(work: Path, wait_seconds: float = 300.0):
    """One writer of a study's report at a time (workers finishing units together would interleave
    its files): waits for another process's write; after `wait_seconds` goes on without the lock."""
    deadline = time.monotonic() + wait_seconds
    while True:
        with step_lock(Path(work) / "report") as mine:
            if mine or time.monotonic() > deadline:
                yield
                return
        time.sleep(0.5)


@contextlib.contextmanager
def step_lock(path: Path):
    """Yields True when this process owns step `path`, False when another holder does (another
    process, or another step_lock of this one on the same path). The lock is an flock on
    PATH.lock held while the step runs: the kernel drops it when its holder dies (SIGKILL,
    reboot), so there is no stale lock to take over and no race between two processes taking one
    over; the file carries the holder's pid for people only. The holder removes the file while it
    still holds it, and a process that locked (or found locked) a file no longer at the path
    tries the one there. Local filesystems only (on NFS flock is emulated per process)."""
    import fcntl

    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        except OSError:
            os.close(fd)
            raise
        if not current:  # its holder has just removed it: the step may be free now
            os.close(fd)
            continue
        if held:
            break
        os.close(fd)
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield True
    finally:
        try:
            lock.unlink(missing_ok=True)  # while we hold it (see above)
        finally:
            os.close(fd)


def tied_to_this_process():
    """A subprocess preexec_fn: the child gets SIGKILL when this process dies (Linux
    PR_SET_PDEATHSIG), so a child doing the work of this process's step_lock never runs on after
    the lock went with its holder; a child whose parent died before the call exits at once. Where
    prctl is missing (not Linux) the child is not tied."""
    import signal

    parent = os.getpid()

    def tie() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return tie


def _all_corruptions() -> list[str]:
    from .attacks import parse_corruptions

    return parse_corruptions("all")


def _class_counts(split_file: Path) -> dict:
    """Table II: images per class in each part of the split."""
    from .data import load_split

    split, _ = load_split(split_file)
    table: dict = {}
    for part, records in split.parts().items():
        for r in records:
            table.setdefault(r.label, {"train": 0, "val": 0, "test": 0})[part] += 1
    for extra in split.extra_train:  # another dataset's faces in the training part (--extra-train)
        for r in extra.records:
            row = table.setdefault(r.label, {"train": 0, "val": 0, "test": 0})
            row["extra_train"] = row.get("extra_train", 0) + 1
    return table


def convergence(history: list[dict], loss_below: float = 1.0, accuracy_above: float = 0.95) -> dict:
    """The reference's convergence figures: first epoch whose training loss is below 1, and first
    epoch whose validation (else training) accuracy passes 95%; None when never reached."""
    key = "val_accuracy" if any("val_accuracy" in h for h in history) else "train_accuracy"
    loss_epoch = next((h["epoch"] for h in history if h["train_loss"] < loss_below), None)
    acc_epoch = next((h["epoch"] for h in history if (h.get(key) or 0) >= accuracy_above), None)
    return {"epochs_to_loss_below_1": loss_epoch, "epochs_to_accuracy_95": acc_epoch, "accuracy_curve": key}


def headline(report: dict) -> dict:
    """Flat accuracy figures of one robustness report: clean, attack@eps, worst@eps, corruption means."""
    row = {"clean": report["clean_accuracy"]}
    for name, by_eps in report["attacks"].items():
        for eps, value in by_eps.items():
            row[f"{name}@{eps}"] = value["accuracy"]
    for eps, value in report["worst_case"].items():
        row[f"worst@{eps}"] = value["accuracy"]
    for name, by_severity in report["corruptions"].items():
        row[f"corruption:{name}"] = sum(v["accuracy"] for v in by_severity.values()) / len(by_severity)
    return row


def _per_class_conditions(report: dict, mid: str) -> dict:
    """class accuracies under clean and each attack at the reference's middle eps `mid` (the box plots)."""
    from .attacks.registry import LABELS

    attacks = report["attacks"]
    out = {"benign": report["per_class_accuracy"]["clean"]}
    out.update({f"{LABELS[n]} {mid}": attacks[n][mid]["per_class_accuracy"] for n in attacks if mid in attacks[n]})
    return out


def _autoattack_stages(report: dict) -> dict:
    """eps -> AutoAttack's robust accuracy after each of its attacks (and what it skipped)."""
    return {eps: {"stages": v.get("stages"), "skipped": v.get("skipped")}
            for eps, v in report["attacks"].get("autoattack", {}).items()}


def mean_std(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": values}


def summarize(units: dict) -> dict:
    """mean ± std over the units (folds x seeds) of each run's accuracy and convergence and of
    each robustness figure."""
    first = next(iter(units.values()))
    out: dict = {"runs": {}, "defended": {}, "undefended": {}, "sweep": {}}
    for name in first["runs"]:
        out["runs"][name] = {k: mean_std([u["runs"][name][k] for u in units.values()])
                             for k in ("test_accuracy", "balanced_accuracy", "epochs_to_loss_below_1",
                                       "epochs_to_accuracy_95", "seconds_per_epoch")}
    for variant in ("defended", "undefended"):
        out[variant] = {k: mean_std([u[variant].get(k) for u in units.values()]) for k in first[variant]}
    for i, point in enumerate(first["sweep"]):
        if point["eps"] > 0:  # eps 0 is the clean accuracy, reported with the runs
            out["sweep"][f"{point['eps']:g}"] = mean_std([u["sweep"][i]["accuracy"] for u in units.values()])
    return out


def _m(summary: dict, *path) -> float | None:
    node = summary
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node["mean"]


def check_claims(summary: dict, num_classes: int, options: StudyOptions) -> list[dict]:
    """Each SPEC §7 claim with the reference's figure, ours (mean over units) and whether it holds here.
    A claim 'holds' when its qualitative statement is true of our means; the rule is stated."""
    chance = 1 / num_classes
    eps = [f"{e:g}" for e in options.eps]
    mid = eps[len(eps) // 2]
    claims = []

    def add(claim, reference, ours, holds, rule):
        claims.append({"claim": claim, "reference": reference, "ours": ours, "holds": bool(holds), "rule": rule})

    for b, s in summary.items():
        loc, own = _m(s, "runs", "localization", "test_accuracy"), _m(s, "runs", "own-head", "test_accuracy")
        add(f"{b}: the localization head beats the backbone's own head", "VGG16 95.67% vs 88.32%; AlexNet 95.09% vs 87.29%",
            f"{loc:.2%} vs {own:.2%}", loc > own, "localization > own head (clean test accuracy)")
        defended = _m(s, "defended", "clean")
        undefended = _m(s, "undefended", "clean")
        add(f"{b}: the defense costs little clean accuracy", "VGG16 95.67% -> 94.97% (-0.7 pt); AlexNet -1.5 pt",
            f"{undefended:.2%} -> {defended:.2%} ({(defended - undefended) * 100:+.1f} pt)",
            defended >= undefended - 0.02, "drop <= 2 points")
        pre_loss = _m(s, "runs", "localization", "epochs_to_loss_below_1")
        pre_acc = _m(s, "runs", "localization", "epochs_to_accuracy_95")
        if "scratch" in s["runs"]:
            sc_loss = _m(s, "runs", "scratch", "epochs_to_loss_below_1")
            sc_acc = _m(s, "runs", "scratch", "epochs_to_accuracy_95")
            fmt = lambda v: "never" if v is None else f"{v:.1f}"  # noqa: E731
            add(f"{b}: pretrained weights converge within 2 epochs, scratch needs >= 17 (loss < 1) / >= 20 (accuracy > 95%)",
                "pretrained <= 2 / <= 2 epochs; scratch >= 17 / >= 20",
                f"pretrained {fmt(pre_loss)} / {fmt(pre_acc)}; scratch {fmt(sc_loss)} / {fmt(sc_acc)} epochs",
                pre_loss is not None and pre_loss <= 2 and pre_acc is not None and pre_acc <= 2,
                "pretrained reaches both within 2 epochs (mean over units; 'never' counts as not reached)")
        above = {e: v["mean"] for e, v in s["sweep"].items() if float(e) > 0.006}
        add(f"{b}: undefended accuracy under FGSM falls below chance once eps > 0.006",
            "below 20% (chance) for eps > 0.006",
            ", ".join(f"{e}: {v:.1%}" for e, v in above.items()) + f" (chance {chance:.0%})",
            bool(above) and all(v < chance for v in above.values()), "every swept eps > 0.006 below chance")
        fg = [_m(s, "defended", f"fgsm@{e}") for e in eps]
        rf = [_m(s, "defended", f"rfgsm@{e}") for e in eps]
        fg_u = _m(s, "undefended", f"fgsm@{mid}")
        add(f"{b}: the defense raises FGSM accuracy at eps {mid} over the undefended model",
            "VGG16 85.76% vs 7.22% (+78.5 points); FGSM .005/.01/.015 = 90.84/85.76/82.75%",
            f"{fg[len(fg) // 2]:.2%} vs {fg_u:.2%} ({(fg[len(fg) // 2] - fg_u) * 100:+.1f} points); FGSM "
            + "/".join(f"{v:.1%}" for v in fg), fg[len(fg) // 2] >= fg_u + 0.1,
            "defended >= undefended + 10 points (whether the undefended model collapses is the sweep claim's)")
        add(f"{b}: R+FGSM is the weaker attack on the defended model at every eps",
            "VGG16 R+FGSM 93.31/90.84/87.99% vs FGSM 90.84/85.76/82.75%",
            "R+FGSM " + "/".join(f"{v:.1%}" for v in rf), all(r >= f for r, f in zip(rf, fg)),
            "R+FGSM accuracy >= FGSM accuracy at each eps")
        pgd, pgd_u = _m(s, "defended", f"pgd@{mid}"), _m(s, "undefended", f"pgd@{mid}")
        apgd = _m(s, "defended", f"apgd@{mid}")
        add(f"{b}: the defense carries over to the unseen PGD attack (eps {mid})",
            "VGG16 83.29% vs 0.41% (+82.9 points)",
            f"{pgd:.2%} vs {pgd_u:.2%} ({(pgd - pgd_u) * 100:+.1f} points; APGD: {apgd:.2%})",
            pgd >= pgd_u + 0.1 and apgd >= pgd - 0.1,
            "defended PGD >= undefended + 10 points, and APGD within 10 points of PGD (no gradient masking)")
    return claims
