"""Faces to emotions with one bundle's ONNX model: the int8 self-check that decides the
precision on this CPU, the health check a bundle passes before it becomes current, and the
per-frame analyzer (detect, crop as in training, classify, smooth)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..data.faces import ALIGN_MODES, DEFAULT_MARGIN, align_face, expand_box, face_detector
from ..data.images import resize_face
from ..errors import EmoshieldError, one_line
from ..tiers.bundle import MANIFEST, ONNX_FP32, ONNX_INT8, PROBES, BundleError, read_probes
from ..views import TTA_MODES, mean_probabilities, numpy_views
from .tracking import FaceTracker

DEFAULT_MIN_AGREEMENT = 0.9
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_isa() -> str:
    """The integer-SIMD features of this CPU that decide onnxruntime's int8 kernels, e.g.
    "avx2" or "avx2 avx512f avx512_vnni" (from /proc/cpuinfo; "unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ISA_FLAGS if f in flags) or "baseline"
    except OSError:
        pass
    return "unknown"


@dataclass
class SelfCheck:
    """Which precision the device runs a bundle in, and why: int8 kernels differ between CPUs,
    so int8 is used only after it agreed with the fp32 model on the bundle's probe faces here."""

    requested: str
    precision: str
    reason: str
    agreement: float | None = None
    min_agreement: float | None = None
    probes: int = 0
    seconds: float = 0.0
    cpu: str = field(default_factory=cpu_isa)

    @property
    def fell_back(self) -> bool:
        return self.requested != self.precision

    def to_dict(self) -> dict:
        return {**asdict(self), "fell_back": self.fell_back}

    def describe(self) -> str:
        if self.agreement is None:
            return f"{self.precision} ({self.reason})"
        verdict = "using fp32 instead" if self.fell_back else "using int8"
        return (f"int8 self-check on {self.probes} probe faces: {self.agreement:.1%} agree with fp32 "
                f"(threshold {self.min_agreement:.0%}, {self.seconds * 1e3:.0f} ms); {verdict}")


class EmotionClassifier:
    """One bundle's ONNX model (int8 by default) with the preprocessing its manifest names.
    `load_classifier` is the way in: it self-checks int8 on this CPU first."""

    check: SelfCheck | None = None

    def __init__(self, bundle_dir: Path, precision: str = "int8", threads: int = 1):
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        self.precision = precision
        self.manifest = json.loads((self.bundle_dir / MANIFEST).read_text())
        self.classes: list[str] = list(self.manifest["classes"])
        pre = self.manifest["preprocessing"]
        self.input_size = int(pre["input_size"])
        self.gray = pre.get("channels", "gray") == "gray"
        self.margin = float(pre.get("face_margin", DEFAULT_MARGIN))
        self.align = pre.get("align", "none")  # as the model was trained (emoshield.data.faces.align_face)
        if self.align not in ALIGN_MODES:
            raise BundleError(f"{bundle_dir}: manifest asks for face alignment {str(self.align)[:40]!r}, which this "
                              f"device does not know ({', '.join(ALIGN_MODES)})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        model = ONNX_INT8 if precision == "int8" else ONNX_FP32
        self.session = ort.InferenceSession(str(self.bundle_dir / model), options, providers=["CPUExecutionProvider"])
        self.version = int(self.manifest["version"])

    def face_tensor(self, frame_bgr: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
        """Crop (box grown by the training margin), colour as in training, resize: 1 x 3 x S x S float32."""
        if box is not None:
            x, y, w, h = expand_box(box, frame_bgr.shape[:2], self.margin)
            frame_bgr = frame_bgr[y:y + h, x:x + w]
        if self.align != "none":
            frame_bgr = align_face(frame_bgr, self.align)
        if self.gray:
            face = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY) if frame_bgr.ndim == 3 else frame_bgr
            face = resize_face(face, self.input_size)[None].repeat(3, 0)
        else:
            rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB) if frame_bgr.ndim == 3 else \
                cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2RGB)
            face = resize_face(rgb, self.input_size).transpose(2, 0, 1)
        return (face.astype(np.float32) / 255.0)[None]

    def logits(self, faces: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": faces})[0]

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        logits = self.logits(faces).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def load_classifier(bundle_dir: Path, precision: str = "int8", threads: int = 1) -> EmotionClassifier:
    """The bundle's model in `precision`, int8 only once it passed its self-check on this CPU:
    an int8 model that disagrees with the fp32 logits stored with the probe faces (below the
    manifest's threshold), or that does not load, gives way to fp32. `classifier.check` says
    which and why. Bundles made before probes existed run int8 unchecked (and say so)."""
    if precision == "fp32":
        classifier = EmotionClassifier(bundle_dir, "fp32", threads)
        classifier.check = SelfCheck("fp32", "fp32", "fp32 requested")
        return classifier
    started = time.perf_counter()
    agreement = threshold = None
    probes = 0
    try:
        classifier = EmotionClassifier(bundle_dir, "int8", threads)
    except Exception as exc:  # onnxruntime raises its own types for graphs it cannot run
        reason = f"int8 model does not load on this CPU ({one_line(exc, 160)})"
    else:
        entry = classifier.manifest.get("self_check")
        if not isinstance(entry, dict) or PROBES not in classifier.manifest.get("files", {}):
            classifier.check = SelfCheck("int8", "int8", "bundle carries no probe faces: int8 unchecked")
            return classifier
        threshold = entry.get("min_agreement")
        if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            threshold = DEFAULT_MIN_AGREEMENT
        images, reference = read_probes(Path(bundle_dir) / PROBES, classifier.input_size, len(classifier.classes))
        probes = len(images)
        try:
            # one face at a time: onnxruntime's arena keeps the largest batch it ever ran (a batch
            # of 8 48-px faces costs ~9 MB more peak RSS than the video's one or two faces)
            predicted = np.concatenate([classifier.logits(images[i:i + 1]) for i in range(probes)])
            agreement = float((predicted.argmax(1) == reference.argmax(1)).mean())
        except Exception as exc:
            reason = f"int8 model fails on this CPU ({one_line(exc, 160)})"
        else:
            if agreement >= threshold:
                classifier.check = SelfCheck("int8", "int8", "self-check passed", agreement, threshold, probes,
                                             time.perf_counter() - started)
                return classifier
            reason = (f"int8 agrees with fp32 on {agreement:.1%} of {probes} probe faces, below "
                      f"{threshold:.0%}: this CPU's int8 kernels are not accurate for this model")
    classifier = EmotionClassifier(bundle_dir, "fp32", threads)
    classifier.check = SelfCheck("int8", "fp32", reason, agreement, threshold, probes, time.perf_counter() - started)
    return classifier


def health_check(bundle_dir: Path, precision: str = "int8", threads: int = 1) -> EmotionClassifier:
    """Load the bundle's model (self-checked, see load_classifier) and classify a constant image:
    finite probabilities of the right shape, or BundleError. Run before a bundle becomes
    current; returns the classifier ready to use."""
    try:
        classifier = load_classifier(bundle_dir, precision, threads)
        probe = np.full((2, 3, classifier.input_size, classifier.input_size), 0.5, dtype=np.float32)
        p = classifier.probabilities(probe)
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
        raise BundleError(f"{bundle_dir}: health check failed ({one_line(exc, 160)})") from None
    if p.shape != (2, len(classifier.classes)) or not np.isfinite(p).all():
        raise BundleError(f"{bundle_dir}: health check failed (output shape {p.shape} or non-finite values)")
    return classifier



@dataclass
class FaceResult:
    track: int
    box: list[int]
    label: str
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return {"track": self.track, "box": self.box, "label": self.label, "probabilities": self.probabilities}

    @classmethod
    def from_dict(cls, data: object) -> "FaceResult":
        """One face of a JSON line `device run` wrote; ValueError on anything else (the file may
        have been edited, cut short or come from elsewhere)."""
        if not isinstance(data, dict):
            raise ValueError("a face is not an object")
        track, box, label, probabilities = (data.get(k) for k in ("track", "box", "label", "probabilities"))
        if type(track) is not int or not 0 <= track < 2**31:
            raise ValueError("a face's track is not a non-negative integer")
        if (not isinstance(box, list) or len(box) != 4 or any(type(v) is not int for v in box)
                or any(abs(v) > 1 << 20 for v in box) or box[2] <= 0 or box[3] <= 0):
            raise ValueError("a face's box is not [x, y, w, h] in pixels")
        if (not isinstance(probabilities, dict) or not 0 < len(probabilities) <= 64
                or not all(isinstance(k, str) and type(v) in (int, float) for k, v in probabilities.items())):
            raise ValueError("a face's probabilities are not {class: number}")
        if not isinstance(label, str) or label not in probabilities:
            raise ValueError("a face's label is not one of its probabilities' classes")
        for name in probabilities:  # drawn with OpenCV: printable, encodable text only (a lone
            name.encode("utf-8")    # surrogate crashes cv2.putText); UnicodeEncodeError is a ValueError
            if not name.isprintable() or len(name) > 64:
                raise ValueError("a face's class names are not printable text of 1-64 characters")
        try:
            values = {k: float(v) for k, v in probabilities.items()}
        except OverflowError:
            raise ValueError("a face's probabilities are out of range") from None
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in values.values()):
            raise ValueError("a face's probabilities are not numbers in [0, 1]")
        return cls(track, box, label, values)


@dataclass
class FrameResult:
    """One frame: every face (largest first, each with its track id); box/label/probabilities
    repeat the largest face's for readers that follow one person."""

    frame: int
    time: float
    faces: list[FaceResult]
    bundle_version: int

    @property
    def main(self) -> FaceResult | None:
        return self.faces[0] if self.faces else None

    @property
    def box(self) -> list[int] | None:
        return self.main.box if self.faces else None

    @property
    def label(self) -> str | None:
        return self.main.label if self.faces else None

    @property
    def probabilities(self) -> dict[str, float] | None:
        return self.main.probabilities if self.faces else None

    def to_json(self) -> str:
        return json.dumps({"frame": self.frame, "time": round(self.time, 3), "box": self.box, "label": self.label,
                           "probabilities": self.probabilities, "faces": [f.to_dict() for f in self.faces],
                           "bundle_version": self.bundle_version})


DEFAULT_DETECT_WIDTH = 320


@dataclass
class FrameAnalyzer:
    """Find every face (FaceTracker: detection on a shrunk copy every few frames, boxes followed
    in between), classify them in one batch, smooth probabilities per track.

    smoothing a in [0, 1): p_t = (1 - a) * p + a * p_{t-1} per track (0 = off); a new track starts
    unsmoothed. detect_every: 0 = automatic, 1 = detect on every frame, N = every N frames.
    detect_width: detect on frames shrunk to this width (0 = full size). tta "flip" / "tencrop":
    each face's probabilities are the mean over its views (emoshield.views; one batch of 2x / 10x
    the faces; the same function as `emoshield evaluate --tta`)."""

    classifier: EmotionClassifier
    smoothing: float = 0.0
    detect_every: int = 0
    min_face: int = 24
    detector: str = "haar"
    detect_width: int = DEFAULT_DETECT_WIDTH
    max_faces: int = 8
    tta: str = "none"
    tracker: FaceTracker = field(init=False, repr=False)
    _last_end: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.check_options(self.smoothing, self.detect_every, self.detect_width, self.max_faces)
        if self.tta not in TTA_MODES:
            raise EmoshieldError(f"--tta is one of {', '.join(TTA_MODES)}, not {self.tta!r}")
        self.tracker = FaceTracker(face_detector(self.detector, self.min_face, self.detect_width),
                                   self.detect_every, self.max_faces)

    @staticmethod
    def check_options(smoothing: float, detect_every: int, detect_width: int, max_faces: int) -> None:
        """One-line errors for out-of-range settings (the CLI checks before loading anything)."""
        if not 0 <= smoothing < 1:
            raise EmoshieldError("--smooth must be in [0, 1)")
        if detect_every < 0:
            raise EmoshieldError("--detect-every must be >= 0 (0 = automatic)")
        if detect_width < 0:
            raise EmoshieldError("--detect-width must be >= 0 (0 = full size)")
        if max_faces < 1:
            raise EmoshieldError("--max-faces must be >= 1")

    def reset_smoothing(self) -> None:
        """A new model may have other classes: every track starts its smoothing again."""
        for track in self.tracker.tracks:
            track.probabilities = None

    def analyze(self, index: int, t: float, frame: np.ndarray) -> FrameResult:
        started = time.perf_counter()
        detections = self.tracker.detections
        tracks = [tr for tr in self.tracker.update(frame) if not tr.lost]
        detected = self.tracker.detections != detections
        track_done = time.perf_counter()
        faces = []
        if tracks:
            batch = np.concatenate([self.classifier.face_tensor(frame, tr.box) for tr in tracks])
            probabilities = mean_probabilities(self.classifier.probabilities(numpy_views(batch, self.tta)), self.tta)
            classes = self.classifier.classes
            for tr, p in zip(tracks, probabilities):
                if self.smoothing and tr.probabilities is not None and len(tr.probabilities) == len(p):
                    p = (1 - self.smoothing) * p + self.smoothing * tr.probabilities
                tr.probabilities = p
                faces.append(FaceResult(tr.id, [int(v) for v in tr.box], classes[int(p.argmax())],
                                        {c: round(float(v), 4) for c, v in zip(classes, p)}))
        # the automatic detection interval weighs detection against the rest of a frame's work,
        # including what happens between our calls (decoding the next frame, writing results)
        end = time.perf_counter()
        outside = started - self._last_end if self._last_end is not None else 0.0
        self._last_end = end
        self.tracker.note_frame_seconds(min(outside, 0.1) + end - (track_done if detected else started))
        return FrameResult(index, t, faces, self.classifier.version)


def annotate(frame: np.ndarray, result: FrameResult) -> np.ndarray:
    """Every face's box, label and track id."""
    for face in result.faces:
        x, y, w, h = face.box
        colour = _TRACK_COLOURS[face.track % len(_TRACK_COLOURS)]
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, 2)
        score = face.probabilities[face.label]
        cv2.putText(frame, f"#{face.track} {face.label} {score:.0%}", (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6, colour, 2)
    return frame


_TRACK_COLOURS = ((0, 200, 0), (0, 160, 255), (255, 128, 0), (200, 0, 200), (0, 220, 220), (255, 255, 255))
