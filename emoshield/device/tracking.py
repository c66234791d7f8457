"""Every face in the frame, followed from frame to frame: the detector runs on a shrunk copy of
some frames only, and between detections each face's box follows it by template matching on a
small grey copy of the frame (a fraction of a millisecond per face). A track that loses its face
asks for a detection on the next frame; detections are matched to tracks by box overlap, so a
person keeps one track id while they stay in view.

How often to detect is chosen from measured costs unless fixed: often enough that a new face is
found within a few frames, rarely enough that detection takes about a third of the frame time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from ..data.faces import box_iou as iou

Box = tuple[int, int, int, int]  # x, y, w, h in frame pixels

TRACK_WIDTH = 320  # width of the grey copy boxes are followed on (sub-pixel peaks: ~0.5 px at 640)
MATCH_THRESHOLD = 0.7  # normalised cross-correlation below this: the face is lost
IOU_MATCH = 0.3  # a detection continues a track when their boxes overlap this much
MAX_MISSED = 2  # detections a track may miss before it ends
# bounds of the automatic detection interval (frames): a new face is found within 15 frames (0.5 s
# at 30 FPS); a lost one triggers a detection at once whatever the interval
AUTO_EVERY = (2, 15)
DETECT_SHARE = 0.35  # the automatic interval keeps detection at about this share of the time


@dataclass
class Track:
    id: int
    box: Box
    template: np.ndarray | None = field(default=None, repr=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)
    missed: int = 0
    lost: bool = False


class FaceTracker:
    """tracks = tracker.update(frame): the faces of this frame, each with a stable id.

    detect: frame -> boxes (the shrunk-copy detector of data.faces.face_detector).
    detect_every: 0 = automatic (see module doc), 1 = detect on every frame (no tracking),
    N = every N frames (and at once when a face is lost)."""

    def __init__(self, detect: Callable[[np.ndarray], list[Box]], detect_every: int = 0,
                 max_faces: int = 8):
        self.detect = detect
        self.detect_every = detect_every
        self.max_faces = max_faces
        self.tracks: list[Track] = []
        self._next_id = 1
        self._since_detect = 0
        self._detect_seconds: float | None = None
        self._frame_seconds: float | None = None
        self.detections = 0
        self.frames = 0

    @property
    def interval(self) -> int:
        """Frames between detections now (automatic: from the measured costs)."""
        if self.detect_every:
            return self.detect_every
        if self._detect_seconds is None or not self._frame_seconds:
            return AUTO_EVERY[0]
        # detection's share of the time is t_d / (N * t_f + t_d) <= DETECT_SHARE
        n = math.ceil(self._detect_seconds * (1 - DETECT_SHARE) / (DETECT_SHARE * self._frame_seconds))
        return max(AUTO_EVERY[0], min(AUTO_EVERY[1], n))

    def note_frame_seconds(self, seconds: float) -> None:
        """The rest of a frame's cost (decode, track, classify): the automatic interval's yardstick."""
        self._frame_seconds = seconds if self._frame_seconds is None else 0.9 * self._frame_seconds + 0.1 * seconds

    def update(self, frame: np.ndarray) -> list[Track]:
        self.frames += 1
        small, scale = _track_copy(frame)
        due = (self.detect_every == 1 or not self.tracks or any(t.lost for t in self.tracks)
               or self._since_detect + 1 >= self.interval)
        if not due:
            self._since_detect += 1
            for track in self.tracks:
                self._follow(track, small, scale, frame.shape)
            if not any(t.lost for t in self.tracks):
                return list(self.tracks)
        started = time.perf_counter()
        boxes = self.detect(frame)[: self.max_faces]
        seconds = time.perf_counter() - started
        self._detect_seconds = seconds if self._detect_seconds is None else 0.8 * self._detect_seconds + 0.2 * seconds
        self.detections += 1
        self._since_detect = 0
        self._assign(boxes, small, scale)
        return list(self.tracks)

    def _assign(self, boxes: list[Box], small: np.ndarray, scale: float) -> None:
        """Greedy matching by overlap, largest overlap first; unmatched boxes start tracks,
        unmatched tracks count a miss and end after MAX_MISSED."""
        pairs = sorted(((iou(t.box, b), i, j) for i, t in enumerate(self.tracks) for j, b in enumerate(boxes)),
                       reverse=True)
        used_t, used_b = set(), set()
        for overlap, i, j in pairs:
            if overlap < IOU_MATCH or i in used_t or j in used_b:
                continue
            used_t.add(i)
            used_b.add(j)
            track = self.tracks[i]
            track.box, track.missed, track.lost = boxes[j], 0, False
            track.template = _template(small, track.box, scale)
        kept = []
        for i, track in enumerate(self.tracks):
            if i not in used_t:
                track.missed += 1
                track.lost = True
                if track.missed > MAX_MISSED:
                    continue
            kept.append(track)
        for j, box in enumerate(boxes):
            if j not in used_b:
                kept.append(Track(self._next_id, box, _template(small, box, scale)))
                self._next_id += 1
        # a track that missed its detection is still reported (at its last box) but not classified
        self.tracks = sorted(kept, key=lambda t: t.box[2] * t.box[3], reverse=True)

    def _follow(self, track: Track, small: np.ndarray, scale: float, shape: tuple) -> None:
        """Move the box to where its template matches best in a window around it."""
        if track.template is None:
            track.lost = True
            return
        th, tw = track.template.shape
        x, y = int(track.box[0] * scale), int(track.box[1] * scale)
        mx, my = max(4, tw // 2), max(4, th // 2)
        x0, y0 = max(0, x - mx), max(0, y - my)
        x1, y1 = min(small.shape[1], x + tw + mx), min(small.shape[0], y + th + my)
        window = small[y0:y1, x0:x1]
        if window.shape[0] < th or window.shape[1] < tw:
            track.lost = True
            return
        scores = cv2.matchTemplate(window, track.template, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(scores)
        if not best >= MATCH_THRESHOLD:  # also catches NaN (a flat patch)
            track.lost = True
            return
        dx, dy = _subpixel(scores, bx, by)
        nx, ny = (x0 + bx + dx) / scale, (y0 + by + dy) / scale
        w, h = track.box[2], track.box[3]
        track.box = (int(round(min(max(nx, 0), shape[1] - w))), int(round(min(max(ny, 0), shape[0] - h))), w, h)


def _subpixel(scores: np.ndarray, bx: int, by: int) -> tuple[float, float]:
    """Offset of the correlation peak from (bx, by) by a parabola through it and its neighbours."""
    def vertex(left: float, centre: float, right: float) -> float:
        curvature = left - 2 * centre + right
        return 0.0 if curvature >= 0 else max(-0.5, min(0.5, 0.5 * (left - right) / curvature))

    h, w = scores.shape
    dx = vertex(scores[by, bx - 1], scores[by, bx], scores[by, bx + 1]) if 0 < bx < w - 1 else 0.0
    dy = vertex(scores[by - 1, bx], scores[by, bx], scores[by + 1, bx]) if 0 < by < h - 1 else 0.0
    return float(dx), float(dy)


def _track_copy(frame: np.ndarray) -> tuple[np.ndarray, float]:
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
    scale = min(1.0, TRACK_WIDTH / gray.shape[1])
    if scale < 1.0:
        gray = cv2.resize(gray, (TRACK_WIDTH, max(1, round(gray.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    return gray, scale


def _template(small: np.ndarray, box: Box, scale: float) -> np.ndarray | None:
    x, y, w, h = (int(round(v * scale)) for v in box)
    patch = small[max(0, y):y + h, max(0, x):x + w]
    return patch.copy() if patch.shape[0] >= 6 and patch.shape[1] >= 6 else None
