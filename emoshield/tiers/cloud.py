"""The cloud tier as an HTTP service: it lists and serves the model library's backbones with
their sha256, so edge nodes can fetch one and verify it before training on it.

    GET /health                       {"status": "ok", "entries": N}
    GET /backbones                    [metadata, ...]
    GET /backbones/{name}             metadata (backbone, input size, data, accuracy, sha256, ...)
    GET /backbones/{name}/weights     the safetensors file (X-Content-SHA256 header)

OpenAPI docs at /docs. Read-only: entries are added with `emoshield cloud add` or
`emoshield cloud pretrain`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EmoshieldError
from .library import list_entries, read_entry


def create_app(library: Path):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    library = Path(library)
    app = FastAPI(title="emoshield cloud", description="Model library of pretrained backbones.", version="1")

    def entry(name: str):
        try:
            return read_entry(name, library, verify=False)
        except EmoshieldError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "entries": len(list_entries(library))}

    @app.get("/backbones")
    def backbones() -> list[dict]:
        return list_entries(library)

    @app.get("/backbones/{name}")
    def backbone(name: str) -> dict:
        return entry(name)[0]

    @app.get("/backbones/{name}/weights")
    def weights(name: str):
        meta, path = entry(name)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{meta['name']}.safetensors",
                            headers={"X-Content-SHA256": meta["sha256"]})

    return app
