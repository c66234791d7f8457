"""Test-time augmentation: the model's answer averaged over the face and its mirror image.

Expressions are (nearly) left-right symmetric and training sees mirrored faces (`--augment`), so
the average of the two views removes some of the noise of one crop. `FlipAverage` returns the
log of the mean softmax, a valid logit vector: the prediction is the argmax of the averaged
probabilities, and attacks differentiate through both views (a white-box attack sees exactly
what a device running `--tta flip` computes)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import EmoshieldError

TTA_MODES = ("none", "flip")


class FlipAverage(nn.Module):
    """log((softmax(m(x)) + softmax(m(mirror(x)))) / 2); `config` and the train/eval mode are the
    wrapped model's. Computed as a logsumexp of log-softmaxes: no clamp, so even a class whose
    probability underflows keeps its gradient (targeted attacks need it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.train(model.training)  # a new Module starts in training mode; reports check the mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        both = self.model(torch.cat([x, x.flip(-1)])).float().log_softmax(1)
        return torch.logsumexp(torch.stack([both[:n], both[n:]]), 0) - math.log(2)


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    if mode not in TTA_MODES:
        raise EmoshieldError(f"unknown test-time augmentation {mode!r}; choose from {', '.join(TTA_MODES)}")
    return FlipAverage(model) if mode == "flip" else model
