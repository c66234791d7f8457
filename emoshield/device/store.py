"""The device's bundle store (one folder):

    bundles/v<N>/     verified bundles, never modified after install (current + previous only)
    state.json        {"current": N, "previous": M, "rejected": [...]}, replaced atomically
    staging/          downloads in progress, discarded on failure and at start
    tuf/              the update channel's verified TUF metadata (see sync.py)

A bundle becomes current only after signature, hashes, a strictly higher version and a
health check pass.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..tiers.bundle import WEIGHTS, BundleError, BundleVersionError, verify_bundle
from ..tiers.signing import load_public_key
from .recognizer import health_check


class BundleStore:
    """Verified bundles on the device and which one is current.

    Keeps the current and the previous bundle only (older ones are deleted after each install),
    remembers versions it rolled back from so that they are not installed again, and removes
    half-copied downloads left in staging/ by a process that died (kill -9, power loss)."""

    MAX_REJECTED = 32

    def __init__(self, root: Path, public_key, health: Callable[[Path], object] = health_check):
        self.root = Path(root)
        self.public_key = load_public_key(Path(public_key)) if isinstance(public_key, (str, Path)) else public_key
        self.health = health
        (self.root / "bundles").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / "staging", ignore_errors=True)  # leftovers of a process that died mid-download
        for leftover in self.root.glob(".state-*.json"):
            leftover.unlink(missing_ok=True)
        try:
            self._collect_garbage()  # a bundle moved in by an install that died before its state change
        except BundleError:
            pass  # unreadable state: install/rollback report it

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        path = self.root / "state.json"
        if not path.is_file():
            return {"current": None, "previous": None, "rejected": []}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: unreadable store state ({exc.__class__.__name__})") from None
        return {"rejected": [], **state}

    def _write_state(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / "state.json")
        except OSError as exc:  # disk full: the old state.json is still whole
            Path(tmp).unlink(missing_ok=True)
            raise BundleError(f"{self.root}: cannot write the store state ({exc.strerror or exc})") from None

    def current_version(self) -> int | None:
        return self.state()["current"]

    def current_dir(self) -> Path | None:
        version = self.current_version()
        return self.version_dir(version) if version is not None else None

    def version_dir(self, version: int) -> Path:
        return self.root / "bundles" / f"v{int(version)}"

    def staging(self) -> Path:
        """A fresh folder under staging/ for one download (removed by install or at the next start)."""
        (self.root / "staging").mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root / "staging"))

    def verify(self, bundle_dir: Path, min_version: int | None = None) -> dict:
        """verify_bundle for a device: the weights file (for the edge and cloud) may be absent,
        every other listed file must be there and match its signed hash."""
        return verify_bundle(bundle_dir, self.public_key, min_version=min_version, optional=(WEIGHTS,))

    # -- changes --------------------------------------------------------------------------------
    def install(self, source_dir: Path, move: bool = False) -> dict:
        """Copy a bundle in (`move`: move its files, for a download already in this store's
        staging/), verify it (signature, hashes, version > current, not rolled back from
        before), health-check it, then make it current; the old current becomes `previous` and
        older bundles are deleted. On any failure, a full disk included, the store is unchanged
        and BundleError says why. What the health check returned (the self-checked classifier)
        is kept for `take_checked`, so the new bundle is not loaded and checked twice."""
        state = self.state()
        work = self.staging()
        try:
            for item in Path(source_dir).iterdir():
                if item.is_file() and not item.is_symlink():
                    (os.replace if move else shutil.copyfile)(item, work / item.name)
            manifest = self.verify(work, min_version=state["current"])
            if manifest["version"] in state["rejected"]:
                raise BundleVersionError(f"bundle v{manifest['version']} was rolled back from before; not installing "
                                         "it again (publish a newer version)")
            checked = self.health(work)
            target = self.version_dir(manifest["version"])
            if target.exists():
                shutil.rmtree(target)  # a leftover of an install that died before its state change
            os.replace(work, target)
            if hasattr(checked, "bundle_dir"):
                checked.bundle_dir = target  # its model is in memory; the folder moved
        except OSError as exc:
            raise BundleError(f"{self.root}: cannot install the bundle ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._write_state({**state, "current": manifest["version"], "previous": state["current"]})
        self._checked = (manifest["version"], checked)
        self._collect_garbage()
        return manifest

    def take_checked(self, version: int):
        """What the health check returned when this process installed `version` (once; None
        for another version or when it was taken)."""
        checked, self._checked = getattr(self, "_checked", None), None
        return checked[1] if checked is not None and checked[0] == version else None

    def rollback(self, reason: str = "") -> int:
        """Make the previous bundle current again (e.g. the new one failed at run time); the bad
        version is remembered and never installed again."""
        state = self.state()
        if state["previous"] is None:
            raise BundleError("no previous bundle to roll back to" + (f" ({reason})" if reason else ""))
        bad = state["current"]
        rejected = [*state["rejected"], bad][-self.MAX_REJECTED:]
        self._write_state({"current": state["previous"], "previous": None, "rejected": rejected,
                           "reason": reason[:500]})
        return state["previous"]

    def _collect_garbage(self) -> None:
        state = self.state()
        keep = {f"v{v}" for v in (state["current"], state["previous"]) if v is not None}
        for folder in (self.root / "bundles").iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
