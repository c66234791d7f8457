"""The cloud tier's model library on disk: one folder per pretrained backbone.

    LIB/NAME/weights.safetensors   feature-extractor tensors (and the pretraining head, if any)
    LIB/NAME/metadata.json         name, backbone, input size, normalization, classes, data,
                                   epochs, accuracy, sha256 of the weights file, creation time

`--weights library:NAME` in training reads LIB/NAME (LIB = $EMOSHIELD_LIBRARY, default
<cache>/library). Reading is torch-free (the cloud service only lists and serves files);
adding an entry builds the model and so imports torch.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ..errors import EmoshieldError
from ..paths import cache_dir
from .bundle import sha256_file

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_library() -> Path:
    return Path(os.environ["EMOSHIELD_LIBRARY"]) if os.environ.get("EMOSHIELD_LIBRARY") else cache_dir() / "library"


def check_name(name: str) -> str:
    """Entry names are used as folder names: letters, digits, '_', '.', '-' only."""
    if not _NAME.match(name or "") or ".." in name:
        raise EmoshieldError(f"library entry name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


def entry_dir(name: str, library: Path | None = None) -> Path:
    return Path(library or default_library()) / check_name(name)


def list_entries(library: Path | None = None) -> list[dict]:
    """Metadata of every entry, sorted by name (entries without metadata are skipped)."""
    root = Path(library or default_library())
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = folder / METADATA_FILE
        if meta.is_file() and (folder / WEIGHTS_FILE).is_file():
            entries.append(json.loads(meta.read_text()))
    return entries


def read_entry(name: str, library: Path | None = None, verify: bool = True) -> tuple[dict, Path]:
    """(metadata, weights path) of one entry; with verify, the file's sha256 must match."""
    folder = entry_dir(name, library)
    if not (folder / METADATA_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        names = ", ".join(e["name"] for e in list_entries(library)) or "none"
        raise EmoshieldError(f"no library entry {name!r} in {folder.parent} (entries: {names})")
    meta = json.loads((folder / METADATA_FILE).read_text())
    if verify and sha256_file(folder / WEIGHTS_FILE) != meta.get("sha256"):
        raise EmoshieldError(f"{folder / WEIGHTS_FILE}: sha256 does not match its metadata (corrupt or replaced)")
    return meta, folder / WEIGHTS_FILE


def add_entry(name: str, model, library: Path | None = None, data: str = "", epochs: int | None = None,
              accuracy: dict | None = None, overwrite: bool = False) -> dict:
    """Save an EmotionNet's weights as a library entry and return its metadata."""
    from ..models.network import save_model

    folder = entry_dir(name, library)
    if folder.exists() and not overwrite:
        raise EmoshieldError(f"library entry {folder} exists (pass --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / WEIGHTS_FILE)
    config = model.config
    meta = {"name": name, "backbone": config.backbone, "input_size": config.input_size,
            "normalization": {"mean": list(config.mean), "std": list(config.std)},
            "classes": list(config.classes), "initial_weights": config.weights, "data": data, "epochs": epochs,
            "accuracy": accuracy or {}, "sha256": sha256_file(folder / WEIGHTS_FILE),
            "bytes": (folder / WEIGHTS_FILE).stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    return meta
