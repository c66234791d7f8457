"""Strict parsing of values that arrive from another process (HTTP answers, MQTT payloads,
cloud metadata): one place that decides what a version, a hash or a file name may be, so a
peer that lies gets a one-line error instead of an OverflowError deep in a thread.

Torch-free: devices use it.
"""

from __future__ import annotations

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
