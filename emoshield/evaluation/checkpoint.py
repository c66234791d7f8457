"""Attack results kept on disk batch by batch, so an evaluation that is stopped (a session's end,
SIGKILL, a full disk) resumes at the batch it was on when the same command runs again, instead of
starting an hours-long AutoAttack over.

A batch's entry is the per-image correctness under one attack (its repr names every setting, seed
included) and the attack's running statistics after that batch (AutoAttack's per-stage counts
and seconds). Entries live under a folder named by a fingerprint of everything that decides
them: the model's weights and buffers, the images and labels, the batch size and the attack
code's own source. Anything else changed, and nothing is reused. An entry that cannot be read
back (truncated, edited, another length) is computed again; a write that fails (full or
read-only disk) is reported once and the evaluation goes on without checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

FORMAT = "emoshield.attack-checkpoint/1"


def _attack_code_digest() -> str:
    """sha256 of emoshield/attacks/*.py: a fixed attack is a different attack."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parents[1] / "attacks").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> str:
    """What a batch's result depends on besides the attack's settings."""
    digest = hashlib.sha256(f"{FORMAT}\0{batch_size}\0{_attack_code_digest()}\0".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class AttackCheckpoint:
    """Per-batch results of attacks on one model and one set of images, under `folder`."""

    def __init__(self, folder: Path, key: str, log=None):
        self.folder = Path(folder) / key[:24]
        self.log = log or (lambda message: None)
        self.writable = True
        self.loaded = 0  # batches read back, for the caller's progress line

    def _path(self, name: str) -> Path:
        return self.folder / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".json")

    def load(self, name: str, size: int) -> dict | None:
        """{"correct": bool tensor, "state": dict, "seconds": float} of batch `name`, or None."""
        try:
            entry = json.loads(self._path(name).read_text())
            bits = entry["correct"]
            if entry.get("format") != FORMAT or entry.get("name") != name or len(bits) != size \
                    or set(bits) - {"0", "1"} or not isinstance(entry.get("state"), dict):
                return None
            seconds = float(entry.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return {"correct": torch.tensor([b == "1" for b in bits], dtype=torch.bool), "state": entry["state"],
                "seconds": seconds}

    def save(self, name: str, correct: torch.Tensor, state: dict, seconds: float) -> None:
        if not self.writable:
            return
        entry = {"format": FORMAT, "name": name, "correct": "".join("1" if c else "0" for c in correct.tolist()),
                 "state": state, "seconds": seconds}
        path = self._path(name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, path)  # a reader sees the whole entry or none
        except OSError as e:
            self.writable = False
            tmp.unlink(missing_ok=True)
            self.log(f"attack checkpoints off ({e.strerror or e}): this evaluation will not resume if stopped")


def correct_under_resumable(model, x: torch.Tensor, y: torch.Tensor, attack, batch_size: int,
                            checkpoint: AttackCheckpoint | None) -> tuple[torch.Tensor, float]:
    """Per-image correctness of `model` under `attack` (as registry.correct_under) and the attack's
    seconds, batch by batch through `checkpoint` when given. The attack's running statistics are
    restored from the last batch read back, so a resumed AutoAttack reports the same stages."""
    from ..attacks.registry import correct_under

    parts, seconds = [], 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        name = f"{attack!r}|{i}:{i + len(yb)}"
        saved = checkpoint.load(name, len(yb)) if checkpoint is not None else None
        if saved is not None:
            try:
                attack.load_state(saved["state"])
            except (ValueError, KeyError, TypeError, AttributeError):
                saved = None
        if saved is not None:
            parts.append(saved["correct"])
            seconds += saved["seconds"]
            checkpoint.loaded += 1
            continue
        started = time.perf_counter()
        correct = correct_under(model, xb, yb, attack, len(yb))
        elapsed = time.perf_counter() - started
        seconds += elapsed
        parts.append(correct)
        if checkpoint is not None:
            checkpoint.save(name, correct, attack.state(), elapsed)
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)), seconds
