"""`emoshield device run`: frames from a video, camera or image folder through the recognizer,
out as JSON lines, an annotated video and MQTT heartbeats, while updates arrive in the
background; the summary says what ran, how fast and in which precision."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..errors import EmoshieldError
from ..tiers.bundle import BundleError, verify_bundle
from ..tiers.wire import finite
from .recognizer import EmotionClassifier, FrameAnalyzer, FrameResult, annotate, health_check
from .store import BundleStore
from .sync import BackgroundUpdate, EdgeSync

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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
    width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if width * height > MAX_FRAME_PIXELS:
        capture.release()
        raise EmoshieldError(f"{path}: frames of {width:.0f} x {height:.0f} pixels; the device decodes at most "
                             f"{MAX_FRAME_PIXELS}")
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


# the largest frame the device decodes (8K video is 33 Mpixels): a small PNG or JPEG can declare
# 1 Gpixel, which OpenCV would allocate 3 GB for
MAX_FRAME_PIXELS = 40_000_000
MAX_FRAME_FILE_BYTES = 256_000_000


def _folder_frames(files: list[Path]) -> Iterator[tuple[int, float, np.ndarray]]:
    """Each image file as a frame; one that is unreadable, too big a file or declares more than
    MAX_FRAME_PIXELS in its PNG/JPEG header is skipped (one line), the frame index still advances."""
    from ..data.images import decode_image, image_size

    for index, path in enumerate(files):
        try:
            if path.stat().st_size > MAX_FRAME_FILE_BYTES:
                raise ValueError(f"over {MAX_FRAME_FILE_BYTES} bytes")
            data = path.read_bytes()
        except (OSError, ValueError) as error:
            print(f"device: frame {path.name} skipped ({error})", file=sys.stderr, flush=True)
            continue
        size = image_size(data)
        if size is not None and size[0] * size[1] > MAX_FRAME_PIXELS:
            print(f"device: frame {path.name} skipped (it declares {size[0]} x {size[1]} pixels; the limit is "
                  f"{MAX_FRAME_PIXELS})", file=sys.stderr, flush=True)
            continue
        frame = decode_image(data, cv2.IMREAD_COLOR)
        if frame is None:
            continue  # unreadable file: skipped, the frame index still advances
        yield index, float(index), frame


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
    count = faces = with_face = 0
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
            faces += len(result.faces)
            with_face += bool(result.faces)
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
    tracker = analyzer.tracker
    return {"frames": count, "frames_with_face": with_face, "faces": faces, "seconds": seconds,
            "fps": count / seconds if seconds > 0 else 0.0, "bundle_version": analyzer.classifier.version,
            "detections": tracker.detections, "detect_interval_last": tracker.interval,
            "interrupted": interrupted}


MAX_RESULT_LINE = 1 << 20  # a frame record is a few hundred bytes per face


def read_results(jsonl: Path) -> dict[int, list]:
    """Frame index -> faces, from the JSON lines `device run --jsonl` wrote, read a line at a time
    (a line over MAX_RESULT_LINE is refused unread). A line that is not one of them stops with the
    line's number (a last line cut short by a killed run is skipped)."""
    from .recognizer import FaceResult

    faces: dict[int, list] = {}
    try:
        stream = open(jsonl, "rb")
    except OSError as exc:
        raise EmoshieldError(f"--jsonl {jsonl}: {exc.strerror or exc}") from None
    with stream:
        number = 0
        while True:
            try:
                line = stream.readline(MAX_RESULT_LINE + 1)
            except OSError as exc:
                raise EmoshieldError(f"--jsonl {jsonl}: {exc.strerror or exc}") from None
            if not line:
                return faces
            number += 1
            last = not line.endswith(b"\n")
            if len(line) > MAX_RESULT_LINE:
                raise EmoshieldError(f"--jsonl {jsonl}, line {number}: longer than {MAX_RESULT_LINE} bytes, "
                                     "not a `device run` frame record")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or type(record.get("frame")) is not int or record["frame"] < 0:
                    raise ValueError("not a frame record")
                faces[record["frame"]] = [FaceResult.from_dict(f) for f in record.get("faces") or []]
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if last and isinstance(exc, json.JSONDecodeError):
                    continue  # no newline after it: the last line of a run killed mid-write
                reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
                raise EmoshieldError(f"--jsonl {jsonl}, line {number}: not a `device run` frame record ({reason})") \
                    from None


def annotate_video(source: str, jsonl: Path, out: Path) -> dict:
    """Draw a finished run's faces on its source frames: the annotated video as a second pass,
    so the device itself carries no video encoder (about 20 MB of peak RSS)."""
    if Path(source).exists() and Path(out).exists() and os.path.samefile(source, out):
        raise EmoshieldError(f"--out {out} is the source video: write the annotated copy elsewhere")
    faces = read_results(jsonl)
    if not faces:
        raise EmoshieldError(f"--jsonl {jsonl} holds no frame records")
    frames, fps = open_frames(source)
    writer = None
    count = drawn = 0
    try:
        for index, t, frame in frames:
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                if not writer.isOpened():
                    raise EmoshieldError(f"cannot write a video to {out}")
            found = faces.get(index, [])
            writer.write(annotate(frame, FrameResult(index, t, found, 0)))
            count += 1
            drawn += len(found)
    finally:
        if writer is not None:
            writer.release()
    matched = len(faces.keys() & set(range(count)))
    if matched < len(faces):
        Path(out).unlink(missing_ok=True)
        raise EmoshieldError(f"{len(faces) - matched} frame records of {jsonl} are past the end of {source} "
                             f"({count} frames): not this video's run")
    return {"frames": count, "faces": drawn, "out": str(out)}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def connect_mqtt(client, mode: str, log: Callable[[str], None]):
    """The device's MQTT link (announcements in, heartbeats out), or None: mode 'off', no broker
    advertised, the edge unreachable, or the broker down (the device then polls over HTTP)."""
    from ..tiers.client import ServiceError
    from ..tiers.mqtt import DeviceLink
    from ..tiers.wire import parse_me

    if mode == "off":
        return None
    try:
        me = parse_me(client.me())
    except ServiceError as exc:
        log(f"device: no MQTT (edge unreachable: {exc}); polling over HTTP")
        return None
    except EmoshieldError as exc:  # a proxy's empty page, another service, a lying edge
        log(f"device: no MQTT (the edge's /me answer does not fit: {exc}); polling over HTTP")
        return None
    broker = me["mqtt"] if mode == "auto" else mode
    if not broker:
        return None
    try:
        link = DeviceLink(broker, me["edge"], me["id"], client.token if me["mqtt_auth"] == "token" else None)
    except EmoshieldError as exc:  # the edge's address does not parse (the user's own --mqtt is an error)
        if mode != "auto":
            raise
        log(f"device: no MQTT (the edge's {exc}); polling over HTTP")
        return None
    if link.start(wait=3.0):
        log(f"device: MQTT connected to {broker} as {me['id']}; updates are announced, not polled")
    else:
        log(f"device: MQTT broker {broker} unreachable; polling the edge over HTTP until it answers")
    return link


MAX_TRUTH_BYTES = 64_000_000


def load_truth(truth_file: Path) -> dict:
    """`emoshield data video`'s ground truth, checked before the run starts (not after it, when a
    bad file would lose the run's scores): {"frames": [label or null, ...] (non-empty), and
    optionally "faces": per frame a list of {"box": [x, y, w, h], "label", "slot"}}. Anything
    else is a one-line EmoshieldError naming the file."""
    from ..paths import read_json

    path = Path(truth_file)
    try:
        truth = read_json(path, MAX_TRUTH_BYTES)
    except EmoshieldError as error:
        raise EmoshieldError(f"--truth {error}") from None

    def face(f) -> bool:
        return isinstance(f, dict) and isinstance(f.get("label"), str) and isinstance(f.get("slot"), int) \
            and isinstance(f.get("box"), list) and len(f["box"]) == 4 \
            and all(finite(v, -math.inf, math.inf) is not None for v in f["box"])

    frames = truth.get("frames") if isinstance(truth, dict) else None
    if not isinstance(frames, list) or not frames or not all(f is None or isinstance(f, str) for f in frames):
        raise EmoshieldError(f"--truth {path}: needs \"frames\", a non-empty list of labels (or null)")
    faces = truth.get("faces")
    if faces is not None and (not isinstance(faces, list) or not faces
                              or not all(isinstance(fs, list) and all(face(f) for f in fs) for fs in faces)):
        raise EmoshieldError(f"--truth {path}: \"faces\" must be per frame a list of {{box, label, slot}}")
    if faces is None:
        truth.pop("faces", None)  # null: as if absent, labels per frame only
    return truth


def score_against_truth(results: list[FrameResult], truth: dict) -> dict:
    """Accuracy against `emoshield data video`'s ground truth (load_truth's): of the largest face's
    label per frame, and, where the truth has every face's box, of every face (each true face is
    matched to the reported face overlapping it most) with the track ids seen per true slot."""
    from .tracking import iou

    frames = truth["frames"]
    scored = [(r.label, frames[r.frame % len(frames)]) for r in results]  # modulo: --loop replays
    scored = [(p, t) for p, t in scored if t is not None]
    detected = [(p, t) for p, t in scored if p is not None]
    out = {"frames_scored": len(scored), "detection_rate": len(detected) / len(scored) if scored else 0.0,
           "accuracy_on_detected": sum(p == t for p, t in detected) / len(detected) if detected else 0.0,
           "accuracy_all_frames": sum(p == t for p, t in scored) / len(scored) if scored else 0.0}
    if "faces" not in truth:
        return out
    faces = found = right = 0
    tracks: dict[int, list[int]] = {}
    for r in results:
        for true in truth["faces"][r.frame % len(truth["faces"])]:
            faces += 1
            best = max(r.faces, key=lambda f: iou(tuple(f.box), tuple(true["box"])), default=None)
            if best is None or iou(tuple(best.box), tuple(true["box"])) < 0.3:
                continue
            found += 1
            right += best.label == true["label"]
            tracks.setdefault(true["slot"], []).append(best.track)
    switches = sum(sum(a != b for a, b in zip(ids, ids[1:])) for ids in tracks.values())
    out.update(faces_scored=faces, face_detection_rate=found / faces if faces else 0.0,
               face_accuracy_on_detected=right / found if found else 0.0,
               face_accuracy_all=right / faces if faces else 0.0,
               track_ids_per_slot={str(k): sorted(set(v)) for k, v in sorted(tracks.items())},
               track_switches=switches)
    return out


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
            manifest = store.verify(bundle_dir)
            version = int(manifest["version"])
            return store.take_checked(version) or load(bundle_dir), manifest
        except BundleError as exc:
            if attempt or store.state()["previous"] is None:
                raise
            version = store.rollback(f"current bundle refused at start: {exc}")
            log(f"device: current bundle refused ({exc}); rolled back to v{version}")
    raise AssertionError("unreachable")


def run_device_command(args) -> int:
    """`emoshield device run`: choose the bundle (local, or the store's current one), run it."""
    from ..paths import cache_dir

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    FrameAnalyzer.check_options(args.smooth, args.detect_every, args.detect_width, args.max_faces)
    truth = load_truth(Path(args.truth)) if args.truth else None
    cv2.setNumThreads(args.threads)  # OpenCV's detector threads too: --threads 1 means one core

    def load(folder: Path) -> EmotionClassifier:
        classifier = health_check(folder, args.precision, args.threads)
        log(f"device: v{classifier.version}: {classifier.check.describe()}")
        return classifier  # the health check of every install too: self-checked once

    store = client = link = sync = None
    if args.bundle:
        if args.edge:
            raise EmoshieldError("give --bundle DIR or --edge URL, not both")
        bundle_dir = Path(args.bundle)
        manifest = verify_bundle(bundle_dir, Path(args.pubkey))
    else:
        store = BundleStore(Path(args.store) if args.store else cache_dir() / "device", Path(args.pubkey), health=load)
        if args.edge:
            from ..tiers.client import EdgeClient
            from .sync import read_trust_root

            if not args.trust_root:
                raise EmoshieldError("--edge needs --trust-root FILE: the edge's trust/metadata/1.root.json, copied "
                                     "to the device out of band (it anchors every update's signatures)")
            client = EdgeClient(args.edge, args.device_token)
            sync = EdgeSync(store, client, read_trust_root(Path(args.trust_root)), log)
            if store.current_version() is None:  # nothing to run yet: wait for the first bundle
                sync.sync()
            link = connect_mqtt(client, args.mqtt, log)
    if store is None:
        classifier = load(bundle_dir)
    else:
        classifier, manifest = _start_current(store, load, log)
    update = BackgroundUpdate(sync, load) if sync is not None else None
    if update is not None and classifier.version == store.current_version():
        update.start()  # is there something newer? asked while the current bundle already runs
    log(f"device: {manifest['name']} v{manifest['version']} verified ({classifier.precision}, "
        f"{manifest['preprocessing']['input_size']} px, classes {', '.join(manifest['classes'])})")
    analyzer = FrameAnalyzer(classifier, args.smooth, args.detect_every, detector=args.detector,
                             detect_width=args.detect_width, max_faces=args.max_faces, tta=args.tta)
    results: list[FrameResult] = []  # kept only to score against --truth (a camera runs for days)
    counts = {"frames": 0, "faces": 0, "frames_with_face": 0}
    # faces per emotion since the last heartbeat: the edge's live timeline (counts, never images)
    interval_emotions: dict[str, int] = {}
    out = open(args.jsonl, "w", buffering=1) if args.jsonl else sys.stdout  # line-buffered: tail -f works
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        def emit(result: FrameResult) -> None:
            counts["frames"] += 1
            counts["faces"] += len(result.faces)
            counts["frames_with_face"] += bool(result.faces)
            counts["faces_now"] = len(result.faces)
            for face in result.faces:
                interval_emotions[face.label] = interval_emotions.get(face.label, 0) + 1
            if args.truth:
                results.append(result)
            print(result.to_json(), file=out)

        def running() -> dict:
            classifier = analyzer.classifier
            return {"version": classifier.version, "precision": classifier.precision,
                    "self_check": classifier.check.to_dict(),
                    **({"updates": sync.status.to_dict()} if sync is not None else {})}

        last_check = [time.monotonic()]
        last_beat = [0.0]  # the first heartbeat goes out with the first frame
        interval_start = [time.monotonic()]
        seen_announcements = [0]
        started = time.monotonic()

        last_metrics = [time.monotonic()]

        def live(now: float) -> dict:  # what a heartbeat and the --metrics file report mid-run
            return {**running(), **counts, "fps": counts["frames"] / max(now - started, 1e-9)}

        def beat(now: float, **extra) -> dict:
            """A heartbeat: the live state plus the faces per emotion seen since the last one."""
            payload = {**live(now), "emotions": dict(interval_emotions),
                       "interval": round(now - interval_start[0], 3), **extra}
            interval_emotions.clear()
            last_beat[0] = interval_start[0] = now
            return payload

        def check_for_update() -> None:
            now = time.monotonic()
            if args.metrics and now - last_metrics[0] >= args.heartbeat:
                last_metrics[0] = now
                write_metrics(Path(args.metrics), live(now))
            if link is not None and now - last_beat[0] >= args.heartbeat:
                link.heartbeat(beat(now))
            if client is None:
                return
            ready = update.take()
            if ready is not None:
                analyzer.reset_smoothing()  # the new model may have other classes
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
            link.heartbeat(beat(time.monotonic(), fps=summary["fps"], finished=True), wait=2.0)
    finally:
        if out is not sys.stdout:
            out.close()
        if link is not None:
            link.stop()
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["precision"] = analyzer.classifier.precision
    summary["tta"] = analyzer.tta
    summary["self_check"] = analyzer.classifier.check.to_dict()
    if sync is not None:
        summary["updates"] = sync.status.to_dict()
    if args.metrics:
        write_metrics(Path(args.metrics), {**summary, "version": analyzer.classifier.version})
    line = (f"device: {summary['frames']} frames ({summary['frames_with_face']} with a face, {summary['faces']} "
            f"faces, {summary['detections']} detections) in "
            f"{summary['seconds']:.2f} s = {summary['fps']:.1f} FPS (decode + detect + classify, "
            f"{args.threads} thread(s), {summary['precision']}"
            + (" after the int8 self-check failed" if analyzer.classifier.check.fell_back else "") + ")")
    if args.truth:
        scores = score_against_truth(results, truth)
        summary.update(scores)
        line += (f"; accuracy {scores['accuracy_on_detected']:.1%} on frames with a face, "
                 f"{scores['accuracy_all_frames']:.1%} on all {scores['frames_scored']} frames")
        if "faces_scored" in scores:
            line += (f"; every face: {scores['face_accuracy_on_detected']:.1%} of {scores['faces_scored']} "
                     f"({scores['face_detection_rate']:.1%} found, {scores['track_switches']} track switches)")
    line += f"; peak RSS {summary['peak_rss_mb']:.0f} MB"
    print(line, file=sys.stderr, flush=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps({**summary, "source": args.source,
                                                  "requested_precision": args.precision,
                                                  "threads": args.threads, "detector": args.detector,
                                                  "detect_every": args.detect_every,
                                                  "detect_width": args.detect_width,
                                                  "max_faces": args.max_faces}, indent=1))
    return 0


def metrics_text(state: dict) -> str:
    """The run's state in Prometheus text format, under the edge's names where they apply
    (emoshield_device_running_version), for node_exporter's textfile collector. Written by hand:
    prometheus-client would add to the device's memory for a dozen lines."""
    check = state.get("self_check") or {}
    values = [("emoshield_device_running_version", "gauge", "Bundle version the device is running",
               state.get("version")),
              ("emoshield_device_frames_total", "counter", "Frames analysed", state.get("frames")),
              ("emoshield_device_faces_total", "counter", "Faces recognised", state.get("faces")),
              ("emoshield_device_frames_with_face_total", "counter", "Frames with at least one face",
               state.get("frames_with_face")),
              ("emoshield_device_fps", "gauge", "Frames per second (decode + detect + classify)", state.get("fps")),
              ("emoshield_device_int8", "gauge", "1 when the int8 model is served, 0 for fp32",
               None if state.get("precision") is None else int(state["precision"] == "int8")),
              ("emoshield_device_self_check_agreement", "gauge", "int8 vs fp32 agreement on the probe faces",
               check.get("agreement")),
              ("emoshield_device_peak_rss_bytes", "gauge", "Peak resident memory",
               None if state.get("peak_rss_mb") is None else state["peak_rss_mb"] * 2**20)]
    lines = []
    for name, kind, help_text, value in values:
        if value is None:
            continue
        family = name.removesuffix("_total") if kind == "counter" else name  # the format's family name
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} {kind}", f"{name} {float(value)!r}"]
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, state: dict) -> None:
    """Atomically (a scraper never reads half a file); a full disk is logged, the run goes on."""
    from ..paths import write_atomic

    try:
        write_atomic(path, metrics_text(state).encode())
        os.chmod(path, 0o644)  # a scraper runs as another user; nothing secret in it
    except OSError as exc:
        print(f"device: --metrics {path}: {exc.strerror or exc}", file=sys.stderr, flush=True)


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
