"""Batched, seeded data augmentation on [0, 1] image tensors (no per-sample Python loops)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import EmoshieldError

AUGMENTATIONS = ("none", "flip", "standard")


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """none: as is; flip: random horizontal flip; standard: flip plus a random affine warp
    (rotation +-10 degrees, scale 0.9-1.1, shift +-8%), border pixels repeated."""
    if mode == "none":
        return x
    if mode not in AUGMENTATIONS:
        raise EmoshieldError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENTATIONS)}")
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    if mode == "flip":
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.16  # grid units: 2 = full width
    sign = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
