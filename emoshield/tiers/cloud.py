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
catalog, so several replicas over one shared library folder serve one consistent list. Each
replica scans the folder again at most every `refresh` seconds (on the next request), so an entry
added or replaced while it runs is served with its new sha256 within that time; an edge checks
every download against the sha256 it was given, so a stale answer is refused, never trained on.
A database that is down or locked answers 503 (retry later); the driver's message stays in the log.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from ..errors import EmoshieldError, one_line
from ..models.library import WEIGHTS_FILE, find_entry_dir, list_entries, read_entry


REFRESH_SECONDS = 10.0


def create_app(library: Path | None = None, database: str | None = None, refresh: float = REFRESH_SECONDS):
    """The service over one library folder, or (None) the default search path: the user's
    library, then the embedded one. With a database, the folder is re-indexed at most every
    `refresh` seconds (0: on every request)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse
    from sqlalchemy.exc import OperationalError

    library = Path(library) if library is not None else None
    app = FastAPI(title="emoshield cloud", description="Model library of pretrained backbones.", version="1")
    catalog = None
    if database:
        from .store import LibraryCatalog

        catalog = LibraryCatalog(database)

        def weights_of(name: str) -> Path | None:
            folder = find_entry_dir(name, library)
            return folder / WEIGHTS_FILE if folder is not None else None

        indexed: dict = {"at": time.monotonic(), "entries": list_entries(library)}
        catalog.sync(indexed["entries"], weights_of)
        scanning = threading.Lock()

        def reindex() -> None:
            """Scan the folder again when `refresh` seconds have passed since the last scan, and
            write the catalog only when what the folder holds changed (one writer at a time)."""
            if time.monotonic() - indexed["at"] < refresh or not scanning.acquire(blocking=False):
                return  # fresh enough, or another request of this replica is scanning now
            try:
                found = list_entries(library)
                if found != indexed["entries"]:
                    catalog.sync(found, weights_of)
                    indexed["entries"] = found
                indexed["at"] = time.monotonic()
            finally:
                scanning.release()

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError):
        """The catalog's database down or locked: 503, retry later; the driver's message (hosts,
        SQL) goes to the service's log only."""
        print(f"cloud: database unavailable ({one_line(exc.orig or exc, 160)})", file=sys.stderr, flush=True)
        return JSONResponse({"detail": "the cloud's catalog database is unavailable; retry later"}, status_code=503)

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
        return FileResponse(path, media_type="application/octet-stream", filename=f"{meta['name']}.safetensors",
                            headers={"X-Content-SHA256": meta["sha256"]})

    return app
