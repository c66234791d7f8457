"""Face detection and cropping: OpenCV's Haar cascade (ships with opencv-python-headless 4.x),
or MTCNN on onnxruntime (facenet-pytorch's trained nets exported to ONNX; no torch at run time).

Used for datasets whose faces are not cropped (JAFFE, raw video frames). Boxes are
cached per file so a dataset is scanned once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import cv2
import numpy as np

from ..errors import EmoshieldError
from ..paths import cache_dir
from .images import read_image

DEFAULT_MARGIN = 0.1
_CACHE_VERSION = 1
_THREAD = threading.local()  # per-thread OpenCV cascades (see haar_cascade)


def _load_cascade(name: str) -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / name
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise EmoshieldError(f"cannot load Haar cascade {path} (opencv-python-headless<5 ships it)")
    return cascade


def haar_cascade(name: str = "haarcascade_frontalface_default.xml") -> cv2.CascadeClassifier:
    """One of OpenCV's bundled Haar cascades, one object per thread and name: detectMultiScale
    changes the classifier's state and releases the GIL, so threads must not share one (the eye
    cascade's race corrupted aligned training sets before it was made per-thread)."""
    cascades = getattr(_THREAD, "cascades", None)
    if cascades is None:
        cascades = _THREAD.cascades = {}
    if name not in cascades:
        cascades[name] = _load_cascade(name)
    return cascades[name]


def detect_faces(gray: np.ndarray, min_size: int = 24) -> list[tuple[int, int, int, int]]:
    """All face boxes (x, y, w, h) in a grayscale image, largest first."""
    found = haar_cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                            minSize=(min_size, min_size))
    boxes = [tuple(int(v) for v in box) for box in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


DETECTORS = ("haar", "mtcnn")


def face_detector(name: str = "haar", min_size: int = 24, max_width: int = 0):
    """A function BGR-or-gray frame -> face boxes (x, y, w, h) in frame pixels, largest first.

    haar: OpenCV's cascade (the device default). mtcnn: facenet-pytorch 2.5.3's trained MTCNN
    run on onnxruntime (see data/mtcnn.py; no torch): finds more turned, dim and small faces,
    at a higher cost per frame. Neither needs torch on the device. max_width > 0 finds faces on a copy of the
    frame shrunk to that width (detection cost falls with the pixel count), then detects each
    again at full resolution in a window around it, so boxes are those a full-size detection
    gives (the crop the classifier sees; scaled-back boxes cost accuracy) at a fraction of the cost."""
    detect = _base_detector(name, min_size)
    if max_width <= 0:
        return detect

    def shrunk(frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        width = frame.shape[1]
        if width <= max_width:
            return detect(frame)
        scale = max_width / width
        small = cv2.resize(frame, (max_width, max(1, round(frame.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        found = [tuple(int(round(v / scale)) for v in box) for box in detect(small, max(24, round(min_size * scale)))]
        return [_refined(detect, frame, box, min_size) for box in found]
    return shrunk


def _refined(detect, frame: np.ndarray, box: tuple[int, int, int, int], min_size: int) -> tuple[int, int, int, int]:
    """`box` detected again at full resolution in a window 1.5x its size; the box itself when the
    window holds no face that overlaps it."""
    x, y, w, h = expand_box(box, frame.shape[:2], 0.25)
    found = detect(frame[y:y + h, x:x + w], max(min_size, int(box[2] * 0.7)))
    if not found:
        return box
    best = max(found, key=lambda b: box_iou((b[0] + x, b[1] + y, b[2], b[3]), box))
    best = (best[0] + x, best[1] + y, best[2], best[3])
    return best if box_iou(best, box) >= 0.3 else box


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / float(a[2] * a[3] + b[2] * b[3] - w * h)


def _base_detector(name: str, default_min_size: int):
    if name == "haar":
        def haar(frame: np.ndarray, min_size: int = default_min_size) -> list[tuple[int, int, int, int]]:
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            return detect_faces(gray, min_size)
        return haar
    if name == "mtcnn":
        from .mtcnn import OnnxMTCNN

        mtcnn = OnnxMTCNN(min_size=default_min_size)

        def detect(frame: np.ndarray, min_size: int = default_min_size) -> list[tuple[int, int, int, int]]:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB if frame.ndim == 3 else cv2.COLOR_GRAY2RGB)
            found, probs, _ = mtcnn.detect(rgb, min_size)
            h, w = rgb.shape[:2]
            boxes = []
            for (x0, y0, x1, y1), prob in zip(found, probs):
                x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
                x1, y1 = min(w, int(round(x1))), min(h, int(round(y1)))
                if prob >= 0.9 and x1 - x0 >= min_size and y1 - y0 >= min_size:
                    boxes.append((x0, y0, x1 - x0, y1 - y0))
            return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)
        return detect
    raise EmoshieldError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTORS)}")


ALIGN_MODES = ("none", "eyes")


def _eye_cascade() -> cv2.CascadeClassifier:
    """OpenCV's eye cascade, one per thread: detectMultiScale changes the classifier's state and
    releases the GIL, so decode_images' worker threads must not share one."""
    return haar_cascade("haarcascade_eye.xml")


EYE_SEARCH_PX = 96  # faces are searched for eyes at this width (CK+48 ships 48 px faces)
MAX_TILT = 25.0  # degrees: a steeper "eye line" is a wrong pair of detections, left alone
MIN_TILT = 1.0  # degrees: rotating less than this only blurs


def eye_tilt(face: np.ndarray) -> float | None:
    """The angle in degrees of the line from the left eye to the right eye of a face crop (positive:
    the right eye is lower), from OpenCV's eye cascade in the crop's upper 60%, or None when no
    plausible pair (one eye per half, under MAX_TILT) is found. Torch-free: the device runs it."""
    gray = face if face.ndim == 2 else cv2.cvtColor(face, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape[:2]
    if min(h, w) < 16:
        return None
    scale = EYE_SEARCH_PX / w
    gray = cv2.resize(gray, (EYE_SEARCH_PX, max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    upper = cv2.equalizeHist(gray[: int(gray.shape[0] * 0.6)])
    eyes = _eye_cascade().detectMultiScale(
        upper, scaleFactor=1.1, minNeighbors=3, minSize=(EYE_SEARCH_PX // 10,) * 2,
        maxSize=(EYE_SEARCH_PX // 2,) * 2)
    half = EYE_SEARCH_PX / 2
    centers = [(x + ew / 2, y + eh / 2, ew * eh) for x, y, ew, eh in eyes]
    left = [c for c in centers if c[0] < half]
    right = [c for c in centers if c[0] >= half]
    if not left or not right:
        return None
    (lx, ly, _), (rx, ry, _) = max(left, key=lambda c: c[2]), max(right, key=lambda c: c[2])
    angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
    return angle if abs(angle) <= MAX_TILT else None


def align_face(face: np.ndarray, mode: str = "eyes") -> np.ndarray:
    """The face crop rotated about its centre so its eyes are level (mode "eyes"), unchanged when
    they already are, when no eye pair is found, or with mode "none". Same size, edges replicated.
    Training, evaluation and the device all call this on the crop, before resizing."""
    if mode == "none":
        return face
    if mode not in ALIGN_MODES:
        raise EmoshieldError(f"unknown face alignment {mode!r}; choose from {', '.join(ALIGN_MODES)}")
    angle = eye_tilt(face)
    if angle is None or abs(angle) < MIN_TILT:
        return face
    h, w = face.shape[:2]
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(face, rotation, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def expand_box(box: tuple[int, int, int, int], shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Grow a box by `margin` of its size on every side, clipped to the image (h, w)."""
    x, y, w, h = box
    dx, dy = int(round(w * margin)), int(round(h * margin))
    x0, y0 = max(0, x - dx), max(0, y - dy)
    x1, y1 = min(shape[1], x + w + dx), min(shape[0], y + h + dy)
    return x0, y0, x1 - x0, y1 - y0


MARGIN_RANGE = (-0.2, 0.5)


def calibrated_margin(faces: np.ndarray, detector: str = "haar", side: int = 200) -> tuple[float, int]:
    """The margin a device must add to its detector's box for its crop to frame a face as the
    training images do, measured on those images: (margin, faces it was measured on).

    Training crops differ by dataset (CK+48 ships tight 48 px crops, JAFFE's are a Haar box grown
    by DEFAULT_MARGIN), and a model is sensitive to the framing: a CK+48 model fed box + 10%
    loses ~15 points. Each training view (N x H x W grey or N x H x W x 3, uint8) is enlarged to
    `side` px inside a replicated border, as a camera frame would hold it, and detected; the
    crop spans side = box * (1 + 2 margin). DEFAULT_MARGIN when too few faces are found."""
    detect = face_detector(detector)
    pad, margins = side // 4, []
    for face in faces:
        big = cv2.resize(np.ascontiguousarray(face), (side, side), interpolation=cv2.INTER_LINEAR)
        canvas = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        truth = (pad, pad, side, side)
        found = [b for b in detect(canvas) if box_iou(b, truth) >= 0.3]
        if found:
            b = max(found, key=lambda b: box_iou(b, truth))
            margins.append((side / ((b[2] + b[3]) / 2) - 1) / 2)
    if len(margins) < max(4, len(faces) // 4):
        return DEFAULT_MARGIN, len(margins)
    return float(np.clip(np.median(margins), *MARGIN_RANGE)), len(margins)


def largest_face_box(gray: np.ndarray, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int] | None:
    """The largest detected face, grown by `margin`, or None when no face is found."""
    boxes = detect_faces(gray)
    return expand_box(boxes[0], gray.shape[:2], margin) if boxes else None


class FaceBoxCache:
    """Face boxes per image file, persisted as JSON and keyed by path, size and mtime."""

    def __init__(self, name: str, margin: float = DEFAULT_MARGIN):
        self.margin = margin
        self.file = cache_dir("faces") / f"{name}-m{margin:g}-v{_CACHE_VERSION}.json"
        try:
            self.boxes: dict[str, list[int] | None] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.boxes = {}
        self._dirty = False

    @staticmethod
    def _key(path: Path) -> str:
        stat = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()

    def box(self, path: Path) -> tuple[int, int, int, int] | None:
        """The cached or freshly detected face box of an image file; None if no face (or unreadable)."""
        key = self._key(path)
        if key not in self.boxes:
            gray = read_image(path, cv2.IMREAD_GRAYSCALE)
            found = largest_face_box(gray, self.margin) if gray is not None else None
            self.boxes[key] = list(found) if found else None
            self._dirty = True
        value = self.boxes[key]
        return tuple(value) if value else None

    def save(self) -> None:
        if self._dirty:
            tmp = self.file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.boxes))
            os.replace(tmp, self.file)
            self._dirty = False
