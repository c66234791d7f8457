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
that time; its weights are served under the sha256 of the metadata beside them at once (a
replica re-indexes when they differ). An edge checks every download against the sha256 it was
given, so whatever slips through (a weights file renamed in before its metadata) is refused,
never trained on. A database that is down, locked or out of connections answers 503 (retry
later); the driver's message stays in the log.
"""

from __future__ import annotations

import sys
import threading
import time
from functools import partial
from pathlib import Path

from ..errors import EmoshieldError, one_line
from ..models.library import WEIGHTS_FILE, find_entry_dir, list_entries, read_entry


REFRESH_SECONDS = 10.0


def create_app(library: Path | None = None, database: str | None = None, refresh: float = REFRESH_SECONDS):
    """The service over one library folder, or (None) the default search path: the user's
    library, then the embedded one. With a database, the folder is re-indexed at most every
    `refresh` seconds (0: on every request)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    library = Path(library) if library is not None else None
    app = FastAPI(title="emoshield cloud", description="Model library of pretrained backbones.", version="1")
    catalog = None
    if database:
        from .store import LibraryCatalog

        catalog = LibraryCatalog(database)

        def weights_of(name: str) -> Path | None:
            folder = find_entry_dir(name, library)
            return folder / WEIGHTS_FILE if folder is not None else None

        scan = partial(list_entries, library)
        try:
            catalog.sync(scan, weights_of)
        except SQLAlchemyError as exc:
            raise EmoshieldError(f"cannot index the library into {database!r}: {one_line(exc.orig or exc, 160)}") from None
        last_scan = {"at": time.monotonic()}
        scanning = threading.Lock()

        def reindex(now: bool = False) -> None:
            """Scan the folder again when `refresh` seconds have passed since the last scan (or
            `now`) and bring the catalog up to it. A scan that cannot write (another replica
            holds the lock past the timeout, the database went away) is logged and retried by a
            later request; this one answers from the catalog as it is."""
            if not now and time.monotonic() - last_scan["at"] < refresh:
                return
            if not scanning.acquire(blocking=now):
                return  # another request of this replica is scanning now
            try:
                catalog.sync(scan, weights_of)
                last_scan["at"] = time.monotonic()
            except OperationalError as exc:
                print(f"cloud: catalog not re-indexed ({one_line(exc.orig or exc, 160)})", file=sys.stderr, flush=True)
            finally:
                scanning.release()

    from .http import answer_503_while_the_database_is_down

    answer_503_while_the_database_is_down(app, "cloud")

    def entries() -> list[dict]:
        if catalog:
            reindex()
            return catalog.entries()
        return list_entries(library)

    def entry(name: str):
        if catalog:
            reindex()
            found = catalog.entry(name)
            if found is None or not found[1].is_file():
                raise HTTPException(status_code=404, detail=f"no library entry {name!r}")
            return found
        try:
            return read_entry(name, library, verify=False)
        except EmoshieldError:  # missing or damaged; the reason names server paths, so it stays here
            raise HTTPException(status_code=404, detail=f"no usable library entry {name[:64]!r}") from None

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
        meta, path = entry(name)
        if catalog and meta["sha256"] != sha256_on_disk(name):
            reindex(now=True)  # replaced since the last scan: the header must name the bytes sent
            meta, path = entry(name)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{meta['name']}.safetensors",
                            headers={"X-Content-SHA256": meta["sha256"]})

    return app
