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
catalog, so several replicas over one shared library folder serve one consistent list.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EmoshieldError
from ..models.library import WEIGHTS_FILE, find_entry_dir, list_entries, read_entry


def create_app(library: Path | None = None, database: str | None = None):
    """The service over one library folder, or (None) the default search path: the user's
    library, then the embedded one."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    library = Path(library) if library is not None else None
    app = FastAPI(title="emoshield cloud", description="Model library of pretrained backbones.", version="1")
    catalog = None
    if database:
        from .store import LibraryCatalog

        catalog = LibraryCatalog(database)
        def weights_of(name: str) -> Path | None:
            folder = find_entry_dir(name, library)
            return folder / WEIGHTS_FILE if folder is not None else None

        catalog.sync(list_entries(library), weights_of)

    def entries() -> list[dict]:
        return catalog.entries() if catalog else list_entries(library)

    def entry(name: str):
        if catalog:
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
