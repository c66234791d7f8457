"""Where data and caches live (one place, so every command resolves them the same way), and
the sha256 that names and checks files everywhere (torch-free)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import EmoshieldError

DATA_ENV = "EMOSHIELD_DATA"
CACHE_ENV = "EMOSHIELD_CACHE"
STUDY_WORK_ENV = "EMOSHIELD_STUDY_WORK"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Return the dataset root: an explicit path, else $EMOSHIELD_DATA; error if neither exists."""
    value = explicit if explicit not in (None, "") else os.environ.get(DATA_ENV)
    if not value:
        raise EmoshieldError(f"no data root: pass --data-root DIR or set {DATA_ENV}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise EmoshieldError(f"data root {root} does not exist or is not a folder")
    return root


def cache_dir(sub: str = "") -> Path:
    """Return (and create) emoshield's cache folder, $EMOSHIELD_CACHE or ~/.cache/emoshield."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "emoshield")
    path = base / sub if sub else base
    path.mkdir(parents=True, exist_ok=True)
    return path


def study_work_root() -> Path:
    """Where scripts/studies.py's stages keep their work folders (trained models, checkpoints):
    $EMOSHIELD_STUDY_WORK, else ~/.cache/emoshield/studies (outside any checkout; not created here).
    The benches that re-read a study's models default to the same place."""
    return Path(os.environ.get(STUDY_WORK_ENV) or Path.home() / ".cache" / "emoshield" / "studies").expanduser()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` all at once (a reader sees the old or the new file, never
    half of one), durable (fsync), with `mode` whatever the umask: private (0600) unless asked."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mkstemp: mode 0600
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_json(path: Path, data) -> None:
    """A result file (metrics, run, results.json), written atomically: a process killed while
    writing leaves the previous version, never a truncated file the report scripts stop on. Its
    mode is what open() would give it (0666 less the umask), not write_atomic's private 0600."""
    import json

    write_atomic(Path(path), json.dumps(data, indent=1, default=str).encode(), mode=0o666 & ~_UMASK)


def read_json(path: Path, max_bytes: int | None = None):
    """A JSON file's value; a one-line EmoshieldError naming the file when it cannot be read, is
    over `max_bytes`, is not UTF-8 or not JSON, or nests past the recursion limit. Callers check
    the value's shape themselves."""
    import json

    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise EmoshieldError(f"{path}: over {max_bytes} bytes")
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise EmoshieldError(f"{path}: cannot read it ({error.strerror or type(error).__name__})") from None
    except (ValueError, RecursionError) as error:  # ValueError: not UTF-8, or not JSON
        raise EmoshieldError(f"{path}: not JSON ({type(error).__name__})") from None
