"""Attack results kept on disk batch by batch, so an evaluation that is stopped (a session's end,
SIGKILL, a full disk) resumes at the batch it was on when the same command runs again, instead of
starting an hours-long AutoAttack over.

A batch's entry is the per-image correctness under one attack and the attack's running
statistics after that batch (AutoAttack's per-stage counts and seconds). Its name is the
attack's repr (every setting, seed included), its exact eps and the batch's image range; it lives
under a folder named by a fingerprint of everything else that decides it: the model's weights,
buffers and module structure (a test-time augmentation's mode included), the images and labels,
torch's version and the attack code's own source. Anything changed, and nothing is reused.

Entries are only data we wrote, but a damaged folder must not stop an evaluation: an entry that
cannot be read back (truncated, edited, too big, not a regular file, a link, another length, a
state out of range) is computed again, and a write that fails is skipped (a full or read-only
disk turns checkpoints off, said once) while the evaluation goes on."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Callable

import torch

from ..paths import write_atomic

FORMAT = "emoshield.attack-checkpoint/1"
MAX_ENTRY_BYTES = 1 << 20  # a batch's bits and a few counts: kilobytes; anything bigger is not ours
WRITES_IMPOSSIBLE = {  # full or read-only disk, no permission: no later write will do better
    errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@functools.cache
def _attack_code_digest() -> str:
    """sha256 of emoshield/attacks/*.py: a fixed attack is a different attack. Read once per
    process (the code it runs), so editing the files mid-run does not change its folder."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parents[1] / "attacks").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}\0{tuple(t.shape)}\0".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    """What a batch's result depends on besides the attack's settings and the batch's range."""
    digest = hashlib.sha256(f"{FORMAT}\0torch {torch.__version__}\0{_attack_code_digest()}\0".encode())
    for module in model.modules():  # structure and plain settings (e.g. ViewAverage's mode)
        digest.update(f"{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})\0".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + b"\0" + _tensor_bytes(tensor))
    digest.update(_tensor_bytes(x) + _tensor_bytes(y))
    return digest.hexdigest()


def _read_entry(path: Path) -> bytes | None:
    """The file's bytes if it is a regular file of at most MAX_ENTRY_BYTES (no link, FIFO or device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_ENTRY_BYTES + 1)
        return data if len(data) <= MAX_ENTRY_BYTES else None
    except OSError:
        return None
    finally:
        os.close(fd)


KEY_CHARS = 24  # of the fingerprint, naming one model-and-images folder under the checkpoint root


def checkpoint_folder(root: Path, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Path:
    """The folder under `root` that holds the attack entries of `model` on these images (what an
    evaluation removes once its report is written, leaving other evaluations' folders alone)."""
    return Path(root) / fingerprint(model, x, y)[:KEY_CHARS]


class AttackCheckpoint:
    """Per-batch results of attacks on one model and one set of images, under `folder`."""

    def __init__(self, folder: Path, key: str, log: Callable[[str], None] | None = None):
        self.folder = Path(folder) / key[:KEY_CHARS]
        self.log = log or (lambda message: None)
        self.writable = True
        self.skipped_writes = 0
        try:  # entries that were here before this run: only those count as resumed
            self.before = {p.name for p in self.folder.iterdir()}
        except OSError:
            self.before = set()
        self.resumed = 0  # batches taken from an earlier run, for the caller's progress line

    def _path(self, name: str) -> Path:
        return self.folder / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".json")

    def load(self, name: str, size: int) -> dict | None:
        """{"correct": bool tensor, "state": dict, "seconds": float} of batch `name`, or None
        when there is no usable entry."""
        data = _read_entry(self._path(name))
        if data is None:
            return None
        try:
            entry = json.loads(data)
            bits, state, seconds = entry["correct"], entry["state"], float(entry["seconds"])
            if (entry.get("format") != FORMAT or entry.get("name") != name or not isinstance(bits, str)
                    or len(bits) != size or set(bits) - {"0", "1"} or not isinstance(state, dict)
                    or not math.isfinite(seconds) or seconds < 0):
                return None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
            return None
        return {"correct": torch.tensor([b == "1" for b in bits], dtype=torch.bool), "state": state,
                "seconds": seconds, "earlier": self._path(name).name in self.before}

    def save(self, name: str, correct: torch.Tensor, state: dict, seconds: float) -> None:
        """Write one batch's entry atomically (a reader sees all of it or nothing); a failed write
        loses only this entry, a full or read-only disk turns checkpoints off for the run."""
        if not self.writable:
            return
        entry = {"format": FORMAT, "name": name, "correct": "".join("1" if c else "0" for c in correct.tolist()),
                 "state": state, "seconds": seconds}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(name), json.dumps(entry).encode())  # removes its temporary file on failure
        except OSError as e:
            if e.errno in WRITES_IMPOSSIBLE:
                self.writable = False
                self.log(f"attack checkpoints off ({e.strerror or e}): this evaluation will not resume if stopped")
            elif not self.skipped_writes:
                self.log(f"attack checkpoint not written ({e}); the evaluation goes on")
            self.skipped_writes += 1


def correct_under_resumable(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack, batch_size: int,
                            checkpoint: AttackCheckpoint | None) -> tuple[torch.Tensor, float]:
    """Per-image correctness of `model` under `attack` (as registry.correct_under) and the attack's
    seconds, batch by batch through `checkpoint` when given. The attack's running statistics are
    restored from the last batch read back, so a resumed AutoAttack reports the same stages."""
    from ..attacks.registry import correct_under

    parts, seconds = [], 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        name = f"{attack!r}|eps={attack.eps!r}|{i}:{i + len(yb)}"
        saved = checkpoint.load(name, len(yb)) if checkpoint is not None else None
        if saved is not None:
            try:
                attack.load_state(saved["state"])
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
                saved = None
        if saved is not None:
            parts.append(saved["correct"])
            seconds += saved["seconds"]
            checkpoint.resumed += saved["earlier"]
            continue
        started = time.perf_counter()
        correct = correct_under(model, xb, yb, attack, len(yb))
        elapsed = time.perf_counter() - started
        seconds += elapsed
        parts.append(correct)
        if checkpoint is not None:
            checkpoint.save(name, correct, attack.state(), elapsed)
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)), seconds
