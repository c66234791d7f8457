"""APGD (Croce & Hein, ICML 2020), L-inf: step-size-adaptive PGD with momentum, with the
cross-entropy or the DLR loss, untargeted (APGD-CE, APGD-DLR) or targeted (APGD-T: targeted
DLR against each of the next most likely classes in turn), as AutoAttack runs them.

One run: a random start on the surface of the eps-ball, step 2*eps, momentum 0.75 (none on the
first step). Checkpoints follow the paper's p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j -
p_{j-1} - 0.03, 0.06) as the reference implementation counts them (first after 0.22 N steps,
then windows 0.03 N shorter, at least 0.06 N). At a checkpoint a sample's step is halved, and
it restarts from its best point, when
  1. the loss rose in at most rho * k of the k steps of the window (rho = 0.75), or
  2. its step was NOT halved at the previous checkpoint and its best loss has not risen since.
Per sample the result fools the model if any iterate did, else it is the point of highest loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EmoshieldError
from .base import LinfAttack, project

LOSSES = ("ce", "dlr")


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations (1-based) at which APGD checks its step size: windows of max(0.22 N, 1)
    steps, each 0.03 N shorter than the last and at least 0.06 N long."""
    window, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], 0
    while at + window <= steps:
        at += window
        points.append(at)
        window = max(window - shrink, shortest)
    return points


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): the Difference of Logits Ratio, per sample
    (scale-invariant, so logit rescaling cannot mask the gradient)."""
    ordered, order = logits.sort(dim=1)
    top_is_y = (order[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = ordered[:, -2] * top_is_y + ordered[:, -1] * (1 - top_is_y)
    return -(z_y - other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): targeted DLR (needs 4 classes or more)."""
    ordered = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12)


def halve_step(losses: list[torch.Tensor], rho: float, reduced_at_last_check: torch.Tensor,
               best_at_last_check: torch.Tensor, best_now: torch.Tensor) -> torch.Tensor:
    """Which samples halve their step at a checkpoint. `losses` are the k + 1 losses from the
    last checkpoint (or the start) to now: k comparisons. Halve when the loss rose in at most
    rho * k of them, or when the step was not halved at the last checkpoint and the best loss
    has not risen since."""
    window = len(losses) - 1
    rises = sum((losses[j] > losses[j - 1]).to(best_now.dtype) for j in range(1, window + 1))
    return (rises <= window * rho) | (~reduced_at_last_check & (best_at_last_check >= best_now))


def loss_gradient(model, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d sum(loss) / dx, logits, per-sample loss) at x; call inside attack_context."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, logits.detach(), loss.detach()


class APGD(LinfAttack):
    """APGD with the `loss` "ce" (APGD-CE) or "dlr" (APGD-DLR); `steps` iterations (AutoAttack:
    100), `restarts` random restarts."""

    name = "apgd"

    def __init__(self, eps: float, steps: int = 100, restarts: int = 1, loss: str = "ce", rho: float = 0.75,
                 momentum: float = 0.75, mode: str = "eval", seed: int = 0, fast: bool = True):
        if loss not in LOSSES:
            raise EmoshieldError(f"unknown APGD loss {loss!r}; choose from {', '.join(LOSSES)}")
        super().__init__(eps, steps=steps, step_size=2 * eps, random_start="uniform", restarts=restarts, mode=mode,
                         seed=seed, fast=fast)
        self.loss, self.rho, self.momentum = loss, rho, momentum

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:g}, steps={self.steps}, loss={self.loss}, "
                f"restarts={self.restarts}, rho={self.rho:g}, seed={self.seed}, mode={self.mode!r})")

    def _loss_fn(self, y: torch.Tensor, target: torch.Tensor | None = None):
        if target is not None:
            return lambda logits: targeted_dlr_loss(logits, y, target)
        if self.loss == "dlr":
            return lambda logits: dlr_loss(logits, y)
        return lambda logits: F.cross_entropy(logits, y, reduction="none")

    def _surface_start(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Uniform noise scaled so its largest coordinate is eps (the reference's start)."""
        t = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        scale = t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        return (x + self.eps * t / scale).clamp(0.0, 1.0)

    def _run(self, model, x, y, generator):
        return self._single_run(model, x, y, generator)[0]

    def _single_run(self, model, x, y, generator, target=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adversarial points, fooled mask) of one APGD run, optionally with targeted DLR.

        A sample leaves the run as soon as it is misclassified (success is all AutoAttack asks
        of it; samples are independent, so the others' iterates are unchanged): on models that
        are not robust most of the batch is done after a few steps."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        eps, steps = self.eps, self.steps
        x_start = self._surface_start(x, generator)
        grad, logits, loss = loss_gradient(model, x_start, self._loss_fn(y, target))
        fooled = logits.argmax(1) != y
        result = x_start.clone()  # fooled: the fooling point; else, at the end, the best point
        window, shrink, shortest = (max(int(0.22 * steps), 1), max(int(0.03 * steps), 1),
                                    max(int(0.06 * steps), 1))
        keep = (~fooled).nonzero()[:, 0]  # indices (into x) of the samples still in the run
        s = {"x": x[keep], "y": y[keep], "x_adv": x_start[keep], "x_old": x_start[keep], "grad": grad[keep],
             "x_best": x_start[keep], "grad_best": grad[keep], "loss_best": loss[keep],
             "step": torch.full((len(keep),), 2 * eps, dtype=x.dtype, device=x.device),
             "best_at_check": loss[keep], "reduced_at_check": torch.ones(len(keep), dtype=torch.bool, device=x.device)}
        if target is not None:
            s["target"] = target[keep]
        losses = [loss[keep]]  # the loss at the start, then after each step
        since_check = 0
        for i in range(steps):
            if len(keep) == 0:
                break
            a = self.momentum if i > 0 else 1.0
            with torch.no_grad():
                z = project(s["x_adv"] + s["step"].view(shape) * s["grad"].sign(), s["x"], eps)
                x_new = project(s["x_adv"] + a * (z - s["x_adv"]) + (1 - a) * (s["x_adv"] - s["x_old"]), s["x"], eps)
            s["x_old"], s["x_adv"] = s["x_adv"], x_new
            s["grad"], logits, loss = loss_gradient(model, x_new, self._loss_fn(s["y"], s.get("target")))
            better = loss > s["loss_best"]
            s["x_best"] = torch.where(better.view(shape), x_new, s["x_best"])
            s["grad_best"] = torch.where(better.view(shape), s["grad"], s["grad_best"])
            s["loss_best"] = torch.where(better, loss, s["loss_best"])
            losses.append(loss)
            since_check += 1
            if since_check == window:
                reduce = halve_step(losses[-(window + 1):], self.rho, s["reduced_at_check"], s["best_at_check"],
                                    s["loss_best"])
                s["reduced_at_check"], s["best_at_check"] = reduce, s["loss_best"].clone()
                s["step"] = torch.where(reduce, s["step"] / 2, s["step"])
                s["x_adv"] = torch.where(reduce.view(shape), s["x_best"], s["x_adv"])
                s["grad"] = torch.where(reduce.view(shape), s["grad_best"], s["grad"])
                window, since_check = max(window - shrink, shortest), 0
                losses = losses[-(window + 1):]
            wrong = logits.argmax(1) != s["y"]
            if wrong.any():  # done: record the fooling point, drop the sample from the run
                result[keep[wrong]] = x_new[wrong]
                fooled[keep[wrong]] = True
                stay = ~wrong
                keep = keep[stay]
                s = {k: v[stay] for k, v in s.items()}
                losses = [v[stay] for v in losses]
        result[keep] = s["x_best"]
        return result, fooled


class APGDT(APGD):
    """APGD-T: targeted DLR APGD against the 2nd, 3rd, ... most likely class of each image in
    turn (`targets` of them; default every other class, as many as the class count allows),
    each run only on the images not fooled yet. Needs at least 4 classes (the targeted DLR
    loss's denominator uses the 4th logit)."""

    name = "apgdt"

    def __init__(self, eps: float, steps: int = 100, targets: int | None = None, restarts: int = 1,
                 rho: float = 0.75, momentum: float = 0.75, mode: str = "eval", seed: int = 0, fast: bool = True):
        super().__init__(eps, steps=steps, restarts=1, loss="dlr", rho=rho, momentum=momentum, mode=mode, seed=seed,
                         fast=fast)
        self.targets, self.restarts_per_target = targets, restarts

    def __repr__(self) -> str:
        return (f"APGDT(eps={self.eps:g}, steps={self.steps}, targets={self.targets or 'all'}, "
                f"restarts={self.restarts_per_target}, seed={self.seed}, mode={self.mode!r})")

    def _run(self, model, x, y, generator):
        shape = (-1,) + (1,) * (x.dim() - 1)
        with torch.no_grad():
            logits = model(x)
        classes = logits.shape[1]
        if classes < 4:
            raise EmoshieldError(f"APGD-T needs at least 4 classes (its targeted DLR loss uses the 4th logit); "
                                 f"this model has {classes}")
        targets = classes - 1 if self.targets is None else min(self.targets, classes - 1)
        order = logits.sort(dim=1)[1]
        best = x.clone()
        fooled = logits.argmax(1) != y  # misclassified already: nothing to attack
        for rank in range(2, targets + 2):
            for _ in range(self.restarts_per_target):
                todo = (~fooled).nonzero()[:, 0]
                if len(todo) == 0:
                    return best
                adv, hit = self._single_run(model, x[todo], y[todo], generator, target=order[todo, -rank])
                best[todo] = torch.where(hit.view(shape), adv, best[todo])
                fooled[todo] |= hit
        return best
