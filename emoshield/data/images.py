"""Decode dataset images once into one uint8 tensor at the model's input size.

Faces are small and datasets modest, so training reads from memory instead of
re-decoding every epoch. Grayscale datasets stay 1-channel here and are expanded to
3 channels per batch (`to_model_input`), which keeps memory 3x lower.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .records import ImageRecord


@dataclass
class DecodedImages:
    """Images (uint8, N x C x S x S, C = 1 or 3) for the records that could be read."""

    pixels: "np.ndarray"
    records: list[ImageRecord]
    failures: list[tuple[str, str]]  # (path, reason) of images that were skipped


def _to_gray_or_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == 1 or (np.array_equal(image[:, :, 0], image[:, :, 1])
                               and np.array_equal(image[:, :, 1], image[:, :, 2])):
        return image[:, :, 0]  # grayscale stored as 3 equal channels (e.g. JAFFE's TIFFs)
    return image


def _finish(image: np.ndarray, record: ImageRecord, size: int, align: str = "none") -> np.ndarray:
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    image = _to_gray_or_bgr(image)
    if record.crop is not None:
        x, y, w, h = record.crop
        image = image[y:y + h, x:x + w]
    if align != "none":  # on the crop, before resizing: as the device does
        from .faces import align_face

        image = align_face(image, align)
    return resize_face(image, size)


def resize_face(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize as in training (area when shrinking, linear when enlarging); devices use it too."""
    if image.shape[0] != size or image.shape[1] != size:
        shrink = image.shape[0] > size
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image


def read_image(path: Path | str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """cv2.imread, None for a file that does not decode, including one over OpenCV's pixel limit
    (emoshield/__init__ lowers it; OpenCV raises rather than returning None there)."""
    try:
        return cv2.imread(str(path), flags)
    except cv2.error:
        return None


def decode_image(data: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """cv2.imdecode of bytes, None when they do not decode (read_image's rules)."""
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None


def _read_still(root: Path, record: ImageRecord, size: int, align: str = "none") -> np.ndarray | str:
    path = root / record.path
    if not path.is_file():
        return "file not found"
    image = read_image(path)
    if image is None or image.size == 0:
        return "unreadable or corrupt image"
    return _finish(image, record, size, align)


def _read_video(root: Path, path: str, wanted: list[tuple[int, ImageRecord]], size: int,
                align: str = "none") -> dict[int, np.ndarray | str]:
    """Decode the wanted frames of one video in a single sequential pass."""
    by_frame = defaultdict(list)
    for index, record in wanted:
        by_frame[record.frame].append((index, record))
    out: dict[int, np.ndarray | str] = {}
    capture = cv2.VideoCapture(str(root / path))
    frame_no, last = 0, max(by_frame)
    while capture.isOpened() and frame_no <= last:
        ok, frame = capture.read()
        if not ok:
            break
        for index, record in by_frame.get(frame_no, ()):
            out[index] = _finish(frame, record, size, align)
        frame_no += 1
    capture.release()
    for index, _record in wanted:
        out.setdefault(index, "video frame could not be read")
    return out


def decode_images(root: Path, records: list[ImageRecord], size: int, workers: int = 4,
                  align: str = "none") -> DecodedImages:
    """Read, crop, align (`align`: emoshield.data.faces.align_face) and resize every record to size x
    size; unreadable files are reported and skipped."""
    from .datasets import VIDEO_SUFFIXES

    results: dict[int, np.ndarray | str] = {}
    videos: dict[str, list[tuple[int, ImageRecord]]] = defaultdict(list)
    stills = []
    for index, record in enumerate(records):
        if Path(record.path).suffix.lower() in VIDEO_SUFFIXES:
            videos[record.path].append((index, record))
        else:
            stills.append(index)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, result in zip(stills, pool.map(lambda i: _read_still(root, records[i], size, align), stills)):
            results[index] = result
        for part in pool.map(lambda item: _read_video(root, item[0], item[1], size, align), videos.items()):
            results.update(part)
    kept, failures, arrays = [], [], []
    for index, record in enumerate(records):
        result = results[index]
        if isinstance(result, str):
            failures.append((record.path, result))
        else:
            kept.append(record)
            arrays.append(result)
    if failures:
        shown = "; ".join(f"{p}: {why}" for p, why in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        warnings.warn(f"skipped {len(failures)} unreadable image(s): {shown}{more}", stacklevel=2)
    gray = all(a.ndim == 2 for a in arrays)
    if gray:
        pixels = np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, size, size), np.uint8)
    else:
        color = [cv2.cvtColor(a, cv2.COLOR_GRAY2RGB) if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
                 for a in arrays]
        pixels = np.stack(color).transpose(0, 3, 1, 2).copy()
    return DecodedImages(np.ascontiguousarray(pixels), kept, failures)


def to_model_input(pixels):
    """uint8 N x C x H x W tensor -> float32 in [0, 1] with 3 channels (grayscale expanded)."""
    x = pixels.float().div_(255.0)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) declared by a PNG's IHDR, a BMP's or a JPEG's frame header, read without decoding
    (so a 600-byte file that would decode to 32768 x 32768 pixels is refused before any memory
    is spent); None when the header is missing or truncated."""
    if data.startswith(b"BM"):  # BMP: width and height (negative: stored top-down) in its info header
        if len(data) < 26:
            return None
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True))
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    i = 2
    while i + 9 < len(data):  # JPEG: walk the marker segments up to the first SOFn
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None
