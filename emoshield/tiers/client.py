"""A small HTTP client for the edge and cloud services (stdlib only: devices run it too)."""

from __future__ import annotations

import json
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
    once time.monotonic() passes `deadline`: the socket timeout bounds each read, not the whole
    answer, so without this a peer sending a byte now and then would hold the caller forever."""
    copied = 0
    # read1: whatever has arrived (read() would wait for the whole 64 kB, past the deadline)
    while block := response.read1(1 << 16 if max_bytes is None else min(1 << 16, max_bytes - copied + 1)):
        copied += len(block)
        if max_bytes is not None and copied > max_bytes:
            raise ServiceError(f"GET {url}: more than the {max_bytes} bytes expected")
        if deadline is not None and time.monotonic() > deadline:
            raise ServiceError(f"GET {url}: too slow (deadline passed after {copied} bytes)")
        sink(block)
    return copied


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
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        chunks: list[bytes] = []
        with urllib.request.urlopen(req, timeout=timeout) as response:
            _read_bounded(response, url, chunks.append, MAX_JSON_BYTES, deadline)
        payload = b"".join(chunks)
    except ServiceError as exc:
        raise ServiceError(str(exc).replace("GET ", f"{method} ", 1)) from None
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        raise ServiceError(f"{method} {url}: HTTP {exc.code} {detail}".rstrip(), exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServiceError(f"{method} {url}: unreachable ({getattr(exc, 'reason', exc)})") from None
    if raw:
        return payload
    try:
        return json.loads(payload or b"null")
    except (ValueError, RecursionError):  # HTML from a proxy, truncated JSON, absurd nesting
        raise ServiceError(f"{method} {url}: the answer is not JSON ({len(payload)} bytes)") from None


def download(url: str, dest: Path, token: str | None = None, timeout: float = 60, max_bytes: int | None = None,
             deadline: float | None = None) -> int:
    """Stream url into dest; ServiceError (and no file) when it fails, sends more than max_bytes or
    is still running at `deadline` (time.monotonic()), so neither an oversized nor a trickling
    answer can hold the caller. Returns the byte count."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r, \
                open(dest, "wb") as f:
            copied = _read_bounded(r, url, f.write, max_bytes, deadline)
    except ServiceError:
        Path(dest).unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as exc:
        Path(dest).unlink(missing_ok=True)
        raise ServiceError(f"GET {url}: HTTP {exc.code}", exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        Path(dest).unlink(missing_ok=True)
        raise ServiceError(f"GET {url}: failed ({getattr(exc, 'reason', exc)})") from None
    return copied


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
