"""Test-time augmentation: the model's answer averaged over several views of the face
(emoshield.views: the mirror image, or the classic ten-crop).

Expressions are (nearly) left-right symmetric and training sees mirrored and shifted faces
(`--augment`), so the average over views removes some of the noise of one crop. `ViewAverage`
returns the log of the mean softmax over the views, a valid logit vector: the prediction is the
argmax of the averaged probabilities, and attacks differentiate through every view (a white-box
attack sees exactly what a device running the same `--tta` computes)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import EmoshieldError
from ..views import TTA_MODES, crop_boxes, resize_matrix, view_count


def torch_views(x: torch.Tensor, mode: str) -> torch.Tensor:
    """emoshield.views.numpy_views in torch (differentiable): (V * N) x C x S x S, view-major."""
    if mode == "none":
        return x
    if mode == "flip":
        return torch.cat([x, x.flip(-1)])
    size = x.shape[-1]
    views = []
    for top, left, side in crop_boxes(size):
        r = torch.tensor(resize_matrix(size, side), device=x.device, dtype=x.dtype)  # a copy: the cached array is read-only
        resized = r @ x[..., top:top + side, left:left + side] @ r.T
        views += [resized, resized.flip(-1)]
    return torch.cat(views)


class ViewAverage(nn.Module):
    """log(mean over views of softmax(m(view))); `config` and the train/eval mode are the wrapped
    model's. Computed as a logsumexp of log-softmaxes: no clamp, so even a class whose
    probability underflows keeps its gradient (targeted attacks need it)."""

    def __init__(self, model: nn.Module, mode: str = "flip"):
        super().__init__()
        if mode not in TTA_MODES or mode == "none":
            raise EmoshieldError(f"ViewAverage needs a test-time augmentation other than none, not {mode!r}")
        self.model, self.mode = model, mode
        self.config = getattr(model, "config", None)
        self.train(model.training)  # a new Module starts in training mode; reports check the mode

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"  # in the module's repr, so fingerprints and logs tell the modes apart

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = view_count(self.mode)
        out = self.model(torch_views(x, self.mode)).float().log_softmax(1)
        return torch.logsumexp(out.view(views, x.shape[0], -1), 0) - math.log(views)


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    if mode not in TTA_MODES:
        raise EmoshieldError(f"unknown test-time augmentation {mode!r}; choose from {', '.join(TTA_MODES)}")
    return model if mode == "none" else ViewAverage(model, mode)
