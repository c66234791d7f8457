"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: gradient-free random search.

It never looks at a gradient, only at the model's logits, so a defense that only masks
gradients does not stop it: AutoAttack runs it last, and a Square attack that succeeds where
APGD failed is a sign of gradient masking (robustness reports flag it).

Start: vertical stripes of +-eps. Each query changes one square window of side s (the same
window and per-channel signs for the whole batch, as the reference does) to +-2 eps around the
best point so far, projected back into the eps-ball; a sample keeps the change when its margin
loss z_y - max_{i != y} z_i falls, and stops once it is misclassified. s shrinks on the
reference's schedule of p (the fraction of pixels changed), rescaled to the query budget.
"""

from __future__ import annotations

import math

import torch

from .base import LinfAttack

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def square_fraction(p_init: float, query: int, queries: int) -> float:
    """p at `query` of `queries` (the reference's piecewise schedule on a 10000-query scale)."""
    it = int(query / queries * 10000)
    for bound, divisor in _SCHEDULE:
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per sample (<= 0: misclassified)."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - others


class Square(LinfAttack):
    """Square Attack with the margin loss; `queries` model evaluations per image at most
    (AutoAttack: 5000), `restarts` runs on the images still robust."""

    name = "square"

    def __init__(self, eps: float, queries: int = 5000, p_init: float = 0.8, restarts: int = 1, mode: str = "eval",
                 seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=queries, restarts=restarts, mode=mode, seed=seed, fast=fast)
        self.queries, self.p_init = queries, p_init

    def __repr__(self) -> str:
        return (f"Square(eps={self.eps:g}, queries={self.queries}, p_init={self.p_init:g}, restarts={self.restarts}, "
                f"seed={self.seed}, mode={self.mode!r})")

    def _signs(self, shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(like.dtype).to(like.device)

    @torch.no_grad()
    def _run(self, model, x, y, generator):
        n, c, h, w = x.shape
        eps = self.eps
        best = (x + eps * self._signs((n, c, 1, w), generator, x)).clamp(0.0, 1.0)
        best_margin = margin(model(best), y)
        for query in range(self.queries):
            todo = (best_margin > 0).nonzero()[:, 0]
            if len(todo) == 0:
                break
            x_now, best_now = x[todo], best[todo]
            side = max(int(round(math.sqrt(square_fraction(self.p_init, query, self.queries) * h * w))), 1)
            side = min(side, h, w)
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            delta = torch.zeros((c, h, w), dtype=x.dtype, device=x.device)
            delta[:, top:top + side, left:left + side] = 2 * eps * self._signs((c, 1, 1), generator, x)
            candidate = torch.min(torch.max(best_now + delta, x_now - eps), x_now + eps).clamp(0.0, 1.0)
            candidate_margin = margin(model(candidate), y[todo])
            improved = candidate_margin < best_margin[todo]
            best_margin[todo] = torch.where(improved, candidate_margin, best_margin[todo])
            best[todo] = torch.where(improved.view(-1, 1, 1, 1), candidate, best_now)
        return best
