"""The ledger over HTTP, read-only: C2SP tlog-tiles plus what a full audit needs.

Resources (all GET; ``poi ledger serve RUN_DIR`` serves them at ``/``, ``poi serve`` at
``/ledger/``):

- ``checkpoint``: the latest signed checkpoint with its verified cosignatures
  (``text/plain; charset=utf-8``, ``Cache-Control: no-cache``).
- ``tile/<L>/<N>[.p/<W>]`` and ``tile/entries/<N>[.p/<W>]``: hash tiles and entry
  bundles, byte for byte as https://c2sp.org/tlog-tiles specifies
  (``application/octet-stream``, immutable: ``max-age`` of a year). Entry bundles are
  gzip-compressed when the client accepts it.
- ``poi/log``: ``{"origin", "log_key", "size"}``: the log's parameters (a verifier
  should pin ``log_key`` out of band; this is for convenience).
- ``poi/history``: every stored checkpoint and cosignature row, read in one snapshot,
  so a mirror holds exactly what ``poi ledger verify`` checks on the operator's file
  (checkpoint history, cosignature rows). JSON, ``no-cache``; built once per commit.
- ``poi/blobs/<sha256 hex>``: a blob the ledger names (updates, models, the reveal),
  as stored; the client checks the digest. Immutable.

Nothing here trusts the client: paths are parsed strictly (:func:`ledger.tiles.
parse_tile_path`), a resource outside the tree is 404 with the reason as text, and the
database is opened read-only (one connection per serving thread).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from ledger.blobs import BLOB_DIR, BlobStore
from ledger.errors import StoreError
from ledger.log import LogReader, resolve_db_path
from ledger.tiles import parse_tile_path

__all__ = ["IMMUTABLE", "ledger_http_app"]

IMMUTABLE = "public, max-age=31536000, immutable"
MUTABLE = "no-cache"
_OCTETS = "application/octet-stream"


class _Readers(threading.local):
    reader: LogReader | None = None


def ledger_http_app(path: str | os.PathLike[str]) -> FastAPI:
    """The read-only HTTP app of the ledger at ``path`` (a ``ledger.db`` or its run folder).

    Raises :class:`StoreError` now when there is no readable ledger there.
    """
    db_path = resolve_db_path(path)
    LogReader.open(db_path).close()  # fail at start, not on the first request
    blobs = BlobStore(Path(db_path).parent / BLOB_DIR)
    readers = _Readers()

    def reader() -> LogReader:
        if readers.reader is None:
            readers.reader = LogReader.open(db_path)
        return readers.reader

    app = FastAPI(
        title="poi ledger",
        description="A Proof-of-Intelligence ledger as C2SP tlog-tiles, read-only.",
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/checkpoint", response_class=PlainTextResponse)
    def checkpoint() -> Response:
        note = reader().checkpoint()
        return PlainTextResponse(
            note, media_type="text/plain; charset=utf-8", headers={"Cache-Control": MUTABLE}
        )

    @app.get("/tile/{rest:path}")
    def tile(rest: str, request: Request) -> Response:
        try:
            ref = parse_tile_path(f"tile/{rest}")
            data = reader().tile(ref)
        except StoreError as error:
            return PlainTextResponse(str(error), status_code=404)
        headers = {"Cache-Control": IMMUTABLE}
        if ref.is_entries:
            headers["Vary"] = "Accept-Encoding"
            if _accepts_gzip(request.headers.get("accept-encoding", "")):
                data = gzip.compress(data, compresslevel=1, mtime=0)
                headers["Content-Encoding"] = "gzip"
        return Response(data, media_type=_OCTETS, headers=headers)

    @app.get("/poi/log")
    def log() -> Response:
        view = reader()
        body = {"origin": view.origin, "log_key": view.log_key, "size": view.size}
        return JSONResponse(body, headers={"Cache-Control": MUTABLE})

    # The body for (last checkpoint id, last cosignature id): rebuilt only after a commit.
    cached: dict[tuple[int, ...], bytes] = {}

    @app.get("/poi/history")
    def history() -> Response:
        view = reader()
        with view.snapshot():
            key = tuple(int(view.connection.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}")
                            .fetchone()[0]) for t in ("checkpoints", "cosignatures"))
            body = cached.get(key)
            if body is None:
                body = json.dumps(_history(view), separators=(",", ":")).encode()
                cached.clear()
                cached[key] = body
        return Response(body, media_type="application/json", headers={"Cache-Control": MUTABLE})

    @app.get("/poi/blobs/{digest}")
    def blob(digest: str) -> Response:
        try:
            path = blobs.path(digest)
        except StoreError as error:
            return PlainTextResponse(str(error), status_code=404)
        if not path.is_file():
            return PlainTextResponse(f"no blob {digest} in this run", status_code=404)
        return FileResponse(path, media_type=_OCTETS, headers={"Cache-Control": IMMUTABLE})

    return app


def _accepts_gzip(header: str) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip (``gzip;q=0`` refuses it)."""
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            quality = params.strip().removeprefix("q=").strip() if "q=" in params else "1"
            try:
                return float(quality) > 0
            except ValueError:
                return False
    return False


def _history(view: LogReader) -> dict[str, Any]:
    """Every checkpoint and cosignature row (inside the caller's snapshot)."""
    return {
        "origin": view.origin,
        "log_key": view.log_key,
        "size": view.size,
        "checkpoints": [
            {"id": row.id, "size": row.size, "root": _b64(row.root), "note": row.note}
            for row in view.stored_checkpoints()
        ],
        "cosignatures": [
            {"id": int(i), "checkpoint_id": int(c), "witness": str(w), "line": str(line)}
            for i, c, w, line in view.connection.execute(
                "SELECT id, checkpoint_id, CAST(witness AS TEXT), CAST(line AS TEXT) "
                "FROM cosignatures ORDER BY id"
            )
        ],
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
