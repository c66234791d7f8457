"""The cloud tier's model library on disk: one folder per pretrained backbone.

    LIB/NAME/weights.safetensors   feature-extractor tensors (and the pretraining head, if any)
    LIB/NAME/metadata.json         name, backbone, input size, normalization, classes, data,
                                   epochs, accuracy, sha256 of the weights file, creation time

`--weights library:NAME` in training reads LIB/NAME (LIB = $EMOSHIELD_LIBRARY, default
<cache>/library), and, when LIB has no such entry, the embedded library shipped inside the
package (emoshield/library: small backbones this project pretrained itself, so a fresh clone
has a FER2013-pretrained starting point without any download; README "Models" says how
to rebuild them). An explicit library folder (`--library`) is searched alone. Reading is
torch-free (the cloud service only lists and serves files); adding an entry builds the model
and so imports torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from ..errors import EmoshieldError
from ..paths import cache_dir, read_json, sha256_file

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


EMBEDDED_LIBRARY = Path(__file__).resolve().parent.parent / "library"


def default_library() -> Path:
    return Path(os.environ["EMOSHIELD_LIBRARY"]) if os.environ.get("EMOSHIELD_LIBRARY") else cache_dir() / "library"


def search_path(library: Path | None = None) -> list[Path]:
    """Folders searched for entries, first match wins: an explicit library alone; by default the
    user's library, then the embedded one (so a user entry of the same name overrides it)."""
    if library is not None:
        return [Path(library)]
    return [default_library()] + ([EMBEDDED_LIBRARY] if EMBEDDED_LIBRARY.is_dir() else [])


def _is_entry_name(name: str) -> bool:
    return bool(_NAME.match(name or "")) and ".." not in name


def check_name(name: str) -> str:
    """Entry names are used as folder names: letters, digits, '_', '.', '-' only."""
    if not _is_entry_name(name):
        raise EmoshieldError(f"library entry name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


def entry_dir(name: str, library: Path | None = None) -> Path:
    """Where entry `name` is written (the explicit or the user's library; never the embedded one)."""
    return Path(library or default_library()) / check_name(name)


def _complete(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def find_entry_dir(name: str, library: Path | None = None) -> Path | None:
    """The folder holding entry `name` along the search path, or None. A damaged entry (metadata
    that does not read) is passed over, as list_entries passes over it, so an embedded entry of
    the same name is the one found and served."""
    check_name(name)
    return _find(name, library)[0]


def _find(name: str, library: Path | None, accept=lambda meta: True) -> tuple[Path | None, EmoshieldError | None]:
    """(the first sound entry folder named `name` whose metadata `accept` takes, the first damaged
    one's error)."""
    damaged = None
    for root in search_path(library):
        if _complete(root / name):
            try:
                if not accept(_metadata(root / name)):
                    continue
                return root / name, damaged
            except EmoshieldError as error:
                _warn_once(root / name, str(error))  # passed over, but not silently
                damaged = damaged or error
    return None, damaged


def list_entries(library: Path | None = None) -> list[dict]:
    """Metadata of every entry along the search path, sorted by name (entries without metadata
    are skipped, and so are damaged ones, with one warning line each: one bad entry must not take
    the catalog or the cloud service down; an embedded entry is marked "embedded": true)."""
    found: dict[str, dict] = {}
    for root in search_path(library):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name not in found and _complete(folder):
                try:
                    found[folder.name] = _metadata(folder)
                except EmoshieldError as error:
                    _warn_once(folder, str(error))
    return [found[name] for name in sorted(found)]


_WARNED: set[tuple[str, int]] = set()


def _warn_once(folder: Path, message: str) -> None:
    """One line per damaged metadata file (and again once it changes), not one per request."""
    try:
        key = (str(folder), (folder / METADATA_FILE).stat().st_mtime_ns)
    except OSError:
        key = (str(folder), 0)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"emoshield: warning: library entry skipped: {message}", file=sys.stderr, flush=True)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BACKBONE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")  # what the cloud's catalog column holds
MAX_INPUT_SIZE = 4096
# what the service, the edge and `--weights library:NAME` read from an entry's metadata
_REQUIRED = {"name": str, "backbone": str, "input_size": int, "sha256": str}


def _metadata(folder: Path) -> dict:
    """An entry's metadata, checked: a truncated, foreign or hand-edited file is a one-line
    EmoshieldError naming it, never a traceback or a KeyError in a caller."""
    path = folder / METADATA_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise EmoshieldError(f"{path}: library metadata must be a JSON object")
    wrong = [key for key, kind in _REQUIRED.items()
             if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)]
    if wrong:
        raise EmoshieldError(f"{path}: library metadata lacks or mistypes {', '.join(wrong)}")
    if (meta["name"] != folder.name or not _is_entry_name(meta["name"]) or not _SHA256.match(meta["sha256"]) or not _BACKBONE.match(meta["backbone"])
            or not 1 <= meta["input_size"] <= MAX_INPUT_SIZE):
        raise EmoshieldError(f"{path}: library metadata does not fit its entry (name, sha256, backbone or "
                             f"input_size)")
    return {**meta, "embedded": True} if folder.parent == EMBEDDED_LIBRARY else meta


def read_entry(name: str, library: Path | None = None, verify: bool = True) -> tuple[dict, Path]:
    """(metadata, weights path) of one entry; with verify, the file's sha256 must match."""
    folder, damaged = _find(check_name(name), library)
    if folder is None and damaged is not None:
        raise damaged
    if folder is None:
        names = ", ".join(e["name"] for e in list_entries(library)) or "none"
        searched = ", ".join(str(p) for p in search_path(library))
        raise EmoshieldError(f"no library entry {name!r} in {searched} (entries: {names})")
    meta = _metadata(folder)
    if verify and sha256_file(folder / WEIGHTS_FILE) != meta.get("sha256"):
        raise EmoshieldError(f"{folder / WEIGHTS_FILE}: sha256 does not match its metadata (corrupt or replaced)")
    return meta, folder / WEIGHTS_FILE


def exact_weights(meta: dict) -> str:
    """library:NAME@SHA12, how a run records the exact entry it started from (read_weights_spec
    takes it back)."""
    return f"library:{meta['name']}@{str(meta.get('sha256'))[:12]}"


def read_weights_spec(spec: str, verify: bool = True) -> tuple[dict, Path]:
    """(metadata, weights path) of `library:NAME` or `library:NAME@SHA` (a sha256 prefix, as runs
    record it): with a sha, the entry must still be those weights, not one retrained under the
    same name since."""
    name, at, pinned = spec.removeprefix("library:").partition("@")
    if at and not (8 <= len(pinned) <= 64 and all(c in "0123456789abcdef" for c in pinned.lower())):
        raise EmoshieldError(f"{spec[:120]!r}: after '@' comes a sha256 prefix of 8-64 hex digits")
    if not pinned:
        return read_entry(name, verify=verify)
    # a user entry may shadow the embedded one a run started from: the first entry of those weights
    folder, _ = _find(check_name(name), None, lambda meta: meta["sha256"].startswith(pinned.lower()))
    if folder is not None:
        return read_entry(name, folder.parent, verify=verify)  # only the chosen entry's file is hashed
    current, _ = read_entry(name, verify=False)  # what library:NAME loads now (or no such entry: its error)
    raise EmoshieldError(f"{spec}: library entry {name!r} is now sha256 {current['sha256'][:12]} "
                         f"(replaced since); pass library:{name} for the current weights")


def add_entry(name: str, model, library: Path | None = None, data: str = "", epochs: int | None = None,
              accuracy: dict | None = None, overwrite: bool = False, seed: int | None = None) -> dict:
    """Save an EmotionNet's weights as a library entry and return its metadata."""
    from .network import save_model

    folder = entry_dir(name, library)
    if folder.exists() and not overwrite:
        raise EmoshieldError(f"library entry {folder} exists (pass --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / WEIGHTS_FILE)
    config = model.config
    meta = {"name": name, "backbone": config.backbone, "input_size": config.input_size,
            "normalization": {"mean": list(config.mean), "std": list(config.std)},
            "classes": list(config.classes), "initial_weights": config.weights, "data": data, "epochs": epochs,
            "seed": seed,
            "accuracy": accuracy or {}, "sha256": sha256_file(folder / WEIGHTS_FILE),
            "bytes": (folder / WEIGHTS_FILE).stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from ..paths import write_atomic

    write_atomic(folder / METADATA_FILE, json.dumps(meta, indent=1).encode())  # a kill leaves the old or the new
    (folder / METADATA_FILE).chmod(0o644)  # metadata is public: the cloud service serves it
    return meta
