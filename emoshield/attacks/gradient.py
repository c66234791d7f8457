"""FGSM, R+FGSM and PGD as configurations of the shared L-inf base (SPEC §5)."""

from __future__ import annotations

from ..errors import EmoshieldError
from .base import LinfAttack


class FGSM(LinfAttack):
    """x' = clip(x + eps * sign(grad_x L(x, y)), 0, 1)."""

    name = "fgsm"

    def __init__(self, eps: float, mode: str = "eval", seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=1, step_size=eps, random_start=None, mode=mode, seed=seed, fast=fast)


class RFGSM(LinfAttack):
    """Single-step R+FGSM (Tramer et al. 2018): x~ = x + alpha * sign(N(0, I));
    x' = clip(x~ + (eps - alpha) * sign(grad_x~ L(x~, y)), 0, 1), eps > alpha (default alpha = eps / 2).

    Some libraries call a multi-step variant "RFGSM"; this one is single-step.
    """

    name = "rfgsm"

    def __init__(self, eps: float, alpha: float | None = None, mode: str = "eval", seed: int = 0,
                 fast: bool = True):
        alpha = eps / 2 if alpha is None else float(alpha)
        if eps > 0 and not eps > alpha:
            raise EmoshieldError(f"R+FGSM needs eps > alpha, got eps={eps:g}, alpha={alpha:g}")
        if alpha < 0:
            raise EmoshieldError("R+FGSM needs alpha >= 0")
        super().__init__(eps, steps=1, step_size=eps - alpha, random_start="sign", start_size=alpha, mode=mode,
                         seed=seed, fast=fast)
        self.alpha = alpha


class PGD(LinfAttack):
    """Projected gradient descent (Madry et al. 2018): `steps` signed steps of `step_size`
    (default 2.5 * eps / steps) from a uniform random start in the eps-ball, `restarts` times."""

    name = "pgd"

    def __init__(self, eps: float, steps: int = 10, step_size: float | None = None, random_start: bool = True,
                 restarts: int = 1, mode: str = "eval", seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=steps, step_size=2.5 * eps / steps if step_size is None else step_size,
                         random_start="uniform" if random_start else None, restarts=restarts, mode=mode, seed=seed,
                         fast=fast)
