"""Evaluation: metrics, confusion matrices, plots and Markdown reports."""

from .metrics import classification_report, confusion_matrix
from .report import describe_run, metrics_markdown

__all__ = ["classification_report", "confusion_matrix", "describe_run", "metrics_markdown"]
