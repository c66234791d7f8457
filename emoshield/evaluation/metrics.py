"""Accuracy, per-class accuracy and the confusion matrix from labels and predictions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """counts[i, j] = images of true class i predicted as class j."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def classification_report(labels: Sequence[int], predictions: Sequence[int], classes: Sequence[str]) -> dict:
    """accuracy, per_class_accuracy (recall per class; None when a class has no images),
    balanced_accuracy (mean over classes present), confusion_matrix, support."""
    matrix = confusion_matrix(labels, predictions, len(classes))
    support = matrix.sum(1)
    per_class = {c: (float(matrix[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    total = int(support.sum())
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "balanced_accuracy": float(np.mean(present)) if present else 0.0,
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "support": {c: int(s) for c, s in zip(classes, support)},
        "num_images": total,
    }
