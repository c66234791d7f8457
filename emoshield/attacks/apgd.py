"""APGD-CE: step-size-adaptive PGD with momentum (Croce & Hein, ICML 2020), L-inf.

Starts from a uniform random point with step 2*eps; at checkpoints w_j (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) it halves a sample's step and restarts it
from its best point when fewer than rho of the steps since the last checkpoint raised the
loss, or when neither its step nor its best loss changed. Momentum alpha = 0.75. Per
sample, the result is a point that fools the model if any iterate did, else the point of
highest loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LinfAttack, input_gradient, project


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations (1-based) at which APGD checks its step size."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    return sorted({math.ceil(round(v * steps, 6)) for v in p[1:]})  # round: 0.57 * 100 is 57.000...01


class APGD(LinfAttack):
    """APGD with cross-entropy loss; `steps` iterations, `restarts` random restarts."""

    name = "apgd"

    def __init__(self, eps: float, steps: int = 50, restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
                 mode: str = "eval", seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=steps, step_size=2 * eps, random_start="uniform", restarts=restarts, mode=mode,
                         seed=seed, fast=fast)
        self.rho, self.momentum = rho, momentum

    def _run(self, model, x, y, generator):
        shape = (-1,) + (1,) * (x.dim() - 1)
        eps = self.eps

        def evaluate(point):
            grad, logits = input_gradient(model, point, y)
            return grad, F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y

        x0 = self._start(x, generator)
        g, loss0, fooled = evaluate(x0)
        x_fooled = x0.clone()
        eta = torch.full((x.shape[0],), 2 * eps, dtype=x.dtype, device=x.device)
        x_k = project(x0 + eta.view(shape) * g.sign(), x, eps)
        g_k, loss_k, fooled_k = evaluate(x_k)
        x_fooled = torch.where(fooled_k.view(shape) & ~fooled.view(shape), x_k, x_fooled)
        fooled = fooled | fooled_k
        better = loss_k > loss0
        x_max = torch.where(better.view(shape), x_k, x0)
        g_max = torch.where(better.view(shape), g_k, g)
        f_max = torch.maximum(loss_k, loss0)
        successes = better.to(x.dtype)
        x_prev, g = x0, g_k
        checkpoints = set(apgd_checkpoints(self.steps))
        last_check, eta_at_check, fmax_at_check = 0, eta.clone(), f_max.clone()
        for k in range(1, self.steps):
            z = project(x_k + eta.view(shape) * g.sign(), x, eps)
            x_new = project(x_k + self.momentum * (z - x_k) + (1 - self.momentum) * (x_k - x_prev), x, eps)
            g_new, loss_new, fooled_new = evaluate(x_new)
            x_fooled = torch.where(fooled_new.view(shape) & ~fooled.view(shape), x_new, x_fooled)
            fooled = fooled | fooled_new
            successes += (loss_new > loss_k).to(x.dtype)
            better = loss_new > f_max
            x_max = torch.where(better.view(shape), x_new, x_max)
            g_max = torch.where(better.view(shape), g_new, g_max)
            f_max = torch.where(better, loss_new, f_max)
            x_prev, x_k, g, loss_k = x_k, x_new, g_new, loss_new
            if k in checkpoints:
                too_few = successes < self.rho * (k - last_check)
                stalled = (eta == eta_at_check) & (f_max == fmax_at_check)
                reduce = too_few | stalled
                eta = torch.where(reduce, eta / 2, eta)
                x_k = torch.where(reduce.view(shape), x_max, x_k)
                x_prev = torch.where(reduce.view(shape), x_max, x_prev)
                g = torch.where(reduce.view(shape), g_max, g)
                successes.zero_()
                last_check, eta_at_check, fmax_at_check = k, eta.clone(), f_max.clone()
        return torch.where(fooled.view(shape), x_fooled, x_max)
