"""The cloud tier as an HTTP service: it lists and serves the model library's backbones with
their sha256, so edge nodes can fetch one and verify it before training on it.

    GET /health                       {"status": "ok", "entries": N}
    GET /backbones                    [metadata, ...]
    GET /backbones/{name}             metadata (backbone, input size, data, accuracy, sha256, ...)
    GET /backbones/{name}/weights     the safetensors file (X-Content-SHA256 header)

By default it serves the user's library and then the embedded one (emoshield.models.library).
OpenAPI docs at /docs. Read-only: entries are added with `emoshield cloud add` or
`emoshield cloud pretrain`. With a database (`--database URL`, any SQLAlchemy URL), the entries
found in the library folder are indexed there at start and the service answers from that
catalog, so several replicas over one shared library folder serve one list. A replica scans the
folder again on a request once `refresh` seconds have passed since its last scan, and writes the
catalog only when it differs from the folder, under a lock all replicas take (so an older scan
never overwrites a newer one). An entry added or replaced while replicas run is listed within
that time. Weights always go out under the sha256 of the bytes sent, read from one open file (a
replica re-indexes when they and the catalog differ, and answers 503 while an entry's weights and
metadata still disagree), so a download is never cut short or mislabelled by a replacement.
Entry folders the catalog cannot hold are skipped with one warning (emoshield.models.library). A
database that is down, locked or out of connections answers 503 (retry later); the driver's
message stays in the log.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

from ..errors import EmoshieldError
from ..models.library import WEIGHTS_FILE, check_name, find_entry_dir, list_entries, read_entry


REFRESH_SECONDS = 10.0
_HASHES: OrderedDict[tuple[int, ...], str] = OrderedDict()  # file version -> sha256 of its bytes (LRU)
_HASHING = threading.Lock()  # one hash at a time: requests racing for a new version hash it once
_WARNED: set[tuple[int, ...]] = set()


def _log(line: str) -> None:
    sys.stderr.write(f"cloud: {line}\n")  # one write: lines from several threads stay whole
    sys.stderr.flush()


def _sha256_of(f) -> tuple[str, tuple[int, ...]]:
    """(sha256 of an open file's bytes, the file version it was computed for), computed once per
    version (device, inode, size, mtime, ctime); the file is left at its start."""
    st = os.fstat(f.fileno())
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HASHING:
        digest = _HASHES.get(key)
        if digest is None:
            h = hashlib.sha256()
            while block := f.read(1 << 20):
                h.update(block)
            f.seek(0)
            digest = _HASHES[key] = h.hexdigest()
            if len(_HASHES) > 1024:
                _HASHES.popitem(last=False)
        _HASHES.move_to_end(key)
    return digest, key


def _chunks(f):
    try:
        while block := f.read(1 << 20):
            yield block
    finally:
        f.close()


def create_app(library: Path | None = None, database: str | None = None, refresh: float = REFRESH_SECONDS):
    """The service over one library folder, or (None) the default search path: the user's
    library, then the embedded one. With a database, the folder is re-indexed at most every
    `refresh` seconds (0: on every request)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from starlette.background import BackgroundTask

    library = Path(library) if library is not None else None
    app = FastAPI(title="emoshield cloud", description="Model library of pretrained backbones.", version="1")
    catalog = None
    if database:
        from .store import LOCK_WAIT_SECONDS, LibraryCatalog, driver_message

        catalog = LibraryCatalog(database)

        def weights_of(name: str) -> Path | None:
            try:
                folder = find_entry_dir(name, library)
            except EmoshieldError:  # a name no entry may have: not indexed
                return None
            return folder / WEIGHTS_FILE if folder is not None else None

        scan = partial(list_entries, library)
        try:
            catalog.sync(scan, weights_of)
        except Exception as exc:  # noqa: BLE001 - any driver's error: one line, not a traceback at start
            raise EmoshieldError(f"cannot index the library into the catalog database: {driver_message(exc)}") from None
        last_scan = {"at": time.monotonic()}
        scanning = threading.Lock()

        def reindex(now: bool = False) -> None:
            """Scan the folder again when `refresh` seconds have passed since the last try (or
            `now`) and bring the catalog up to it. A scan that cannot write (another replica holds
            the lock past its wait, the database went away) is logged and tried again after
            `refresh` seconds; the request answers from the catalog as it is."""
            if not now and time.monotonic() - last_scan["at"] < refresh:
                return
            if not scanning.acquire(timeout=LOCK_WAIT_SECONDS + 1 if now else 0):
                return  # another request of this replica is scanning now
            try:
                catalog.sync(scan, weights_of)
            except Exception as exc:  # noqa: BLE001 - upkeep: a request is never failed by it
                _log(f"catalog not re-indexed ({driver_message(exc)})")
            finally:
                last_scan["at"] = time.monotonic()
                scanning.release()

    from .http import answer_503_while_the_database_is_down

    answer_503_while_the_database_is_down(app, "cloud")

    def entries() -> list[dict]:
        if catalog:
            reindex()
            return catalog.entries()
        return list_entries(library)

    def entry(name: str):
        try:
            check_name(name)
            if not catalog:
                return read_entry(name, library, verify=False)
        except EmoshieldError:  # missing or damaged; the reason names server paths, so it stays here
            raise HTTPException(status_code=404, detail=f"no usable library entry {name[:64]!r}") from None
        reindex()
        found = catalog.entry(name)
        if found is None or not found[1].is_file():
            raise HTTPException(status_code=404, detail=f"no library entry {name!r}")
        return found

    def sha256_on_disk(name: str) -> str | None:
        try:
            return read_entry(name, library, verify=False)[0]["sha256"]
        except EmoshieldError:
            return None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "entries": len(entries()), "catalog": "database" if catalog else "folder"}

    @app.get("/backbones")
    def backbones() -> list[dict]:
        return entries()

    @app.get("/backbones/{name}")
    def backbone(name: str) -> dict:
        return entry(name)[0]

    @app.get("/backbones/{name}/weights")
    def weights(name: str):
        """The bytes of one open file, under the sha256 of those bytes: an entry replaced meanwhile
        (new weights renamed in, then new metadata) is re-read once, and while its metadata and
        weights still disagree the answer is 503, never bytes under another file's hash."""
        for attempt in range(2):
            meta, path = entry(name)
            try:
                f = open(path, "rb")
            except FileNotFoundError:  # removed since it was indexed
                f, version = None, None
            if f is not None:
                digest, version = _sha256_of(f)  # version: (device, inode, size, mtime, ctime)
                if digest == meta["sha256"]:
                    return StreamingResponse(
                        _chunks(f), media_type="application/octet-stream", background=BackgroundTask(f.close),
                        headers={"Content-Length": str(version[2]), "X-Content-SHA256": digest,
                                 "Content-Disposition": f'attachment; filename="{meta["name"]}.safetensors"'})
                f.close()
            # re-indexed only when the catalog is behind the metadata on disk (a replacement), not
            # for weights that disagree with metadata the catalog already holds (damaged, or new
            # weights renamed in before their metadata): those cost one small read, not a scan
            if attempt == 0 and catalog and meta["sha256"] != sha256_on_disk(name):
                reindex(now=True)
                continue
            break
        if version not in _WARNED:  # one line per file version, however often it is asked for
            if len(_WARNED) > 1024:
                _WARNED.clear()
            _WARNED.add(version)
            _log(f"entry {name!r}: its weights do not match the sha256 of its metadata "
                 f"(being replaced, or damaged)")
        raise HTTPException(status_code=503, detail=f"library entry {name!r} is being replaced; retry later",
                            headers={"Retry-After": "5"})

    return app
