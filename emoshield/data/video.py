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
                     size: tuple[int, int] = (640, 480), face_px: int = 200, per_frame: int = 1) -> Path:
    """Write `out` (mp4v) and `out`.labels.json; returns the labels file. With per_frame > 1 the
    faces are dealt round-robin into that many side-by-side slots, each showing its faces one after
    the other, so every frame holds per_frame faces (the last frames of a slot that runs out show
    no face there). The labels file has "frames" (the first slot's label per frame, as a
    one-face reader expects) and "faces" (per frame: every face's box and label, and its slot)."""
    if not faces:
        raise EmoshieldError("no faces to write into a video")
    if per_frame < 1:
        raise EmoshieldError("--faces-per-frame must be >= 1")
    width, height = size
    pad = face_px // 4
    box = face_px + 2 * pad
    slot_width = width // per_frame
    if box + 16 > min(slot_width, height):
        raise EmoshieldError(f"{per_frame} faces of {face_px} px do not fit side by side in a {width}x{height} frame")
    slots = [list(zip(faces[k::per_frame], labels[k::per_frame])) for k in range(per_frame)]
    length = max(len(s) for s in slots) * hold
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise EmoshieldError(f"cannot write video {out}")
    padded = [[(_padded(face, face_px, pad), label) for face, label in slot] for slot in slots]
    frame_faces: list[list[dict]] = []
    try:
        for index in range(length):
            step = index % hold
            canvas = np.full((height, width, 3), 96, np.uint8)
            present = []
            for k, slot in enumerate(padded):
                if index // hold >= len(slot):
                    continue
                image, label = slot[index // hold]
                x = k * slot_width + (slot_width - box) // 2 + (step % 5) * 2
                y = (height - box) // 2 + (step % 3) * 2
                canvas[y:y + box, x:x + box] = image
                present.append({"slot": k, "box": [x + pad, y + pad, face_px, face_px], "label": label})
            writer.write(canvas)
            frame_faces.append(present)
    finally:
        writer.release()
    labels_file = out.with_name(out.name + ".labels.json")
    first = [next((f["label"] for f in present if f["slot"] == 0), None) for present in frame_faces]
    labels_file.write_text(json.dumps({"video": out.name, "fps": fps, "hold": hold, "faces_per_frame": per_frame,
                                       "frames": first, "faces": frame_faces}))
    return labels_file


def _padded(face: np.ndarray, face_px: int, pad: int) -> np.ndarray:
    face = face if face.ndim == 3 else cv2.cvtColor(face, cv2.COLOR_GRAY2BGR)
    face = cv2.resize(face, (face_px, face_px), interpolation=cv2.INTER_LINEAR)
    return cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
