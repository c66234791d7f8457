"""One labelled face image with the metadata that splits need (subject, sequence, frame)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ImageRecord:
    """A labelled image. `path` is relative to the dataset folder.

    subject: who is shown (None when the dataset has no subject ids, e.g. FER2013).
    sequence: the video or posing session the image belongs to (one per image when none).
    frame: position inside the sequence (orders frames of a video).
    source_split: the dataset's own split (FER2013's train/val/test), if it has one.
    crop: (x, y, w, h) face box to cut from the image before resizing, if any.
    """

    path: str
    label: str
    subject: str | None
    sequence: str
    frame: int = 0
    source_split: str | None = None
    crop: tuple[int, int, int, int] | None = field(default=None)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.crop is not None:
            data["crop"] = list(self.crop)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ImageRecord":
        keys = {"path", "label", "subject", "sequence", "frame", "source_split", "crop"}
        values = {k: v for k, v in data.items() if k in keys}
        if values.get("crop") is not None:
            values["crop"] = tuple(values["crop"])
        return cls(**values)
