"""One L-infinity gradient attack: random start, signed-gradient steps, projection.

Every attack here is a configuration of `LinfAttack` (FGSM, R+FGSM, PGD) or extends it
(APGD). Shared contract, the things users of attack libraries most often trip over:
- images are in [0, 1]; the model normalizes inside (emoshield's EmotionNet does);
- the model runs in eval mode by default (`mode="eval"`; "train" or "keep" on request), and
  the caller's mode and every parameter's requires_grad are restored afterwards;
- gradients are enabled even inside a caller's torch.no_grad()/inference_mode;
- x is never modified; the result is detached, within eps of x in L-inf, and in [0, 1];
- the loss is summed over the batch, so each sample's gradient is independent of the
  batch it came in (with eval-mode BatchNorm): a slice of a batch gives the same result;
- random starts come from a torch.Generator seeded per call (`seed`), reproducibly;
- in eval mode the gradients come from `eval_graph(model)` (folding.py): the same function
  with each BatchNorm folded into its convolution, channels_last memory and the convolution
  forms of kernels.py (exact up to float rounding, 1.4-2.3x faster per gradient than torchattacks
  on CPU; bench/attacks.py), cached per model and
  refreshed when its weights change; an attack too small to repay building that copy runs
  the module as is. `fast=False` always uses the module as is.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..errors import EmoshieldError
from .folding import eval_graph

MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def full_float32():
    """No TF32 inside: on CUDA, cuDNN convolutions run in TF32 by default (10-bit mantissa),
    which would make attack gradients differ from the float32 ones the evaluation claims.
    Restores the caller's settings after; no effect on CPU."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if conv is not None and matmul is not None:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision = conv
            torch.backends.cuda.matmul.fp32_precision = matmul
        return
    legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy


@contextlib.contextmanager
def attack_context(model: torch.nn.Module, mode: str = "eval"):
    """Put the model in the attack's mode, freeze its parameters, enable grad, turn TF32 off
    (full_float32); restore all after.

    Each submodule's own mode comes back (a training model with frozen BatchNorm layers keeps
    them frozen), and nothing is toggled when the model already is in the attack's mode."""
    if mode not in MODES:
        raise EmoshieldError(f"unknown attack mode {mode!r}; choose one of {', '.join(MODES)}")
    if any(p.is_inference() for p in model.parameters()):
        raise EmoshieldError("the model's parameters are inference tensors (made under torch.inference_mode()); "
                             "build or load the model outside inference mode to attack it")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if mode != "keep" and any(flag != (mode == "train") for _, flag in modes):
        model.train(mode == "train")
    for p, flag in flags:
        if flag:
            p.requires_grad_(False)  # no weight gradients: faster, and the caller's .grad stays untouched
    try:
        with torch.inference_mode(False), torch.enable_grad(), full_float32():
            yield
    finally:
        for p, flag in flags:
            if flag:
                p.requires_grad_(True)
        for m, flag in modes:
            if m.training != flag:
                m.training = flag


def input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d sum-CE / dx, logits) at x; call inside attack_context."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point of the eps-ball around x (L-inf) that is also in [0, 1]."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


class LinfAttack:
    """x_adv = attack(model, x, y).

    random_start: None, "uniform" (U(-eps, eps), then projected) or "sign" (alpha * sign(N(0, I)),
    NOT clipped, as R+FGSM defines it). steps signed-gradient steps of `step_size`, each
    followed by projection onto the eps-ball and [0, 1]. With restarts > 1 the first
    restart that fools the model is kept per sample (else the last one).
    """

    name = "linf"

    def __init__(self, eps: float, steps: int = 1, step_size: float | None = None, random_start: str | None = None,
                 start_size: float | None = None, restarts: int = 1, mode: str = "eval", seed: int = 0,
                 fast: bool = True):
        if not eps >= 0:
            raise EmoshieldError(f"eps must be >= 0, got {eps}")
        if steps < 1 or restarts < 1:
            raise EmoshieldError("steps and restarts must be >= 1")
        if random_start not in (None, "uniform", "sign"):
            raise EmoshieldError(f"unknown random start {random_start!r}")
        if mode not in MODES:
            raise EmoshieldError(f"unknown attack mode {mode!r}; choose one of {', '.join(MODES)}")
        self.eps, self.steps, self.restarts, self.mode, self.seed = float(eps), steps, restarts, mode, seed
        self.fast = fast
        self.step_size = float(eps if step_size is None else step_size)
        self.random_start = random_start
        self.start_size = float(eps if start_size is None else start_size)
        # (rank, world size, global batch size) under data parallelism: draw the random start for
        # the whole global batch and keep this rank's rows (strided shards), so N processes
        # perturb each image exactly as one process would
        self.shard: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:g}, steps={self.steps}, step_size={self.step_size:g}, "
                f"random_start={self.random_start}, restarts={self.restarts}, seed={self.seed}, mode={self.mode!r})")

    def state(self) -> dict:
        """Statistics the attack accumulates over calls (JSON-able; none here), for checkpoints."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take back what state() returned (an evaluation resumed from a checkpoint)."""

    def _draw(self, draw, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.shard is None:
            return draw(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        rank, world, size = self.shard
        return draw((size, *x.shape[1:]), generator=generator, dtype=x.dtype)[rank::world].to(x.device)

    def _start(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.random_start == "uniform":
            noise = self._draw(torch.rand, x, generator) * 2 - 1
            return project(x + self.start_size * noise, x, self.eps)
        if self.random_start == "sign":
            return x + self.start_size * self._draw(torch.randn, x, generator).sign()
        return x.clone()

    def _run(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x_adv = self._start(x, generator)
        for _ in range(self.steps):
            grad, _ = input_gradient(model, x_adv, y)
            x_adv = project(x_adv + self.step_size * grad.sign(), x, self.eps)
        return x_adv

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.min() < 0 or x.max() > 1:
            raise EmoshieldError("attacks take images in [0, 1] (normalization belongs inside the model)")
        x = x.detach()
        y = y.detach()
        if self.eps == 0:
            return x.clone()
        generator = torch.Generator().manual_seed(self.seed)
        with attack_context(model, self.mode):
            if self.fast and self.mode == "eval":
                model = eval_graph(model, gradient_images=x.shape[0] * self.steps * self.restarts)
            best = self._run(model, x, y, generator)
            for _ in range(self.restarts - 1):
                with torch.no_grad():
                    fooled = model(best).argmax(1) != y
                if bool(fooled.all()):
                    break
                candidate = self._run(model, x, y, generator)
                best = torch.where(fooled.view(-1, *[1] * (x.dim() - 1)), best, candidate)
        return best.detach().contiguous()
