"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _wrap(title: str, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(title, width)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts in each cell."""
    plt = _pyplot()
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 1.0 + 0.75 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{counts[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(_wrap(title, 12 * len(classes) + 10), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: Sequence[dict], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train and validation."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, axis in (("loss", left), ("accuracy", right)):
        axis.plot(epochs, [r[f"train_{key}"] for r in history], label="train")
        if any(f"val_{key}" in r for r in history):
            axis.plot(epochs, [r.get(f"val_{key}", np.nan) for r in history], label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(_wrap(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finish_accuracy_axes(plt, fig, ax, path: Path, title: str, ylabel: str) -> Path:
    """Shared ending of the accuracy plots: 0-105% axis, legend, wrapped title, save, close."""
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(_wrap(title), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_eps(curves: dict, path: Path, title: str, chance: float | None = None) -> Path:
    """curves: label -> (eps list, accuracy list); labels containing 'baseline' are dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours: dict[str, str] = {}
    for label, (eps, acc) in curves.items():
        series = label.split(" (")[0]  # same attack, same colour; the baseline is dashed
        colour = colours.setdefault(series, f"C{len(colours)}")
        ax.plot(eps, [a * 100 for a in acc], marker="o", markersize=3, label=label, color=colour,
                linestyle="--" if "baseline" in label or "undefended" in label else "-")
    if chance:
        ax.axhline(chance * 100, color="gray", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xlabel("eps (L-inf, images in [0, 1])")
    ax.grid(alpha=0.3)
    return _finish_accuracy_axes(plt, fig, ax, path, title, "accuracy (%)")


def plot_condition_bars(groups: dict, path: Path, title: str) -> Path:
    """groups: model label -> {condition: accuracy}; grouped bars per condition."""
    plt = _pyplot()
    conditions = list(next(iter(groups.values())))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(conditions), 4))
    for k, (label, values) in enumerate(groups.items()):
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(conditions))]
        bars = ax.bar(xs, [values.get(c, 0) * 100 for c in conditions], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(conditions)), conditions)
    return _finish_accuracy_axes(plt, fig, ax, path, title, "accuracy (%)")


def plot_per_class_boxes(groups: dict, path: Path, title: str) -> Path:
    """groups: model label -> {condition: {class: accuracy}}; a box per condition over the classes."""
    plt = _pyplot()
    conditions = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(conditions), 4))
    width = 0.8 / len(groups)
    for k, (label, by_condition) in enumerate(groups.items()):
        data = [[v * 100 for v in by_condition[c].values() if v is not None] for c in conditions]
        pos = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(conditions))]
        parts = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for box in parts["boxes"]:
            box.set_facecolor(f"C{k}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{k}", linewidth=6, alpha=0.6, label=label)
    ax.set_xticks(range(len(conditions)), conditions)
    return _finish_accuracy_axes(plt, fig, ax, path, title, "per-class accuracy (%)")
