"""The localization module of SPEC §2: pooling -> batch norm -> dense(256) -> ReLU -> dense(classes).

Pooling (SPEC's "global average pooling with a 4x4 filter" is ambiguous, so it is a choice):
- "global"   adaptive average pooling to 1x1 (default: works for any input size, and
             for 48-64 px faces the last feature map is already 1x1 to 2x2);
- "grid:N"   adaptive average pooling to an N x N grid (N*N*C features);
- "window:K" a fixed K x K average-pooling window with stride K, the literal reading for
             the reference's 480 px inputs (VGG16's 15x15 map -> 3x3); needs a map of >= K.
Batch norm acts per channel on the pooled map, before flattening.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EmoshieldError

POOLING_HELP = "global | grid:N | window:K"


def make_pooling(spec: str) -> nn.Module:
    kind, _, arg = spec.partition(":")
    try:
        if kind == "global" and not arg:
            return nn.AdaptiveAvgPool2d(1)
        if kind == "grid":
            return nn.AdaptiveAvgPool2d(int(arg))
        if kind == "window":
            size = int(arg)
            return nn.AvgPool2d(size, stride=size)
    except ValueError:
        pass
    raise EmoshieldError(f"bad pooling {spec!r}; use {POOLING_HELP}")


class LocalizationHead(nn.Module):
    """Pool, BatchNorm2d, flatten, Linear(->hidden), ReLU, Linear(->classes)."""

    def __init__(self, channels: int, feature_map: tuple[int, int], num_classes: int,
                 pooling: str = "global", hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.pool = make_pooling(pooling)
        with torch.no_grad():
            try:
                pooled = self.pool(torch.zeros(1, channels, *feature_map))
            except RuntimeError:
                raise EmoshieldError(f"pooling {pooling!r} does not fit the {feature_map[0]}x{feature_map[1]} "
                                     "feature map; use a larger input size or --pooling global") from None
        if pooled.numel() == 0:
            raise EmoshieldError(f"pooling {pooling!r} gives no output on a {feature_map[0]}x{feature_map[1]} map")
        self.norm = nn.BatchNorm2d(channels)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(pooled.numel(), hidden)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.norm(self.pool(features)))
        return self.fc2(self.drop(self.act(self.fc1(x))))
