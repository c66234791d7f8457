"""Library API for whole jobs: data -> split -> model -> training -> evaluation -> files.

The CLI is a thin shell over these functions; notebooks and the services call them too.
Output folder of a training job (OUT):
  model.safetensors  best model on validation (weights + config, no pickle)
  checkpoint.safetensors  last finished epoch (for --resume)
  split.json, history.json, metrics.json, run.json, report.md,
  confusion_matrix.png, training_curves.png
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EmoshieldError
from .paths import write_json


@dataclass
class DataOptions:
    """Which images, under which split protocol."""

    dataset: str
    data_root: str | None = None
    protocol: str = "reference"
    fold: int = 0
    folds: int = 5
    classes: str | None = None
    val_fraction: float = 0.15
    limit_per_class: int | None = None  # keep whole sequences up to ~N images per class (quick runs)
    scan_options: dict = field(default_factory=dict)  # subject_pattern, frame_stride, detect_faces
    # other datasets whose faces of the run's classes join the training part (never validation or test)
    extra_train: list[str] = field(default_factory=list)
    # subject protocol: split only the people outside this (fold, folds)'s test part (nested cross-validation)
    nested_in: tuple[int, int] | None = None


@dataclass
class ModelOptions:
    backbone: str = "resnet18"
    weights: str = "scratch"
    head: str = "localization"
    pooling: str = "global"
    input_size: int = 48
    dropout: float = 0.0
    align: str = "none"  # "eyes": rotate each face crop so its eyes are level (emoshield.data.faces)


def validate_model_options(options: ModelOptions) -> None:
    """Refuse bad model options before any data is read (one-line errors)."""
    from .models import HEADS, backbone_spec
    from .models.heads import make_pooling

    spec = backbone_spec(options.backbone)
    if options.input_size < spec.min_input_size:
        raise EmoshieldError(f"input size {options.input_size} is too small for {options.backbone} "
                             f"(needs >= {spec.min_input_size})")
    if options.head not in HEADS:
        raise EmoshieldError(f"unknown head {options.head!r}; choose one of {', '.join(HEADS)}")
    make_pooling(options.pooling)
    from .data.faces import ALIGN_MODES

    if options.align not in ALIGN_MODES:
        raise EmoshieldError(f"unknown face alignment {options.align!r}; choose from {', '.join(ALIGN_MODES)}")
    weights = options.weights
    if weights.endswith(".safetensors"):
        if not Path(weights).is_file():
            raise EmoshieldError(f"weights file {weights} does not exist")
    elif weights.startswith("library:"):
        from .models.library import read_weights_spec

        meta, _ = read_weights_spec(weights)
        if meta["backbone"] != options.backbone:
            raise EmoshieldError(f"library entry {meta['name']!r} is a {meta['backbone']}, not a {options.backbone}")
    elif weights != "scratch" and weights.partition(":")[0] != "imagenet":
        raise EmoshieldError(f"unknown weights {weights!r}; use scratch, imagenet[:ENTRY], library:NAME "
                             "or a .safetensors file")


@dataclass
class PreparedData:
    dataset: object  # FaceDataset
    split: object  # Split
    parts: dict  # split name -> TensorData
    failures: list


def _limit(records: list, per_class: int, seed: int) -> list:
    """Keep whole sequences, in a seeded order, until each class has about `per_class` images."""
    by_seq: dict[str, list] = {}
    for r in records:
        by_seq.setdefault(r.sequence, []).append(r)
    order = sorted(by_seq)
    random.Random(seed).shuffle(order)
    kept, counts = [], {}
    for seq in order:
        label = by_seq[seq][0].label
        if counts.get(label, 0) < per_class:
            kept += by_seq[seq]
            counts[label] = counts.get(label, 0) + len(by_seq[seq])
    return kept


def _tensor_data(pixels, records, classes):
    import torch

    from .training import TensorData

    index = {c: i for i, c in enumerate(classes)}
    return TensorData(torch.from_numpy(pixels), torch.tensor([index[r.label] for r in records], dtype=torch.int64))


def load_data(options: DataOptions, seed: int = 0):
    """Scan the dataset and apply the class selection and the optional per-class limit."""
    from .data import load_dataset
    from .paths import data_root

    dataset = load_dataset(options.dataset, data_root(options.data_root), options.classes, **options.scan_options)
    if options.limit_per_class:
        dataset.records = _limit(dataset.records, options.limit_per_class, seed)
    return dataset


def prepare_data(options: DataOptions, input_size: int, seed: int = 0, align: str = "none") -> PreparedData:
    """Scan, split and decode a dataset into in-memory tensors per split; the faces of
    `options.extra_train` join the training part."""
    from .data import make_split
    from .data.images import decode_images

    check_extra_train(options)
    dataset = load_data(options, seed)
    split = make_split(dataset, options.protocol, options.fold, options.folds, seed, options.val_fraction,
                       options.nested_in)
    split.extra_train = [extra_training_faces(name, options, dataset, seed) for name in options.extra_train]
    parts, failures = {}, []
    for name, records in split.parts().items():
        decoded = decode_images(dataset.root, records, input_size, align=align)
        failures += decoded.failures
        setattr(split, name, decoded.records)  # unreadable images leave the split, and are reported
        parts[name] = _tensor_data(decoded.pixels, decoded.records, dataset.classes)
    for extra in split.extra_train:
        decoded = decode_images(Path(extra.dataset_dir), extra.records, input_size, align=align)
        failures += [(f"{extra.dataset}:{path}", why) for path, why in decoded.failures]
        extra.records = decoded.records
        parts["train"] = _joined(parts["train"], _tensor_data(decoded.pixels, decoded.records, dataset.classes))
    if len(parts["train"]) < 2:
        raise EmoshieldError(f"{dataset.name}: fewer than two readable training images")
    return PreparedData(dataset, split, parts, failures)


def check_extra_train(options: DataOptions) -> None:
    """One clear error for an --extra-train that cannot work, before any data is read."""
    from .data import DATASET_NAMES

    if not options.extra_train:
        return
    if options.dataset == "folder":
        raise EmoshieldError("--extra-train needs a named dataset: --dataset folder reads --data-root as its own "
                             "folder, so no other dataset's folder sits beside it")
    for name in options.extra_train:
        if name not in DATASET_NAMES or name == "folder":
            raise EmoshieldError(f"--extra-train is one of {', '.join(d for d in DATASET_NAMES if d != 'folder')}, "
                                 f"not {name!r}")
        if name == options.dataset:
            raise EmoshieldError(f"--extra-train {name} is the dataset being split; name another dataset")
        if options.extra_train.count(name) > 1:
            raise EmoshieldError(f"--extra-train {name} is given more than once (its faces would count twice)")


def extra_training_faces(name: str, options: DataOptions, dataset, seed: int = 0):
    """The faces of dataset `name` (its folder beside the run's: DATA_ROOT/NAME) in the classes of
    the run's `dataset`, for the training part only: a dataset with its own split gives its training
    part (its test images stay unseen). Held-out people stay held out as long as the two datasets
    show different people (FER2013, CK+48 and JAFFE do)."""
    from .data.splits import ExtraTraining
    from .paths import data_root

    check_extra_train(DataOptions(dataset=options.dataset, extra_train=[name]))
    folder = data_root(options.data_root) / name
    if not folder.is_dir():
        raise EmoshieldError(f"--extra-train {name}: no folder {folder} (--data-root must hold both datasets' folders)")
    _refuse_overlap(name, folder, dataset.root)
    other = load_data(DataOptions(dataset=name, data_root=str(folder)))
    _refuse_overlap(name, other.root, dataset.root)  # DATA_ROOT/NAME/NAME is read too
    classes = dataset.classes
    shared = [c for c in classes if c in other.classes]
    if not shared:
        raise EmoshieldError(f"--extra-train {name} has none of the run's classes ({', '.join(classes)}); "
                             f"it has {', '.join(other.classes)}")
    records = [r for r in other.records if r.label in shared and r.source_split in (None, "train")]
    if not records:
        raise EmoshieldError(f"--extra-train {name}: no training images of the run's classes")
    if options.limit_per_class:
        records = _limit(records, options.limit_per_class, seed)
    dataset.skipped += [(f"{name}:{path}", why) for path, why in other.skipped]  # reported with the run's own
    return ExtraTraining(name, str(other.root.resolve()), records)


def _refuse_overlap(name: str, folder: Path, own: Path) -> None:
    """The other dataset's folder must not be, hold or sit inside the run's own (symlinks followed):
    its faces would include the run's validation and test faces."""
    mine, theirs = Path(own).resolve(), Path(folder).resolve()
    if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
        raise EmoshieldError(f"--extra-train {name}: {folder} holds the run's own images ({own})")


def _joined(a, b):
    """Two TensorData as one; a grayscale side is widened to 3 equal channels when the other is colour."""
    import torch

    from .training import TensorData

    if a.pixels.shape[1] != b.pixels.shape[1]:
        a, b = (TensorData(t.pixels.expand(-1, 3, -1, -1).contiguous() if t.pixels.shape[1] == 1 else t.pixels,
                           t.labels) for t in (a, b))
    return TensorData(torch.cat([a.pixels, b.pixels]), torch.cat([a.labels, b.labels]))


def run_metadata(data: DataOptions, model: ModelOptions, epochs: int, seed: int, weights: str,
                 classes: list[str]) -> dict:
    """The facts every result carries (dataset, protocol, fold, classes, backbone, ...)."""
    from .provenance import git_commit

    return {
        "dataset": data.dataset, "protocol": data.protocol,
        "fold": data.fold if data.protocol == "subject" else None,
        "folds": data.folds if data.protocol == "subject" else None,
        "classes": classes, "backbone": model.backbone, "head": model.head, "pooling": model.pooling,
        "weights": weights, "input_size": model.input_size, "align": model.align, "epochs": epochs, "seed": seed,
        "git_commit": git_commit(),
        **({"extra_train": list(data.extra_train)} if data.extra_train else {}),
        **({"nested_in": list(data.nested_in)} if data.nested_in else {}),
    }


def evaluate_tensors(model, test, classes: list[str], meta: dict, out_dir: Path, title: str,
                     summary_name: str = "report.md") -> dict:
    """Accuracy, per-class accuracy and confusion matrix of `model` on `test`; writes
    metrics.json, confusion_matrix.png and report.md into out_dir."""
    from .evaluation import classification_report, describe_run, metrics_markdown
    from .evaluation.plots import plot_confusion_matrix
    from .training import predict_logits

    logits = predict_logits(model, test.pixels)
    report = classification_report(test.labels.tolist(), logits.argmax(1).tolist(), classes)
    metrics = dict(meta, test_accuracy=report.pop("accuracy"), **report)
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png",
                          describe_run(metrics))
    metrics["confusion_matrix_png"] = "confusion_matrix.png"
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / summary_name).write_text(metrics_markdown(metrics, title))
    return metrics


def train_model(data: DataOptions, model_options: ModelOptions, train_config, out_dir: Path,
                resume: bool = False, progress: bool = True, log=None, defense=None) -> dict | None:
    """Train (with the perturbation-aware defense when `defense` is given) and evaluate one
    model; returns metrics.json's content. Under torchrun every rank trains its shard and
    rank 0 alone writes files and evaluates (the other ranks return None)."""
    import torch

    from .training.distributed import init_distributed

    from .evaluation.plots import plot_history
    from .evaluation.report import describe_run
    from .models import ModelConfig, build_model, save_model
    from .provenance import run_info
    from .training import Trainer

    train_config.validate(defense)
    if defense is not None:
        defense.validate()
    validate_model_options(model_options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .training.checkpoint import has_checkpoint, refuse_unless_resuming

    refuse_unless_resuming(out_dir, resume)  # before anything in OUT is rewritten
    dist = init_distributed(train_config.device)  # None for one process
    main = dist is None or dist.is_main
    if not main:
        log = lambda m: None  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_data(data, model_options.input_size, train_config.seed, model_options.align)
    for w in caught:
        (log or print)(f"warning: {w.message}")
    dataset, split = prepared.dataset, prepared.split
    if has_checkpoint(out_dir) and (out_dir / "split.json").is_file():
        _refuse_other_images(out_dir / "split.json", split, dataset.name)
    if main:
        split.save(out_dir / "split.json", dataset)
    torch.manual_seed(train_config.seed)
    config = ModelConfig(backbone=model_options.backbone, classes=list(dataset.classes),
                         input_size=model_options.input_size, head=model_options.head,
                         pooling=model_options.pooling, dropout=model_options.dropout,
                         weights=model_options.weights, align=model_options.align)
    model = build_model(config)
    meta = run_metadata(data, model_options, train_config.epochs, train_config.seed, config.weights,
                        list(dataset.classes))
    meta["defense"] = asdict(defense) if defense is not None else None
    meta["processes"] = 1 if dist is None else dist.world_size
    from .training.devices import effective_amp, resolve_device

    device = resolve_device(train_config.device, 0 if dist is None else dist.local_rank)
    meta["device"] = str(device)
    # what the training passes ran in here (--amp falls back to float32 without native bfloat16)
    meta["precision"] = (("float16" if device.type == "cuda" else "bfloat16")
                         if effective_amp(device, train_config.amp) else "float32")
    if main:
        write_json(out_dir / "run.json", {
            **meta, "data_options": asdict(data), "model_options": asdict(model_options),
            "train_config": asdict(train_config), "model_config": asdict(config), "run": run_info(),
            "counts": {k: len(v) for k, v in prepared.parts.items()},
            "skipped": [list(s) for s in dataset.skipped], "unreadable": [list(f) for f in prepared.failures],
        })
    (log or print)(f"training: {describe_run(meta)}; images train/val/test = "
                   f"{len(prepared.parts['train'])}/{len(prepared.parts['val'])}/{len(prepared.parts['test'])}")
    trainer = Trainer(model, train_config, out_dir, progress=progress, log=log, defense=defense, dist=dist,
                      save_best=lambda m: save_model(m, out_dir / "model.safetensors", meta))
    result = trainer.fit(prepared.parts["train"], prepared.parts["val"], resume=resume)
    if not main:
        return None
    plot_history(result.history, out_dir / "training_curves.png", describe_run(meta))
    from .models import load_model

    best = load_model(out_dir / "model.safetensors")
    meta.update(best_epoch=result.best_epoch, best_val_score=result.best_val_score,
                train_seconds=result.seconds,
                unreadable_images=len(prepared.failures), skipped_images=len(dataset.skipped))
    return evaluate_tensors(best, prepared.parts["test"], list(dataset.classes), meta, out_dir,
                            "Training result (test split)")


def _refuse_other_images(path: Path, split, dataset: str) -> None:
    """A resumed run goes on with the images it started with: split.json (what evaluation refuses to
    test on) must stay true of every epoch, so other data options (dataset, fold, classes,
    --extra-train, ...) are refused, not silently mixed in."""
    from .data import load_split

    saved, header = load_split(path)

    def images(s) -> set:
        return ({(part, r.path, r.frame, r.label) for part, records in s.parts().items() for r in records}
                | {(f"extra:{e.dataset}", r.path, r.frame, r.label) for e in s.extra_train for r in e.records})

    if header.get("dataset") != dataset or images(saved) != images(split):
        raise EmoshieldError(f"{path.parent} started on other images ({path}): resume it with the data options it "
                             "started with, or train into another --out")


def model_test_data(model_dir: Path, data: DataOptions | None = None, classes: list[str] | None = None):
    """(model, test records, dataset folder, meta) for a trained model: its own test split
    (split.json beside it) by default, or another dataset's (`data`; --protocol all = every image)."""
    from .data import make_split
    from .models import load_model
    from .provenance import git_commit

    model_file, run = _model_file_and_run(model_dir)
    model = load_model(model_file)
    classes = classes or list(model.config.classes)
    if run.get("library_entry"):  # a cloud backbone as it is, no fine-tuning: no split.json to test on
        if data is None or data.dataset is None:
            raise EmoshieldError(f"{model_dir}: a library entry has no test split of its own; pass --dataset "
                                 "(and --protocol all for every image of another dataset)")
        if data.dataset == run.get("pretrained_on") and data.protocol != "official":
            raise EmoshieldError(f"{model_dir} was pretrained on {data.dataset}'s official training split: test it "
                                 "with --protocol official (its PrivateTest images), not with images it trained on")
    if data is None or data.dataset is None:
        records, root, header = saved_split_records(model_file, "test", data.data_root if data else None)
        meta = {k: run.get(k, header.get(k)) for k in
                ("dataset", "protocol", "fold", "folds", "seed", "epochs", "git_commit", "defense")}
        if run.get("nested_in"):  # an inner fold's model: its test people are inside another fold's training part
            meta["nested_in"] = run["nested_in"]
    else:
        from .data.splits import refuse_nested_outside_subject

        refuse_nested_outside_subject(data.nested_in, data.protocol)
        absent: list[str] = []
        if data.protocol == "all":  # another dataset: test on the model's classes it has (the model keeps all its outputs)
            dataset = load_data(DataOptions(**{**asdict(data), "classes": None, "limit_per_class": None}))
            absent = [c for c in classes if c not in dataset.classes]
            if len(absent) == len(classes):
                raise EmoshieldError(f"{data.dataset} has none of the model's classes ({', '.join(classes)}); "
                                     f"it has {', '.join(dataset.classes)}")
            dataset.records = [r for r in dataset.records if r.label in classes]
            if data.limit_per_class:
                dataset.records = _limit(dataset.records, data.limit_per_class, run.get("seed", 0))
        else:
            dataset = load_data(DataOptions(**{**asdict(data), "classes": ",".join(classes)}), run.get("seed", 0))
        root = dataset.root
        records = dataset.records if data.protocol == "all" else make_split(
            dataset, data.protocol, data.fold, data.folds, run.get("seed", 0), data.val_fraction, data.nested_in).test
        meta = {"dataset": data.dataset, "protocol": data.protocol,
                "fold": data.fold if data.protocol == "subject" else None,
                "folds": data.folds if data.protocol == "subject" else None,
                **({"nested_in": list(data.nested_in)} if data.nested_in else {}),
                "seed": run.get("seed", 0), "epochs": run.get("epochs"), "defense": run.get("defense"),
                **({"classes_absent_from_dataset": absent} if absent else {}),
                **({k: run[k] for k in ("library_entry", "pretrained_on") if run.get(k)})}
        _refuse_training_images(model_file, data.dataset, records)
    meta.update(classes=classes, backbone=model.config.backbone, head=model.config.head,
                pooling=model.config.pooling, weights=model.config.weights,
                input_size=model.config.input_size, align=getattr(model.config, "align", "none"),
                model=str(model_file), evaluated_by=git_commit())
    extra = run.get("extra_train")
    if isinstance(extra, list) and extra and all(isinstance(name, str) for name in extra):
        meta["extra_train"] = extra
    return model, [r for r in records if r.label in classes], root, meta


def _model_file_and_run(model: Path | str) -> tuple[Path, dict]:
    """(weights file, its training's run.json) of a training folder, a model.safetensors, or
    `library:NAME[@SHA]` (a cloud library entry, sha256-checked: epochs, seed and the dataset it was
    pretrained on come from its metadata)."""
    from .models.library import read_weights_spec

    if str(model).startswith("library:"):
        entry, weights = read_weights_spec(str(model))
        run = {"epochs": entry.get("epochs"), "library_entry": entry["name"],
               "pretrained_on": str(entry.get("data", "")).split(" ")[0] or None}
        return weights, run | ({"seed": entry["seed"]} if entry.get("seed") is not None else {})
    model = Path(model)
    model_file = model / "model.safetensors" if model.is_dir() else model
    run_file = model_file.parent / "run.json"
    return model_file, json.loads(run_file.read_text()) if run_file.is_file() else {}


def _refuse_training_images(model_file: Path, dataset: str, records: list) -> None:
    """Evaluating on the training dataset with other split options must not test on what the
    model trained or was selected on: refuse any image of its split.json's train/val parts, and,
    when it was trained subject-disjoint, any of their subjects; likewise any face (and person) of
    a dataset whose faces joined its training (`--extra-train`)."""
    from .data import load_split

    split_file = Path(model_file).parent / "split.json"
    if not split_file.is_file():
        return
    split, header = load_split(split_file)
    seen, by_subject = [], False
    if header.get("dataset") == dataset:
        seen += [r for part in ("train", "val") for r in split.parts()[part]]
        by_subject = split.protocol == "subject"
    for extra in split.extra_train:
        if extra.dataset == dataset:  # every face of its classes was trained on
            seen += extra.records
            by_subject = True
    paths = {r.path for r in seen}
    images = sum(r.path in paths for r in records)
    subjects = {r.subject for r in seen if r.subject is not None} if by_subject else set()
    from_subjects = sum(r.subject in subjects for r in records)
    if images or from_subjects:
        raise EmoshieldError(
            f"{images} of the {len(records)} images chosen for testing were in this model's training or validation "
            f"data" + (f" and {from_subjects} show its training/validation subjects" if subjects else "")
            + f" ({split_file}): evaluate on its own test split (leave out --dataset) or on another dataset")


def saved_split_records(model_file: Path, part: str, data_root: str | None = None):
    """(records, dataset folder, split header) of one part of the split saved beside a model."""
    from .data import load_split
    from .data.datasets import resolve_dataset_dir

    split_file = Path(model_file).parent / "split.json"
    if not split_file.is_file():
        raise EmoshieldError(f"{split_file} not found: pass --dataset and --data-root to choose images")
    split, header = load_split(split_file)
    root = Path(header["dataset_dir"])
    if data_root:
        root = resolve_dataset_dir(Path(data_root), header["dataset"])
    return split.parts()[part], root, header


def decode_split_part(model_file: Path, part: str, data_root: str | None = None, limit: int | None = None,
                      seed: int = 0):
    """A saved split's part decoded at the model's input size: (TensorData, records, model config);
    `limit` keeps a seeded random subset (e.g. calibration images)."""
    from .models.network import read_safetensors, saved_config

    model_file = Path(model_file)
    if model_file.is_dir():
        model_file = model_file / "model.safetensors"
    _tensors, meta = read_safetensors(model_file)
    config = saved_config(meta, model_file)
    records, root, _header = saved_split_records(model_file, part, data_root)
    records = [r for r in records if r.label in config.classes]
    if limit is not None and len(records) > limit:
        records = random.Random(seed).sample(records, limit)
    data, records = _decode_for(config, records, root, config.classes)
    return data, records, config


def _decode_for(model, records, root, classes):
    from .data.images import decode_images

    config = getattr(model, "config", model)
    decoded = decode_images(root, records, config.input_size, align=getattr(config, "align", "none"))
    if not decoded.records:
        raise EmoshieldError(f"no readable test images of classes {', '.join(classes)} under {root}")
    return _tensor_data(decoded.pixels, decoded.records, classes), decoded.records


@dataclass
class RobustnessOptions:
    """Which perturbations a robustness evaluation runs."""

    attacks: list[str]
    eps: list[float]
    corruptions: list[str] = field(default_factory=list)
    pgd_steps: int = 10
    apgd_steps: int = 50
    restarts: int = 1
    seed: int = 0
    square_queries: int = 5000
    autoattack_steps: int = 100
    attack_eps: dict[str, list[float]] = field(default_factory=dict)  # per-attack eps lists (default: eps)


def evaluate_model(model_dir: Path, out_dir: Path, data: DataOptions | None = None,
                   robustness: RobustnessOptions | None = None, baseline_dir: Path | None = None,
                   log=None, tta: str = "none", checkpoint_root: Path | None = None) -> dict:
    """Evaluate a trained model (see model_test_data for which images). With `robustness`, also
    write robustness.json, report.md (SPEC §7 tables) and plots; with `baseline_dir`, evaluate
    that model on the same images and report the improvement over it. `tta` "flip" evaluates the
    mean of the face and its mirror (emoshield.models.tta), attacks included, the baseline too.
    Attack results are kept batch by batch in CHECKPOINT_ROOT/partial (default: OUT/partial), so a
    stopped evaluation resumes; that folder is removed once the report is written."""
    from .models.tta import with_tta

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, records, root, meta = model_test_data(model_dir, data)
    model = with_tta(model, tta)
    meta["tta"] = tta
    classes = meta["classes"]
    test, records = _decode_for(model, records, root, classes)
    metrics = evaluate_tensors(model, test, classes, meta, out_dir,
                               "Evaluation", summary_name="summary.md" if robustness else "report.md")
    if robustness is None:
        return metrics
    partial = Path(checkpoint_root or out_dir) / "partial"  # attack results batch by batch: a stop resumes there
    report = _robustness(model, test, classes, robustness, log, partial)
    result = {"model": meta, "robustness": report}
    comparison, baseline_meta, baseline_report = None, None, None
    if baseline_dir is not None:
        base_model, _, _, baseline_meta = model_test_data(
            baseline_dir, None if data is None or data.dataset is None else data, classes)
        base_model = with_tta(base_model, tta)
        baseline_meta["tta"] = tta
        if list(base_model.config.classes) != classes:
            raise EmoshieldError(f"baseline {baseline_dir} has classes {base_model.config.classes}, not {classes}")
        base_test, _ = _decode_for(base_model, records, root, classes)  # the same images as this model
        (log or print)("baseline:")
        baseline_report = _robustness(base_model, base_test, classes, robustness, log, partial)
        from .evaluation.robustness import compare_with_baseline

        comparison = compare_with_baseline(report, baseline_report)
        result.update(baseline=baseline_meta, baseline_robustness=baseline_report, improvement=comparison)
        same_faces = (base_model.config.input_size == model.config.input_size
                      and getattr(base_model.config, "align", "none") == getattr(model.config, "align", "none"))
        if same_faces and report["attacks"]:  # the baseline is attacked on this model's decoded faces
            from .data.images import to_model_input
            from .evaluation.robustness import transfer_check, transfer_flags

            report.setdefault("masking_checks", {})["transfer"] = transfer_check(
                model, base_model, to_model_input(test.pixels), test.labels, robustness.eps, robustness.pgd_steps,
                robustness.seed)
            report["sanity_flags"] += transfer_flags(report)
    write_json(out_dir / "robustness.json", result)
    write_robustness_outputs(out_dir, result)
    _remove_checkpoints(partial, [(model, test)] + ([(base_model, base_test)] if baseline_dir is not None else []))
    return result


def _remove_checkpoints(partial: Path, evaluated: list) -> None:
    """Remove this evaluation's attack checkpoints (one folder per model and images), not what
    other evaluations keep under the same root; then the root itself if nothing else is left."""
    from .data.images import to_model_input
    from .evaluation.checkpoint import checkpoint_folder

    for model, images in evaluated:
        shutil.rmtree(checkpoint_folder(partial, model, to_model_input(images.pixels), images.labels),
                      ignore_errors=True)
    try:
        partial.rmdir()
    except OSError:  # not empty (another evaluation's entries), or never made
        pass


IDENTITY = ("dataset", "protocol", "fold", "folds", "seed", "epochs", "git_commit", "defense", "classes", "backbone",
            "head", "pooling", "weights", "input_size", "library_entry",
            "nested_in")  # what names a model and its test images


def _same_model(folder: Path, stored: dict, loaded: dict) -> None:
    differ = [k for k in IDENTITY if stored.get(k) != loaded.get(k)]
    if stored.get("align", "none") != loaded.get("align", "none"):  # reports before align was recorded: none
        differ.append("align")
    if differ:
        raise EmoshieldError(f"{folder} is not the model the report evaluated, or not on its images ("
                             + ", ".join(f"{k}: report {stored.get(k)!r}, here {loaded.get(k)!r}" for k in differ[:3])
                             + "); pass the model and the dataset options it was evaluated with")


def recheck_masking(out_dir: Path, model_dir: Path, baseline_dir: Path | None = None,
                    data: DataOptions | None = None, log=None) -> list[str]:
    """Add the APGD-CE follow-up of the eps sweep (emoshield.evaluation.robustness.sweep_followup)
    to a robustness.json made before it existed, without re-running its attacks: its flags are
    recomputed (result flags from the numbers, model flags kept) and report.md re-rendered. Only
    reports whose sweep stayed above the floor need it; for them the model (and baseline) must be
    the ones the report names (training metadata), loaded on the same images the evaluation used
    (the model's test records; the baseline decoded on those, as evaluate_model does), with the
    same clean accuracy per class, else this refuses. Returns a line per report that changed."""
    from .attacks.registry import correct_under
    from .data.images import to_model_input
    from .evaluation.robustness import MASKING_FLOOR, _per_class, result_flags, sweep_followup, sweep_followup_eps
    from .models.tta import with_tta
    from .provenance import git_commit

    out_dir = Path(out_dir)
    path = out_dir / "robustness.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise EmoshieldError(f"{path}: not a readable robustness report ({error})") from None

    todo = [k for k in ("robustness", "baseline_robustness") if sweep_followup_eps(result.get(k)) is not None]
    if not todo:
        return []
    if "baseline_robustness" in todo and baseline_dir is None:
        raise EmoshieldError(f"{path}: the baseline's sweep stayed above {MASKING_FLOOR:.0%} too; pass --baseline")
    classes = result["robustness"]["classes"]
    tta = result["model"].get("tta", "none")
    model, records, root, meta = model_test_data(model_dir, data)
    _same_model(Path(model_dir), result["model"], meta)
    model = with_tta(model, tta).eval()
    test, records = _decode_for(model, records, root, classes)  # the baseline gets the faces this model decoded
    loaded = {"robustness": (model, test)}
    if "baseline_robustness" in todo:
        base, _, _, base_meta = model_test_data(baseline_dir, data, classes)
        _same_model(Path(baseline_dir), result.get("baseline") or {}, base_meta)
        base = with_tta(base, tta).eval()
        loaded["baseline_robustness"] = (base, _decode_for(base, records, root, classes)[0])  # this model's images
    changed = []
    for key in todo:
        report, (net, images) = result[key], loaded[key]
        x = to_model_input(images.pixels)
        correct = correct_under(net, x, images.labels, None, 128)
        if len(images.labels) != report["num_images"] or \
                _per_class(correct, images.labels, classes) != report["per_class_accuracy"]["clean"]:
            raise EmoshieldError(f"{key}: {correct.float().mean().item():.2%} clean on {len(images.labels)} images "
                                 f"here, the report says {report['clean_accuracy']:.2%} on {report['num_images']} "
                                 "(or other per-class figures): not the images it was evaluated on")
        before = dict(report, masking_checks=dict(report["masking_checks"]))
        settings = report["settings"]
        sweep_followup(net, x, images.labels, report, settings["apgd_steps"], settings["seed"], progress=log)
        report["masking_checks"]["sweep_apgd_by"] = git_commit()  # the attacks before it ran at evaluated_by
        model_flags = [f for f in report["sanity_flags"] if f not in result_flags(before)]
        report["sanity_flags"] = model_flags + result_flags(report)
        eps, accuracy = next(iter(report["masking_checks"]["sweep_apgd"].items()))
        changed.append(f"{key}: APGD-CE at eps {eps}: {accuracy:.2%}")
    from .paths import write_atomic

    write_atomic(path, json.dumps(result, indent=1, default=str).encode())
    write_robustness_outputs(out_dir, result)
    return changed


def write_robustness_outputs(out_dir: Path, result: dict) -> None:
    """report.md and the PNG plots of a robustness.json's content (re-renderable from the JSON alone)."""
    from .evaluation.report import robustness_markdown

    report, baseline = result["robustness"], result.get("baseline_robustness")
    plots = _robustness_plots(report, baseline, result["model"], Path(out_dir))
    (Path(out_dir) / "report.md").write_text(
        robustness_markdown(report, result["model"], result.get("improvement"), result.get("baseline"), plots))


def _robustness(model, test, classes, options: RobustnessOptions, log=None,
                checkpoint_dir: Path | None = None) -> dict:
    from .evaluation.robustness import robustness_report

    return robustness_report(model, test.pixels, test.labels, classes, options.attacks, options.eps,
                             options.corruptions, options.pgd_steps, options.apgd_steps, options.restarts,
                             options.seed, progress=log or print, square_queries=options.square_queries,
                             autoattack_steps=options.autoattack_steps, attack_eps=options.attack_eps,
                             checkpoint_dir=checkpoint_dir)


def _robustness_plots(report: dict, baseline: dict | None, meta: dict, out_dir: Path) -> dict:
    from .attacks.registry import LABELS
    from .evaluation.plots import plot_accuracy_vs_eps, plot_condition_bars, plot_per_class_boxes
    from .evaluation.report import describe_run

    if not report["attacks"]:
        return {}
    title = describe_run(meta)
    models = {"this model": report} if baseline is None else {"this model": report, "baseline": baseline}
    curves = {}
    for label, rep in models.items():
        for name, by_eps in rep["attacks"].items():
            eps = sorted(by_eps, key=float)
            curves[f"{LABELS[name]} ({label})"] = ([0.0] + [float(e) for e in eps],
                                                  [rep["clean_accuracy"]] + [by_eps[e]["accuracy"] for e in eps])
    plots = {"accuracy vs eps": plot_accuracy_vs_eps(curves, out_dir / "accuracy_vs_eps.png", title,
                                                     chance=1 / len(meta["classes"])).name}
    eps_keys = sorted({e for by_eps in report["attacks"].values() for e in by_eps}, key=float)
    mid = eps_keys[len(eps_keys) // 2]
    bars, boxes = {}, {}
    for label, rep in models.items():
        bars[label] = {"benign": rep["clean_accuracy"], **{f"{LABELS[n]}": rep["attacks"][n][mid]["accuracy"]
                                                         for n in rep["attacks"] if mid in rep["attacks"][n]}}
        boxes[label] = {"benign": rep["per_class_accuracy"]["clean"],
                        **{LABELS[n]: rep["attacks"][n][mid]["per_class_accuracy"]
                           for n in rep["attacks"] if mid in rep["attacks"][n]}}
    plots["accuracy bars"] = plot_condition_bars(bars, out_dir / "accuracy_bars.png", f"eps {mid}; {title}").name
    plots["per-class accuracy"] = plot_per_class_boxes(boxes, out_dir / "per_class_boxes.png",
                                                       f"eps {mid}; {title}").name
    return plots


def sweep_model(model_dir: Path, attack: str, eps: list[float], out_dir: Path, data: DataOptions | None = None,
                log=None) -> dict:
    """Accuracy against eps for one attack (the reference's robustness curve): sweep.json, sweep.md, sweep.png."""
    from .attacks.registry import LABELS
    from .evaluation.plots import plot_accuracy_vs_eps
    from .evaluation.report import describe_run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, records, root, meta = model_test_data(model_dir, data)
    test, _ = _decode_for(model, records, root, meta["classes"])
    report = _robustness(model, test, meta["classes"], RobustnessOptions([attack], eps), log)
    points = [{"eps": 0.0, "accuracy": report["clean_accuracy"]}] + [
        {"eps": float(e), "accuracy": v["accuracy"]} for e, v in report["attacks"][attack].items() if float(e) > 0]
    result = {"model": meta, "attack": attack, "points": points, "sanity_flags": report["sanity_flags"]}
    write_json(out_dir / "sweep.json", result)
    plot_accuracy_vs_eps({LABELS[attack]: ([p["eps"] for p in points], [p["accuracy"] for p in points])},
                         out_dir / "sweep.png", describe_run(meta), chance=1 / len(meta["classes"]))
    lines = [f"# {LABELS[attack]} accuracy vs eps", "", describe_run(meta), "", "| eps | accuracy |", "|---:|---:|"]
    lines += [f"| {p['eps']:g} | {p['accuracy']:.2%} |" for p in points]
    lines += ["", "![accuracy vs eps](sweep.png)", ""] + [f"- ⚠ {f}" for f in report["sanity_flags"]]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    return result
