"""Strict parsing of values that arrive from another process (HTTP answers, MQTT payloads,
cloud metadata): one place that decides what a version, a hash or a file name may be, so a
peer that lies gets a one-line error instead of an OverflowError deep in a thread.

Torch-free: devices use it.
"""

from __future__ import annotations

import math
import re

from ..errors import EmoshieldError

MAX_VERSION = 2**31 - 1
MIN_TOKEN_LENGTH = 12  # for tokens an operator configures; the edge's own are 43 characters  # fits every SQL integer column and every JSON number exactly
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # an upload's optional subject tag (who the face shows)


def subject_tag(subject: object) -> str | None:
    """A dataset's subject id made into a tag that SUBJECT_PATTERN accepts; None when unknown."""
    if not subject:
        return None
    tag = re.sub(r"[^A-Za-z0-9._-]", "-", str(subject)).lstrip("._-")[:64]
    return tag or None


class RemoteValueError(EmoshieldError, ValueError):
    """A value from a peer is not of the form it must have."""


def parse_version(value, what: str = "version", minimum: int = 0) -> int:
    """A bundle or job version: a JSON integer (not a bool, float or string) in [minimum, 2**31 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_VERSION:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise RemoteValueError(f"{what} {shown} is not an integer in [{minimum}, {MAX_VERSION}]")
    return value


def parse_sha256(value, what: str = "sha256") -> str:
    """A lowercase hex SHA-256 digest (safe to use in a file name)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise RemoteValueError(f"{what} is not 64 lowercase hex characters")
    return value


def parse_file_name(value, what: str = "file name") -> str:
    """A plain file name: letters, digits, '.', '_', '-', not starting with a dot, no separators."""
    if not isinstance(value, str) or not _FILE_NAME.fullmatch(value):
        raise RemoteValueError(f"{what} {value!r:.60} is not a plain file name")
    return value


def parse_token(token: str | None, what: str = "token", min_length: int = 1) -> str:
    """A bearer token as the services accept it: printable ASCII without spaces, at most 512
    characters (RFC 6750's token68 alphabet is a subset). Refuses empty, whitespace-only and
    non-ASCII values with a one-line error, so no such token can be configured or compared."""
    token = (token or "").strip()
    if not token:
        raise RemoteValueError(f"the {what} is empty")
    if not (token.isascii() and token.isprintable()) or " " in token or not min_length <= len(token) <= 512:
        raise RemoteValueError(f"the {what} must be {min_length}-512 printable ASCII characters without spaces")
    return token


def parse_topic_level(value, what: str) -> str:
    """A name the device puts in an MQTT topic (the edge's name, its own id): 1-64 printable
    characters without the topic separator or wildcards ('/', '+', '#'), so no peer can make a
    device publish outside its own topic or make paho refuse the topic mid-stream; not starting
    with '-', since the edge's name is also an argument of its jobs' commands."""
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable() \
            or any(c in value for c in "/+#") or value.startswith("-"):
        raise RemoteValueError(f"{what} {value!r:.60} is not 1-64 printable characters without '/', '+', '#' "
                               "(nor a leading '-': it is passed on command lines)")
    return value


def parse_me(value) -> dict:
    """The edge's GET /me answer as the device uses it: {'id', 'edge'} topic-level names, 'mqtt'
    (None, or a broker address of at most 255 printable ASCII characters) and 'mqtt_auth' (None
    or 'token'). Anything else is a RemoteValueError: the device then polls over HTTP."""
    if not isinstance(value, dict):
        raise RemoteValueError(f"the edge's /me answer is {type(value).__name__}, not an object")
    broker, auth = value.get("mqtt"), value.get("mqtt_auth")
    if broker is not None and not (isinstance(broker, str) and 0 < len(broker) <= 255 and broker.isascii()
                                   and broker.isprintable() and " " not in broker):
        raise RemoteValueError(f"the edge's broker address {broker!r:.60} is not printable ASCII")
    if auth not in (None, "token"):
        raise RemoteValueError(f"the edge's mqtt_auth {auth!r:.40} is neither null nor 'token'")
    return {"id": parse_topic_level(value.get("id"), "device id"), "edge": parse_topic_level(value.get("edge"), "edge name"),
            "mqtt": broker or None, "mqtt_auth": auth}


def finite(value: object, low: float = 0.0, high: float = 1e9) -> float | None:
    """A JSON number (not a bool) as a float when it is finite and in [low, high], else None (an
    integer too large for a float included): one test for every number a peer or a file gives."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and low <= value <= high else None
