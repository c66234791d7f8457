"""Updates from the edge, verified with The Update Framework (python-tuf's client).

The device trusts one thing it was given out of band: the edge's first root metadata
(`--trust-root`, the edge's trust/metadata/1.root.json). From it python-tuf's Updater checks,
on every sync, the chain of newer roots (key rotations and revocations), then timestamp ->
snapshot -> targets, each signed by the keys the root names, none expired, none older than
what this store saw before (kept in STORE/tuf/). Only then does the device read the newest
version from the signed `custom` field of the `bundles/latest.json` entry in the targets
metadata and downloads that bundle's files, each bounded by its signed length and hash, all
within one deadline. So:

- an edge or mirror that replays an old state is refused: by version against what this store
  has seen, and on a fresh store by expiry (the timestamp lives a day by default);
- an edge that keeps serving the same state forever (a freeze) is detected once the timestamp
  expires: the device says "frozen" in its log, heartbeats and summary, and runs on;
- `/bundles/latest` and MQTT announcements are only hints of when to look.

The bundle's own Ed25519 manifest signature is still checked at install (it is what the
offline `--bundle DIR` path relies on). The weights file is not downloaded: devices run ONNX.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import EmoshieldError, one_line
from ..tiers.bundle import MANIFEST, ONNX_FP32, ONNX_INT8, PROBES, SIGNATURE, BundleError, verify_signature
from ..tiers.wire import RemoteValueError, parse_version
from .store import BundleStore

if TYPE_CHECKING:
    from .recognizer import EmotionClassifier

LATEST_TARGET = "bundles/latest.json"
UPDATE_NICENESS = 10  # the update thread's nice value (the frame loop keeps the process's)
DEVICE_FILES = (ONNX_INT8, ONNX_FP32, PROBES)  # of a bundle's files, what a device runs (not the weights)
# metadata size bounds (bytes): far above what an edge writes (a root ~1.5 kB, targets ~5 kB)
METADATA_LIMITS = {"root_max_length": 64_000, "timestamp_max_length": 8_000, "snapshot_max_length": 64_000,
                   "targets_max_length": 1_000_000}


def _fetcher_class():
    from tuf.api import exceptions
    from tuf.ngclient import FetcherInterface

    class EdgeFetcher(FetcherInterface):
        """python-tuf's downloads over http.client: the device's bearer token, no redirects (a
        redirect would carry the token to another host), a per-read timeout, and one hard
        deadline for the whole sync: a watchdog shuts the socket at the deadline, so an edge
        that trickles headers or body cannot hold the update thread longer. Every failure is a
        DownloadError, however it happens (python-tuf wraps only what _fetch raises itself)."""

        def __init__(self, token: str | None, timeout: float, deadline: float):
            self.token, self.timeout, self.deadline = token, timeout, deadline

        def _fetch(self, url: str) -> Iterator[bytes]:
            return self._chunks(url)

        def _chunks(self, url: str) -> Iterator[bytes]:
            import http.client
            import urllib.parse

            parts = urllib.parse.urlsplit(url)
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise exceptions.SlowRetrievalError(f"GET {url}: the sync's deadline passed")
            connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            connection = connection_class(parts.hostname, parts.port, timeout=min(self.timeout, left))
            fired = threading.Event()  # a shut socket can look like a short, complete answer: remember it
            watchdog = threading.Timer(left, lambda: (fired.set(), _shut(connection)))
            watchdog.daemon = True
            watchdog.start()
            try:
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                connection.request("GET", path, headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
                response = connection.getresponse()
                if fired.is_set():
                    raise exceptions.SlowRetrievalError(f"GET {url}: too slow (the sync's deadline passed)")
                if response.status != 200:
                    raise exceptions.DownloadHTTPError(f"GET {url}: HTTP {response.status}", response.status)
                while block := response.read1(1 << 16):  # whatever has arrived
                    if fired.is_set() or time.monotonic() > self.deadline:
                        raise exceptions.SlowRetrievalError(f"GET {url}: too slow (the sync's deadline passed)")
                    yield block
                if fired.is_set():
                    raise exceptions.SlowRetrievalError(f"GET {url}: too slow (the sync's deadline passed)")
                if response.length:  # the peer closed before the Content-Length it announced
                    raise exceptions.DownloadError(f"GET {url}: cut short ({response.length} bytes missing)")
            except exceptions.DownloadError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as exc:  # reset, truncated, garbled, shut
                if time.monotonic() > self.deadline:
                    raise exceptions.SlowRetrievalError(f"GET {url}: too slow (the sync's deadline passed)") from None
                raise exceptions.DownloadError(f"GET {url}: {exc.__class__.__name__}: {exc}"[:300]) from None
            finally:
                watchdog.cancel()
                connection.close()

    def _shut(connection) -> None:
        import socket

        try:
            if connection.sock is not None:
                connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    return EdgeFetcher


@dataclass
class SyncStatus:
    """What the device last learnt about its update channel (heartbeats and the summary carry it).

    state: "current" (signed metadata names no newer bundle), "installed", "frozen" (the
    edge's signed metadata has expired: it stopped re-signing, or something replays an old
    state), "refused" (metadata or bundle failed verification), "unreachable", or "unknown"."""

    state: str = "unknown"
    detail: str = ""
    checked: float | None = None  # time.time() of the last sync
    signed_latest: int | None = None  # the newest version the verified metadata named

    def to_dict(self) -> dict:
        return asdict(self)


class EdgeSync:
    """Pulls the edge's newest bundle into a BundleStore through TUF (see the module doc)."""

    def __init__(self, store: BundleStore, client, trust_root: bytes, log: Callable[[str], None],
                 deadline_s: float = 600.0):
        self.store, self.client, self.log = store, client, log
        self.trust_root, self.deadline_s = trust_root, deadline_s
        self.status = SyncStatus()

    def _updater(self, deadline: float):
        from tuf.ngclient import Updater, UpdaterConfig

        metadata = self.store.root / "tuf"
        metadata.mkdir(exist_ok=True)
        fetcher = _fetcher_class()(self.client.token, self.client.timeout, deadline)
        return Updater(str(metadata), f"{self.client.url}/tuf/", None, f"{self.client.url}/", fetcher,
                       UpdaterConfig(prefix_targets_with_hash=False, **METADATA_LIMITS), bootstrap=self.trust_root)

    def sync(self) -> int | None:
        """Install the newest bundle the signed metadata names, when it is newer than the
        current one. Returns its version, or None when nothing changed; never raises for a
        remote fault (the reason is logged and kept in `status`)."""
        from tuf.api import exceptions as tuf

        current = self.store.current_version()
        keeping = f"keeping bundle v{current}" if current is not None else "no bundle yet"
        try:
            version = self._sync(time.monotonic() + self.deadline_s)
        except tuf.ExpiredMetadataError as exc:
            return self._set("frozen", f"the edge's signed update metadata has expired ({exc}): it stopped "
                                       f"re-signing, or an old state is being replayed; {keeping}")
        except tuf.DownloadLengthMismatchError as exc:
            return self._set("refused", f"more than the signed size was sent ({exc}); {keeping}")
        except (tuf.RepositoryError, BundleError, RemoteValueError) as exc:
            return self._set("refused", f"refused an update: {one_line(exc, 200)}; {keeping}")
        except (tuf.DownloadError, OSError) as exc:  # unreachable, HTTP errors, too slow, disk full
            return self._set("unreachable", f"edge unreachable or failing ({one_line(exc, 200)}); {keeping}")
        except ValueError as exc:  # python-tuf's own value checks on remote input
            return self._set("refused", f"refused an update: {one_line(exc, 200)}; {keeping}")
        except Exception as exc:  # noqa: BLE001 - whatever else a hostile edge provokes: the device runs on
            return self._set("refused", f"update failed: {one_line(exc, 200)}; {keeping}")
        if version is None:
            return None
        previous = self.store.state()["previous"]
        self._set("installed", f"installed bundle v{version}"
                  + (f" (previous v{previous} kept for rollback)" if previous else " (first bundle)"))
        return version

    def _sync(self, deadline: float) -> int | None:
        updater = self._updater(deadline)
        updater.refresh()
        latest = updater.get_targetinfo(LATEST_TARGET)
        if latest is None:
            self._set("current", "the edge has published no bundle yet", quiet=True)
            return None
        custom = latest.custom
        version = parse_version(custom.get("version") if isinstance(custom, dict) else None, "signed latest version", 1)
        download = self.store.staging()
        try:
            self.status.signed_latest = version
            state = self.store.state()
            if (state["current"] or 0) >= version:
                self._set("current", f"bundle v{version} is the newest signed one", quiet=True)
                return None
            if version in state["rejected"]:
                self._set("current", f"the newest signed bundle v{version} was rolled back from before; "
                                     f"keeping v{state['current']}", quiet=True)
                return None
            for name in (MANIFEST, SIGNATURE):
                self._download(updater, version, name, download)
            manifest = verify_signature(download, self.store.public_key)
            for name in manifest.get("files", {}):
                if name in DEVICE_FILES:
                    self._download(updater, version, name, download)
            return int(self.store.install(download, move=True)["version"])
        finally:
            shutil.rmtree(download, ignore_errors=True)

    @staticmethod
    def _download(updater, version: int, name: str, folder: Path) -> None:
        info = updater.get_targetinfo(f"bundles/{version}/{name}")
        if info is None:
            raise BundleError(f"bundle v{version}'s {name} is not in the signed targets metadata")
        updater.download_target(info, str(folder / name))

    def _set(self, state: str, detail: str, quiet: bool = False) -> None:
        self.status = SyncStatus(state, detail[:300], time.time(), self.status.signed_latest)
        if not quiet:
            self.log(f"device: {detail}")
        return None


def read_trust_root(path: Path) -> bytes:
    """The edge's root metadata a device was given (bytes; python-tuf verifies it at use)."""
    try:
        data = Path(path).read_bytes()
        json.loads(data)
    except (OSError, ValueError) as exc:
        raise EmoshieldError(f"--trust-root {path}: not a readable TUF root metadata file ({exc.__class__.__name__})") \
            from None
    return data


class BackgroundUpdate:
    """Syncs with the edge on a worker thread while frames keep being recognised with the
    current bundle; the frame loop picks up the new, self-checked classifier when it is ready."""

    def __init__(self, sync: EdgeSync, load: Callable[[Path], "EmotionClassifier"]):
        self.sync, self.load = sync, load
        self.store, self.log = sync.store, sync.log
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
        try:  # Linux: a nice value per thread. Frames first: the update may take longer, never them
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPDATE_NICENESS)
        except (AttributeError, OSError):
            pass
        version = self.sync.sync()
        if version is None:
            return
        try:  # the classifier the install's health check self-checked, else load it now
            self._ready = self.store.take_checked(version) or self.load(self.store.current_dir())
        except Exception as exc:  # noqa: BLE001 - passed its install check but fails here: roll back
            try:
                self.log(f"device: bundle v{self.store.current_version()} failed to load ({exc}); rolling back to "
                         f"v{self.store.rollback(str(exc))}")
                self._ready = self.load(self.store.current_dir())
            except Exception as again:  # noqa: BLE001 - the frame loop keeps the classifier it has
                self.log(f"device: no update this time ({one_line(again, 200)}); running on as before")

    def take(self) -> "EmotionClassifier | None":
        """The classifier of a newly installed bundle, once (None while none is ready)."""
        ready, self._ready = self._ready, None
        return ready

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
