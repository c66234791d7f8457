"""Hostile input at every boundary that needs no trained model: remote values (versions,
hashes, tokens, file names), image headers and decompression bombs, MQTT payloads on both
topics (against a real Mosquitto), lying HTTP peers (a real server on 127.0.0.1), the device
store under a full disk and after kill -9. Each answer is a one-line error or a dropped
message; nothing raises past its boundary and every loop stays alive."""

import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emoshield.tiers.client import EdgeClient, ServiceError, download, request
from emoshield.data.images import image_size
from emoshield.tiers.edge import UploadError, UploadTooLarge, check_image
from emoshield.tiers.mqtt import DeviceLink, EdgeAnnouncer
from emoshield.tiers.store import EdgeStore
from emoshield.tiers.wire import MAX_VERSION, RemoteValueError, parse_file_name, parse_sha256, parse_token, parse_version
from tests.test_mqtt import wait_for

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


# ---- remote values ---------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(JSON)
def test_a_version_is_an_int_in_range_or_a_one_line_refusal(value):
    try:
        parsed = parse_version(value)
    except RemoteValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200
        assert isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VERSION
    else:
        assert parsed == value and type(parsed) is int and 0 <= parsed <= MAX_VERSION


@pytest.mark.parametrize("value", [10**20, float("inf"), 1e999, -1, True, "7", 7.0, None, [1], {"v": 1}])
def test_versions_peers_have_sent_are_refused(value):
    with pytest.raises(RemoteValueError):
        parse_version(value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_hashes_and_file_names_never_let_a_path_through(text):
    for parse in (parse_sha256, parse_file_name):
        try:
            parsed = parse(text)
        except RemoteValueError:
            continue
        assert "/" not in parsed and "\\" not in parsed and not parsed.startswith(".") and parsed.isascii()


def test_tokens_refuse_empty_whitespace_and_non_ascii():
    for bad in ("", "   ", "\xa0", "\xe9" * 20, "tab\there-and-more", "a b c d e f g h i j k l", "x" * 513):
        with pytest.raises(RemoteValueError):
            parse_token(bad, min_length=12)
    assert parse_token("  a-token-of-16-chars \n", min_length=12) == "a-token-of-16-chars"


# ---- images: header checks before any decoding -------------------------------------------------

def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale: tiny raw size
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows or b"", 9)) + chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(cv2.imencode(".jpg", np.full((32, 32), 128, np.uint8))[1].tobytes())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_image_size_reads_png_and_jpeg_headers():
    face = np.full((40, 30), 200, np.uint8)
    assert image_size(cv2.imencode(".png", face)[1].tobytes()) == (30, 40)
    assert image_size(cv2.imencode(".jpg", face)[1].tobytes()) == (30, 40)
    assert image_size(_jpeg_declaring(32768, 32768)) == (32768, 32768)
    assert image_size(b"\x89PNG\r\n\x1a\n") is None and image_size(b"\xff\xd8\xff") is None


def _tiff_declaring(width: int, height: int) -> bytes:
    """A 1 kB TIFF whose header declares width x height pixels (its strips hold 8 x 8)."""
    data = bytearray(cv2.imencode(".tiff", np.full((8, 8, 3), 100, np.uint8))[1].tobytes())
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for k in range(struct.unpack(order + "H", data[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * k
        tag, kind = struct.unpack(order + "HH", data[at:at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = width if tag == 256 else height
            data[at + 8:at + 12] = struct.pack(order + "HH", value, 0) if kind == 3 else struct.pack(order + "I", value)
    return bytes(data)


def test_a_tiff_frame_over_the_pixel_limit_is_skipped_not_decoded(tmp_path):
    """TIFF has no header check of ours: OpenCV's own pixel limit, which emoshield lowers from
    2**30 to 64 Mi before any module imports cv2, refuses it (OpenCV raises there; the reader takes
    that as an unreadable frame). A fresh process, as `device run` is: the limit is read at import."""
    (tmp_path / "a.tiff").write_bytes(_tiff_declaring(20000, 20000))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((40, 40, 3), 9, np.uint8))
    # peak RSS from /proc (VmHWM starts afresh at exec; ru_maxrss would carry the forking test worker's)
    script = ("import emoshield\nfrom emoshield.device.run import open_frames\n"
              f"frames, _ = open_frames({str(tmp_path)!r})\n"
              "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
              "print([(i, f.shape) for i, _, f in frames], peak // 1024)")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    for limit, decoded in ((None, False), (str(2**30), True)):  # ours, then OpenCV's default
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**env, **({"OPENCV_IO_MAX_IMAGE_PIXELS": limit} if limit else {})})
        assert proc.returncode == 0, proc.stderr
        frames, peak_mb = proc.stdout.rsplit("] ", 1)
        assert frames == "[(1, (40, 40, 3))", proc.stdout
        assert decoded or int(peak_mb) < 600, proc.stdout  # (under OpenCV's own limit it may take 1.2 GB)
        # under our limit OpenCV refuses the header; under its own it allocates and tries the strips
        assert ("TIFFReadRGBAStrip" in proc.stderr) is decoded, proc.stderr


def test_the_device_skips_frame_files_that_declare_too_many_pixels(tmp_path, capsys):
    """An image folder as the device's source: a 600-byte JPEG declaring 32768 x 32768 pixels (3 GB
    to decode) is skipped with one line before any decoding, as an unreadable file is; the faces
    around it are frames with their own indices."""
    from emoshield.device.run import open_frames

    face = cv2.imencode(".png", np.full((60, 50, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "a.png").write_bytes(face)
    (tmp_path / "b.jpg").write_bytes(_jpeg_declaring(32768, 32768))
    (tmp_path / "c.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "d.png").write_bytes(face)
    frames, _fps = open_frames(str(tmp_path))
    assert [(index, frame.shape) for index, _t, frame in frames] == [(0, (60, 50, 3)), (3, (60, 50, 3))]
    assert capsys.readouterr().err.strip().splitlines() == [
        "device: frame b.jpg skipped (it declares 32768 x 32768 pixels; the limit is 40000000)"]


def test_decompression_bombs_are_refused_from_the_header_without_decoding():
    bomb = _png(32768, 32768, (b"\x00" + b"\x00" * 4096) * 32768)  # decodes to 1 Gpixel
    assert len(bomb) < 2_000_000
    small_jpeg_bomb = _jpeg_declaring(32768, 32768)
    assert len(small_jpeg_bomb) < 1000
    for data in (bomb, small_jpeg_bomb, _png(60000, 60000)):
        started = time.perf_counter()
        with pytest.raises(UploadTooLarge, match="pixels"):
            check_image(data, 2_000_000)
        assert time.perf_counter() - started < 0.5  # nothing was decoded
    with pytest.raises(UploadError, match="size header"):
        check_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, 2_000_000)
    assert check_image(cv2.imencode(".png", np.full((48, 48), 9, np.uint8))[1].tobytes(), 2_000_000) == "png"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b""]), st.binary(max_size=400))
def test_any_bytes_get_a_verdict_never_an_exception(prefix, rest):
    try:
        check_image(prefix + rest, 100_000)
    except UploadError as exc:
        assert "\n" not in str(exc)


# ---- MQTT payloads on both topics (real broker) ----------------------------------------------

def test_edge_heartbeat_loop_survives_hostile_payloads(broker, tmp_path):
    store = EdgeStore(tmp_path / "edge")
    device_id, _ = store.enrol("camera-a")
    announcer = EdgeAnnouncer(broker, "edge-h", store.record_heartbeat)
    link = DeviceLink(broker, "edge-h", device_id)
    try:
        assert announcer.start() and link.start()
        topic = f"emoshield/edge-h/devices/{device_id}/heartbeat"
        for payload in (b'{"version": 100000000000000000000}', b'{"version": 1e999}', b"\xff\xfe",
                        b"[" * 100_000, b'{"version": "7"}', b"x" * 20_000, b'{"version": -3}', b"null"):
            link.client.publish(topic, payload, qos=1).wait_for_publish(5)
        link.heartbeat({"version": 5, "frames": 1})
        assert wait_for(lambda: store.devices()[0]["running_version"] == 5)
        # the loop thread is alive: the next heartbeat is recorded too, and an announcement goes out
        link.heartbeat({"version": 6})
        assert wait_for(lambda: store.devices()[0]["running_version"] == 6)
    finally:
        link.stop()
        announcer.stop()


def test_a_failing_heartbeat_handler_drops_the_message_and_says_why():
    def broken(device, payload):
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    announcer = EdgeAnnouncer("127.0.0.1:1", "e", broken)  # never started: the callback is driven directly
    announcer._heartbeat(SimpleNamespace(payload=b'{"version": 1}', topic="emoshield/e/devices/d/heartbeat"), broken)
    assert announcer.dropped == 1 and "OverflowError" in announcer.last_drop


def test_store_drops_heartbeats_whose_values_do_not_fit():
    store_values = [10**20, -1, True, "7", 1.5]
    store = EdgeStore(Path(os.environ.get("TMPDIR", "/tmp")) / f"hb-{os.getpid()}-{time.time_ns()}")
    device_id, _ = store.enrol("cam")
    for version in store_values:
        assert not store.record_heartbeat(device_id, {"version": version})
    assert not store.record_heartbeat(device_id, {"version": 1, "fps": float("inf")})
    assert store.record_heartbeat(device_id, {"version": 2, "fps": 3.5})
    assert store.devices()[0]["running_version"] == 2


def _message(payload: bytes):
    return SimpleNamespace(payload=payload, topic="emoshield/e/model")


def test_device_announcements_are_hints_not_high_water_marks():
    link = DeviceLink("127.0.0.1:1", "e", "d")  # never started: the callback is driven directly
    for payload in (b'{"version": 1e999}', b'{"version": 100000000000000000000}', b"garbage", b'{"v": 1}',
                    b'{"version": 0}', b"[" * 50_000):
        link._on_model(None, None, _message(payload))
    assert link.announced is None and link.announcements == 0
    link._on_model(None, None, _message(b'{"version": 1000000000}'))  # forged, retained on the broker
    link._on_model(None, None, _message(b'{"version": 3}'))  # the edge's real next version
    assert link.announced == 3 and link.announcements == 2


# ---- lying HTTP peers (a real server on 127.0.0.1) ---------------------------------------------

class LyingEdge(http.server.ThreadingHTTPServer):
    """Answers every GET from `routes`: path -> (status, body bytes, seconds between 1-byte chunks)."""

    def __init__(self, routes: dict):
        self.routes = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 - the handler instance
                status, body, trickle = self.routes.get(handler.path, (404, b'{"detail": "no"}', 0))
                handler.send_response(status)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                try:
                    if trickle:
                        for i in range(len(body)):
                            handler.wfile.write(body[i:i + 1])
                            handler.wfile.flush()
                            time.sleep(trickle)
                    else:
                        handler.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def lying_edge():
    server = LyingEdge({})
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b'{"version": "latest"}', b'{"version": 1e999}',
                                  b'{"version": 3}', b'{"version": 3, "manifest": []}', b"[" * 10_000, b""])
def test_a_malformed_latest_answer_is_a_service_error(lying_edge, body):
    lying_edge.routes["/bundles/latest"] = (200, body, 0)
    with pytest.raises(ServiceError):
        EdgeClient(lying_edge.url, "device-token-123").latest_bundle()


def test_downloads_stop_at_their_signed_size_and_their_deadline(lying_edge, tmp_path):
    lying_edge.routes["/big"] = (200, b"x" * 3_000_000, 0)
    lying_edge.routes["/slow"] = (200, b"y" * 100, 0.05)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="more than the 1000 bytes"):
        download(lying_edge.url + "/big", tmp_path / "big", max_bytes=1000)
    with pytest.raises(ServiceError, match="too slow"):
        download(lying_edge.url + "/slow", tmp_path / "slow", deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 3
    assert not list(tmp_path.iterdir())  # nothing half-written is left
    assert download(lying_edge.url + "/big", tmp_path / "ok", max_bytes=3_000_000) == 3_000_000
    with pytest.raises(ServiceError, match="not JSON"):
        request("GET", lying_edge.url + "/big")
    started = time.monotonic()  # a JSON answer trickling in is cut at its deadline too
    with pytest.raises(ServiceError, match="GET .*too slow"):
        request("GET", lying_edge.url + "/slow", timeout=5, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 3


_ENTRY = {"name": "tiny", "backbone": "smallcnn", "input_size": 48, "sha256": "a" * 64}


@pytest.mark.parametrize("metadata, weights_trickle", [
    (b"{", 0), (b"[]", 0), (json.dumps({**_ENTRY, "sha256": "../../x"}).encode(), 0),
    (json.dumps({k: v for k, v in _ENTRY.items() if k != "backbone"}).encode(), 0),
    (json.dumps({**_ENTRY, "backbone": "--out=/tmp/x"}).encode(), 0), (json.dumps({**_ENTRY, "name": "other"}).encode(), 0),
    (json.dumps(_ENTRY).encode(), 0.2),  # honest metadata, weights a byte every 0.2 s
    (b"{" + b" " * 200, 0.05)],  # metadata trickling past its deadline
    ids=["truncated", "list", "path-digest", "no-backbone", "option-backbone", "other-entry", "slow-weights",
         "slow-metadata"])
def test_the_edge_refuses_a_lying_or_slow_cloud_with_one_line_and_in_bounded_time(lying_edge, tmp_path, metadata,
                                                                                 weights_trickle):
    """The edge's job fetches its backbone from the cloud: a cloud that lies or trickles fails the
    job with a one-line EmoshieldError within the deadline (the node's one job worker is never held),
    a digest or an architecture name never becomes a path or an option, and nothing half-written is left."""
    from emoshield.errors import EmoshieldError
    from emoshield.tiers.edge import fetch_backbone

    lying_edge.routes["/backbones/tiny"] = (200, metadata, 0.05 if metadata.startswith(b"{ ") else 0)
    lying_edge.routes["/backbones/tiny/weights"] = (200, b"w" * 100, weights_trickle)
    started = time.monotonic()
    with pytest.raises(EmoshieldError) as refused:
        fetch_backbone(lying_edge.url, "tiny", tmp_path / "cache", timeout=1, deadline_s=1.0)
    assert time.monotonic() - started < 6 and "\n" not in str(refused.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# ---- the device store: kill -9 leftovers and a full disk ----------------------------------------

def test_staging_left_by_a_killed_device_is_removed_at_start(tmp_path):
    from emoshield.device.store import BundleStore
    from emoshield.tiers.signing import generate_keys

    generate_keys(tmp_path / "keys")
    leftover = tmp_path / "store" / "staging" / "tmpabc"
    leftover.mkdir(parents=True)
    (leftover / "model.int8.onnx").write_bytes(b"half a download")
    (tmp_path / "store" / ".state-x.json").write_text("{")
    BundleStore(tmp_path / "store", tmp_path / "keys" / "public.key")
    assert not (tmp_path / "store" / "staging").exists() and not list((tmp_path / "store").glob(".state-*"))


def test_a_full_disk_during_install_is_a_bundle_error_and_the_store_is_unchanged(tmp_path):
    """RLIMIT_FSIZE in a child process: writing a file past 200 kB fails with EFBIG (SIGXFSZ ignored)."""
    script = f"""
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from emoshield.tiers.bundle import BundleError
from emoshield.device.store import BundleStore
from emoshield.tiers.signing import generate_keys
root = Path({str(tmp_path)!r})
generate_keys(root / "keys")
source = root / "bundle"
source.mkdir()
(source / "model.int8.onnx").write_bytes(b"x" * 300_000)
store = BundleStore(root / "store", root / "keys" / "public.key")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
try:
    store.install(source)
except BundleError as exc:
    print("refused:", exc)
print("state:", store.state())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert "state: {'current': None, 'previous': None, 'rejected': []}" in proc.stdout
    assert not (tmp_path / "store" / "staging").exists() or not list((tmp_path / "store" / "staging").iterdir())


# ---- tokens never on command lines; empty tokens refused at start --------------------------------

def test_tokens_come_from_files_or_the_environment_never_from_argv(tmp_path):
    from tests.test_cli import run

    common = ["edge", "serve", "--root", tmp_path / "edge", "--key", tmp_path / "no.key", "--cloud", "http://127.0.0.1:9",
              "--backbone", "b", "--classes", "happy,sad"]
    proc = run(*common, "--admin-token", "a-secret-on-the-command-line", check=False)
    assert proc.returncode == 2 and "visible to every user" in proc.stderr and len(proc.stderr.splitlines()) == 1
    for content in ("   \n", "\xa0short"):  # whitespace only; non-ASCII and too short (each CLI start ~5 s)
        (tmp_path / "admin.token").write_text(content)
        proc = run(*common, "--admin-token-file", tmp_path / "admin.token", check=False)
        assert proc.returncode == 2 and "admin token" in proc.stderr and len(proc.stderr.splitlines()) == 1, content
    (tmp_path / "edge").mkdir(exist_ok=True)
    (tmp_path / "edge" / "admin.token").write_text("")  # an empty generated token file is refused too
    proc = run(*common, check=False)
    assert proc.returncode == 2 and "is empty" in proc.stderr
    (tmp_path / "admin.token").write_text("a-good-admin-token")  # the edge's name goes into MQTT topics
    proc = run(*common, "--admin-token-file", tmp_path / "admin.token", "--name", "lab/#", check=False)
    assert proc.returncode == 2 and "--name 'lab/#'" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run("device", "run", "--source", tmp_path, "--edge", "http://127.0.0.1:9", "--pubkey", tmp_path / "k",
               "--token", "device-secret-123", check=False)
    assert proc.returncode == 2 and "--token-file" in proc.stderr


# ---- the edge's job children: stopped with the edge, killed after a crash ----------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.is_file() and "zombie" not in status.read_text()


def test_edge_stops_its_training_child_on_sigterm_and_a_restart_kills_orphans(tmp_path, data_root):
    """SIGTERM: the edge stops the job's `emoshield train` (its own process group) and records the
    job as interrupted. SIGKILL: the child outlives the edge; the next node start kills it."""
    import signal

    from emoshield.tiers.edge import EdgeConfig, EdgeNode
    from emoshield.tiers.store import EdgeStore
    from tests.conftest import FIVE, free_port, trust_repository
    from tests.test_cli import run
    from tests.test_services import start, wait_healthy

    run("keys", "generate", "--out", tmp_path / "keys")
    run("cloud", "add", "--library", tmp_path / "library", "--name", "tiny", "--backbone", "smallcnn",
        "--weights", "scratch", "--input-size", "32")
    meta = json.loads((tmp_path / "library" / "tiny" / "metadata.json").read_text())
    cloud = LyingEdge({"/backbones/tiny": (200, json.dumps(meta).encode(), 0),
                       "/backbones/tiny/weights": (200, (tmp_path / "library" / "tiny" / "weights.safetensors")
                                                   .read_bytes(), 0)})
    (tmp_path / "admin.token").write_text("admin-secret-token")
    faces = [(path, label) for folder, label in (("happy", "happy"), ("sadness", "sad"), ("surprise", "surprise"),
                                                 ("disgust", "disgust"), ("fear", "fear"))
             for path in sorted((data_root / "ckplus48" / folder).iterdir())[:3]]

    def edge_with_a_running_job(root: Path):
        port = free_port()
        trust_repository(root)
        proc = start("edge", "serve", "--root", root, "--key", tmp_path / "keys" / "private.key", "--cloud", cloud.url,
                     "--backbone", "tiny", "--classes", FIVE, "--admin-token-file", tmp_path / "admin.token",
                     "--epochs", "500", "--input-size", "32", "--port", port, log=root.parent / f"{root.name}.log")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, root.parent / f"{root.name}.log")
        device = EdgeClient(url, EdgeClient(url, "admin-secret-token").enrol("cam")["token"])
        for path, label in faces:
            device.upload(path.read_bytes(), label)
        job_id = request("POST", url + "/jobs", "admin-secret-token")["job_id"]
        pid_file = root / "jobs" / str(job_id) / "child.pid"
        assert wait_for(pid_file.is_file, timeout=60), (root.parent / f"{root.name}.log").read_text()
        child = int(pid_file.read_text())
        time.sleep(3.0)  # well into training (a child that failed on its own would be gone by now)
        assert _alive(child), (root / "jobs" / str(job_id) / "log.txt").read_text()
        return proc, job_id, child

    try:
        proc, job_id, child = edge_with_a_running_job(tmp_path / "edge1")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert wait_for(lambda: not _alive(child), timeout=10)
        job = EdgeStore(tmp_path / "edge1").job(job_id)
        assert job["status"] == "failed" and "interrupted" in job["error"]

        proc, job_id, child = edge_with_a_running_job(tmp_path / "edge2")
        proc.kill()  # no chance to clean up: the child keeps training
        proc.wait(timeout=30)
        time.sleep(1.0)
        assert _alive(child)
        EdgeNode(EdgeConfig(root=tmp_path / "edge2", key=tmp_path / "keys" / "private.key", classes=FIVE.split(","),
                            cloud_url=cloud.url, backbone="tiny", admin_token="admin-secret-token"))
        assert wait_for(lambda: not _alive(child), timeout=10)
        assert EdgeStore(tmp_path / "edge2").job(job_id)["status"] == "failed"
    finally:
        cloud.shutdown()
        cloud.server_close()


@given(st.one_of(st.none(), st.text(max_size=200), st.integers()))
def test_any_subject_id_becomes_a_tag_the_edge_accepts_or_none(subject):
    import re

    from emoshield.tiers.wire import SUBJECT_PATTERN, subject_tag

    tag = subject_tag(subject)
    assert tag is None or re.fullmatch(SUBJECT_PATTERN, tag)


def test_the_job_worker_survives_store_and_disk_faults_and_health_says_so(tmp_path, monkeypatch):
    """A database that restarts (claims and updates refused) and a full disk (the job log) must not
    end the edge's job worker: a dead worker would leave every later job queued while /health said
    ok. The worker retries, /health says 'degraded' meanwhile (without the fault's text, which may
    name hosts), and a job failure the store refused once is still recorded."""
    import errno

    from sqlalchemy.exc import OperationalError

    from emoshield.errors import EmoshieldError
    from emoshield.tiers.edge import EdgeConfig, EdgeNode, create_app
    from tests.conftest import FIVE, trust_repository

    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","),
                        cloud_url="http://127.0.0.1:9", backbone="b", admin_token="t" * 16)
    trust_repository(config.root)
    node = EdgeNode(config)
    node.WORKER_RETRY_SECONDS = 0.05
    health = next(r.endpoint for r in create_app(node).routes if getattr(r, "path", None) == "/health")
    database_down = threading.Event()
    database_down.set()
    lost = OperationalError("SELECT jobs", {}, Exception("server at db.internal:5432 closed the connection"))
    claim, update = node.store.claim_next_job, node.store.update_job
    refusals = [lost]  # the first failure record is refused once
    log_writes = []

    def flaky_claim():
        if database_down.is_set():
            raise lost
        return claim()

    def flaky_update(job_id, **fields):
        if fields.get("status") == "failed" and refusals:
            raise refusals.pop()
        return update(job_id, **fields)

    def full_disk_log(job_id, text):
        log_writes.append(text)
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_job(job_id):
        raise EmoshieldError("not enough samples\x00\x1b[2J\nsecond line")  # a NUL PostgreSQL refuses

    monkeypatch.setattr(node.store, "claim_next_job", flaky_claim)
    monkeypatch.setattr(node.store, "update_job", flaky_update)
    monkeypatch.setattr(node, "_log", full_disk_log)
    monkeypatch.setattr(node, "run_job", failing_job)
    node.start()
    try:
        first = node.queue_job("manual")
        assert wait_for(lambda: node.worker_fault is not None, timeout=10)
        answer = health()
        assert answer["status"] == "degraded" and "db.internal" not in json.dumps(answer)
        time.sleep(0.3)  # several retries while the database is down
        assert node._worker.is_alive() and node.store.job(first)["status"] == "queued"
        database_down.clear()
        assert wait_for(lambda: node.store.job(first)["status"] == "failed", timeout=10)
        assert node.store.job(first)["error"] == "EmoshieldError: not enough samples??[2J"
        assert log_writes and not refusals  # the log write failed, the refused record was retried
        second = node.queue_job("manual")  # the worker still takes jobs
        assert wait_for(lambda: node.store.job(second)["status"] == "failed", timeout=10)
        assert node._worker.is_alive() and health()["status"] == "ok"
    finally:
        node.stop()


def test_faults_after_a_bundle_is_published_are_one_line_each_and_every_listener_is_still_told(
        tmp_path, monkeypatch, capsys):
    """Once a job's bundle is signed and the job recorded finished, the job log (full disk), the MQTT
    announcement (broker gone) and the on_publish hook (a bug) only tell others: each fault is one
    stderr line, the steps after it still run, and nothing is raised into the worker (which would
    record the published job as failed)."""
    import errno

    from emoshield.tiers.edge import EdgeConfig, EdgeNode
    from tests.conftest import FIVE, trust_repository

    told = []

    def hook(version, manifest):
        told.append(("on_publish", version, manifest["version"]))
        raise KeyError("bug\nin the hook")

    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","),
                        cloud_url="http://127.0.0.1:9", backbone="b", admin_token="t" * 16)
    trust_repository(config.root)
    node = EdgeNode(config, on_publish=hook)

    def full_disk(job_id, text):
        told.append(("log", job_id))
        raise OSError(errno.ENOSPC, "No space left on device")

    def broker_gone(version, manifest):
        told.append(("announce", version))
        raise ConnectionRefusedError("broker at 127.0.0.1:1883 went away")

    monkeypatch.setattr(node, "_log", full_disk)
    node.announcer = SimpleNamespace(announce=broker_gone)
    node._tell_published(7, 3, {"version": 3}, {"test_accuracy": 0.9})
    assert told == [("log", 7), ("announce", 3), ("on_publish", 3, 3)]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("; its ")[1].split(" failed")[0] for line in lines] == ["log", "announce", "on_publish"]
    assert all(line.startswith("edge: job 7 published v3; its ") for line in lines)
    node.announcer, node.on_publish = None, None  # nothing to tell: no line at all
    monkeypatch.setattr(node, "_log", lambda job_id, text: told.append(("log", job_id)))
    node._tell_published(8, 4, {"version": 4}, {})
    assert told[-1] == ("log", 8) and capsys.readouterr().err == ""


_NAMES = st.one_of(st.text(max_size=70), st.sampled_from(["d+", "e/x", "#", "", " ", "é" * 64, "a\x00b", "-x"]), JSON)


@settings(max_examples=150, deadline=None)
@given(me=st.one_of(JSON, st.fixed_dictionaries(
    {"id": _NAMES, "edge": _NAMES},
    optional={"mqtt": st.one_of(JSON, st.sampled_from(["127.0.0.1:1", "h:0", "h:70000", "h:99999999999999999999",
                                                        "hôte:1883", "h:1883\n", "mqtt://h:1883/"])),
              "mqtt_auth": st.one_of(st.just("token"), JSON)})))
def test_any_me_answer_gives_a_link_or_polling_never_an_exception(me):
    """The device asks the edge's GET /me for its MQTT broker, its id and the edge's name, and
    puts the last two in topics. Whatever comes back (a proxy's empty page, another service's
    JSON, wildcards or '/' in the names, a port out of range), `device run` must go on: a link
    whose heartbeat publishes, or None (it polls over HTTP) with one log line; never a traceback
    before the first frame or a paho ValueError mid-stream."""
    from emoshield.device.run import connect_mqtt

    logs = []
    client = SimpleNamespace(me=lambda: me, token="device-token-123")
    original = DeviceLink.start
    DeviceLink.start = lambda self, wait=0.0: False  # no broker wait per example
    try:
        link = connect_mqtt(client, "auto", logs.append)
    finally:
        DeviceLink.start = original
    if link is None:
        assert len(logs) <= 1 and all("\n" not in line for line in logs)
    else:
        link.heartbeat({"fps": 1.0})  # its topic holds the id and edge name the answer gave
        link.stop()
        assert isinstance(me, dict) and me["mqtt"] and link.device_id == me["id"] and link.edge == me["edge"]


def test_a_job_log_of_any_bytes_and_size_is_served_as_text(tmp_path, monkeypatch):
    """A training child may write bytes that are not UTF-8 (a file name, a library's output) and
    logs grow: GET /jobs/ID/log answers with the text (U+FFFD for what does not decode) and at
    most the log's tail, never a 500."""
    from emoshield.tiers import edge as edge_module
    from emoshield.tiers.edge import EdgeConfig, EdgeNode, create_app
    from tests.conftest import FIVE, trust_repository

    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","),
                        cloud_url="http://127.0.0.1:9", backbone="b", admin_token="t" * 16)
    trust_repository(config.root)
    node = EdgeNode(config)  # worker not started: the job stays queued
    job_log = next(r.endpoint for r in create_app(node).routes if getattr(r, "path", None) == "/jobs/{job_id}/log")
    job = node.queue_job("manual")
    node.job_dir(job).mkdir(parents=True)
    (node.job_dir(job) / "log.txt").write_bytes(b"epoch 1 \xff\xfe caf\xe9\n")
    assert job_log(job) == "epoch 1 \ufffd\ufffd caf\ufffd\n"
    monkeypatch.setattr(edge_module, "MAX_LOG_BYTES", 10)
    (node.job_dir(job) / "log.txt").write_bytes(b"a" * 30 + b"last line\n")
    assert job_log(job) == "[... the first 30 bytes left out ...]\nlast line\n"


def test_an_upload_on_a_full_disk_is_a_507_and_the_edge_keeps_serving(tmp_path, data_root):
    """The edge's process runs under RLIMIT_FSIZE (as a full disk fails a write): a face too big to
    store is refused with 507 (the device keeps it and retries), nothing half-written stays in the
    store, and the next face that fits is stored."""
    import resource
    import signal

    from tests.conftest import FIVE, free_port, trust_repository
    from tests.test_cli import run
    from tests.test_services import wait_healthy

    run("keys", "generate", "--out", tmp_path / "keys")
    (tmp_path / "admin.token").write_text("admin-secret-token")
    root, port, log = tmp_path / "edge", free_port(), tmp_path / "edge.log"
    trust_repository(root)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, resource.RLIM_INFINITY))

    proc = subprocess.Popen([sys.executable, "-m", "emoshield", "edge", "serve", "--root", str(root), "--key",
                             str(tmp_path / "keys" / "private.key"), "--cloud", "http://127.0.0.1:9", "--backbone", "b",
                             "--classes", FIVE, "--admin-token-file", str(tmp_path / "admin.token"), "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, preexec_fn=limited)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        device = EdgeClient(url, EdgeClient(url, "admin-secret-token").enrol("cam")["token"])
        for side in (520, 700):  # ~0.8 MB: kept in memory, its store write fails; ~1.5 MB: its spool file fails
            noise = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
            big = cv2.imencode(".png", noise)[1].tobytes()
            assert 500_000 < len(big) < 2_000_000
            with pytest.raises(ServiceError, match="507.*storage full") as refused:
                device.upload(big, "happy")
            assert refused.value.status == 507
        face = sorted((data_root / "ckplus48" / "happy").iterdir())[0].read_bytes()
        assert device.upload(face, "happy")["bytes"] == len(face)
        assert [s["bytes"] for s in device.call("GET", "/samples")] == [len(face)]
        assert not [p for p in (root / "cas").rglob("*") if ".tmp" in p.name]
        assert request("GET", url + "/health")["status"] == "ok" and proc.poll() is None
        assert "cannot store an upload" in log.read_text() and "cannot spool an upload" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _asgi(app, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request through an ASGI app in this process (no server, no client library)."""
    import asyncio

    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_a_database_that_is_down_is_a_503_naming_no_host(tmp_path, monkeypatch):
    """Every route that reads the metadata store (a device's token check first of all) answers 503
    'retry later' while the database is down, never a 500, and the driver's message (host, SQL)
    stays in the edge's log."""
    from sqlalchemy.exc import OperationalError

    from emoshield.tiers.edge import EdgeConfig, EdgeNode, create_app
    from tests.conftest import FIVE, trust_repository

    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","),
                        cloud_url="http://127.0.0.1:9", backbone="b", admin_token="t" * 16)
    trust_repository(config.root)
    node = EdgeNode(config)
    app = create_app(node)

    def down(*args, **kwargs):
        raise OperationalError("SELECT devices", {}, Exception("could not connect to db.internal:5432"))

    monkeypatch.setattr(node.store, "device_for", down)
    status, body = _asgi(app, "GET", "/samples", {"Authorization": "Bearer device-token-123456"})
    assert status == 503 and b"retry later" in body and b"db.internal" not in body


def test_a_device_revoked_between_its_token_check_and_its_answer_is_a_403(tmp_path, monkeypatch):
    """GET /me looks the device up after the token check; a revoke landing between the two (seen
    under load) must be the token's 403, not a 500 from a row that is gone."""
    from emoshield.tiers.edge import EdgeConfig, EdgeNode, create_app
    from tests.conftest import FIVE, trust_repository

    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","),
                        cloud_url="http://127.0.0.1:9", backbone="b", admin_token="t" * 16)
    trust_repository(config.root)
    node = EdgeNode(config)
    device_id, token = node.enrol("camera")
    app = create_app(node)
    status, body = _asgi(app, "GET", "/me", {"Authorization": f"Bearer {token}"})
    assert status == 200 and json.loads(body)["id"] == device_id
    monkeypatch.setattr(node.store, "device", lambda _: None)  # the row went after the token check
    status, body = _asgi(app, "GET", "/me", {"Authorization": f"Bearer {token}"})
    assert status == 403 and b"unknown device token" in body


def test_a_revoke_racing_an_enrolment_leaves_no_broker_account(tmp_path):
    """The dashboard lists a device as soon as its row exists, before its MQTT account is granted:
    a revoke clicked then must come after the grant (and remove the account), never before it."""
    from emoshield.tiers.edge import EdgeConfig, EdgeNode
    from tests.conftest import FIVE, trust_repository

    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","),
                        cloud_url="http://127.0.0.1:9", backbone="b", admin_token="t" * 16)
    trust_repository(config.root)
    node = EdgeNode(config)
    calls, granting, release = [], threading.Event(), threading.Event()

    def grant_device(device_id, token):
        granting.set()
        release.wait(10)  # a slow broker
        calls.append(("grant", device_id))

    node.announcer = SimpleNamespace(grant_device=grant_device, revoke_device=lambda d: calls.append(("revoke", d)))
    enrolment = threading.Thread(target=node.enrol, args=("camera",))
    enrolment.start()
    assert granting.wait(10)
    (listed,) = node.store.devices()  # on the dashboard already
    revoking = threading.Thread(target=node.revoke, args=(listed["id"],))
    revoking.start()
    time.sleep(0.3)
    release.set()
    enrolment.join(10)
    revoking.join(10)
    assert calls == [("grant", listed["id"]), ("revoke", listed["id"])] and node.store.devices() == []
