"""AutoAttack (Croce & Hein, ICML 2020), standard L-inf version: APGD-CE, APGD-T, FAB-T and
Square in this order, each only on the images every earlier attack failed on, so the result is
the per-image worst case over the four. The robust accuracy after each attack is kept
(`stages`), summed over every batch the attack object has seen.

Standard settings: APGD-CE 100 steps, 1 restart; APGD-T 100 steps, every other class as a
target (9 on CIFAR-10; here as many as the classes allow; APGD-T needs 4 classes or more and is
skipped, and said so, below that); FAB-T 100 steps, the same targets; Square 5000 queries.
"""

from __future__ import annotations

import math
import time

import torch

from .apgd import APGD, APGDT
from .base import LinfAttack, attack_context
from .fab import FABT
from .square import Square

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


class AutoAttack(LinfAttack):
    """x_adv = AutoAttack(eps)(model, x, y); `stages` gives robust accuracy after each attack."""

    name = "autoattack"

    def __init__(self, eps: float, steps: int = 100, queries: int = 5000, targets: int | None = None,
                 mode: str = "eval", seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=steps, mode=mode, seed=seed, fast=fast)
        self.queries, self.targets = queries, targets
        self.parts = {"apgd-ce": APGD(eps, steps=steps, loss="ce", mode=mode, seed=seed, fast=fast),
                      "apgd-t": APGDT(eps, steps=steps, targets=targets, mode=mode, seed=seed, fast=fast),
                      "fab-t": FABT(eps, steps=steps, targets=targets, mode=mode, seed=seed, fast=fast),
                      "square": Square(eps, queries=queries, mode=mode, seed=seed, fast=fast)}
        self.robust = {name: 0 for name in ("clean", *STAGES)}
        self.images = 0
        self.skipped: dict[str, str] = {}
        self.seconds = {name: 0.0 for name in STAGES}  # wall time per attack, summed over batches

    def __repr__(self) -> str:
        return (f"AutoAttack(eps={self.eps:g}, version=standard, steps={self.steps}, square_queries={self.queries}, "
                f"targets={self.targets or 'all'}, seed={self.seed}, mode={self.mode!r})")

    def stages(self) -> dict:
        """Robust accuracy after clean evaluation and after each attack, over all images seen."""
        return {name: count / self.images if self.images else None for name, count in self.robust.items()}

    def state(self) -> dict:
        """The running counts and seconds (JSON-able), so a checkpointed evaluation can resume."""
        return {"robust": dict(self.robust), "images": self.images, "skipped": dict(self.skipped),
                "seconds": dict(self.seconds)}

    def load_state(self, state: dict) -> None:
        """Take back what state() returned; raises ValueError/KeyError/TypeError/OverflowError on a
        state that this object could not have produced, changing nothing."""
        robust = {k: int(v) for k, v in state["robust"].items()}
        seconds = {k: float(v) for k, v in state["seconds"].items()}
        images, skipped = int(state["images"]), {str(k): str(v) for k, v in state["skipped"].items()}
        if list(robust) != list(self.robust) or list(seconds) != list(self.seconds):
            raise ValueError("AutoAttack state of another stage list")
        counts = list(robust.values())  # clean, then after each attack: never more robust than before
        if not (0 <= counts[-1] and all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] <= images):
            raise ValueError("AutoAttack state with counts out of range")
        if not all(math.isfinite(v) and v >= 0 for v in seconds.values()):
            raise ValueError("AutoAttack state with seconds out of range")
        self.robust, self.seconds, self.images, self.skipped = robust, seconds, images, skipped

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.detach(), y.detach()
        with attack_context(model, self.mode), torch.no_grad():
            logits = model(x)
        robust = logits.argmax(1) == y
        if logits.shape[1] < 4:
            self.skipped["apgd-t"] = f"needs 4 classes or more, the model has {logits.shape[1]}"
        adv = x.clone()
        self.images += len(y)
        self.robust["clean"] += int(robust.sum())
        for name, attack in self.parts.items():
            todo = robust.nonzero()[:, 0]
            if len(todo) and name not in self.skipped:
                started = time.perf_counter()
                candidate = attack(model, x[todo], y[todo])
                with attack_context(model, self.mode), torch.no_grad():
                    broken = model(candidate).argmax(1) != y[todo]
                adv[todo[broken]] = candidate[broken]
                robust[todo[broken]] = False
                self.seconds[name] += time.perf_counter() - started
            self.robust[name] += int(robust.sum())
        return adv
