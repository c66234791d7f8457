"""Markdown summaries of a model's results."""

from __future__ import annotations


def describe_run(meta: dict) -> str:
    """One line naming the data, protocol, backbone, input size, epochs and seed of a result."""
    fold = f", fold {meta['fold']}/{meta['folds']}" if meta.get("fold") is not None else ""
    return (f"{meta['dataset']} ({len(meta['classes'])} classes: {', '.join(meta['classes'])}), "
            f"{meta['protocol']} protocol{fold}, {meta['backbone']} + {meta['head']} head "
            f"(weights: {meta['weights']}), input {meta['input_size']} px, {meta['epochs']} epochs, seed {meta['seed']}")


def metrics_markdown(metrics: dict, title: str = "Evaluation") -> str:
    """A summary: what was measured, overall accuracy, per-class accuracy and the confusion matrix."""
    classes = metrics["classes"]
    lines = [f"# {title}", "", describe_run(metrics), "",
             f"- test images: {metrics['num_images']}",
             f"- accuracy: **{metrics['test_accuracy']:.2%}** (balanced: {metrics['balanced_accuracy']:.2%})",
             f"- git commit: `{metrics.get('git_commit', 'unknown')}`", "",
             "| class | images | accuracy |", "|---|---:|---:|"]
    for c in classes:
        acc = metrics["per_class_accuracy"][c]
        lines.append(f"| {c} | {metrics['support'][c]} | {'n/a' if acc is None else f'{acc:.2%}'} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for c, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    if metrics.get("confusion_matrix_png"):
        lines += ["", f"![confusion matrix]({metrics['confusion_matrix_png']})"]
    return "\n".join(lines) + "\n"
