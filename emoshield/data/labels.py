"""The one canonical emotion label set, and how each dataset's names map onto it."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import EmoshieldError

CANONICAL_CLASSES: tuple[str, ...] = (
    "angry", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise",
)

# The reference system's five classes (SPEC §3), in canonical order.
REFERENCE_CLASSES: tuple[str, ...] = ("disgust", "fear", "happy", "sad", "surprise")

_ALIASES: dict[str, str] = {
    "anger": "angry", "an": "angry", "angry": "angry", "mad": "angry",
    "contempt": "contempt", "co": "contempt",
    "disgust": "disgust", "disgusted": "disgust", "di": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "fe": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "ha": "happy",
    "neutral": "neutral", "ne": "neutral",
    "sad": "sad", "sadness": "sad", "sa": "sad",
    "surprise": "surprise", "surprised": "surprise", "su": "surprise",
}


def canonical_label(name: str) -> str | None:
    """Map a dataset's class name (any case; 'happiness', 'SA', ...) to the canonical label, or None."""
    return _ALIASES.get(name.strip().lower())


def parse_classes(spec: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Parse '--classes happy,sad,...' into canonical labels in canonical order (None = all present).

    Unknown names raise a one-line error that lists the accepted names.
    """
    if spec is None:
        return None
    names = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        return None
    chosen = set()
    for name in names:
        label = canonical_label(name)
        if label is None:
            raise EmoshieldError(
                f"unknown class name {name.strip()!r}; use names from: {', '.join(CANONICAL_CLASSES)}")
        chosen.add(label)
    if len(chosen) < 2:
        raise EmoshieldError("--classes needs at least two distinct classes")
    return tuple(c for c in CANONICAL_CLASSES if c in chosen)
