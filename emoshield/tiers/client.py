"""A small HTTP client for the edge and cloud services (stdlib only: devices run it too)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from ..errors import EmoshieldError
from .wire import RemoteValueError, parse_version

MAX_JSON_BYTES = 8_000_000  # no answer of ours is near this; a bigger one is a lying peer


class ServiceError(EmoshieldError):
    """The service answered with an error status, or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _read_bounded(response, url: str, sink, max_bytes: int | None, deadline: float | None) -> int:
    """Copy a response into `sink` (a write callable) as it arrives; ServiceError past max_bytes or
    once time.monotonic() passes `deadline` (checked between reads; the watchdog below cuts a read
    that itself outlasts the deadline)."""
    copied = 0
    # read1: whatever has arrived (read() would wait for the whole 64 kB, past the deadline)
    while block := response.read1(1 << 16 if max_bytes is None else min(1 << 16, max_bytes - copied + 1)):
        copied += len(block)
        if max_bytes is not None and copied > max_bytes:
            raise ServiceError(f"GET {url}: more than the {max_bytes} bytes expected")
        if deadline is not None and time.monotonic() > deadline:
            raise ServiceError(f"GET {url}: too slow (deadline passed after {copied} bytes)")
        try:
            sink(block)
        except OSError as exc:  # a full disk under a download: not the peer's fault
            raise ServiceError(f"GET {url}: cannot store the answer ({exc.strerror or type(exc).__name__})") from None
    if getattr(response, "length", None):  # read1 ends quietly when the peer closes before Content-Length
        raise ServiceError(f"GET {url}: the answer was cut short ({copied} bytes, {response.length} missing)")
    return copied


class _Watchdog:
    """Shuts the call's sockets down at its deadline. The socket timeout bounds each recv only, and
    http.client loops inside one call over status and header lines, chunk sizes and trailers: a
    peer sending a byte now and then could hold the caller there forever."""

    def __init__(self, deadline: float):
        self.deadline, self.fired, self._timers = deadline, False, []
        self._lock, self._done = threading.Lock(), False  # no shutdown once the call is over (fd reuse)

    def watch(self, sock) -> None:
        def cut() -> None:
            with self._lock:
                if self._done:
                    return
                self.fired = True
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked recv returns at once
                except OSError:
                    pass

        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), cut)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def connect_timeout(self, timeout: float | None) -> float:
        """The socket timeout for a connection made now: its own, cut to the time left, so DNS,
        the TCP connect and the TLS handshake end by the deadline too."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed before connecting")
        return min(timeout, left) if timeout else left

    def finish(self) -> None:
        """The call is over (its answer read or failed): its sockets may be closed and reused."""
        with self._lock:
            self._done = True
        for timer in self._timers:
            timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        """An opener for http(s) only, whose connections are watched from the moment they connect;
        no redirects (a 3xx is an error: following one would carry the bearer token to another
        host and turn a POST into a GET) and no ftp:// or file:// URLs."""
        watchdog = self

        class Watched(http.client.HTTPConnection):
            def connect(self):
                self.timeout = watchdog.connect_timeout(self.timeout)
                super().connect()
                watchdog.watch(self.sock)

        class WatchedTLS(http.client.HTTPSConnection):
            def connect(self):
                self.timeout = watchdog.connect_timeout(self.timeout)
                super().connect()
                watchdog.watch(self.sock)

        class Handler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(Watched, req)

        class TLSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(WatchedTLS, req, context=self._context)

        opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), Handler(), TLSHandler(),
                        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
            opener.add_handler(handler)
        return opener


def _call(req: urllib.request.Request, timeout: float, deadline: float, sink, max_bytes: int | None) -> int:
    """One HTTP call copied into `sink`, whole by `deadline` or a ServiceError; an error status is
    a ServiceError with the service's 'detail' (read bounded too) and its status."""
    method, url = req.get_method(), req.full_url
    watchdog = _Watchdog(deadline)
    try:
        with watchdog.opener().open(req, timeout=timeout) as response:
            try:
                copied = _read_bounded(response, url, sink, max_bytes, deadline)
            finally:
                watchdog.finish()  # before the socket closes (and its descriptor may be reused)
        if watchdog.fired:  # cut mid-answer: http.client may take the shut socket for a short, whole answer
            raise ServiceError(f"{method} {url}: too slow (deadline passed)")
        return copied
    except ServiceError as exc:
        if watchdog.fired:  # the cut made the answer look short: say why it was cut
            raise ServiceError(f"{method} {url}: too slow (deadline passed)") from None
        raise ServiceError(str(exc).replace("GET ", f"{method} ", 1)) from None
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read(65536)).get("detail", "")
        except (ValueError, AttributeError, RecursionError, OSError, http.client.HTTPException):
            detail = ""
        finally:
            watchdog.finish()
            exc.close()
        if 300 <= exc.code < 400:  # never followed (see _Watchdog.opener)
            raise ServiceError(f"{method} {url}: redirected (HTTP {exc.code}); not followed", exc.code) from None
        raise ServiceError(f"{method} {url}: HTTP {exc.code} {str(detail)[:300]}".rstrip(), exc.code) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        if watchdog.fired:
            raise ServiceError(f"{method} {url}: too slow (deadline passed)") from None
        raise ServiceError(f"{method} {url}: unreachable or broken answer "
                           f"({getattr(exc, 'reason', None) or type(exc).__name__})") from None
    finally:
        watchdog.finish()


def request(method: str, url: str, token: str | None = None, body: dict | None = None,
            data: bytes | None = None, content_type: str | None = None, timeout: float = 30, raw: bool = False,
            deadline: float | None = None):
    """JSON (or raw bytes) from one HTTP call; ServiceError with the service's detail on failure.
    The answer must be whole by `deadline` (time.monotonic(); default 4 x timeout from now)."""
    deadline = time.monotonic() + 4 * timeout if deadline is None else deadline
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data, content_type = json.dumps(body).encode(), "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    chunks: list[bytes] = []
    _call(urllib.request.Request(url, data=data, method=method, headers=headers), timeout, deadline,
          chunks.append, MAX_JSON_BYTES)
    payload = b"".join(chunks)
    if raw:
        return payload
    try:
        return json.loads(payload or b"null")
    except (ValueError, RecursionError):  # HTML from a proxy, truncated JSON, absurd nesting
        raise ServiceError(f"{method} {url}: the answer is not JSON ({len(payload)} bytes)") from None


def download(url: str, dest: Path, token: str | None = None, timeout: float = 60, max_bytes: int | None = None,
             deadline: float | None = None) -> int:
    """Stream url into dest; ServiceError (and no file) when it fails, sends more than max_bytes or
    is still running at `deadline` (time.monotonic(); default 4 x timeout per 1 MB of max_bytes,
    at least 4 x timeout), so neither an oversized nor a trickling answer can hold the caller.
    Returns the byte count."""
    if deadline is None:
        deadline = time.monotonic() + 4 * timeout * max(1.0, (max_bytes or 0) / 1e6)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        f = open(dest, "wb")
    except OSError as exc:
        raise ServiceError(f"GET {url}: cannot write {dest} ({exc.strerror or type(exc).__name__})") from None
    try:
        with f:
            return _call(urllib.request.Request(url, headers=headers), timeout, deadline, f.write, max_bytes)
    except BaseException:
        Path(dest).unlink(missing_ok=True)  # ours: opened (and so created or emptied) above
        raise


def multipart(fields: dict[str, str], file_field: str, file_name: str, file_bytes: bytes) -> tuple[bytes, str]:
    """Body and content type of a multipart/form-data upload."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"{file_name}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + file_bytes + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class EdgeClient:
    """What a device (or an admin script) does with an edge node."""

    def __init__(self, url: str, token: str, timeout: float = 30):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def call(self, method: str, path: str, **kwargs):
        return request(method, self.url + path, self.token, timeout=self.timeout, **kwargs)

    def enrol(self, name: str) -> dict:
        return self.call("POST", "/devices", body={"name": name})

    def upload(self, image_bytes: bytes, label: str, file_name: str = "face.png", subject: str | None = None) -> dict:
        """Send one labelled face; `subject` (who it shows) lets the edge's jobs test on held-out people."""
        fields = {"label": label, **({"subject": subject} if subject else {})}
        body, content_type = multipart(fields, "file", file_name, image_bytes)
        return self.call("POST", "/samples", data=body, content_type=content_type)

    def me(self) -> dict:
        """This device's id and name, the edge's name and its MQTT broker (or None)."""
        return self.call("GET", "/me")

    def latest_bundle(self) -> dict | None:
        """{"version": N, "manifest": {...}} of the edge's newest bundle, None when it has none;
        ServiceError when the answer is not of that form. For people and scripts: devices decide
        from the edge's signed TUF metadata (emoshield.device.sync), never from this answer."""
        try:
            latest = self.call("GET", "/bundles/latest")
        except ServiceError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            if not isinstance(latest, dict) or not isinstance(latest.get("manifest"), dict):
                raise RemoteValueError("no manifest object")
            parse_version(latest.get("version"), "latest version", 1)
        except RemoteValueError as exc:
            raise ServiceError(f"GET {self.url}/bundles/latest: malformed answer ({exc})") from None
        return latest


def wait_healthy(url: str, process=None, timeout: float = 60) -> dict:
    """Poll URL/health until it answers (its JSON), the service `process` exits, or `timeout`
    seconds pass (ServiceError in both of the last cases)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"the service for {url} exited with status {process.returncode}")
        try:
            return request("GET", url + "/health", timeout=2)
        except ServiceError:
            if time.monotonic() > deadline:
                raise ServiceError(f"{url} did not become healthy in {timeout:g} s") from None
            time.sleep(0.3)
