"""One error type for problems a user can fix (bad paths, bad options, bad files).

The CLI prints these as a single line instead of a traceback.
"""


class EmoshieldError(Exception):
    """A user-facing problem, described in one line that names the file or option."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception as the one line a log, a job record or a heartbeat shows: its type and its
    message's first line (cut to `limit` characters)."""
    text = printable((str(error).strip().splitlines() or [""])[0][:limit])
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def printable(text: str) -> str:
    """`text` with every character that is not printable (NUL, escapes, newlines) shown as '?':
    for databases, logs and terminals, whatever a peer or a file put in it."""
    return "".join(c if c.isprintable() else "?" for c in text)
