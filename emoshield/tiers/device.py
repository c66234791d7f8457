"""The IoT device runtime: it never trains and never imports torch (onnxruntime, OpenCV and
numpy only). It keeps verified bundles in a local store, swaps to a new one atomically
only after signature, hashes, a strictly higher version and a health check pass, keeps the
previous one for rollback, and recognises emotions on video frames.

Store layout (one folder):
    bundles/v<N>/     verified bundles, never modified after install
    state.json        {"current": N, "previous": M}, replaced atomically (write + rename)
    staging/          half-copied downloads, discarded on failure
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..data.faces import DEFAULT_MARGIN, expand_box, face_detector
from ..data.images import resize_face
from ..errors import EmoshieldError
from .bundle import (MANIFEST, ONNX_FP32, ONNX_INT8, PROBES, BundleError, BundleVersionError, read_probes,
                     verify_bundle, verify_signature)
from .signing import load_public_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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


def _first_line(exc: Exception) -> str:
    return f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


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
        reason = f"int8 model does not load on this CPU ({_first_line(exc)})"
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
            # small batches: onnxruntime's arena grows to the largest batch it ever ran (RSS)
            predicted = np.concatenate([classifier.logits(images[i:i + 8]) for i in range(0, probes, 8)])
            agreement = float((predicted.argmax(1) == reference.argmax(1)).mean())
        except Exception as exc:
            reason = f"int8 model fails on this CPU ({_first_line(exc)})"
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
        raise BundleError(f"{bundle_dir}: health check failed ({_first_line(exc)})") from None
    if p.shape != (2, len(classifier.classes)) or not np.isfinite(p).all():
        raise BundleError(f"{bundle_dir}: health check failed (output shape {p.shape} or non-finite values)")
    return classifier


class BundleStore:
    """Verified bundles on the device and which one is current.

    Keeps the current and the previous bundle only (older ones are deleted after each install),
    remembers versions it rolled back from so that they are not installed again, and removes
    half-copied downloads left in staging/ by a process that died (kill -9, power loss)."""

    MAX_REJECTED = 32

    def __init__(self, root: Path, public_key, health: Callable[[Path], object] = health_check):
        self.root = Path(root)
        self.public_key = load_public_key(Path(public_key)) if isinstance(public_key, (str, Path)) else public_key
        self.health = health
        (self.root / "bundles").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / "staging", ignore_errors=True)  # leftovers of a process that died mid-download
        for leftover in self.root.glob(".state-*.json"):
            leftover.unlink(missing_ok=True)
        try:
            self._collect_garbage()  # a bundle moved in by an install that died before its state change
        except BundleError:
            pass  # unreadable state: install/rollback report it

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        path = self.root / "state.json"
        if not path.is_file():
            return {"current": None, "previous": None, "rejected": []}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: unreadable store state ({exc.__class__.__name__})") from None
        return {"rejected": [], **state}

    def _write_state(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / "state.json")
        except OSError as exc:  # disk full: the old state.json is still whole
            Path(tmp).unlink(missing_ok=True)
            raise BundleError(f"{self.root}: cannot write the store state ({exc.strerror or exc})") from None

    def current_version(self) -> int | None:
        return self.state()["current"]

    def current_dir(self) -> Path | None:
        version = self.current_version()
        return self.version_dir(version) if version is not None else None

    def version_dir(self, version: int) -> Path:
        return self.root / "bundles" / f"v{int(version)}"

    def staging(self) -> Path:
        """A fresh folder under staging/ for one download (removed by install or at the next start)."""
        (self.root / "staging").mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root / "staging"))

    # -- changes --------------------------------------------------------------------------------
    def install(self, source_dir: Path) -> dict:
        """Copy a bundle in, verify it (signature, hashes, version > current, not rolled back
        from before), health-check it, then make it current; the old current becomes `previous`
        and older bundles are deleted. On any failure, a full disk included, the store is
        unchanged and BundleError says why."""
        state = self.state()
        work = self.staging()
        try:
            for item in Path(source_dir).iterdir():
                if item.is_file() and not item.is_symlink():
                    shutil.copyfile(item, work / item.name)
            manifest = verify_bundle(work, self.public_key, min_version=state["current"])
            if manifest["version"] in state["rejected"]:
                raise BundleVersionError(f"bundle v{manifest['version']} was rolled back from before; not installing "
                                         "it again (publish a newer version)")
            self.health(work)
            target = self.version_dir(manifest["version"])
            if target.exists():
                shutil.rmtree(target)  # a leftover of an install that died before its state change
            os.replace(work, target)
        except OSError as exc:
            raise BundleError(f"{self.root}: cannot install the bundle ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._write_state({**state, "current": manifest["version"], "previous": state["current"]})
        self._collect_garbage()
        return manifest

    def rollback(self, reason: str = "") -> int:
        """Make the previous bundle current again (e.g. the new one failed at run time); the bad
        version is remembered and never installed again."""
        state = self.state()
        if state["previous"] is None:
            raise BundleError("no previous bundle to roll back to" + (f" ({reason})" if reason else ""))
        bad = state["current"]
        rejected = [*state["rejected"], bad][-self.MAX_REJECTED:]
        self._write_state({"current": state["previous"], "previous": None, "rejected": rejected,
                           "reason": reason[:500]})
        return state["previous"]

    def _collect_garbage(self) -> None:
        state = self.state()
        keep = {f"v{v}" for v in (state["current"], state["previous"]) if v is not None}
        for folder in (self.root / "bundles").iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)


# ---- frames in, emotions out -------------------------------------------------------------------

def open_frames(source: str) -> tuple[Iterator[tuple[int, float, np.ndarray]], float]:
    """(frames, fps) for a video file, `camera:N`, or a folder of images (sorted by name, 1 fps
    notional time). Frames are BGR uint8."""
    if source.startswith("camera:"):
        capture = cv2.VideoCapture(int(source.partition(":")[2] or 0))
        if not capture.isOpened():
            raise EmoshieldError(f"cannot open {source}")
        return _capture_frames(capture), float(capture.get(cv2.CAP_PROP_FPS) or 30.0)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EmoshieldError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return _folder_frames(files), 1.0
    if not path.is_file():
        raise EmoshieldError(f"video source {source} does not exist")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise EmoshieldError(f"{path} is not a readable video")
    return _capture_frames(capture), float(capture.get(cv2.CAP_PROP_FPS) or 25.0)


def _capture_frames(capture) -> Iterator[tuple[int, float, np.ndarray]]:
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield index, capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0, frame
            index += 1
    finally:
        capture.release()


def _folder_frames(files: list[Path]) -> Iterator[tuple[int, float, np.ndarray]]:
    for index, path in enumerate(files):
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            continue  # unreadable file: skipped, the frame index still advances
        yield index, float(index), frame


@dataclass
class FrameResult:
    frame: int
    time: float
    box: list[int] | None
    label: str | None
    probabilities: dict[str, float] | None
    bundle_version: int

    def to_json(self) -> str:
        return json.dumps({"frame": self.frame, "time": round(self.time, 3), "box": self.box, "label": self.label,
                           "probabilities": self.probabilities, "bundle_version": self.bundle_version})


@dataclass
class FrameAnalyzer:
    """Detect the largest face, classify it, smooth probabilities over frames.

    smoothing a in [0, 1): p_t = (1 - a) * p + a * p_{t-1} (0 = off); it resets when no face
    is found. detect_every N > 1 reuses the last box for N - 1 frames (detection is the most
    expensive step on a device)."""

    classifier: EmotionClassifier
    smoothing: float = 0.0
    detect_every: int = 1
    min_face: int = 24
    detector: str = "haar"
    detect_width: int = 0  # detect on frames shrunk to this width (0 = full size)
    _previous: np.ndarray | None = field(default=None, repr=False)
    _box: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        if not 0 <= self.smoothing < 1:
            raise EmoshieldError("--smooth must be in [0, 1)")
        if self.detect_every < 1:
            raise EmoshieldError("--detect-every must be >= 1")
        self._detect = face_detector(self.detector, self.min_face, self.detect_width)

    def analyze(self, index: int, t: float, frame: np.ndarray) -> FrameResult:
        if index % self.detect_every == 0 or self._box is None:
            boxes = self._detect(frame)
            self._box = boxes[0] if boxes else None
        if self._box is None:
            self._previous = None
            return FrameResult(index, t, None, None, None, self.classifier.version)
        p = self.classifier.probabilities(self.classifier.face_tensor(frame, self._box))[0]
        if self.smoothing and self._previous is not None:
            p = (1 - self.smoothing) * p + self.smoothing * self._previous
        self._previous = p
        classes = self.classifier.classes
        return FrameResult(index, t, [int(v) for v in self._box], classes[int(p.argmax())],
                           {c: round(float(v), 4) for c, v in zip(classes, p)}, self.classifier.version)


def annotate(frame: np.ndarray, result: FrameResult) -> np.ndarray:
    if result.box is not None:
        x, y, w, h = result.box
        cv2.rectangle(frame, (x, y), (x + w, y + h), (0, 200, 0), 2)
        score = result.probabilities[result.label]
        cv2.putText(frame, f"{result.label} {score:.0%}", (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (0, 200, 0), 2)
    return frame


def _replayed(source: str) -> Iterator[tuple[int, float, np.ndarray]]:
    """A video file or image folder played again and again (frame indices keep counting)."""
    if source.startswith("camera:"):
        raise EmoshieldError("--loop replays a video file or an image folder, not a camera")
    offset, t_offset = 0, 0.0
    while True:
        frames, fps = open_frames(source)
        count = 0
        for index, t, frame in frames:
            yield offset + index, t_offset + t, frame
            count = index + 1
        if count == 0:
            return
        offset, t_offset = offset + count, t_offset + count / fps


def run_frames(analyzer: FrameAnalyzer, source: str, emit: Callable[[FrameResult], None],
               annotated_video: Path | None = None, max_frames: int | None = None,
               between_frames: Callable[[], None] | None = None, loop: bool = False,
               realtime: bool = False) -> dict:
    """Analyze every frame of `source`; returns counts and throughput. `between_frames` runs
    before each frame (update checks); it may replace analyzer.classifier. `loop` replays a
    file source until max_frames; `realtime` paces frames at the source's rate, like a camera."""
    frames, fps = open_frames(source)
    if loop:
        frames.close()
        frames = _replayed(source)
    writer = None
    started = time.perf_counter()
    count = faces = 0
    interrupted = False
    try:
        for index, t, frame in frames:
            if max_frames is not None and count >= max_frames:
                break
            if realtime:
                time.sleep(max(0.0, started + count / fps - time.perf_counter()))
            if between_frames is not None:
                between_frames()
            result = analyzer.analyze(index, t, frame)
            emit(result)
            count += 1
            faces += result.box is not None
            if annotated_video is not None:
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(str(annotated_video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                writer.write(annotate(frame, result))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop cleanly and still report
        interrupted = True
    finally:
        if writer is not None:
            writer.release()
    seconds = time.perf_counter() - started
    return {"frames": count, "frames_with_face": faces, "seconds": seconds,
            "fps": count / seconds if seconds > 0 else 0.0, "bundle_version": analyzer.classifier.version,
            "interrupted": interrupted}


def sync_from_edge(store: BundleStore, client, log: Callable[[str], None]) -> int | None:
    """Install the edge's newest bundle when it is newer than the current one. Returns the new
    version, or None when nothing changed: edge unreachable or answering nonsense (the device
    goes on offline with its last good bundle), nothing newer, a version rolled back from
    before, or the bundle refused (reason logged). Only the signed manifest's files are
    downloaded, each bounded by its signed size."""
    from .client import ServiceError

    try:
        latest = client.latest_bundle()
        state = store.state()
        if latest is None or (state["current"] or 0) >= latest["version"] or latest["version"] in state["rejected"]:
            return None
        download = store.staging()
        try:
            client.fetch_bundle(latest["version"], download, lambda folder: verify_signature(folder, store.public_key))
            manifest = store.install(download)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    except ServiceError as exc:
        log(f"device: edge unreachable or failing, keeping bundle v{store.current_version()} ({exc})")
        return None
    except BundleError as exc:
        log(f"device: refused a bundle, keeping v{store.current_version()}: {exc}")
        return None
    except OSError as exc:  # e.g. the disk filled up during the download
        log(f"device: cannot store the download, keeping v{store.current_version()} ({exc.strerror or exc})")
        return None
    previous = store.state()["previous"]
    log(f"device: installed bundle v{manifest['version']}"
        + (f" (previous v{previous} kept for rollback)" if previous else " (first bundle)"))
    return int(manifest["version"])


class BackgroundUpdate:
    """Syncs with the edge on a worker thread while frames keep being recognised with the
    current bundle; the frame loop picks up the new, self-checked classifier when it is ready."""

    def __init__(self, store: BundleStore, client, load: Callable[[Path], "EmotionClassifier"],
                 log: Callable[[str], None]):
        self.store, self.client, self.load, self.log = store, client, load, log
        self._thread: threading.Thread | None = None
        self._ready: EmotionClassifier | None = None

    def start(self) -> bool:
        """Begin a sync unless one is running; False when one already was."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self._thread = threading.Thread(target=self._run, name="device-update", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        if sync_from_edge(self.store, self.client, self.log) is None:
            return
        try:
            self._ready = self.load(self.store.current_dir())
        except Exception as exc:  # noqa: BLE001 - passed its install check but fails here: roll back
            try:
                self.log(f"device: bundle v{self.store.current_version()} failed to load ({exc}); rolling back to "
                         f"v{self.store.rollback(str(exc))}")
                self._ready = self.load(self.store.current_dir())
            except Exception as again:  # noqa: BLE001 - the frame loop keeps the classifier it has
                self.log(f"device: no update this time ({_first_line(again)}); running on as before")

    def take(self) -> "EmotionClassifier | None":
        """The classifier of a newly installed bundle, once (None while none is ready)."""
        ready, self._ready = self._ready, None
        return ready

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def connect_mqtt(client, mode: str, log: Callable[[str], None]):
    """The device's MQTT link (announcements in, heartbeats out), or None: mode 'off', no broker
    advertised, the edge unreachable, or the broker down (the device then polls over HTTP)."""
    from .client import ServiceError
    from .mqtt import DeviceLink

    if mode == "off":
        return None
    try:
        me = client.me()
    except ServiceError as exc:
        log(f"device: no MQTT (edge unreachable: {exc}); polling over HTTP")
        return None
    broker = me.get("mqtt") if mode == "auto" else mode
    if not broker:
        return None
    link = DeviceLink(broker, me["edge"], me["id"], client.token if me.get("mqtt_auth") == "token" else None)
    if link.start(wait=3.0):
        log(f"device: MQTT connected to {broker} as {me['id']}; updates are announced, not polled")
    else:
        log(f"device: MQTT broker {broker} unreachable; polling the edge over HTTP until it answers")
    return link


def score_against_truth(results: list[FrameResult], truth_file: Path) -> dict:
    """Accuracy of the per-frame labels against `emoshield data video`'s ground truth."""
    truth = json.loads(Path(truth_file).read_text())["frames"]
    scored = [(r.label, truth[r.frame % len(truth)]) for r in results]  # modulo: --loop replays
    detected = [(p, t) for p, t in scored if p is not None]
    return {"frames_scored": len(scored), "detection_rate": len(detected) / len(scored) if scored else 0.0,
            "accuracy_on_detected": sum(p == t for p, t in detected) / len(detected) if detected else 0.0,
            "accuracy_all_frames": sum(p == t for p, t in scored) / len(scored) if scored else 0.0}


def _start_current(store: BundleStore, load: Callable[[Path], EmotionClassifier],
                   log: Callable[[str], None]) -> tuple[EmotionClassifier, dict]:
    """The store's current bundle, verified and loaded; when it fails (corrupted on disk, or its
    model does not run here) and the previous one is intact, roll back to that one instead of
    stopping the device."""
    for attempt in range(2):
        bundle_dir = store.current_dir()
        if bundle_dir is None:
            raise EmoshieldError(f"no bundle installed in {store.root} and none could be pulled: "
                                 "give --bundle DIR or an --edge that has published one")
        try:
            manifest = verify_bundle(bundle_dir, store.public_key)
            return load(bundle_dir), manifest
        except BundleError as exc:
            if attempt or store.state()["previous"] is None:
                raise
            version = store.rollback(f"current bundle refused at start: {exc}")
            log(f"device: current bundle refused ({exc}); rolled back to v{version}")
    raise AssertionError("unreachable")


def run_device_command(args) -> int:
    """`emoshield device run`: choose the bundle (local, or the store's current one), run it."""
    import sys

    from ..paths import cache_dir

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    store = client = link = None
    if args.bundle:
        if args.edge:
            raise EmoshieldError("give --bundle DIR or --edge URL, not both")
        bundle_dir = Path(args.bundle)
        manifest = verify_bundle(bundle_dir, Path(args.pubkey))
    else:
        store = BundleStore(Path(args.store) if args.store else cache_dir() / "device", Path(args.pubkey))
        if args.edge:
            from .client import EdgeClient

            client = EdgeClient(args.edge, args.device_token)
            if store.current_version() is None:  # nothing to run yet: wait for the first bundle
                sync_from_edge(store, client, log)
            link = connect_mqtt(client, args.mqtt, log)
    cv2.setNumThreads(args.threads)  # OpenCV's detector threads too: --threads 1 means one core

    def load(folder: Path) -> EmotionClassifier:
        classifier = health_check(folder, args.precision, args.threads)
        log(f"device: v{classifier.version}: {classifier.check.describe()}")
        return classifier

    if store is None:
        classifier = load(bundle_dir)
    else:
        classifier, manifest = _start_current(store, load, log)
    update = BackgroundUpdate(store, client, load, log) if client is not None else None
    if update is not None and classifier.version == store.current_version():
        update.start()  # is there something newer? asked while the current bundle already runs
    log(f"device: {manifest['name']} v{manifest['version']} verified ({classifier.precision}, "
        f"{manifest['preprocessing']['input_size']} px, classes {', '.join(manifest['classes'])})")
    analyzer = FrameAnalyzer(classifier, args.smooth, args.detect_every, detector=args.detector,
                             detect_width=args.detect_width)
    results: list[FrameResult] = []  # kept only to score against --truth (a camera runs for days)
    counts = {"frames": 0, "faces": 0}
    out = open(args.jsonl, "w", buffering=1) if args.jsonl else sys.stdout  # line-buffered: tail -f works
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        def emit(result: FrameResult) -> None:
            counts["frames"] += 1
            counts["faces"] += result.box is not None
            if args.truth:
                results.append(result)
            print(result.to_json(), file=out)

        def running() -> dict:
            classifier = analyzer.classifier
            return {"version": classifier.version, "precision": classifier.precision,
                    "self_check": classifier.check.to_dict()}

        last_check = [time.monotonic()]
        last_beat = [0.0]
        seen_announcements = [0]
        started = time.monotonic()

        def check_for_update() -> None:
            now = time.monotonic()
            if link is not None and now - last_beat[0] >= args.heartbeat:
                last_beat[0] = now
                link.heartbeat({**running(), "frames": counts["frames"],
                                "fps": counts["frames"] / max(now - started, 1e-9), "faces": counts["faces"]})
            if client is None:
                return
            ready = update.take()
            if ready is not None:
                analyzer._previous = None  # smoothing restarts: the new model may have other classes
                analyzer.classifier = ready
            fresh = False
            if link is not None and link.announcements != seen_announcements[0]:
                seen_announcements[0] = link.announcements  # one check per announcement, never a high-water mark
                fresh = (link.announced or 0) > (store.current_version() or 0)
            if fresh:
                log(f"device: bundle v{link.announced} announced over MQTT")
            elif (not args.poll or now - last_check[0] < args.poll
                  or (link is not None and link.connected.is_set())):
                return  # polling only while no broker is connected
            last_check[0] = now
            update.start()  # downloads on its own thread: frames go on with the current bundle

        summary = run_frames(analyzer, args.source, emit, Path(args.annotate) if args.annotate else None,
                             args.max_frames, check_for_update, loop=args.loop, realtime=args.realtime)
        if update is not None:
            update.join(timeout=5.0)  # let a quick check finish and log; a long download is abandoned
        if link is not None:
            link.heartbeat({**running(), "frames": summary["frames"],
                            "fps": summary["fps"], "faces": summary["frames_with_face"], "finished": True},
                           wait=2.0)
    finally:
        if out is not sys.stdout:
            out.close()
        if link is not None:
            link.stop()
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["precision"] = analyzer.classifier.precision
    summary["self_check"] = analyzer.classifier.check.to_dict()
    line = (f"device: {summary['frames']} frames ({summary['frames_with_face']} with a face) in "
            f"{summary['seconds']:.2f} s = {summary['fps']:.1f} FPS (decode + detect + classify, "
            f"{args.threads} thread(s), {summary['precision']}"
            + (" after the int8 self-check failed" if analyzer.classifier.check.fell_back else "") + ")")
    if args.truth:
        scores = score_against_truth(results, Path(args.truth))
        summary.update(scores)
        line += (f"; accuracy {scores['accuracy_on_detected']:.1%} on frames with a face, "
                 f"{scores['accuracy_all_frames']:.1%} on all {scores['frames_scored']} frames")
    line += f"; peak RSS {summary['peak_rss_mb']:.0f} MB"
    print(line, file=sys.stderr, flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps({**summary, "source": args.source,
                                                  "requested_precision": args.precision,
                                                  "threads": args.threads, "detector": args.detector,
                                                  "detect_every": args.detect_every,
                                                  "detect_width": args.detect_width}, indent=1))
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM of its own address space. (ru_maxrss
    survives exec on Linux, so a device started by a big parent, e.g. a torch benchmark,
    would report the parent's footprint.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
