"""Learning-rate schedules, one rate per epoch (epochs are numbered from 1)."""

from __future__ import annotations

import math

from ..errors import EmoshieldError

SCHEDULES = ("reference", "constant", "cosine")


def reference_lr_schedule(epochs: int = 50, lr0: float = 0.01, decay_rate: float = 0.9,
                          decay_stride: int = 5) -> list[float]:
    """Algorithm 1 of the reference (SPEC §4), exactly as written.

    decay_start = 0.5 * epochs. For epoch k = 1..epochs: if k > decay_start then
    frac = floor((k - decay_start) / decay_stride) and lr_k = lr_{k-1} * decay_rate ** frac;
    else lr_k = lr0. The decay compounds (it multiplies the previous epoch's rate).
    """
    if epochs < 1 or decay_stride < 1:
        raise EmoshieldError("epochs and decay_stride must be >= 1")
    decay_start = 0.5 * epochs
    rates: list[float] = []
    for k in range(1, epochs + 1):
        if k > decay_start:
            frac = math.floor((k - decay_start) / decay_stride)
            rates.append((rates[-1] if rates else lr0) * decay_rate ** frac)  # lr_0 = lr0
        else:
            rates.append(lr0)
    return rates


def lr_schedule(name: str, epochs: int, lr0: float, decay_rate: float = 0.9, decay_stride: int = 5) -> list[float]:
    """The per-epoch learning rates of a named schedule."""
    if name == "reference":
        return reference_lr_schedule(epochs, lr0, decay_rate, decay_stride)
    if name == "constant":
        return [lr0] * epochs
    if name == "cosine":
        return [0.5 * lr0 * (1 + math.cos(math.pi * (k - 1) / epochs)) for k in range(1, epochs + 1)]
    raise EmoshieldError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
