"""Perturbation-aware ("immune-driven") training, SPEC §6.

In every batch, perturbed copies x^s are generated with the CURRENT model for each method s
in S, and the model minimises the differential loss
    beta_0 * L(x, y) + (1 - beta_0) * sum_s beta_s * L(x^s, y),
with beta_0 >= 0.5, beta_s >= 0 and sum_s beta_s = 1.

How one step is computed (exact, and cheaper than the naive form):
1. The clean forward/backward of beta_0 * L(x, y) accumulates the clean term's weight gradients.
2. Each method's perturbation comes from an input-gradient pass with weight gradients switched
   off (attacks freeze parameters), with BatchNorm running statistics frozen (momentum 0), so
   attack passes never pollute them.
3. Each perturbed batch has its own forward/backward of (1 - beta_0) * beta_s * L(x^s, y); the
   gradients add up and one optimizer step follows. Each loss term has its own BatchNorm batch.

Which BatchNorm mode generates the training perturbations (`attack_bn`):
- `eval` (default): BatchNorm uses its running statistics, i.e. the perturbation attacks the
  model as it is deployed and as every test-time attack sees it. Measured on CK+48 (5 classes,
  mobilenet_v2, 50 epochs, seed 0; results/defense_ckplus48_{evalbn,trainbn}), it gave higher
  clean AND robust accuracy than `train` under both protocols (see README "Results").
- `train`: BatchNorm uses the batch's own statistics, i.e. the perturbation attacks the exact
  function optimised in that step. Then the clean pass of step 1 already holds FGSM's input
  gradient, so FGSM costs no extra pass (exact: a test checks it against a separate FGSM pass;
  with dropout it shares the clean pass's mask). Cheaper per step, less robust in our runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EmoshieldError

DEFENSE_METHODS = ("fgsm", "rfgsm", "pgd")
ATTACK_BN_MODES = ("train", "eval")
SELECTIONS = ("clean", "robust", "mean")


def parse_defense(spec: str) -> dict[str, float]:
    """'fgsm:0.5,rfgsm:0.5' -> {'fgsm': 0.5, 'rfgsm': 0.5}; a bare name gets an equal share."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise EmoshieldError("--defense needs at least one method, e.g. fgsm:0.5,rfgsm:0.5")
    methods: dict[str, float] = {}
    for item in items:
        name, _, weight = item.partition(":")
        name = name.strip().lower()
        if name not in DEFENSE_METHODS:
            raise EmoshieldError(f"unknown defense method {name!r}; choose from {', '.join(DEFENSE_METHODS)}")
        if name in methods:
            raise EmoshieldError(f"defense method {name!r} is given twice")
        try:
            methods[name] = float(weight) if weight else float("nan")
        except ValueError:
            raise EmoshieldError(f"bad weight {weight!r} for defense method {name!r}") from None
    if all(v != v for v in methods.values()):  # only names: equal shares
        methods = {k: 1.0 / len(methods) for k in methods}
    elif any(v != v for v in methods.values()):
        raise EmoshieldError("give a weight to every defense method or to none (e.g. fgsm:0.5,rfgsm:0.5)")
    return methods


@dataclass
class DefenseConfig:
    methods: dict[str, float] = field(default_factory=lambda: {"fgsm": 0.5, "rfgsm": 0.5})
    beta0: float = 0.5
    eps: float = 0.01
    alpha: float | None = None  # R+FGSM's random step; eps / 2 when None
    pgd_steps: int = 7
    attack_bn: str = "eval"
    select: str = "mean"

    @property
    def rfgsm_alpha(self) -> float:
        return self.eps / 2 if self.alpha is None else self.alpha

    def validate(self) -> None:
        if not 0.5 <= self.beta0 <= 1:
            raise EmoshieldError(f"--beta0 must be in [0.5, 1] (SPEC §6), got {self.beta0:g}")
        for name, beta in self.methods.items():
            if name not in DEFENSE_METHODS:
                raise EmoshieldError(f"unknown defense method {name!r}; choose from {', '.join(DEFENSE_METHODS)}")
            if beta < 0:
                raise EmoshieldError(f"defense weight beta_{name} must be >= 0, got {beta:g}")
        total = sum(self.methods.values())
        if abs(total - 1) > 1e-6:
            raise EmoshieldError(f"defense weights must sum to 1, got {total:g} ({self.methods})")
        if not 0 < self.eps <= 1:
            raise EmoshieldError(f"--eps must be in (0, 1], got {self.eps:g}")
        if self.alpha is not None and not self.eps > self.alpha:
            raise EmoshieldError(f"--eps must be larger than --alpha, got eps={self.eps:g}, alpha={self.alpha:g}")
        if self.alpha is not None and self.alpha < 0:
            raise EmoshieldError("--alpha must be >= 0")
        if self.pgd_steps < 1:
            raise EmoshieldError("--defense-pgd-steps must be >= 1")
        if self.attack_bn not in ATTACK_BN_MODES:
            raise EmoshieldError(f"--attack-bn must be one of {', '.join(ATTACK_BN_MODES)}")
        if self.select not in SELECTIONS:
            raise EmoshieldError(f"--select must be one of {', '.join(SELECTIONS)}")

    def attack(self, name: str, mode: str, seed: int, fast: bool = True):
        """The attack object that generates method `name`'s perturbations (fast=False: run the
        model given as is, e.g. an eval_graph the caller already built)."""
        from ..attacks import FGSM, PGD, RFGSM

        if name == "fgsm":
            return FGSM(self.eps, mode=mode, seed=seed, fast=fast)
        if name == "rfgsm":
            return RFGSM(self.eps, alpha=self.rfgsm_alpha, mode=mode, seed=seed, fast=fast)
        return PGD(self.eps, steps=self.pgd_steps, mode=mode, seed=seed, fast=fast)
