"""Verify a ledger from its URL: mirror the tiles into a local file, then audit that.

A mirror trusts nothing it fetches. It copies what the server claims (entry bundles,
hash tiles, the checkpoint history and cosignature rows of ``poi/history``) into a
ledger database of the same schema, and :func:`ledger.audit.verify_log` then checks
that database exactly as it checks the operator's own file: every signature, every
leaf against the served level-0 tiles, every served higher tile against the hashes
below it, every checkpoint and cosignature. A tile that disagrees with the entries is
a stored-subtree failure at the entries it covers.

How the served tiles become the mirror's ``nodes``: the hashes of a level-``L`` tile
are stored at tree level ``8L`` as served, and the levels in between are hashed from
them within the tile (a node at level ``8L + j``, ``j < 8``, covers ``2**j`` hashes of
one tile). So the mirror holds every complete subtree hash, each one either served or
derived from served ones, and the audit recomputes them all from the leaves.

The latest ``checkpoint`` is fetched first and held as a trusted checkpoint: the
history fetched after it can only be as large or larger (the log is append-only), so a
live log gives no false failure, and a server that shows one tree at ``checkpoint``
and another in its tiles fails.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ledger import merkle
from ledger.audit import AuditReport, verify_log
from ledger.blobs import BLOB_DIR, is_digest
from ledger.errors import StoreError
from ledger.log import DB_NAME, create_schema, node_id
from ledger.tiles import (
    MAX_ENTRY_SIZE,
    TILE_HEIGHT,
    TileRef,
    count_tiles,
    decode_bundle,
    iter_tiles,
    split_hashes,
)

__all__ = ["MirrorResult", "RemoteError", "fetch_blobs", "is_url", "mirror_log", "verify_remote"]

_WINDOW = 64  # tiles in flight at once
RESOURCE_SECONDS = 120.0  # the longest one resource may take, all of it
MAX_HISTORY_BYTES = 256 << 20  # poi/history: ~300 bytes a checkpoint
MAX_BLOB_BYTES = 256 << 20  # the default cap on one blob (fetch_blobs)
MIRROR_MARK = ".poi-mirror"  # a folder holding this was made by mirror_log
_decode = json.JSONDecoder().decode
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class RemoteError(StoreError):
    """The server could not be reached (``unreachable``) or served something that is
    not a ledger (malformed JSON, a tile of the wrong length, a duplicate row)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class MirrorResult:
    """What :func:`mirror_log` fetched: the local database, the served checkpoint, counts."""

    url: str
    path: Path
    size: int
    checkpoint: str
    log_key: str
    requests: int
    bytes: int
    seconds: float


def is_url(text: str | os.PathLike[str]) -> bool:
    return str(text).startswith(("http://", "https://"))


class _Fetcher:
    def __init__(self, url: str, client: httpx.Client | None) -> None:
        self.base = url.rstrip("/") + "/"
        self.client = client or httpx.Client(
            timeout=_TIMEOUT, headers={"Accept-Encoding": "gzip, identity"},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        self.owned = client is None
        self.requests = 0
        self.bytes = 0

    def get(self, path: str, *, limit: int, missing_ok: bool = False) -> bytes | None:
        """The body of ``path``, decoded, refused past ``limit`` bytes (a gzip bomb
        stops there) or past :data:`RESOURCE_SECONDS` in all (a slow drip)."""
        url = self.base + path
        deadline = time.monotonic() + RESOURCE_SECONDS
        try:
            with self.client.stream("GET", url) as response:
                self.requests += 1
                if response.status_code == 404 and missing_ok:
                    return None
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise RemoteError(f"expected at most {limit} bytes from {url}, got more")
                    if time.monotonic() > deadline:
                        raise RemoteError(f"{url} took more than {RESOURCE_SECONDS} s",
                                          unreachable=True)
                self.bytes += response.num_bytes_downloaded
        except httpx.HTTPError as error:
            raise RemoteError(f"cannot fetch {url}: {error}", unreachable=True) from error
        if response.status_code != 200:
            text = bytes(body[:200]).decode("utf-8", "replace")
            raise RemoteError(f"expected 200 from {url}, got {response.status_code}: {text}",
                              unreachable=response.status_code >= 500)
        return bytes(body)

    def json(self, path: str) -> Any:
        data = self.get(path, limit=MAX_HISTORY_BYTES)
        try:
            return json.loads(data or b"")
        except (ValueError, RecursionError) as error:
            raise RemoteError(f"expected JSON from {self.base}{path}: {error}") from error

    def close(self) -> None:
        if self.owned:
            self.client.close()


def _field(document: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = document.get(name) if isinstance(document, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RemoteError(f"expected {where}.{name} to be {kind.__name__}, got {value!r:.80}")
    return value


def _root(text: str, where: str) -> bytes:
    try:
        root = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RemoteError(f"expected base64 in {where}.root, got {text!r:.80}") from error
    if len(root) != merkle.HASH_SIZE:
        raise RemoteError(f"expected a {merkle.HASH_SIZE}-byte root in {where}, got {len(root)}")
    return root


def _columns(index: int, leaf: bytes) -> tuple[str, int, str]:
    """The (author, seq, kind) index columns, read from the payload without checks (the
    audit checks them against the signed payload). An unreadable leaf gets columns no
    real entry has, unique to its index, so the audit reports the leaf itself."""
    try:
        payload = _decode(leaf[: leaf.rindex(b"\n")].decode("utf-8"))
        author, seq, kind = payload["author"], payload["seq"], payload["kind"]
        if isinstance(author, str) and type(seq) is int and isinstance(kind, str):
            return author, seq, kind
    except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
        pass
    return f"!unreadable-{index}", -1, "!unreadable"


def _interior(level: int, start: int, hashes: Sequence[bytes]) -> Iterator[tuple[int, bytes]]:
    """The nodes a tile's hashes give: themselves at ``level``, then each level above up
    to ``level + 7`` hashed from complete pairs within the tile."""
    yield from ((node_id(level, start + i), digest) for i, digest in enumerate(hashes))
    row, index = list(hashes), start
    hash_children = merkle.hash_children
    for up in range(1, TILE_HEIGHT):
        row = [hash_children(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)]
        index >>= 1
        if not row:
            return
        yield from ((node_id(level + up, index + i), digest) for i, digest in enumerate(row))


def _fresh_database(dest: Path, url: str) -> sqlite3.Connection:
    """An empty database in ``dest``, replacing only an earlier mirror's: a folder with
    a ``ledger.db`` that :func:`mirror_log` did not make (a run's own ledger) is
    refused."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / DB_NAME
    if path.exists() and not (dest / MIRROR_MARK).is_file():
        raise RemoteError(f"{dest} holds a ledger.db that is not a mirror; expected an empty "
                          f"folder or an earlier mirror (marked by {MIRROR_MARK})")
    (dest / MIRROR_MARK).write_text(url + "\n")
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        stale.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")  # a cache, rebuilt whole on every mirror
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-262144")  # 256 MiB: node rows land all over the B-tree
    return db


def mirror_log(
    url: str,
    dest: str | os.PathLike[str],
    *,
    client: httpx.Client | None = None,
    workers: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> MirrorResult:
    """Copy the ledger served at ``url`` into ``dest/ledger.db`` (replacing one there).

    Checks only what it must to build the file (shapes, lengths, JSON); whether the
    log is sound is :func:`verify_log`'s job on the result. ``progress(done, total)``
    is called as tiles arrive. Raises :class:`RemoteError`.
    """
    started = time.perf_counter()
    fetcher = _Fetcher(url, client)
    try:
        served = (fetcher.get("checkpoint", limit=1 << 20) or b"").decode("utf-8", "replace")
        history = fetcher.json("poi/history")
        origin = _field(history, "origin", str, "poi/history")
        log_key = _field(history, "log_key", str, "poi/history")
        size = _field(history, "size", int, "poi/history")
        checkpoints = _field(history, "checkpoints", list, "poi/history")
        cosignatures = _field(history, "cosignatures", list, "poi/history")
        if size < 0:
            raise RemoteError(f"expected poi/history.size >= 0, got {size}")
        db = _fresh_database(Path(dest), url)
        try:
            db.execute("BEGIN")
            create_schema(db)
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [("origin", origin), ("log_key", log_key)])
            rows = []
            for position, row in enumerate(checkpoints):
                where = f"poi/history.checkpoints[{position}]"
                rows.append((_field(row, "id", int, where), _field(row, "size", int, where),
                             _root(_field(row, "root", str, where), where),
                             _field(row, "note", str, where)))
            _insert(db, "checkpoints", rows)
            rows = []
            for position, row in enumerate(cosignatures):
                where = f"poi/history.cosignatures[{position}]"
                rows.append((_field(row, "id", int, where),
                             _field(row, "checkpoint_id", int, where),
                             _field(row, "witness", str, where), _field(row, "line", str, where)))
            db.execute("PRAGMA foreign_keys=OFF")  # a dangling row is the audit's to report
            _insert(db, "cosignatures", rows)
            _fetch_tiles(fetcher, db, size, workers, progress)
            db.execute("COMMIT")
        except (sqlite3.Error, OverflowError, UnicodeError) as error:
            raise RemoteError(f"cannot build the mirror in {dest} from what {url} served: "
                              f"{type(error).__name__}: {error}") from error
        finally:
            db.close()
    finally:
        fetcher.close()
    return MirrorResult(
        url=url, path=Path(dest) / DB_NAME, size=size, checkpoint=served, log_key=log_key,
        requests=fetcher.requests, bytes=fetcher.bytes, seconds=time.perf_counter() - started,
    )


def _insert(db: sqlite3.Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    marks = ",".join("?" * len(rows[0]))
    try:
        db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    except sqlite3.IntegrityError as error:
        raise RemoteError(f"expected distinct row ids in the served {table}: {error}") from error
    except (OverflowError, UnicodeError) as error:
        raise RemoteError(f"expected storable values in the served {table}: {error}") from error


def _fetch_tiles(
    fetcher: _Fetcher,
    db: sqlite3.Connection,
    size: int,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    refs = iter_tiles(size)  # lazily: a huge claimed size fails at its first missing tile
    total = count_tiles(size)
    done = 0

    def fetch(ref: TileRef) -> tuple[TileRef, list[bytes]]:
        limit = ref.width * (MAX_ENTRY_SIZE + 2) if ref.is_entries else ref.size
        data = fetcher.get(ref.path, limit=limit) or b""
        try:
            if ref.is_entries:
                return ref, decode_bundle(data, ref.width)
            return ref, split_hashes(data, ref.width)
        except StoreError as error:
            raise RemoteError(f"{fetcher.base}{ref.path}: {error}") from error

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while window := list(itertools.islice(refs, _WINDOW)):
            for ref, items in pool.map(fetch, window):
                if ref.is_entries:
                    _insert_entries(db, ref.start, items)
                else:
                    db.executemany("INSERT INTO nodes VALUES (?, ?)",
                                   _interior(ref.node_level, ref.start, items))
                done += 1
                if progress is not None:
                    progress(done, total)


def _insert_entries(db: sqlite3.Connection, start: int, leaves: list[bytes]) -> None:
    rows = [(start + i, leaf, *_columns(start + i, leaf)) for i, leaf in enumerate(leaves)]
    try:
        db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", rows)
    except (sqlite3.IntegrityError, OverflowError, UnicodeError):  # row by row, below
        # Two leaves claim one (author, seq), or a column SQLite cannot store (a seq of
        # 2**63, a lone surrogate): columns no real entry has, for the audit to report.
        for index, leaf, author, seq, kind in rows:
            try:
                db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                           (index, leaf, author, seq, kind))
            except (sqlite3.IntegrityError, OverflowError, UnicodeError):
                db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                           (index, leaf, f"!unstorable-{index}", -1, "!unstorable"))


def verify_remote(
    url: str,
    mirror: str | os.PathLike[str],
    *,
    log_key: str | None = None,
    trusted_checkpoints: Sequence[str] = (),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> tuple[AuditReport, MirrorResult]:
    """Mirror ``url`` into the folder ``mirror``, then :func:`verify_log` it with the
    served checkpoint among the trusted ones. ``options`` go to :func:`verify_log`."""
    result = mirror_log(url, mirror, progress=progress)
    trusted = [result.checkpoint, *trusted_checkpoints]
    report = verify_log(result.path, log_key=log_key, trusted_checkpoints=trusted,
                        workers=workers, **options)
    return report, result


def fetch_blobs(url: str, mirror: str | os.PathLike[str], digests: Sequence[str], *,
                max_bytes: int = MAX_BLOB_BYTES) -> list[str]:
    """Fetch the named blobs from ``url`` into ``mirror/blobs/`` as served (a damaged one
    is kept as is, so the audit reports it as damaged); returns those the server did not
    have. Every blob is asked for, so a copy left by an earlier mirror never hides one
    the server withholds; a blob over ``max_bytes`` is refused (:class:`RemoteError`)."""
    folder = Path(mirror) / BLOB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fetcher = _Fetcher(url, None)
    missing = []
    try:
        for digest in dict.fromkeys(digests):
            if not is_digest(digest):
                continue  # not a digest: the audit names it
            target = folder / digest
            data = fetcher.get(f"poi/blobs/{digest}", limit=max_bytes, missing_ok=True)
            if data is None:
                target.unlink(missing_ok=True)
                missing.append(digest)
                continue
            temporary = folder / f".part-{digest}"
            temporary.write_bytes(data)
            temporary.replace(target)
    finally:
        fetcher.close()
    return missing
