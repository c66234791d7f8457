"""MTCNN (Zhang et al. 2016) on onnxruntime: a face detector that needs no torch at run time.

Haar misses faces that are turned, lit from one side or small; MTCNN finds more of them and
gives five landmarks (eyes, nose, mouth corners). facenet-pytorch 2.5.3 ships the trained
P/R/O-nets inside its wheel; `export_mtcnn` (run once by `emoshield models install-weights`,
where torch is installed) writes them as ONNX into the cache, and `OnnxMTCNN` runs the three
stages with numpy + onnxruntime, the same cascade facenet-pytorch runs, so a device
gets the better detector without torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import EmoshieldError
from ..paths import cache_dir, sha256_file

NETS = ("pnet", "rnet", "onet")
THRESHOLDS = (0.6, 0.7, 0.7)  # per stage, facenet-pytorch's defaults
PYRAMID_FACTOR = 0.709
MANIFEST = "manifest.json"


def mtcnn_dir() -> Path:
    return cache_dir("detectors/mtcnn-facenet-2.5.3")


def export_mtcnn(folder: Path | None = None, force: bool = False) -> list[Path]:
    """Write facenet-pytorch's P/R/O-nets as ONNX (dynamic batch; PNet also dynamic size)
    plus a manifest of their sha256 into `folder`; returns the files. Needs torch."""
    folder = Path(folder) if folder else mtcnn_dir()
    files = [folder / f"{name}.onnx" for name in NETS]
    if not force and _verified(folder):
        return files
    try:
        import torch
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    except ImportError as exc:
        raise EmoshieldError("exporting MTCNN needs torch and facenet-pytorch==2.5.3 "
                             "(pip install --no-deps facenet-pytorch==2.5.3; `make setup` does)") from exc
    folder.mkdir(parents=True, exist_ok=True)
    specs = {"pnet": (PNet, (1, 3, 48, 64), {0: "batch", 2: "height", 3: "width"}, ["reg", "prob"]),
             "rnet": (RNet, (1, 3, 24, 24), {0: "batch"}, ["reg", "prob"]),
             "onet": (ONet, (1, 3, 48, 48), {0: "batch"}, ["reg", "landmarks", "prob"])}
    for name, (cls, shape, axes, outputs) in specs.items():
        net = cls(pretrained=True).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript exporter: exact for these small CNNs
            torch.onnx.export(net, (torch.zeros(shape),), str(folder / f"{name}.onnx.part"),
                              input_names=["image"], output_names=outputs, opset_version=17, dynamo=False,
                              dynamic_axes={"image": axes, **{o: {0: "batch"} for o in outputs}})
        (folder / f"{name}.onnx.part").replace(folder / f"{name}.onnx")
    (folder / MANIFEST).write_text(json.dumps({f.name: sha256_file(f) for f in files}, indent=1))
    return files


def _verified(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(manifest.get(f"{n}.onnx") == sha256_file(folder / f"{n}.onnx") for n in NETS)
    except (OSError, ValueError):
        return False


class OnnxMTCNN:
    """The MTCNN cascade on onnxruntime. `detect(rgb)` -> boxes (N x 4, x0 y0 x1 y1), scores (N),
    landmarks (N x 5 x 2: left eye, right eye, nose, mouth left, mouth right), best first."""

    def __init__(self, folder: Path | None = None, min_size: int = 20, threads: int = 1,
                 thresholds: tuple[float, float, float] = THRESHOLDS):
        folder = Path(folder) if folder else mtcnn_dir()
        if not _verified(folder):
            try:
                export_mtcnn(folder)
            except EmoshieldError as exc:
                raise EmoshieldError(f"no verified MTCNN ONNX files in {folder}: run `emoshield models "
                                     f"install-weights` where torch is installed and copy that folder here") from exc
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.nets = {n: ort.InferenceSession(str(folder / f"{n}.onnx"), options, providers=["CPUExecutionProvider"])
                     for n in NETS}
        self.min_size = min_size
        self.thresholds = thresholds

    def detect(self, rgb: np.ndarray, min_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = _Integral(rgb)
        boxes = self._proposals(image, min_size or self.min_size)
        if len(boxes):
            boxes = self._refine(image, boxes)
        if not len(boxes):
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        return self._output(image, boxes)

    def _proposals(self, image: np.ndarray, min_size: int) -> np.ndarray:
        """Stage 1: PNet over an image pyramid; rows x0 y0 x1 y1 score (square, regressed)."""
        h, w = image.shape
        scale, side, found = 12.0 / min_size, min(h, w) * 12.0 / min_size, []
        while side >= 12:
            scaled = image.resized(0, 0, w, h, int(w * scale + 1), int(h * scale + 1))
            reg, prob = self.nets["pnet"].run(None, {"image": _normalized(scaled)})
            ys, xs = np.nonzero(prob[0, 1] >= self.thresholds[0])
            if len(ys):
                cells = np.stack([xs, ys], 1).astype(np.float32)
                rows = np.concatenate([np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale),
                                       prob[0, 1, ys, xs, None], reg[0][:, ys, xs].T], 1)
                found.append(rows[_nms(rows[:, :4], rows[:, 4], 0.5)])
            scale, side = scale * PYRAMID_FACTOR, side * PYRAMID_FACTOR
        if not found:
            return np.zeros((0, 5), np.float32)
        rows = np.concatenate(found)
        rows = rows[_nms(rows[:, :4], rows[:, 4], 0.7)]
        size = rows[:, 2:4] - rows[:, 0:2]
        corners = np.concatenate([rows[:, 0:2] + rows[:, 5:7] * size, rows[:, 2:4] + rows[:, 7:9] * size], 1)
        return _square(np.concatenate([corners, rows[:, 4:5]], 1))

    def _refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: RNet on 24 px crops of the proposals."""
        boxes, crops = _crops(image, boxes, 24)
        if not len(boxes):
            return boxes
        reg, prob = self.nets["rnet"].run(None, {"image": crops})
        keep = prob[:, 1] > self.thresholds[1]
        boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1)
        reg = reg[keep]
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7)
        return _square(_regressed(boxes[pick], reg[pick]))

    def _output(self, image: np.ndarray, boxes: np.ndarray):
        """Stage 3: ONet on 48 px crops: final boxes, scores and landmarks."""
        boxes, crops = _crops(image, boxes, 48)
        empty = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        if not len(boxes):
            return empty
        reg, marks, prob = self.nets["onet"].run(None, {"image": crops})
        keep = prob[:, 1] > self.thresholds[2]
        boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1)
        reg, marks = reg[keep], marks[keep]
        size = boxes[:, 2:4] - boxes[:, 0:2] + 1
        points = np.stack([size[:, :1] * marks[:, :5] + boxes[:, :1] - 1,
                           size[:, 1:2] * marks[:, 5:] + boxes[:, 1:2] - 1], 2)
        boxes = _regressed(boxes, reg)
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7, smaller=True)
        boxes, points = boxes[pick], points[pick]
        return boxes[:, :4].astype(np.float32), boxes[:, 4].astype(np.float32), points.astype(np.float32)


def _normalized(pixels: np.ndarray) -> np.ndarray:
    """H x W x 3 (or N x H x W x 3) RGB 0-255 -> N x 3 x H x W in [-1, 1], MTCNN's input."""
    batch = pixels[None] if pixels.ndim == 3 else pixels
    return np.ascontiguousarray(((batch - 127.5) * 0.0078125).transpose(0, 3, 1, 2), dtype=np.float32)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square around its centre (rows x0 y0 x1 y1 ...)."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, 0:2] + side[:, None]
    return boxes


def _regressed(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    boxes = boxes.copy()
    size = boxes[:, 2:4] - boxes[:, 0:2] + 1
    boxes[:, 0:2] += reg[:, 0:2] * size
    boxes[:, 2:4] += reg[:, 2:4] * size
    return boxes


class _Integral:
    """An image's summed-area table: any box resized by area averaging (torch's `interpolate(mode=
    "area")`, the resampling MTCNN's nets were run with) in O(output pixels), for every pyramid
    level and every crop of one frame."""

    def __init__(self, rgb: np.ndarray):
        pixels = np.asarray(rgb)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, 2)
        self.shape = pixels.shape[:2]
        # integer sums are exact; int32 holds any 8-bit frame of up to 8 million pixels
        exact = np.int32 if pixels.dtype == np.uint8 and pixels[..., 0].size < 2 ** 31 // 255 else np.float64
        self.table = np.zeros((self.shape[0] + 1, self.shape[1] + 1, 3), exact)
        np.cumsum(np.cumsum(pixels, 0, dtype=exact), 1, out=self.table[1:, 1:])

    def resized(self, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) averaged onto out_h x out_w cells, as adaptive average pooling."""
        i, j = np.arange(out_h), np.arange(out_w)
        r0, r1 = y + i * h // out_h, y + ((i + 1) * h + out_h - 1) // out_h
        c0, c1 = x + j * w // out_w, x + ((j + 1) * w + out_w - 1) // out_w
        t = self.table
        total = t[np.ix_(r1, c1)] - t[np.ix_(r0, c1)] - t[np.ix_(r1, c0)] + t[np.ix_(r0, c0)]
        return (total / ((r1 - r0)[:, None, None] * (c1 - c0)[None, :, None])).astype(np.float32)


def _crops(image: _Integral, boxes: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The boxes that hold pixels and their crops (clipped to the image, resized to side x side)."""
    h, w = image.shape
    corners = np.trunc(boxes[:, :4]).astype(np.int64)
    x0, y0 = np.maximum(corners[:, 0], 1) - 1, np.maximum(corners[:, 1], 1) - 1
    x1, y1 = np.minimum(corners[:, 2], w), np.minimum(corners[:, 3], h)
    valid = (x1 > x0) & (y1 > y0)
    crops = [image.resized(a, b, c - a, d - b, side, side) for a, b, c, d in zip(x0[valid], y0[valid], x1[valid], y1[valid])]
    if not crops:
        return boxes[:0], np.zeros((0, 3, side, side), np.float32)
    return boxes[valid], _normalized(np.stack(crops))


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, smaller: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best first. Overlap is IoU, or (smaller=True)
    intersection over the smaller box with inclusive pixel sizes, as MTCNN's last stage uses."""
    one = 1.0 if smaller else 0.0
    area = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + one)
        h = np.maximum(0.0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + one)
        inter = w * h
        overlap = inter / (np.minimum(area[i], area[rest]) if smaller else area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)
