"""Train/validation/test splits, saved as split.json so every result names its exact images.

Protocols:
- reference: SPEC §3. The frames of EVERY sequence are divided between train, val and
  test (~80/10/10), so every video appears in all three. For a sequence of n frames:
  n_val = n_test = max(1, round(0.1 * n)) when n >= 3 (so every sequence reaches all
  three splits, as in the reference), n = 2 gives 1 train + 1 test, n = 1 goes to
  train; the rest is train. Which frames go where is a seeded shuffle within the
  sequence. CK+48 has 3 frames per sequence, so it is exactly 1 train / 1 val / 1 test.
  Single-image "sequences" (still-image datasets) are pooled per class and divided by
  the same rule, i.e. a stratified ~80/10/10 image split. With `--val-fraction 0` the
  validation frames go to train instead (CK+48: 2 train / 1 test frames per sequence, the
  split of the issue's prototype) and the last epoch is kept, as there is nothing to select on.
  Neighbouring frames are near-identical, so this protocol inflates accuracy.
- subject: subject-independent k-fold. Subjects are shuffled with the seed and dealt
  round-robin into k folds; fold K is the test set; validation subjects (a
  `val_fraction` of the rest, at least one) are carved from the training subjects.
  No subject is in two splits. `nested_in=(K, N)` first removes the test subjects of fold K of N
  (same seed) and splits only the rest: nested cross-validation, so that a choice made on these
  inner folds (a learning rate, say) never saw fold K's test people.
- official: the dataset's own split (FER2013 train / PublicTest=val / PrivateTest=test).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EmoshieldError, one_line
from ..paths import read_json
from .datasets import FaceDataset
from .records import ImageRecord

PROTOCOLS = ("reference", "subject", "official")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ExtraTraining:
    """Another dataset's faces that joined a run's training part (`--extra-train`), named image by
    image so that no evaluation tests on them."""

    dataset: str
    dataset_dir: str
    records: list[ImageRecord]


@dataclass
class Split:
    """Records per split, with how they were made."""

    protocol: str
    seed: int
    fold: int | None
    folds: int | None
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    extra_train: list[ExtraTraining] = field(default_factory=list)
    nested_in: tuple[int, int] | None = None  # (fold, folds) whose training people alone were split

    def parts(self) -> dict[str, list[ImageRecord]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def to_json(self, dataset: FaceDataset) -> dict:
        entries = [dict(r.to_json(), split=name) for name, part in self.parts().items() for r in part]
        return {
            "dataset": dataset.name, "dataset_dir": str(dataset.root.resolve()),
            "classes": list(dataset.classes), "protocol": self.protocol, "seed": self.seed,
            "fold": self.fold, "folds": self.folds,
            **({"nested_in": {"fold": self.nested_in[0], "folds": self.nested_in[1]}} if self.nested_in else {}),
            "counts": {name: len(part) for name, part in self.parts().items()},
            "entries": entries,
            # only when there is some: a split.json without extra faces reads as before
            **({"extra_train": [{"dataset": e.dataset, "dataset_dir": e.dataset_dir, "count": len(e.records),
                                 "entries": [r.to_json() for r in e.records]} for e in self.extra_train]}
               if self.extra_train else {}),
        }

    def save(self, path: Path, dataset: FaceDataset) -> None:
        """Atomically: a resumed run compares its images with this file, so it is never left cut short."""
        from ..paths import write_json

        write_json(Path(path), self.to_json(dataset))


def load_split(path: Path) -> tuple[Split, dict]:
    """Read a split.json back: the Split and its header (dataset, dataset_dir, classes)."""
    try:
        data = read_json(path)
    except EmoshieldError as error:
        raise EmoshieldError(f"cannot read split file {error}") from None
    parts: dict[str, list[ImageRecord]] = {name: [] for name in SPLIT_NAMES}
    try:  # a file edited, cut or written by something else: one line naming it, not a KeyError
        for entry in data["entries"]:
            parts[entry["split"]].append(_record(entry))
        extra = [_extra_training(e) for e in data.get("extra_train", [])]
        nested = data.get("nested_in")
        if nested is not None and not all(isinstance(nested[k], int) and not isinstance(nested[k], bool)
                                          for k in ("fold", "folds")):
            raise TypeError("nested_in's fold and folds are not integers")
        split = Split(data["protocol"], data["seed"], data.get("fold"), data.get("folds"), **parts,
                      extra_train=extra, nested_in=(nested["fold"], nested["folds"]) if nested else None)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EmoshieldError(f"{path} is not a split file emoshield wrote ({one_line(exc, 120)})") from None
    header = {k: v for k, v in data.items() if k not in ("entries", "extra_train")}
    return split, header


def _record(entry: dict) -> ImageRecord:
    """One split.json entry, its fields checked against their types (TypeError otherwise)."""
    record = ImageRecord.from_json(entry)
    if not (isinstance(record.path, str) and isinstance(record.label, str) and isinstance(record.sequence, str)
            and (record.subject is None or isinstance(record.subject, str))
            and (record.source_split is None or isinstance(record.source_split, str))
            and isinstance(record.frame, int) and not isinstance(record.frame, bool)
            and (record.crop is None or len(record.crop) == 4 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in record.crop))):
        raise TypeError("an entry's fields are not of their types")
    return record


def _extra_training(entry: dict) -> ExtraTraining:
    """One split.json `extra_train` item, checked like the entries (TypeError otherwise)."""
    if not (isinstance(entry["dataset"], str) and isinstance(entry["dataset_dir"], str)):
        raise TypeError("an extra_train item's dataset and dataset_dir are not text")
    return ExtraTraining(entry["dataset"], entry["dataset_dir"], [_record(r) for r in entry["entries"]])


def _reference_counts(n: int, validation: bool = True) -> tuple[int, int, int]:
    if n >= 3:
        held = max(1, int(math.floor(0.1 * n + 0.5)))
        return (n - 2 * held, held, held) if validation else (n - held, 0, held)
    if n == 2:
        return 1, 0, 1
    return n, 0, 0


def reference_split(records: list[ImageRecord], seed: int = 0, validation: bool = True) -> Split:
    """SPEC §3's per-sequence frame split (see module docstring for the exact rule);
    validation=False gives the would-be validation frames to train (no model selection)."""
    by_sequence: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        by_sequence[record.sequence].append(record)
    for sequence in [s for s, frames in by_sequence.items() if len(frames) == 1]:
        still = by_sequence.pop(sequence)[0]
        by_sequence[f"\0stills:{still.label}"].append(still)  # stills: one pool per class
    rng = random.Random(seed)
    train, val, test = [], [], []
    for sequence in sorted(by_sequence):
        frames = sorted(by_sequence[sequence], key=lambda r: (r.frame, r.path))
        rng.shuffle(frames)
        n_train, n_val, _ = _reference_counts(len(frames), validation)
        train += frames[:n_train]
        val += frames[n_train:n_train + n_val]
        test += frames[n_train + n_val:]
    return Split("reference", seed, None, None, train, val, test)


def subject_split(records: list[ImageRecord], fold: int = 0, folds: int = 5, seed: int = 0,
                  val_fraction: float = 0.15, nested_in: tuple[int, int] | None = None) -> Split:
    """Subject-independent k-fold split (see module docstring); `nested_in=(K, N)`: of the
    subjects outside fold K of N's test part only."""
    if any(r.subject is None for r in records):
        raise EmoshieldError("the subject protocol needs subject ids, and this dataset has none "
                             "(use --protocol official or reference)")
    if nested_in is not None:
        outer_test = _fold_subjects(records, *nested_in, seed, ("--nested-in fold", "--nested-in folds"))[0]
        records = [r for r in records if r.subject not in outer_test]
    whose = f" outside fold {nested_in[0]}/{nested_in[1]}'s test part" if nested_in else ""
    test_subjects, subjects = _fold_subjects(records, fold, folds, seed, whose=whose)
    rest = [s for s in subjects if s not in test_subjects]
    n_val = max(1, int(round(val_fraction * len(rest)))) if len(rest) > 1 else 0
    val_subjects = set(rest[:n_val])
    train = [r for r in records if r.subject not in test_subjects and r.subject not in val_subjects]
    val = [r for r in records if r.subject in val_subjects]
    test = [r for r in records if r.subject in test_subjects]
    return Split("subject", seed, fold, folds, train, val, test, nested_in=nested_in)


def _fold_subjects(records: list[ImageRecord], fold: int, folds: int, seed: int,
                   names: tuple[str, str] = ("--fold", "--folds"), whose: str = "") -> tuple[set[str], list[str]]:
    """(the test subjects of fold `fold` of `folds`, every subject in the seed's shuffled order);
    `names`: how the two numbers were given, `whose`: which subjects these are, for the error."""
    subjects = sorted({r.subject for r in records})
    if folds < 2 or folds > len(subjects):
        raise EmoshieldError(f"{names[1]} must be between 2 and the number of subjects{whose} ({len(subjects)}), "
                             f"got {folds}")
    if not 0 <= fold < folds:
        raise EmoshieldError(f"{names[0]} must be between 0 and {folds - 1}, got {fold}")
    rng = random.Random(seed)
    rng.shuffle(subjects)
    return set(subjects[fold::folds]), subjects


def official_split(records: list[ImageRecord], seed: int = 0) -> Split:
    """The dataset's own train/val/test split."""
    if any(r.source_split is None for r in records):
        raise EmoshieldError("the official protocol needs a dataset with its own split (fer2013)")
    parts = {name: [r for r in records if r.source_split == name] for name in SPLIT_NAMES}
    return Split("official", seed, None, None, **parts)


def refuse_nested_outside_subject(nested_in, protocol: str) -> None:
    """--nested-in means inner subject folds; with another protocol it would be silently ignored."""
    if nested_in and protocol != "subject":
        raise EmoshieldError(f"--nested-in splits subject folds; it needs --protocol subject, not {protocol}")


def nested_label(nested_in) -> str:
    """' of the training people of fold K/N' for an inner fold's split, else ''."""
    return f" of the training people of fold {nested_in[0]}/{nested_in[1]}" if nested_in else ""


def make_split(dataset: FaceDataset, protocol: str, fold: int = 0, folds: int = 5, seed: int = 0,
               val_fraction: float = 0.15, nested_in: tuple[int, int] | None = None) -> Split:
    """Build the split of `dataset` under `protocol`; deterministic for a seed."""
    refuse_nested_outside_subject(nested_in, protocol)
    if protocol == "reference":
        split = reference_split(dataset.records, seed, validation=val_fraction > 0)
    elif protocol == "subject":
        split = subject_split(dataset.records, fold, folds, seed, val_fraction, nested_in)
    elif protocol == "official":
        split = official_split(dataset.records, seed)
    else:
        raise EmoshieldError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not split.train or not split.test:
        raise EmoshieldError(f"{dataset.name}: the {protocol} split has an empty "
                             f"{'train' if not split.train else 'test'} set")
    return split
