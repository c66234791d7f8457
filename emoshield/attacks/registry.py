"""Attacks by name (for the CLI and reports), eps lists, and the worst-case evaluator."""

from __future__ import annotations

import torch

from ..errors import EmoshieldError
from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .fab import FABT
from .gradient import FGSM, PGD, RFGSM
from .square import Square

ATTACKS = {"fgsm": FGSM, "rfgsm": RFGSM, "pgd": PGD, "apgd": APGD, "apgdt": APGDT, "fabt": FABT, "square": Square,
           "autoattack": AutoAttack}
LABELS = {"fgsm": "FGSM", "rfgsm": "R+FGSM", "pgd": "PGD", "apgd": "APGD-CE", "apgdt": "APGD-T", "fabt": "FAB-T",
          "square": "Square", "autoattack": "AutoAttack"}


def make_attack(name: str, eps: float, **options):
    """An attack by name: fgsm, rfgsm (alpha = eps/2), pgd (10 steps), apgd (APGD-CE), apgdt
    (APGD-T), fabt (FAB-T), square (gradient-free, 5000 queries), autoattack (the standard
    sequence of the last four)."""
    if name not in ATTACKS:
        raise EmoshieldError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return ATTACKS[name](eps, **options)


def parse_attacks(spec: str | None) -> list[str]:
    names = [s.strip().lower() for s in (spec or "").split(",") if s.strip()]
    for name in names:
        if name not in ATTACKS:
            raise EmoshieldError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return names


MAX_EPS_VALUES = 1000


def parse_eps_list(spec: str) -> list[float]:
    """'0.005,0.01' or a range 'start:stop:step' (stop included) -> eps values."""
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            if not 1 <= count <= MAX_EPS_VALUES:
                raise EmoshieldError(f"eps range {spec!r} gives {count} values; use 1 to {MAX_EPS_VALUES}")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except (ValueError, OverflowError):
        raise EmoshieldError(f"bad eps list {spec!r}; use 0.005,0.01 or start:stop:step") from None
    if not values or not all(0 <= v <= 1 for v in values):  # NaN fails every comparison
        raise EmoshieldError(f"eps values must be in [0, 1], got {spec!r}")
    return values


@torch.no_grad()
def correct_under(model, x: torch.Tensor, y: torch.Tensor, attack=None, batch_size: int = 256) -> torch.Tensor:
    """Per-sample correctness of `model` (as it is: callers set eval mode) on x, or on attack(x) if given."""
    parts = []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        parts.append(model(attack(model, xb, yb) if attack is not None else xb).argmax(1) == yb)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def worst_case_correct(model, x: torch.Tensor, y: torch.Tensor, attacks: list, batch_size: int = 256) -> dict:
    """Per-sample correctness: clean, under each attack, and in the worst case (a sample is
    robust only if it is classified correctly clean AND under every attack)."""
    was_training = model.training
    model.eval()
    try:
        correct = {"clean": correct_under(model, x, y, None, batch_size)}
        for attack in attacks:
            key = repr(attack)  # names every setting, seed included; equal settings get #2, #3
            key = key if key not in correct else f"{key}#{sum(k.split('#')[0] == key for k in correct) + 1}"
            correct[key] = correct_under(model, x, y, attack, batch_size)
        worst = correct["clean"].clone()
        for value in correct.values():
            worst &= value
        correct["worst_case"] = worst
    finally:
        model.train(was_training)
    return correct
