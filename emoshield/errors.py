"""One error type for problems a user can fix (bad paths, bad options, bad files).

The CLI prints these as a single line instead of a traceback.
"""


class EmoshieldError(Exception):
    """A user-facing problem, described in one line that names the file or option."""
