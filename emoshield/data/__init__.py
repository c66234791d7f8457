"""Datasets with subject/sequence metadata, splits, face detection and image decoding."""

from .datasets import DATASET_NAMES, FaceDataset, load_dataset
from .labels import CANONICAL_CLASSES, REFERENCE_CLASSES, canonical_label, parse_classes
from .records import ImageRecord
from .splits import PROTOCOLS, Split, load_split, make_split

__all__ = [
    "CANONICAL_CLASSES", "DATASET_NAMES", "FaceDataset", "ImageRecord", "PROTOCOLS",
    "REFERENCE_CLASSES", "Split", "canonical_label", "load_dataset", "load_split",
    "make_split", "parse_classes",
]
