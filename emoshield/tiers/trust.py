"""The edge's update repository in The Update Framework's format (TUF, python-tuf's metadata API).

Devices install a bundle only when TUF metadata signed by this repository's keys names it:

    root       who may sign what; signed by the OFFLINE root key, which never lives on the edge
               (`emoshield trust init` writes it where the operator says; `trust rotate` needs it)
    targets    every file of the last few bundles (path, size, sha256) and the entry
               `bundles/latest.json`, whose signed `custom` field names the newest version: a
               device learns what is current from signed metadata, not from the edge's word or
               from what its store happens to hold
    snapshot   the targets metadata's version
    timestamp  the snapshot's version, re-signed often and expiring soon (a day by default):
               an edge or mirror that keeps serving an old state is detected once it expires

The online keys sit in TRUST/keys/<role>-<keyid>.key (mode 0600): a role signs with the key
file its current root names, so a rotation writes the new key files, then the new root, then
deletes the old files, and a crash at any point leaves a root whose keys are on disk. The edge
re-signs each role well before it expires. Rotating or revoking a key is a new root version
signed with the offline key, after checking that the current root is one that key signed (an
edge that edits root.json cannot make the operator sign its changes); devices follow the chain
of roots. Metadata is consistent-snapshot: versioned files are never rewritten, and
timestamp.json, the only file replaced in place, is written last, so a device reading while the
edge publishes sees either the old or the new state, never a mix.

Only the edge and the operator's CLI use this module (it signs); devices verify with
python-tuf's client (`emoshield.device.sync`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..errors import EmoshieldError
from ..paths import write_atomic
from .signing import load_private_key, write_private_key

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
LATEST_TARGET = "bundles/latest.json"
KEEP_BUNDLE_VERSIONS = 4  # bundles listed in targets metadata (devices only install the newest)
KEEP_METADATA_VERSIONS = 8  # old N.snapshot.json / N.targets.json kept for devices mid-update
# what a device may fetch: timestamp.json, or N.root.json / N.snapshot.json / N.targets.json
LIFETIMES = "lifetimes.json"
METADATA_FILE = re.compile(r"(timestamp|[1-9][0-9]{0,9}\.(root|snapshot|targets))\.json")


@dataclass(frozen=True)
class Lifetimes:
    """How long each role's signature is valid. The edge re-signs a role once less than half of
    its lifetime is left, so a device that reaches its edge at least that often never sees
    expired metadata; the root is re-signed only offline (`emoshield trust rotate`)."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=30)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        return getattr(self, role)


    def to_json(self) -> dict:
        return {role: getattr(self, role).total_seconds() for role in ("root", *ONLINE_ROLES)}

    @classmethod
    def from_json(cls, value: dict) -> "Lifetimes":
        return cls(**{role: timedelta(seconds=float(value[role])) for role in ("root", *ONLINE_ROLES)})


def lifetimes_for(timestamp_seconds: float) -> Lifetimes:
    """Default lifetimes with the timestamp's set (the others never shorter than it)."""
    if not timestamp_seconds >= 1:
        raise EmoshieldError("the timestamp lifetime must be at least 1 second")
    timestamp = timedelta(seconds=timestamp_seconds)
    base = Lifetimes()
    return Lifetimes(root=max(base.root, timestamp), targets=max(base.targets, timestamp),
                     snapshot=max(base.snapshot, timestamp), timestamp=timestamp)


class TrustError(EmoshieldError):
    """The update repository is missing, damaged, or asked to do something unsafe."""


def _key_file(role: str, keyid: str | None) -> str:
    return f"{role}-{keyid[:16]}.key" if keyid else f"{role}.new.key"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _signer(key_path: Path):
    from securesystemslib.signer import CryptoSigner

    return CryptoSigner(load_private_key(key_path))


def _new_key(path: Path):
    """A new Ed25519 key written to `path` (0600, atomically); returns its signer."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner

    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_key(path, key)
    return CryptoSigner(key)


class TrustRepository:
    """TRUST/metadata (what devices fetch), TRUST/keys (the online keys), TRUST/lifetimes.json.

    Every change takes an exclusive file lock, so the edge's re-signing thread, its job
    publisher and an operator's `trust rotate` never interleave."""

    def __init__(self, root: Path, lifetimes: Lifetimes | None = None):
        """`lifetimes` None: those saved with the repository (the edge's, so an operator's
        `trust rotate` signs with the same), else the defaults."""
        self.root = Path(root)
        self.metadata_dir = self.root / "metadata"
        self.keys_dir = self.root / "keys"
        self._thread_lock = threading.Lock()
        if lifetimes is None:
            try:
                lifetimes = Lifetimes.from_json(json.loads((self.root / LIFETIMES).read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                lifetimes = Lifetimes()
        self.lifetimes = lifetimes

    def save_lifetimes(self) -> None:
        write_atomic(self.root / LIFETIMES, json.dumps(self.lifetimes.to_json()).encode())

    # -- set-up (offline) -----------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, root_key: Path, lifetimes: Lifetimes = Lifetimes()) -> "TrustRepository":
        """A new repository: online keys, root v1 signed by `root_key` (created when it does not
        exist yet; it must live outside `root`: it is the key that can replace every other),
        and empty targets/snapshot/timestamp."""
        from tuf.api.metadata import Metadata, Root

        repo = cls(root, lifetimes)
        if any(folder.is_dir() and any(folder.iterdir()) for folder in (repo.metadata_dir, repo.keys_dir)):
            raise TrustError(f"{repo.root} already holds an update repository (or part of one): rotate keys with "
                             "emoshield trust rotate, or move it away first")
        root_key = repo._outside(root_key)
        repo.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the edge's folder, if new
        for folder in (repo.root, repo.metadata_dir, repo.keys_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        root_signer = _signer(root_key) if root_key.is_file() else _new_key(root_key)
        with repo._locked():
            repo.save_lifetimes()
            md = Metadata(Root(expires=_now() + lifetimes.root))
            md.signed.add_key(root_signer.public_key, "root")
            for role in ONLINE_ROLES:
                md.signed.add_key(_new_key(repo.keys_dir / _key_file(role, None)).public_key, role)
            repo._name_keys_by_id(md)
            md.sign(root_signer)
            repo._write_root(md)
            repo._publish_targets(repo._new_targets())
        return repo

    def rotate(self, root_key: Path, roles: list[str], new_root_key: Path | None = None) -> int:
        """New keys for `roles` (the old ones are revoked), and optionally a new root key;
        writes the next root version (signed by the old root key, and the new one when it
        changes, as TUF requires), then re-signs everything below it. Also renews the root's
        expiry when `roles` is empty. Refuses unless the current root is one `root_key` signed.
        Returns the new root version."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from securesystemslib.signer import CryptoSigner

        for role in roles:
            if role not in ONLINE_ROLES:
                raise TrustError(f"unknown role {role!r} (one of {', '.join(ONLINE_ROLES)}; the root key rotates "
                                 "with --new-root-key)")
        old_signer = _signer(Path(root_key))
        new_signer = new_private = None
        if new_root_key is not None:
            new_root_key = self._outside(new_root_key)
            if new_root_key.is_file():
                new_signer = _signer(new_root_key)
            else:
                new_private = Ed25519PrivateKey.generate()
                new_signer = CryptoSigner(new_private)
        with self._locked():
            md = self._verified_root(old_signer, root_key)
            old_files = {role: self._key_path(md, role) for role in roles}
            fresh = {role: Ed25519PrivateKey.generate() for role in roles}  # nothing written yet
            for role, private in fresh.items():
                for keyid in list(md.signed.roles[role].keyids):
                    md.signed.revoke_key(keyid, role)
                md.signed.add_key(CryptoSigner(private).public_key, role)
            signers = [old_signer]
            if new_signer is not None:
                md.signed.revoke_key(old_signer.public_key.keyid, "root")
                md.signed.add_key(new_signer.public_key, "root")
                signers.append(new_signer)
            md.signed.version += 1
            md.signed.expires = _now() + self.lifetimes.root
            md.signatures.clear()
            for signer in signers:
                md.sign(signer, append=True)
            # new key files first (new names), then the root that names them, then the old files go
            for role, private in fresh.items():
                write_private_key(self.keys_dir / _key_file(role, CryptoSigner(private).public_key.keyid), private)
            if new_private is not None:
                new_root_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_private_key(new_root_key, new_private)
            self._write_root(md)
            for path in old_files.values():
                path.unlink(missing_ok=True)
            self._publish_targets(self._read("targets"))  # signed by the new keys from now on
            return md.signed.version

    def _verified_root(self, signer, root_key: Path):
        """The current root, refused unless it is the newest N.root.json and `signer` (the
        operator's offline key) validly signed it: whoever edits root.json on the edge (adds a
        key, changes a threshold) cannot get that change signed."""
        md = self._read("root")
        newest = max((int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")), default=0)
        if newest != md.signed.version or (self.metadata_dir / f"{newest}.root.json").read_bytes() != \
                (self.metadata_dir / "root.json").read_bytes():
            raise TrustError(f"{self.metadata_dir}: root.json is not the newest N.root.json (v{newest}): refusing to "
                             "sign over it; restore the metadata from a backup")
        keyid = signer.public_key.keyid
        if keyid not in md.signed.roles["root"].keyids or keyid not in md.signatures:
            raise TrustError(f"{root_key} is not this repository's root key")
        try:
            signer.public_key.verify_signature(md.signatures[keyid], md.signed_bytes)
        except Exception:  # securesystemslib raises its own verification errors
            raise TrustError(f"root v{md.signed.version} on the edge is not what {root_key} signed (changed since): "
                             "refusing to sign over it") from None
        return md

    def _outside(self, key: Path) -> Path:
        key = Path(key).resolve()
        edge_folder = self.root.resolve().parent
        if key.is_relative_to(edge_folder):
            raise TrustError(f"the root key {key} must be kept outside the edge's folder {edge_folder} "
                             "(offline: whoever holds it can replace every key)")
        return key

    # -- what the edge does ---------------------------------------------------------------------
    def initialized(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file() and (self.metadata_dir / "root.json").is_file()

    def check(self) -> None:
        """Refuse to serve from a repository that does not exist or whose keys are missing."""
        if not self.initialized():
            raise TrustError(f"no update repository in {self.root}: create one with `emoshield trust init --edge-root "
                             f"{self.root.parent} --root-key FILE` (keep FILE offline; devices get "
                             f"{self.metadata_dir / '1.root.json'} as their --trust-root)")
        root = self._read("root")
        for role in ONLINE_ROLES:
            path = self._key_path(root, role)
            if not path.is_file():
                raise TrustError(f"{path} is missing: restore it or rotate the {role} key with emoshield trust rotate")

    def publish(self, version: int, bundle_dir: Path, names: list[str]) -> None:
        """List bundle `version`'s files and make it the newest (drops bundles older than the
        last KEEP_BUNDLE_VERSIONS from the metadata)."""
        from tuf.api.metadata import TargetFile

        with self._locked():
            targets = self._read("targets")
            for name in names:
                path = f"bundles/{version}/{name}"
                targets.signed.targets[path] = TargetFile.from_file(path, str(Path(bundle_dir) / name), ["sha256"])
            listed = sorted({int(p.split("/")[1]) for p in targets.signed.targets if p != LATEST_TARGET})
            for old in listed[:-KEEP_BUNDLE_VERSIONS]:
                for path in [p for p in targets.signed.targets if p.startswith(f"bundles/{old}/")]:
                    del targets.signed.targets[path]
            newest = json.dumps({"version": max(listed)}).encode()
            targets.signed.targets[LATEST_TARGET] = TargetFile.from_data(LATEST_TARGET, newest, ["sha256"])
            targets.signed.targets[LATEST_TARGET].unrecognized_fields["custom"] = {"version": max(listed)}
            self._publish_targets(targets)

    def refresh(self) -> list[str]:
        """Re-sign the roles with less than half their lifetime left (each change also renews
        the roles above it); returns the roles re-signed."""
        renewed = []
        with self._locked():
            now = _now()
            due = {role: self._read(role).signed.expires - now < self.lifetimes.of(role) / 2 for role in ONLINE_ROLES}
            if due["targets"]:
                self._publish_targets(self._read("targets"))
                return list(ONLINE_ROLES)
            if due["snapshot"]:
                self._publish_snapshot(self._read("targets").signed.version)
                return ["snapshot", "timestamp"]
            if due["timestamp"]:
                self._publish_timestamp(self._read("snapshot"))
                renewed.append("timestamp")
        return renewed

    def expiry(self) -> dict[str, str]:
        """Each role's expiry (ISO 8601, UTC): what /health shows an operator."""
        return {role: self._read(role).signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
                for role in ("root", *ONLINE_ROLES)}

    def metadata_file(self, name: str) -> Path | None:
        """The file a device asked for, or None when `name` is not a metadata file name."""
        if not METADATA_FILE.fullmatch(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def latest_version(self) -> int | None:
        """The version the signed targets metadata names as newest (None before the first bundle)."""
        entry = self._read("targets").signed.targets.get(LATEST_TARGET)
        return None if entry is None else entry.custom["version"]

    # -- internals ------------------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        with self._thread_lock, os.fdopen(fd, "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, role: str):
        from tuf.api.metadata import Metadata
        from tuf.api.serialization import DeserializationError

        try:
            return Metadata.from_bytes((self.metadata_dir / f"{role}.json").read_bytes())
        except (OSError, ValueError, DeserializationError) as exc:
            raise TrustError(f"{self.metadata_dir / (role + '.json')}: unreadable ({exc.__class__.__name__}); "
                             "restore it from a backup") from None

    def _bytes(self, md) -> bytes:
        from tuf.api.serialization.json import JSONSerializer

        return md.to_bytes(JSONSerializer(compact=True))

    def _key_path(self, root, role: str) -> Path:
        return self.keys_dir / _key_file(role, root.signed.roles[role].keyids[0])

    def _sign(self, md, role: str):
        md.signatures.clear()
        md.sign(_signer(self._key_path(self._read("root"), role)))
        return md

    def _name_keys_by_id(self, root) -> None:
        """Give the key files init wrote their keyid names (what _key_path looks for)."""
        for role in ONLINE_ROLES:
            os.replace(self.keys_dir / _key_file(role, None), self._key_path(root, role))

    def _write_root(self, md) -> None:
        data = self._bytes(md)
        write_atomic(self.metadata_dir / f"{md.signed.version}.root.json", data)
        write_atomic(self.metadata_dir / "root.json", data)

    def _new_targets(self):
        from tuf.api.metadata import Metadata, Targets

        md = Metadata(Targets(expires=_now()))
        md.signed.version = 0  # _publish_targets bumps it to 1 (the constructor refuses 0)
        return md

    def _publish_targets(self, targets) -> None:
        """targets (next version) -> snapshot -> timestamp, each versioned file before the next."""
        targets.signed.version += 1
        targets.signed.expires = _now() + self.lifetimes.targets
        data = self._bytes(self._sign(targets, "targets"))
        write_atomic(self.metadata_dir / f"{targets.signed.version}.targets.json", data)
        write_atomic(self.metadata_dir / "targets.json", data)
        self._publish_snapshot(targets.signed.version, len(data))

    def _publish_snapshot(self, targets_version: int, targets_length: int | None = None) -> None:
        from tuf.api.metadata import Metadata, MetaFile, Snapshot

        if targets_length is None:
            targets_length = (self.metadata_dir / f"{targets_version}.targets.json").stat().st_size
        if (self.metadata_dir / "snapshot.json").exists():
            snapshot = self._read("snapshot")
        else:
            snapshot = Metadata(Snapshot(expires=_now()))
            snapshot.signed.version = 0  # bumped to 1 below
        snapshot.signed.version += 1
        snapshot.signed.expires = _now() + self.lifetimes.snapshot
        snapshot.signed.meta = {"targets.json": MetaFile(version=targets_version, length=targets_length)}
        data = self._bytes(self._sign(snapshot, "snapshot"))
        write_atomic(self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", data)
        write_atomic(self.metadata_dir / "snapshot.json", data)
        self._publish_timestamp(snapshot, len(data))
        self._collect_garbage(snapshot.signed.version, targets_version)

    def _publish_timestamp(self, snapshot, snapshot_length: int | None = None) -> None:
        from tuf.api.metadata import Metadata, MetaFile, Timestamp

        if snapshot_length is None:
            snapshot_length = (self.metadata_dir / f"{snapshot.signed.version}.snapshot.json").stat().st_size
        path = self.metadata_dir / "timestamp.json"
        version = self._read("timestamp").signed.version if path.is_file() else 0
        timestamp = Metadata(Timestamp(version=version + 1, expires=_now() + self.lifetimes.timestamp,
                                       snapshot_meta=MetaFile(version=snapshot.signed.version, length=snapshot_length)))
        write_atomic(path, self._bytes(self._sign(timestamp, "timestamp")))  # last: the switch to the new state

    def _collect_garbage(self, snapshot_version: int, targets_version: int) -> None:
        for role, newest in (("snapshot", snapshot_version), ("targets", targets_version)):
            for path in self.metadata_dir.glob(f"*.{role}.json"):
                if int(path.name.split(".")[0]) <= newest - KEEP_METADATA_VERSIONS:
                    path.unlink(missing_ok=True)
