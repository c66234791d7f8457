"""Build test videos from real dataset faces (torch-free), with per-frame ground truth.

Each face is enlarged, padded with its own border pixels (Haar cascades need some context
around a tight crop) and held for a number of frames on a 640 x 480 canvas, drifting a
few pixels per frame so consecutive frames are not identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ..errors import EmoshieldError


def write_face_video(faces: list[np.ndarray], labels: list[str], out: Path, fps: float = 15.0, hold: int = 8,
                     size: tuple[int, int] = (640, 480), face_px: int = 200) -> Path:
    """Write `out` (mp4v) and `out`.labels.json ({"frames": [label per frame], ...}); returns the labels file."""
    if not faces:
        raise EmoshieldError("no faces to write into a video")
    width, height = size
    pad = face_px // 4
    box = face_px + 2 * pad
    if box + 16 > min(width, height):
        raise EmoshieldError(f"a {face_px} px face does not fit a {width}x{height} frame")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise EmoshieldError(f"cannot write video {out}")
    frame_labels = []
    try:
        for face, label in zip(faces, labels):
            face = face if face.ndim == 3 else cv2.cvtColor(face, cv2.COLOR_GRAY2BGR)
            face = cv2.resize(face, (face_px, face_px), interpolation=cv2.INTER_LINEAR)
            padded = cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
            for step in range(hold):
                canvas = np.full((height, width, 3), 96, np.uint8)
                x = (width - box) // 2 + (step % 5) * 2
                y = (height - box) // 2 + (step % 3) * 2
                canvas[y:y + box, x:x + box] = padded
                writer.write(canvas)
                frame_labels.append(label)
    finally:
        writer.release()
    labels_file = out.with_name(out.name + ".labels.json")
    labels_file.write_text(json.dumps({"video": out.name, "fps": fps, "hold": hold, "frames": frame_labels}))
    return labels_file
