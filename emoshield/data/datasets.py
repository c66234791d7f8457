"""Dataset scanners: turn a folder of real face data into ImageRecords with subject/sequence metadata.

Supported layouts (see README "Data"):
- fer2013:  fer2013/{train,val,test}/{class}/*.jpg       (official split, no subject ids)
- ckplus48: ckplus48/{class}/SXXX_YYY_ZZZZZZZZ.png       (subject, sequence, frame)
- jaffe:    jaffe/SUBJECT.EXPRn.ID.tiff                  (uncropped: Haar face crop, cached)
- liris:    liris/{class}/*.mp4|avi|...                  (a video is a sequence; frames via OpenCV)
- folder:   DIR/{class}/*.png|jpg|...                    (any ImageFolder)
"""

from __future__ import annotations

import math

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EmoshieldError
from .labels import CANONICAL_CLASSES, canonical_label, parse_classes
from .records import ImageRecord

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v"}
DATASET_NAMES = ("fer2013", "ckplus48", "jaffe", "liris", "folder")
DEFAULT_SUBJECT_PATTERN = r"^([^_\-\s.]+)"


@dataclass
class FaceDataset:
    """The records of one dataset folder, restricted to `classes`."""

    name: str
    root: Path
    records: list[ImageRecord]
    classes: tuple[str, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def has_subjects(self) -> bool:
        return all(r.subject is not None for r in self.records)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(r.label for r in self.records)
        return {c: counts.get(c, 0) for c in self.classes}


def resolve_dataset_dir(data_root: Path, dirname: str) -> Path:
    """Accept either the parent folder (../shared/data) or the dataset folder itself."""
    candidate = data_root / dirname
    return candidate if candidate.is_dir() else data_root


def _class_dirs(folder: Path) -> list[tuple[Path, str]]:
    """(subfolder, canonical label) for every class subfolder; unknown names are an error."""
    if not folder.is_dir():
        raise EmoshieldError(f"dataset folder {folder} does not exist")
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = canonical_label(sub.name)
        if label is None:
            raise EmoshieldError(
                f"{sub}: folder name {sub.name!r} is not an emotion class; use one of {', '.join(CANONICAL_CLASSES)}")
        out.append((sub, label))
    return out


def _files(folder: Path, suffixes: set[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def scan_fer2013(root: Path, **_: object) -> tuple[list[ImageRecord], list]:
    """FER2013 as class folders inside train/val/test (PublicTest = val, PrivateTest = test)."""
    records = []
    splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if not splits:
        raise EmoshieldError(f"{root}: expected FER2013 folders train/, val/, test/")
    for split in splits:
        for sub, label in _class_dirs(root / split):
            for path in _files(sub, IMAGE_SUFFIXES):
                rel = path.relative_to(root).as_posix()
                records.append(ImageRecord(rel, label, None, rel, 0, split))
    return records, []


_CK_NAME = re.compile(r"^(S\d+)_(\d+)_(\d+)$")


def scan_ckplus48(root: Path, **_: object) -> tuple[list[ImageRecord], list]:
    """CK+48: SXXX_YYY_ZZZZZZZZ = subject, sequence, frame."""
    records, skipped = [], []
    for sub, label in _class_dirs(root):
        for path in _files(sub, IMAGE_SUFFIXES):
            rel = path.relative_to(root).as_posix()
            match = _CK_NAME.match(path.stem)
            if not match:
                skipped.append((rel, "file name is not SXXX_YYY_ZZZZZZZZ"))
                continue
            subject, seq, frame = match.groups()
            records.append(ImageRecord(rel, label, subject, f"{subject}_{seq}", int(frame)))
    return records, skipped


_JAFFE_NAME = re.compile(r"^([A-Z]{2})\.([A-Z]{2})(\d+)\.(\d+)$")


def scan_jaffe(root: Path, detect_faces: bool = True, **_: object) -> tuple[list[ImageRecord], list]:
    """JAFFE: SUBJECT.EXPRn.ID.tiff. A 'sequence' is one subject posing one expression
    (its n = 1..4 repeats); faces are found with the Haar cascade and cached."""
    from .faces import FaceBoxCache

    if not root.is_dir():
        raise EmoshieldError(f"dataset folder {root} does not exist")
    cache = FaceBoxCache("jaffe") if detect_faces else None
    records, skipped = [], []
    for path in _files(root, IMAGE_SUFFIXES):
        match = _JAFFE_NAME.match(path.stem)
        label = canonical_label(match.group(2)) if match else None
        if label is None:
            skipped.append((path.name, "file name is not SUBJECT.EXPRn.ID"))
            continue
        subject, expr, repeat, _id = match.groups()
        crop = None
        if cache is not None:
            crop = cache.box(path)
            if crop is None:
                skipped.append((path.name, "no face found"))
                continue
        records.append(ImageRecord(path.name, label, subject, f"{subject}.{expr}", int(repeat), None, crop))
    if cache is not None:
        cache.save()
    return records, skipped


def _subject_of(stem: str, pattern: str) -> str | None:
    match = re.search(pattern, stem)
    return (match.group(1) if match.groups() else match.group(0)) if match else None


MAX_VIDEO_FRAMES = 500_000  # 4.6 hours at 30 fps: a LIRIS-CSE clip is seconds long


def scan_liris(root: Path, subject_pattern: str = DEFAULT_SUBJECT_PATTERN, frame_stride: int = 1,
               **_: object) -> tuple[list[ImageRecord], list]:
    """LIRIS-CSE layout: class folders of videos. Each video is one sequence; every
    `frame_stride`-th frame is a record; the subject is parsed from the file name."""
    import cv2

    records, skipped = [], []
    for sub, label in _class_dirs(root):
        for path in _files(sub, VIDEO_SUFFIXES):
            rel = path.relative_to(root).as_posix()
            capture = cv2.VideoCapture(str(path))
            declared = capture.get(cv2.CAP_PROP_FRAME_COUNT) if capture.isOpened() else 0.0
            capture.release()
            count = int(declared) if math.isfinite(declared) else 0
            if count <= 0:
                skipped.append((rel, "unreadable video or no frames"))
                continue
            if count > MAX_VIDEO_FRAMES:  # a header can declare any count: one record per frame would follow
                skipped.append((rel, f"declares {count} frames (more than {MAX_VIDEO_FRAMES})"))
                continue
            subject = _subject_of(path.stem, subject_pattern)
            for frame in range(0, count, max(1, frame_stride)):
                records.append(ImageRecord(rel, label, subject, rel, frame))
    return records, skipped


def scan_folder(root: Path, subject_pattern: str | None = None, **_: object) -> tuple[list[ImageRecord], list]:
    """Any ImageFolder (class subfolders of images). No subject ids unless `subject_pattern` is given."""
    records = []
    for sub, label in _class_dirs(root):
        for path in _files(sub, IMAGE_SUFFIXES):
            rel = path.relative_to(root).as_posix()
            subject = _subject_of(path.stem, subject_pattern) if subject_pattern else None
            records.append(ImageRecord(rel, label, subject, rel, 0))
    return records, []


_SCANNERS: dict[str, tuple[str, Callable[..., tuple[list[ImageRecord], list]]]] = {
    "fer2013": ("fer2013", scan_fer2013),
    "ckplus48": ("ckplus48", scan_ckplus48),
    "jaffe": ("jaffe", scan_jaffe),
    "liris": ("liris", scan_liris),
    "folder": ("", scan_folder),
}


def load_dataset(name: str, data_root: str | Path, classes: str | tuple[str, ...] | None = None,
                 **options: object) -> FaceDataset:
    """Scan a dataset folder and keep the records of the chosen classes (all present ones by default).

    `data_root` may be the folder that holds the dataset folder (e.g. ../shared/data)
    or the dataset folder itself.
    """
    if name not in _SCANNERS:
        raise EmoshieldError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise EmoshieldError(f"data root {data_root} does not exist or is not a folder")
    dirname, scanner = _SCANNERS[name]
    root = resolve_dataset_dir(data_root, dirname) if dirname else data_root
    records, skipped = scanner(root, **options)
    if not records:
        raise EmoshieldError(f"{root}: no {name} images found")
    present = tuple(c for c in CANONICAL_CLASSES if any(r.label == c for r in records))
    wanted = parse_classes(classes) if classes is not None and not isinstance(classes, tuple) else classes
    wanted = wanted or present
    missing = [c for c in wanted if c not in present]
    if missing:
        raise EmoshieldError(f"{root}: no images of class {', '.join(missing)} in {name} "
                             f"(it has {', '.join(present)})")
    kept = [r for r in records if r.label in wanted]
    return FaceDataset(name, root, kept, tuple(wanted), skipped)
