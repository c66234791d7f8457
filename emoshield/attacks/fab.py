"""FAB-T (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack"), L-inf, targeted, as AutoAttack's third attack.

FAB looks for the smallest perturbation that crosses the decision boundary towards a target
class: at each step it linearises the boundary z_t = z_y at the current point, projects both
the current point and the original image onto that hyperplane (within the [0, 1] box, in
L-inf), and moves to a convex combination of the two projections, biased towards the original
(alpha <= alpha_max) and extrapolated by eta; once a point is adversarial it remembers it when
it is the closest so far and steps back towards the original by beta. The result counts as a
success only within eps. Targets: the 2nd, 3rd, ... most likely classes in turn, each on the
images not fooled yet. Without a random start (AutoAttack's standard setting) it is
deterministic.
"""

from __future__ import annotations

import torch

from ..errors import EmoshieldError
from .base import LinfAttack


def project_linf_box(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row i, the step d of least L-inf norm with w_i . (p_i + d) = b_i and
    p_i + d in [0, 1]^D; when the box does not allow reaching the hyperplane, the step that gets
    closest (every coordinate at its bound in the helpful direction). points, w: N x D; b: N.

    With ||d||_inf <= lam, the most w . d can move towards b is
    f(lam) = sum_j |w_j| min(lam, room_j), room_j being how far p_j may move in the helpful
    direction; f is piecewise linear and increasing, so the least lam with f(lam) = need is
    found between two sorted breakpoints."""
    need = b - (w * points).sum(1)
    direction = torch.sign(need).unsqueeze(1) * torch.sign(w)  # the sign each coordinate should move
    room = torch.where(direction > 0, 1 - points, points) * (direction != 0)
    weight = w.abs() * (direction != 0)
    room_sorted, order = room.sort(dim=1)
    weight_sorted = weight.gather(1, order)
    below = torch.cumsum(weight_sorted * room_sorted, dim=1)  # sum over room_j <= breakpoint of |w_j| room_j
    at_least = weight_sorted.sum(1, keepdim=True) - torch.cumsum(weight_sorted, dim=1) + weight_sorted
    reach = below - weight_sorted * room_sorted + room_sorted * at_least  # f at each breakpoint
    target = need.abs().unsqueeze(1)
    k = torch.searchsorted(reach.contiguous(), target.contiguous()).clamp(max=room.shape[1] - 1)
    # lam on the segment ending at breakpoint k: f(lam) = below[k-1] + lam * (weights with room >= breakpoint k)
    prev_below = torch.where(k > 0, below.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(target))
    slope = at_least.gather(1, k).clamp_min(1e-12)
    lam = ((target - prev_below) / slope).clamp_min(0)
    feasible = reach[:, -1:] >= target
    lam = torch.where(feasible, torch.minimum(lam, room_sorted.gather(1, k)), room_sorted[:, -1:])
    return direction * torch.minimum(room, lam)


class FABT(LinfAttack):
    """FAB-T: `steps` iterations per target (AutoAttack: 100), `targets` target classes
    (default every other class), alpha_max 0.1, eta 1.05, beta 0.9."""

    name = "fabt"

    def __init__(self, eps: float, steps: int = 100, targets: int | None = None, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, mode: str = "eval", seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=steps, mode=mode, seed=seed, fast=fast)
        self.targets, self.alpha_max, self.eta, self.beta = targets, alpha_max, eta, beta

    def __repr__(self) -> str:
        return (f"FABT(eps={self.eps:g}, steps={self.steps}, targets={self.targets or 'all'}, "
                f"alpha_max={self.alpha_max:g}, eta={self.eta:g}, beta={self.beta:g}, mode={self.mode!r})")

    def _run(self, model, x, y, generator):
        with torch.no_grad():
            logits = model(x)
        classes = logits.shape[1]
        if classes < 2:
            raise EmoshieldError("FAB-T needs at least 2 classes")
        targets = classes - 1 if self.targets is None else min(self.targets, classes - 1)
        order = logits.sort(dim=1)[1]
        best = x.clone()
        fooled = logits.argmax(1) != y
        for rank in range(2, targets + 2):
            todo = (~fooled).nonzero()[:, 0]
            if len(todo) == 0:
                break
            adv, distance = self._single_run(model, x[todo], y[todo], order[todo, -rank])
            hit = distance <= self.eps
            best[todo] = torch.where(hit.view(-1, *[1] * (x.dim() - 1)), adv, best[todo])
            fooled[todo] |= hit
        return best

    def _single_run(self, model, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
        """(closest adversarial found, its L-inf distance; inf where none) for one target. A
        sample leaves the run once it has an adversarial point within eps (all AutoAttack asks;
        FAB would go on shrinking the distance)."""
        n = x0.shape[0]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        best = x0.clone()
        best_distance = torch.full((n,), float("inf"), dtype=x0.dtype, device=x0.device)
        keep = torch.arange(n, device=x0.device)
        origin, x1, y, target = x0, x0.clone(), y, target
        for _ in range(self.steps):
            if len(keep) == 0:
                break
            m = len(keep)
            point = x1.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                z = model(point)
                gap = z.gather(1, target[:, None])[:, 0] - z.gather(1, y[:, None])[:, 0]  # > 0: fooled towards t
                (grad,) = torch.autograd.grad(gap.sum(), point)
            with torch.no_grad():
                w = grad.reshape(m, -1)
                b = (w * x1.reshape(m, -1)).sum(1) - gap.detach()  # the linearised boundary w . z = b
                steps = project_linf_box(torch.cat((x1.reshape(m, -1), origin.reshape(m, -1))), torch.cat((w, w)),
                                         torch.cat((b, b)))
                d1, d2 = steps[:m].view_as(origin), steps[m:].view_as(origin)
                a1 = d1.flatten(1).abs().amax(1).clamp_min(1e-8)
                a2 = d2.flatten(1).abs().amax(1).clamp_min(1e-8)
                alpha = (a1 / (a1 + a2)).clamp(0, self.alpha_max).view(shape)
                x1 = ((x1 + self.eta * d1) * (1 - alpha) + (origin + self.eta * d2) * alpha).clamp(0.0, 1.0)
                adversarial = model(x1).argmax(1) != y
                distance = (x1 - origin).flatten(1).abs().amax(1)
                closer = adversarial & (distance < best_distance[keep])
                best[keep[closer]] = x1[closer]
                best_distance[keep[closer]] = distance[closer]
                x1 = torch.where(adversarial.view(shape), origin + (x1 - origin) * self.beta, x1)
                stay = best_distance[keep] > self.eps
                keep, origin, x1, y, target = keep[stay], origin[stay], x1[stay], y[stay], target[stay]
        return best, best_distance
