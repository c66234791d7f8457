"""Facts every saved result carries: code version, git commit, time, machine."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

from . import __version__


def git_commit() -> str:
    """Commit of the emoshield source tree ('+dirty' when it has local changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info() -> dict:
    """Version, commit, time (UTC) and machine of the current run."""
    return {
        "emoshield_version": __version__,
        "git_commit": git_commit(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
