"""Secure model updates with TUF: the edge's repository (offline root, online keys, expiring
timestamps) and the device's python-tuf client against honest, frozen, replaying, lying and
rotated repositories. Repositories are served by a real HTTP server on 127.0.0.1."""

import json
import shutil
import stat
import time
from pathlib import Path

import pytest

from emoshield.device.store import BundleStore
from emoshield.device.sync import EdgeSync
from emoshield.tiers.bundle import MANIFEST, ONNX_INT8, SIGNATURE, WEIGHTS, read_manifest
from emoshield.tiers.client import EdgeClient
from emoshield.tiers.trust import TrustError, TrustRepository, lifetimes_for
from tests.conftest import resigned_bundle
from tests.test_hostile import LyingEdge


class Edge:
    """A TUF repository plus bundle folders, served as an edge serves them (/tuf/, /bundles/)."""

    def __init__(self, root: Path, timestamp_seconds: float = 86400.0):
        self.root = root
        self.root_key = root.parent / f"{root.name}-offline-root.key"
        self.repo = TrustRepository.init(root / "trust", self.root_key, lifetimes_for(timestamp_seconds))
        self.server = LyingEdge({})
        self.client = EdgeClient(self.server.url, "device-token-123", timeout=5)
        self.serve()

    def publish(self, bundle: Path, version: int) -> None:
        folder = self.root / "bundles" / str(version)
        shutil.copytree(bundle, folder)
        self.repo.publish(version, folder, [MANIFEST, SIGNATURE, *read_manifest(folder)["files"]])
        self.serve()

    def snapshot(self) -> dict:
        """Everything served now, as a frozen copy (what a stale mirror would keep serving)."""
        return dict(self.server.routes)

    def serve(self, routes: dict | None = None) -> None:
        if routes is None:
            routes = {f"/tuf/{p.name}": (200, p.read_bytes(), 0) for p in self.repo.metadata_dir.iterdir()}
            for path in (self.root / "bundles").glob("*/*"):
                routes[f"/bundles/{path.parent.name}/{path.name}"] = (200, path.read_bytes(), 0)
        self.server.routes = routes

    def device(self, store_root: Path, keys: Path, logs: list) -> EdgeSync:
        store = BundleStore(store_root, keys / "public.key")
        trust_root = (self.repo.metadata_dir / "1.root.json").read_bytes()
        return EdgeSync(store, self.client, trust_root, logs.append, deadline_s=10)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def edge(tmp_path):
    edge = Edge(tmp_path / "edge")
    yield edge
    edge.close()


def test_the_repository_keeps_its_root_key_offline_and_its_files_private(tmp_path):
    with pytest.raises(TrustError, match="outside the edge's folder"):
        TrustRepository.init(tmp_path / "edge" / "trust", tmp_path / "edge" / "root.key")
    repo = TrustRepository.init(tmp_path / "edge" / "trust", tmp_path / "offline" / "root.key")
    with pytest.raises(TrustError, match="already holds"):
        TrustRepository.init(tmp_path / "edge" / "trust", tmp_path / "offline" / "root.key")
    root = json.loads((repo.metadata_dir / "1.root.json").read_text())["signed"]
    root_keyid = root["roles"]["root"]["keyids"][0]
    online = {role: root["roles"][role]["keyids"][0] for role in ("targets", "snapshot", "timestamp")}
    assert root_keyid not in online.values() and len(set(online.values())) == 3
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "edge").rglob("*.key")) == ["snapshot", "targets",
                                                                                       "timestamp"]
    for path in (tmp_path / "edge").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE((tmp_path / "offline" / "root.key").stat().st_mode) == 0o600
    next(repo.keys_dir.glob("timestamp-*.key")).unlink()
    with pytest.raises(TrustError, match="timestamp-.*key is missing"):
        repo.check()
    with pytest.raises(TrustError, match="already holds"):  # a damaged repository is not silently replaced
        TrustRepository.init(tmp_path / "edge" / "trust", tmp_path / "offline" / "root.key")


def test_device_installs_what_signed_metadata_names_and_only_the_files_it_runs(edge, bundle, keys, tmp_path):
    logs = []
    sync = edge.device(tmp_path / "store", keys, logs)
    assert sync.sync() is None and sync.status.state == "current"  # nothing published yet
    edge.publish(bundle, 1)
    assert sync.sync() == 1 and sync.status.state == "installed" and "installed bundle v1" in logs[-1]
    installed = sorted(p.name for p in sync.store.current_dir().iterdir())
    assert WEIGHTS not in installed and ONNX_INT8 in installed  # the weights are for edges, not devices
    assert sync.sync() is None and sync.status.state == "current" and sync.status.signed_latest == 1
    # the unsigned hint is never what decides: a lying /bundles/latest changes nothing
    edge.server.routes["/bundles/latest"] = (200, b'{"version": 99, "manifest": {}}', 0)
    assert sync.sync() is None and sync.store.current_version() == 1


def test_lies_are_refused_before_they_reach_the_store(edge, bundle, keys, tmp_path):
    logs = []
    sync = edge.device(tmp_path / "store", keys, logs)
    edge.publish(bundle, 1)
    assert sync.sync() == 1
    edge.publish(resigned_bundle(bundle, keys, tmp_path / "v2", 2), 2)
    honest = edge.snapshot()
    lies = {
        "html instead of metadata": ("/tuf/timestamp.json", (200, b"<html>maintenance</html>", 0), "refused"),
        "a model over its signed size": ("/bundles/2/model.int8.onnx",
                                         (200, honest["/bundles/2/model.int8.onnx"][1] * 3, 0), "refused"),
        "a model that is not the signed one": ("/bundles/2/model.int8.onnx", (200, b"x" * 1000, 0), "refused"),
        "a trickle": ("/bundles/2/model.int8.onnx", (200, honest["/bundles/2/model.int8.onnx"][1], 0.3),
                      "unreachable"),
        "an error": ("/tuf/timestamp.json", (503, b"busy", 0), "unreachable"),
    }
    for what, (path, answer, state) in lies.items():
        edge.serve({**honest, path: answer})
        if what == "a trickle":
            sync.deadline_s = 1.0
        started = time.monotonic()
        assert sync.sync() is None, what
        assert sync.status.state == state and sync.store.current_version() == 1, (what, sync.status)
        assert time.monotonic() - started < 5, what
        assert not list((sync.store.root / "staging").iterdir()), what
        sync.deadline_s = 10
    edge.serve(honest)
    assert sync.sync() == 2
    sync.store.rollback("v2 misbehaved")  # and the same v2 is never installed again
    assert sync.sync() is None and sync.store.current_version() == 1


def test_a_frozen_or_replayed_edge_is_detected_even_by_a_fresh_store(bundle, keys, tmp_path):
    edge = Edge(tmp_path / "edge", timestamp_seconds=2)
    try:
        seen = edge.device(tmp_path / "seen", keys, [])
        edge.publish(bundle, 1)
        old_state = edge.snapshot()  # v1, as a mirror that stops following the edge keeps it
        edge.publish(resigned_bundle(bundle, keys, tmp_path / "v2", 2), 2)
        assert seen.sync() == 2
        # a device that saw v2's metadata refuses the older state at once (TUF version checks)
        edge.serve(old_state)
        assert seen.sync() is None and seen.status.state == "refused" and seen.store.current_version() == 2
        # a fresh store has seen nothing, but the old state expires: replaying it works only briefly
        time.sleep(2.2)
        logs = []
        fresh = edge.device(tmp_path / "fresh", keys, logs)
        assert fresh.sync() is None and fresh.status.state == "frozen" and fresh.store.current_version() is None
        assert "expired" in logs[-1]
        # the edge itself, stuck (it stopped re-signing): frozen too, and the device runs on
        edge.serve()
        assert seen.sync() is None and seen.status.state == "frozen" and seen.store.current_version() == 2
        assert edge.repo.refresh() == ["timestamp"]  # re-signed: updates flow again
        edge.serve()
        assert fresh.sync() == 2 and seen.sync() is None and seen.status.state == "current"
    finally:
        edge.close()


def test_keys_rotate_and_revoked_keys_sign_nothing(edge, bundle, keys, tmp_path):
    sync = edge.device(tmp_path / "store", keys, [])
    edge.publish(bundle, 1)
    assert sync.sync() == 1
    old_timestamp_key = next(edge.repo.keys_dir.glob("timestamp-*.key")).read_bytes()
    assert edge.repo.rotate(edge.root_key, ["timestamp", "snapshot"]) == 2
    assert len(list(edge.repo.keys_dir.glob("*.key"))) == 3  # the revoked keys' files are gone
    edge.serve()
    assert sync.sync() is None and sync.status.state == "current"
    assert sorted(p.name for p in (sync.store.root / "tuf" / "root_history").iterdir()) == ["1.root.json", "2.root.json"]
    # the revoked timestamp key (say it leaked) signs a newer timestamp: refused
    current_key = next(edge.repo.keys_dir.glob("timestamp-*.key"))
    current = current_key.read_bytes()
    current_key.write_bytes(old_timestamp_key)
    edge.repo._publish_timestamp(edge.repo._read("snapshot"))
    current_key.write_bytes(current)
    edge.serve()
    assert sync.sync() is None and sync.status.state == "refused" and "timestamp" in sync.status.detail
    # a new root key: the next root is signed by the old and the new one; devices follow
    new_root_key = tmp_path / "offline" / "root2.key"
    new_root_key.parent.mkdir()
    assert edge.repo.rotate(edge.root_key, [], new_root_key) == 3
    edge.publish(resigned_bundle(bundle, keys, tmp_path / "v2", 2), 2)
    assert sync.sync() == 2
    # the old root key is revoked too: a root it alone signs is refused
    with pytest.raises(TrustError, match="not this repository's root key"):
        edge.repo.rotate(edge.root_key, ["targets"])
    fresh = edge.device(tmp_path / "fresh", keys, [])  # bootstrapped from root v1, walks to v3
    assert fresh.sync() == 2


def test_background_update_that_cannot_load_rolls_back_and_keeps_the_running_classifier(edge, bundle, keys, tmp_path):
    from emoshield.device.sync import BackgroundUpdate

    logs = []
    sync = edge.device(tmp_path / "store", keys, logs)
    sync.store.install(bundle)
    edge.publish(bundle, 1)
    edge.publish(resigned_bundle(bundle, keys, tmp_path / "v2", 2), 2)
    sync.store.health = lambda folder: None  # v2 passes its install check but hands over no classifier

    def load(folder):
        raise RuntimeError("this CPU cannot run it")

    update = BackgroundUpdate(sync, load)
    assert update.start()
    update.join(timeout=60)
    assert update.take() is None  # nothing to swap in: the frame loop keeps what it runs
    assert any("installed bundle v2" in line for line in logs) and "no update this time" in logs[-1]
    assert sync.store.state()["current"] == 1 and sync.store.state()["rejected"] == [2]


def test_an_update_is_self_checked_once_and_its_classifier_handed_over(edge, bundle, keys, tmp_path):
    from emoshield.device.recognizer import health_check
    from emoshield.device.sync import BackgroundUpdate

    checks = []
    sync = edge.device(tmp_path / "store", keys, [])
    sync.store.health = lambda folder: checks.append(folder) or health_check(folder)
    sync.store.install(bundle)
    edge.publish(bundle, 1)
    edge.publish(resigned_bundle(bundle, keys, tmp_path / "v2", 2), 2)
    update = BackgroundUpdate(sync, lambda folder: pytest.fail("loaded a second time"))
    assert update.start()
    update.join(timeout=60)
    ready = update.take()
    assert ready is not None and ready.version == 2 and len(checks) == 2  # v1's install, v2's install
    assert ready.bundle_dir == sync.store.current_dir() and ready.check.probes > 0


def test_rotate_refuses_a_root_the_edge_edited_and_a_rotation_that_dies_leaves_working_keys(edge, bundle, keys,
                                                                                           tmp_path, monkeypatch):
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    sync = edge.device(tmp_path / "store", keys, [])
    edge.publish(bundle, 1)
    # a compromised edge adds its own key to the root role and re-signs root.json with it
    root_file = edge.repo.metadata_dir / "root.json"
    original = root_file.read_bytes()
    intruder = CryptoSigner.generate_ed25519()
    md = Metadata.from_bytes(original)
    md.signed.add_key(intruder.public_key, "root")
    md.sign(intruder, append=True)
    forged = md.to_bytes()
    for name in ("root.json", "1.root.json"):
        (edge.repo.metadata_dir / name).write_bytes(forged)
    with pytest.raises(TrustError, match="not what .* signed"):
        edge.repo.rotate(edge.root_key, ["timestamp"])
    for name in ("root.json", "1.root.json"):
        (edge.repo.metadata_dir / name).write_bytes(original)
    # a rotation that dies before its root is written: the old keys still sign, devices still sync
    def die(md):
        raise OSError("power cut")

    monkeypatch.setattr(edge.repo, "_write_root", die)
    with pytest.raises(OSError):
        edge.repo.rotate(edge.root_key, ["timestamp", "targets"])
    monkeypatch.undo()
    edge.repo.check()
    edge.publish(resigned_bundle(bundle, keys, tmp_path / "v2", 2), 2)
    assert sync.sync() == 2
    assert edge.repo.rotate(edge.root_key, ["timestamp", "targets"]) == 2  # and the rotation can be redone
    assert len(list(edge.repo.keys_dir.glob("*.key"))) == 3 + 2  # leftovers of the dead run stay unused
    edge.serve()
    assert sync.sync() is None and sync.status.state == "current"


class RawEdge:
    """Answers every connection with `answer` bytes, `delay` seconds between them (one by one
    when delay > 0): garbled chunked encoding, headers that trickle, a connection cut short."""

    def __init__(self, answer: bytes, delay: float = 0.0):
        import socket
        import threading

        self.answer, self.delay = answer, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.recv(65536)
                if self.delay:
                    for i in range(len(self.answer)):
                        conn.sendall(self.answer[i:i + 1])
                        time.sleep(self.delay)
                else:
                    conn.sendall(self.answer)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("answer, delay, state", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk", 0, "unreachable"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n{\"signed\"", 0, "unreachable"),
    (b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n", 0.05, "unreachable"),
    (b"\x00\xff garbage, not HTTP at all\r\n\r\n", 0, "unreachable"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://10.255.255.1/steal\r\nContent-Length: 0\r\n\r\n", 0, "unreachable"),
], ids=["bad-chunks", "cut-short", "trickled-headers", "not-http", "redirect"])
def test_garbled_slow_and_redirecting_answers_never_escape_the_sync(keys, tmp_path, answer, delay, state):
    from emoshield.tiers.client import EdgeClient as Client

    edge = Edge(tmp_path / "edge")
    raw = RawEdge(answer, delay)
    try:
        sync = edge.device(tmp_path / "store", keys, [])
        sync.client = Client(raw.url, "device-token-123", timeout=5)
        sync.deadline_s = 1.0
        started = time.monotonic()
        assert sync.sync() is None
        assert sync.status.state == state, sync.status
        assert time.monotonic() - started < 4
    finally:
        raw.close()
        edge.close()


@pytest.mark.parametrize("answer, delay, expected", [
    (b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 400 + b"\r\n\r\n{}", 0.01, "too slow"),  # a header line, byte by byte
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + b"X-T: 1\r\n" * 500 + b"\r\n", 0.002,
     "too slow"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", 0, None),  # honest: answered at once
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9999999\r\n\r\n{\"detail\": \"" + b"x" * 1000, 0.002, "HTTP 404$"),  # detail cut
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{", 0, "cut short"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 90\r\n\r\n{}", 0, "cut short"),  # parses, but is not all of it
    (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:9/steal\r\nContent-Length: 0\r\n\r\n", 0, "not followed"),
    (b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:9/x\r\nContent-Length: 0\r\n\r\n", 0, "not followed"),
    (b"\x00\xff garbage, not HTTP at all\r\n\r\n", 0, "broken answer")],
    ids=["trickled-header-line", "endless-trailers", "honest", "slow-error-detail", "cut-short", "cut-short-parses",
         "redirect", "redirect-ftp", "not-http"])
def test_a_json_call_is_whole_or_a_service_error_by_its_deadline(answer, delay, expected):
    """client.request (the edge's calls to the cloud, the device's /me and job calls): http.client
    loops inside one call over a header line, trailers or an error's body, so a check between reads
    is not enough; the watchdog shuts the socket at the deadline. Whatever the peer sends, the
    answer is whole JSON or a one-line ServiceError within the deadline (+ a margin); a redirect
    is never followed (it would carry the bearer token elsewhere)."""
    from emoshield.tiers.client import ServiceError, request

    raw = RawEdge(answer, delay)
    started = time.monotonic()
    try:
        if expected is None:
            assert request("GET", raw.url + "/me", token="device-token-123", timeout=5,
                           deadline=time.monotonic() + 1.0) == {}
        else:
            with pytest.raises(ServiceError, match=expected) as refused:
                request("GET", raw.url + "/me", token="device-token-123", timeout=5, deadline=time.monotonic() + 1.0)
            assert "\n" not in str(refused.value)
    finally:
        raw.close()
    assert time.monotonic() - started < 2.5
