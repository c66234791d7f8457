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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..data.faces import DEFAULT_MARGIN, expand_box, face_detector
from ..data.images import resize_face
from ..errors import EmoshieldError
from .bundle import MANIFEST, ONNX_FP32, ONNX_INT8, BundleError, verify_bundle
from .signing import load_public_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class EmotionClassifier:
    """One bundle's ONNX model (int8 by default) with the preprocessing its manifest names."""

    def __init__(self, bundle_dir: Path, precision: str = "int8", threads: int = 1):
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
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

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {"image": faces})[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def health_check(bundle_dir: Path, precision: str = "int8") -> None:
    """Load the bundle's model and classify a probe image: finite probabilities of the right
    shape, or BundleError. Run before a bundle becomes current."""
    try:
        classifier = EmotionClassifier(bundle_dir, precision)
        probe = np.full((2, 3, classifier.input_size, classifier.input_size), 0.5, dtype=np.float32)
        p = classifier.probabilities(probe)
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
        raise BundleError(f"{bundle_dir}: health check failed ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0][:160]})") from None
    if p.shape != (2, len(classifier.classes)) or not np.isfinite(p).all():
        raise BundleError(f"{bundle_dir}: health check failed (output shape {p.shape} or non-finite values)")


class BundleStore:
    """Verified bundles on the device and which one is current."""

    def __init__(self, root: Path, public_key, health: Callable[[Path], None] = health_check):
        self.root = Path(root)
        self.public_key = load_public_key(Path(public_key)) if isinstance(public_key, (str, Path)) else public_key
        self.health = health
        (self.root / "bundles").mkdir(parents=True, exist_ok=True)

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"current": None, "previous": None}

    def _write_state(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "state.json")

    def current_version(self) -> int | None:
        return self.state()["current"]

    def current_dir(self) -> Path | None:
        version = self.current_version()
        return self.root / "bundles" / f"v{version}" if version is not None else None

    # -- changes --------------------------------------------------------------------------------
    def install(self, source_dir: Path) -> dict:
        """Copy a bundle in, verify it (signature, hashes, version > current), health-check
        it, then make it current; the old current becomes `previous`. On any failure the
        store is unchanged and BundleError says why."""
        state = self.state()
        staging = self.root / "staging"
        staging.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=staging))
        try:
            for item in Path(source_dir).iterdir():
                if item.is_file() and not item.is_symlink():
                    shutil.copyfile(item, work / item.name)
            manifest = verify_bundle(work, self.public_key, min_version=state["current"])
            self.health(work)
            target = self.root / "bundles" / f"v{manifest['version']}"
            if target.exists():
                shutil.rmtree(target)  # a leftover of an install that died before its state change
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._write_state({"current": manifest["version"], "previous": state["current"]})
        return manifest

    def rollback(self, reason: str = "") -> int:
        """Make the previous bundle current again (e.g. the new one failed at run time)."""
        state = self.state()
        if state["previous"] is None:
            raise BundleError("no previous bundle to roll back to" + (f" ({reason})" if reason else ""))
        bad = state["current"]
        self._write_state({"current": state["previous"], "previous": None, "rejected": bad, "reason": reason})
        return state["previous"]


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
    version, or None when nothing changed: edge unreachable (the device goes on offline with
    its last good bundle), nothing newer, or the bundle refused (reason logged)."""
    from .client import ServiceError

    try:
        latest = client.latest_bundle()
        if latest is None or (store.current_version() or 0) >= int(latest["version"]):
            return None
        (store.root / "staging").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=store.root / "staging") as tmp:
            client.fetch_bundle(int(latest["version"]), latest["manifest"], Path(tmp))
            manifest = store.install(Path(tmp))
    except ServiceError as exc:
        log(f"device: edge unreachable or failing, keeping bundle v{store.current_version()} ({exc})")
        return None
    except BundleError as exc:
        log(f"device: refused a bundle, keeping v{store.current_version()}: {exc}")
        return None
    previous = store.state()["previous"]
    log(f"device: installed bundle v{manifest['version']}"
        + (f" (previous v{previous} kept for rollback)" if previous else " (first bundle)"))
    return int(manifest["version"])


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
    link = DeviceLink(broker, me["edge"], me["id"])
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
        health_check(bundle_dir, args.precision)
    else:
        store = BundleStore(Path(args.store) if args.store else cache_dir() / "device", Path(args.pubkey))
        if args.edge:
            from .client import EdgeClient

            if not args.token:
                raise EmoshieldError("--edge needs the device's --token")
            client = EdgeClient(args.edge, args.token)
            sync_from_edge(store, client, log)
            link = connect_mqtt(client, args.mqtt, log)
        bundle_dir = store.current_dir()
        if bundle_dir is None:
            raise EmoshieldError(f"no bundle installed in {store.root} and none could be pulled: "
                                 "give --bundle DIR or an --edge that has published one")
        manifest = verify_bundle(bundle_dir, store.public_key)
    cv2.setNumThreads(args.threads)  # OpenCV's detector threads too: --threads 1 means one core
    log(f"device: {manifest['name']} v{manifest['version']} verified ({args.precision}, "
        f"{manifest['preprocessing']['input_size']} px, classes {', '.join(manifest['classes'])})")
    analyzer = FrameAnalyzer(EmotionClassifier(bundle_dir, args.precision, args.threads), args.smooth,
                             args.detect_every, detector=args.detector, detect_width=args.detect_width)
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

        last_check = [time.monotonic()]
        last_beat = [0.0]
        tried_announced = [0]
        started = time.monotonic()

        def check_for_update() -> None:
            now = time.monotonic()
            if link is not None and now - last_beat[0] >= args.heartbeat:
                last_beat[0] = now
                link.heartbeat({"version": analyzer.classifier.version, "frames": counts["frames"],
                                "fps": counts["frames"] / max(now - started, 1e-9), "faces": counts["faces"]})
            if client is None:
                return
            announced = link.announced if link is not None else None
            if announced and announced > (store.current_version() or 0) and announced > tried_announced[0]:
                tried_announced[0] = announced  # one try per announced version; a refused one is not retried
                log(f"device: bundle v{announced} announced over MQTT")
            elif (not args.poll or now - last_check[0] < args.poll
                  or (link is not None and link.connected.is_set())):
                return  # polling only while no broker is connected
            last_check[0] = now
            if sync_from_edge(store, client, log) is not None:
                analyzer._previous = None  # smoothing restarts: the new model may have other classes
                try:
                    analyzer.classifier = EmotionClassifier(store.current_dir(), args.precision, args.threads)
                except Exception as exc:  # the new bundle passed its probe but fails here: roll back
                    log(f"device: bundle v{store.current_version()} failed to load ({exc}); rolling back to "
                        f"v{store.rollback(str(exc))}")
                    analyzer.classifier = EmotionClassifier(store.current_dir(), args.precision, args.threads)

        summary = run_frames(analyzer, args.source, emit, Path(args.annotate) if args.annotate else None,
                             args.max_frames, check_for_update, loop=args.loop, realtime=args.realtime)
        if link is not None:
            link.heartbeat({"version": analyzer.classifier.version, "frames": summary["frames"],
                            "fps": summary["fps"], "faces": summary["frames_with_face"], "finished": True},
                           wait=2.0)
    finally:
        if out is not sys.stdout:
            out.close()
        if link is not None:
            link.stop()
    summary["peak_rss_mb"] = peak_rss_mb()
    line = (f"device: {summary['frames']} frames ({summary['frames_with_face']} with a face) in "
            f"{summary['seconds']:.2f} s = {summary['fps']:.1f} FPS (decode + detect + classify, "
            f"{args.threads} thread(s), {args.precision})")
    if args.truth:
        scores = score_against_truth(results, Path(args.truth))
        summary.update(scores)
        line += (f"; accuracy {scores['accuracy_on_detected']:.1%} on frames with a face, "
                 f"{scores['accuracy_all_frames']:.1%} on all {scores['frames_scored']} frames")
    line += f"; peak RSS {summary['peak_rss_mb']:.0f} MB"
    print(line, file=sys.stderr, flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps({**summary, "source": args.source, "precision": args.precision,
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
