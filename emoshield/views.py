"""Test-time views of a face, shared by `emoshield evaluate --tta` (torch) and the device's
`--tta` (numpy, no torch): the same views and the same resize, so both compute one function.

Modes: "none"; "flip" (the face and its mirror); "tencrop" (the classic ten-crop: four corner
crops and the centre crop of side `CROP_FRACTION` x S, each with its mirror, every crop resized
back to S x S). The model's answer is the mean of its softmax over the views.

The resize is bilinear with half-pixel centres (OpenCV's and torch's align_corners=False rule),
written as one matrix per side, R (S x s), so a crop c becomes R c R^T: a matrix product that
numpy and torch evaluate the same way and that attacks differentiate through."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

TTA_MODES = ("none", "flip", "tencrop")
CROP_FRACTION = 0.9  # the ten-crop side, as a fraction of the input size (44 of 48 px)


def view_count(mode: str) -> int:
    return {"none": 1, "flip": 2, "tencrop": 10}[mode]


def crop_boxes(size: int, fraction: float = CROP_FRACTION) -> list[tuple[int, int, int]]:
    """(top, left, side) of the ten-crop's five crops: the corners, then the centre."""
    side = max(1, int(round(size * fraction)))
    far, mid = size - side, (size - side) // 2
    return [(0, 0, side), (0, far, side), (far, 0, side), (far, far, side), (mid, mid, side)]


@lru_cache(maxsize=32)
def resize_matrix(out_size: int, in_size: int) -> np.ndarray:
    """R (out x in) with R @ v = v resized bilinearly (half-pixel centres, edges clamped); built
    once per size pair (attacks call the views hundreds of times), read-only."""
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        x = min(max((i + 0.5) * scale - 0.5, 0.0), in_size - 1)
        x0 = int(np.floor(x))
        x1 = min(x0 + 1, in_size - 1)
        w = x - x0
        matrix[i, x0] += 1 - w
        matrix[i, x1] += w
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def numpy_views(batch: np.ndarray, mode: str) -> np.ndarray:
    """N x C x S x S float32 faces -> (V * N) x C x S x S views, view-major (view v of face i at
    v * N + i)."""
    if mode == "none":
        return batch
    if mode == "flip":
        return np.concatenate([batch, batch[..., ::-1]])
    size = batch.shape[-1]
    views = []
    for top, left, side in crop_boxes(size):
        r = resize_matrix(size, side)
        crop = batch[..., top:top + side, left:left + side]
        resized = np.einsum("ij,ncjk,lk->ncil", r, crop, r, optimize=True).astype(np.float32)
        views += [resized, resized[..., ::-1]]
    return np.ascontiguousarray(np.concatenate(views))


def mean_probabilities(probabilities: np.ndarray, mode: str) -> np.ndarray:
    """(V * N) x K view probabilities (view-major) -> N x K: their mean per face."""
    views = view_count(mode)
    return probabilities.reshape(views, -1, probabilities.shape[-1]).mean(0)
