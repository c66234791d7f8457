"""Batched, seeded data augmentation on [0, 1] image tensors (no per-sample Python loops)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import EmoshieldError

AUGMENTATIONS = ("none", "flip", "standard", "strong")


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """none: as is; flip: random horizontal flip; standard: flip plus a random affine warp
    (rotation +-10 degrees, scale 0.9-1.1, shift +-8%), border pixels repeated; strong:
    standard plus photometric jitter (brightness and contrast +-25%, the lighting changes
    of real cameras) and, for half the images, one erased rectangle (occlusion by hands,
    glasses, masks; 4-20% of the area) filled with the image mean. Small face datasets
    overfit, and robust training overfits faster than clean training, so more varied
    inputs help robustness most."""
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
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mode == "strong":
        x = _photometric_jitter(x, generator)
        x = _random_erase(x, generator)
    return x


def _photometric_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.25) -> torch.Tensor:
    n = x.shape[0]
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast.to(x.dtype) + mean * brightness.to(x.dtype)).clamp(0, 1)


def _random_erase(x: torch.Tensor, generator: torch.Generator, probability: float = 0.5,
                  area: tuple[float, float] = (0.04, 0.2)) -> torch.Tensor:
    n, _, h, w = x.shape
    chosen = torch.rand(n, generator=generator) < probability
    fraction = area[0] + torch.rand(n, generator=generator) * (area[1] - area[0])
    aspect = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(2))
    eh = (torch.sqrt(fraction * aspect) * h).clamp(1, h)
    ew = (torch.sqrt(fraction / aspect) * w).clamp(1, w)
    top = torch.rand(n, generator=generator) * (h - eh)
    left = torch.rand(n, generator=generator) * (w - ew)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & chosen.view(-1, 1, 1))
    fill = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return torch.where(inside.unsqueeze(1), fill, x)


# ---- mixing pairs of images (mixup, CutMix) --------------------------------------------------

MIXES = ("none", "mixup", "cutmix")


def mix_batch(x: torch.Tensor, y: torch.Tensor, mode: str, alpha: float, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(mixed images, labels a, labels b, weight of a): each image is mixed with the image a
    random permutation of the batch pairs it with, with one weight lam ~ Beta(alpha, alpha) per
    batch (Zhang et al. 2018 mixup; Yun et al. 2019 CutMix). mixup blends the whole images;
    cutmix pastes a box of the partner's (area 1 - lam) and lam becomes the kept area, so the
    loss lam CE(a) + (1 - lam) CE(b) weighs each label by the pixels it owns. Labels are
    soft targets in effect: FER2013's label noise is one reason they are worth measuring."""
    if mode == "none" or alpha <= 0:
        return x, y, y, 1.0
    if mode not in MIXES:
        raise EmoshieldError(f"unknown mix {mode!r}; choose one of {', '.join(MIXES)}")
    # torch's Beta sampler takes no generator: seed numpy's from ours, so a resumed run draws
    # the same lam
    import numpy as np

    lam = float(np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator))).beta(alpha, alpha))
    partner = torch.randperm(x.shape[0], generator=generator)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[partner], y, y[partner], lam
    _, _, h, w = x.shape
    cut = math.sqrt(1 - lam)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    top, bottom = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
    left, right = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    kept = 1 - (bottom - top) * (right - left) / (h * w)
    return mixed, y, y[partner], float(kept)

