"""The transparency log: an RFC 9162 Merkle tree of entries in SQLite, one sequencer.

Storage (SQLite, WAL, ``synchronous=FULL``, so a COMMIT that returned survives a
crash or power loss):

- ``entries(idx, leaf, author, seq, kind)``: the exact leaf bytes, 0-based ``idx``;
  ``UNIQUE(author, seq)``.
- ``nodes(id, hash)``: every complete subtree hash, ``id = level << 48 | index``
  (level 0 holds the leaf hashes), so a proof reads O(log n) rows at any size.
- ``checkpoints(id, size, root, note)``: every signed C2SP checkpoint, in order.
- ``cosignatures(id, checkpoint_id, witness, line)``: witness cosignature lines.
- ``meta(key, value)``: origin and the operator's note verifier key.

Every table is append-only (triggers abort UPDATE and DELETE). ``append_many``
group-commits many entries and one new signed checkpoint in one transaction. A
writer holds an exclusive ``flock`` on ``<db>.lock`` and one keyed by the file's
(device, inode), so another path to the same file meets it; :meth:`Log.open` refuses a
database whose recomputed tree does not match its last signed checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ledger import merkle
from ledger.blobs import BLOB_DIR, BlobStore
from ledger.checkpoint import (
    Checkpoint,
    NoteVerifier,
    parse_checkpoint,
    parse_note,
    sign_checkpoint,
    verify_cosignature,
)
from ledger.cosignatures import COSIGNATURE_KIND, cosignature_fields, witness_verifier
from ledger.entries import (
    BULK_FIELD,
    KEY_KIND,
    Entry,
    KeyRing,
    make_key_entry,
    parse_entry,
    sign_entry,
    with_bulk,
)
from ledger.errors import CheckpointError, EntryError, LedgerError, StoreError
from ledger.keys import Signer, key_id
from ledger.tiles import MAX_ENTRY_SIZE, TileRef, encode_bundle, tile_width

__all__ = [
    "DB_NAME",
    "Log",
    "LogReader",
    "StoredCheckpoint",
    "create_schema",
    "node_id",
    "resolve_db_path",
]

DB_NAME = "ledger.db"
_LEVEL_SHIFT = 48
_TABLES = ("meta", "entries", "nodes", "checkpoints", "cosignatures")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY,
    leaf BLOB NOT NULL,
    author TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    UNIQUE (author, seq)
);
CREATE TABLE nodes (id INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY, size INTEGER NOT NULL, root BLOB NOT NULL, note TEXT NOT NULL
);
CREATE INDEX checkpoints_by_size ON checkpoints (size);
CREATE TABLE cosignatures (
    id INTEGER PRIMARY KEY,
    checkpoint_id INTEGER NOT NULL REFERENCES checkpoints (id),
    witness TEXT NOT NULL,
    line TEXT NOT NULL
);
""" + "".join(
    f"""
CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table}
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: UPDATE on {table}'); END;
CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table}
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: DELETE on {table}'); END;
"""
    for table in _TABLES
)


def node_id(level: int, index: int) -> int:
    """Row id of the complete subtree covering leaves [index * 2**level, (index + 1) * 2**level)."""
    return level << _LEVEL_SHIFT | index


def resolve_db_path(path: str | os.PathLike[str]) -> Path:
    """A ledger database file, or a run directory holding ``ledger.db``."""
    candidate = Path(path)
    return candidate / DB_NAME if candidate.is_dir() else candidate


def _subtree_ids(start: int, end: int) -> list[int]:
    """Decompose [start, end) into complete subtrees, left to right (largest aligned first)."""
    ids = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start:
            level = min(level, (start & -start).bit_length() - 1)
        ids.append(node_id(level, start >> level))
        start += 1 << level
    return ids


def _fold(hashes: Sequence[bytes]) -> bytes:
    root = hashes[-1]
    for node in reversed(hashes[:-1]):
        root = merkle.hash_children(node, root)
    return root


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint row: its order of signing, size, root and note text."""

    id: int
    size: int
    root: bytes
    note: str


class LogReader:
    """Read-only view of a ledger database: entries, roots, proofs, checkpoints.

    Opened with SQLite's read-only mode; takes no lock, so auditors and the CLI can
    read while the sequencer writes (WAL readers see the last committed state).
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        try:
            self.origin: str = meta["origin"]
            self.verifier = NoteVerifier.from_vkey(meta["log_key"])
        except (KeyError, CheckpointError) as error:
            raise StoreError(f"expected origin and log_key in {path} meta, got {meta}") from error

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LogReader:
        """Open an existing ledger read-only; raises :class:`StoreError` if absent or unreadable."""
        db_path = resolve_db_path(path)
        if not db_path.is_file():
            raise StoreError(f"expected a ledger database at {db_path}, found none")
        try:
            connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
            return cls(connection, db_path)
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot read ledger database {db_path}: {error}") from error

    # -- context manager ------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- reads ----------------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[LogReader]:
        """Every read inside sees one committed state of the log (one read transaction).

        Without it, each statement sees the latest commit: size, checkpoints, entries
        and nodes read one after another while the sequencer appends disagree, and a
        healthy log fails its audit. SQLite WAL keeps the snapshot from the first read
        of the transaction until it ends; the writer is not blocked.
        """
        if self._db.in_transaction:  # already inside one: nested use shares it
            yield self
            return
        self._db.execute("BEGIN DEFERRED")
        try:
            self._db.execute("SELECT COUNT(*) FROM meta").fetchone()  # starts the snapshot
            yield self
        finally:
            self._db.execute("COMMIT")

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying SQLite connection, for the auditor's streaming reads."""
        return self._db

    @property
    def size(self) -> int:
        """Number of entries committed (the latest checkpoint's size)."""
        return self._count_entries()

    def _count_entries(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM entries").fetchone()
        return int(row[0])

    @property
    def log_key(self) -> str:
        """The operator's note verifier key ``origin+keyid+base64(0x01 || key)``."""
        return self.verifier.vkey()

    def _check_size(self, size: int | None) -> int:
        current = self.size
        if size is None:
            return current
        if not 0 <= size <= current:
            raise StoreError(f"expected 0 <= size <= {current}, got {size}")
        return size

    def _hashes(self, ids: Sequence[int]) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        unique = sorted(set(ids))
        for offset in range(0, len(unique), 500):
            chunk = unique[offset : offset + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(
                    f"SELECT id, CAST(hash AS BLOB) FROM nodes WHERE id IN ({marks})", chunk
                )
            )
        missing = set(unique) - set(found)
        if missing:
            raise StoreError(
                f"expected stored subtree hashes, {len(missing)} missing: ids {sorted(missing)[:3]}"
            )
        return found

    def _range_hashes(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        decomposed = [_subtree_ids(start, end) for start, end in ranges]
        found = self._hashes([i for ids in decomposed for i in ids])
        return [_fold([found[i] for i in ids]) for ids in decomposed]

    def subtree_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) from stored complete subtrees (a ``merkle.SubtreeSource``)."""
        if not 0 <= start < end <= self.size:
            raise StoreError(f"expected 0 <= start < end <= {self.size}, got [{start}, {end})")
        return self._range_hashes([(start, end)])[0]

    def root(self, size: int | None = None) -> bytes:
        """Root hash of the tree of ``size`` leaves (default: all), in O(log n) reads."""
        tree_size = self._check_size(size)
        return self.subtree_hash(0, tree_size) if tree_size else merkle.EMPTY_ROOT

    def entry(self, index: int) -> bytes:
        """The exact leaf bytes at ``index``; raises :class:`StoreError` when out of range."""
        row = self._db.execute(
            "SELECT CAST(leaf AS BLOB) FROM entries WHERE idx = ?", (index,)
        ).fetchone()
        if row is None:
            raise StoreError(f"expected 0 <= index < {self.size}, got {index}")
        return bytes(row[0])

    def entries(
        self, *, kind: str | None = None, author: str | None = None, end: int | None = None,
        bulk: bool = True,
    ) -> Iterator[tuple[int, Entry]]:
        """Parsed entries in log order, optionally filtered (no signature check).

        ``end`` stops before that index: the entries of the tree an audit verified,
        whatever the sequencer appended since. With ``bulk`` (the default) an entry that
        keeps fields in a bulk blob comes with them merged (:func:`with_bulk`, the blob
        read from the store beside the database); a missing or altered blob raises
        :class:`~ledger.errors.LedgerError` naming the entry.
        """
        query, args = "SELECT idx, CAST(leaf AS BLOB) FROM entries WHERE 1", list[object]()
        if end is not None:
            query, args = query + " AND idx < ?", [*args, end]
        if kind is not None:
            query, args = query + " AND kind = ?", [*args, kind]
        if author is not None:
            query, args = query + " AND author = ?", [*args, author]
        blobs = BlobStore(self.path.parent / BLOB_DIR)  # read only: nothing created
        for index, leaf in self._db.execute(query + " ORDER BY idx", args):
            entry = parse_entry(bytes(leaf))
            if bulk and BULK_FIELD in entry.fields:
                try:
                    entry = with_bulk(entry, blobs.get)
                except LedgerError as exc:
                    raise type(exc)(f"entry {index} ({entry.kind}): {exc}") from exc
            yield int(index), entry

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size`` (default: all)."""
        tree_size = self._check_size(size)
        return self._range_hashes(merkle.inclusion_ranges(index, tree_size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof from ``old_size`` to ``new_size``; 0 < old <= new."""
        tree_size = self._check_size(new_size)
        return self._range_hashes(merkle.consistency_ranges(old_size, tree_size))

    def first_bad_subtree(self, size: int, *, from_level: int = 0) -> tuple[int, str] | None:
        """Recompute every stored subtree hash from the leaves, streaming level by level.

        Returns (first leaf index concerned, why) for the first stored hash that
        differs, is missing or lies beyond ``size``; None when all match. O(n) time,
        O(1) memory. ``from_level`` > 0 skips the levels below it, for a caller (the
        auditor) that has already checked them.
        """
        if from_level <= 0:
            leaves = self._db.execute("SELECT idx, CAST(leaf AS BLOB) FROM entries ORDER BY idx")
            stored = self._level(0, size)
            for position, (index, leaf) in enumerate(leaves):
                if index != position:
                    return position, f"expected entry index {position}, found {index}"
                if next(stored) != merkle.hash_leaf(leaf):
                    return position, "stored leaf hash differs from the hash of the leaf"
        for level in range(max(1, from_level), size.bit_length()):
            count = size >> level
            below, above = self._level(level - 1, 2 * count), self._level(level, count)
            for index in range(count):
                if next(above) != merkle.hash_children(next(below), next(below)):
                    return index << level, f"stored subtree hash ({level}, {index}) is wrong"
        for level in range(0, 64 - _LEVEL_SHIFT + 16):
            beyond = self._db.execute(
                "SELECT COUNT(*) FROM nodes WHERE id >= ? AND id < ?",
                (node_id(level, size >> level), node_id(level + 1, 0)),
            ).fetchone()[0]
            if beyond:
                return size, f"{beyond} stored subtree hashes at level {level} beyond the tree"
        return None

    def _level(self, level: int, count: int) -> Iterator[bytes]:
        """The stored hashes of nodes (level, 0 .. count - 1), then b"" for missing ones."""
        rows = self._db.execute(
            "SELECT id, CAST(hash AS BLOB) FROM nodes WHERE id >= ? AND id < ? ORDER BY id",
            (node_id(level, 0), node_id(level, count)),
        )
        for expected, (found, digest) in enumerate(rows):
            if found != node_id(level, expected):
                break
            yield bytes(digest)
        while True:  # a missing node reads as an impossible hash, so comparisons fail
            yield b""

    def tile(self, ref: TileRef) -> bytes:
        """A C2SP tlog-tiles resource of the current tree (:mod:`ledger.tiles`): the
        concatenated hashes of a hash tile, or the length-prefixed leaves of an entry
        bundle. A full tile needs all 256; a partial one of width ``W`` is served while
        the tree holds at least ``W`` (its bytes never change). :class:`StoreError`
        when the tree does not hold it, or the stored rows are not all there.
        """
        available = tile_width(ref.level, ref.index, self.size)
        if ref.width > available:
            raise StoreError(
                f"expected a tile the tree of {self.size} entries holds, got {ref.path} "
                f"({available} of its {'entries' if ref.is_entries else 'hashes'} exist)"
            )
        if ref.is_entries:
            rows = self._db.execute(
                "SELECT idx, CAST(leaf AS BLOB) FROM entries WHERE idx >= ? AND idx < ? "
                "ORDER BY idx",
                (ref.start, ref.start + ref.width),
            ).fetchall()
            first = ref.start
        else:
            level = ref.node_level
            rows = self._db.execute(
                "SELECT id, CAST(hash AS BLOB) FROM nodes WHERE id >= ? AND id < ? ORDER BY id",
                (node_id(level, ref.start), node_id(level, ref.start + ref.width)),
            ).fetchall()
            first = node_id(level, ref.start)
        if [int(key) for key, _ in rows] != list(range(first, first + ref.width)):
            raise StoreError(f"expected {ref.width} stored rows for {ref.path}, found {len(rows)}")
        if ref.is_entries:
            return encode_bundle([bytes(leaf) for _, leaf in rows])
        return b"".join(bytes(digest) for _, digest in rows)

    def stored_checkpoints(self) -> list[StoredCheckpoint]:
        rows = self._db.execute(
            "SELECT id, size, CAST(root AS BLOB), CAST(note AS TEXT) FROM checkpoints ORDER BY id"
        )
        return [StoredCheckpoint(int(i), int(s), bytes(r), str(n)) for i, s, r, n in rows]

    def _with_cosignatures(self, checkpoint_id: int, note: str) -> str:
        """The note with the stored cosignature lines that verify.

        A line is handed out only when its witness key is registered in the log (a
        ``key`` entry of that key id) and it verifies on this very note: a forged,
        flipped or re-attached line stays in the table (``verify_log`` reports it) but
        never leaves through a checkpoint or a proof.
        """
        lines = []
        rows = self._db.execute(
            "SELECT witness, line FROM cosignatures WHERE checkpoint_id = ? ORDER BY id",
            (checkpoint_id,),
        ).fetchall()
        for vkey, line in rows:
            try:
                witness = witness_verifier(str(vkey))
                registered = self._db.execute(
                    "SELECT 1 FROM entries WHERE author = ? AND kind = ? LIMIT 1",
                    (key_id(witness.raw_key), KEY_KIND),
                ).fetchone()
                if registered is None:
                    continue
                verify_cosignature(note + str(line), witness=witness)
            except (LedgerError, ValueError):
                continue
            lines.append(str(line))
        return note + "".join(lines)

    def checkpoint(self) -> str:
        """The latest signed checkpoint note, with any witness cosignatures."""
        row = self._db.execute(
            "SELECT id, note FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise StoreError(f"expected at least one checkpoint in {self.path}, got none")
        return self._with_cosignatures(int(row[0]), str(row[1]))

    def checkpoint_at(self, size: int) -> str:
        """The latest signed checkpoint of exactly ``size`` leaves; StoreError if none."""
        row = self._db.execute(
            "SELECT id, note FROM checkpoints WHERE size = ? ORDER BY id DESC LIMIT 1", (size,)
        ).fetchone()
        if row is None:
            raise StoreError(f"expected a signed checkpoint of size {size}, found none")
        return self._with_cosignatures(int(row[0]), str(row[1]))

    def next_seq(self, author: str) -> int:
        """The ``seq`` the author's next entry must carry (0 for a new author)."""
        row = self._db.execute(
            "SELECT MAX(seq) FROM entries WHERE author = ?", (author,)
        ).fetchone()
        return 0 if row[0] is None else int(row[0]) + 1


class Log(LogReader):
    """The sequencer's writable log. Use :meth:`Log.open`; one writer per database."""

    def __init__(
        self, connection: sqlite3.Connection, path: Path, operator: Signer, lock_fds: list[int]
    ) -> None:
        super().__init__(connection, path)
        self._operator = operator
        self._lock_fds = lock_fds
        self._size = 0
        self._frontier: list[bytes] = []
        self._keys = KeyRing()
        self._next_seq: dict[str, int] = {}

    @classmethod
    def open(  # type: ignore[override]
        cls,
        path: str | os.PathLike[str],
        operator: Signer,
        origin: str,
        *,
        full_check: bool = True,
    ) -> Log:
        """Open (creating if missing) the ledger at ``path`` as its single writer.

        Raises :class:`StoreError` when another writer holds the lock, when the origin
        or operator key differ from the stored ones, or when the tree recomputed from
        the stored leaves (``full_check``; else from the stored frontier) does not match
        the last signed checkpoint.
        """
        db_path = resolve_db_path(path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        lock_fds = _writer_locks(db_path)
        connection: sqlite3.Connection | None = None
        try:
            connection = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            _create_if_missing(connection, operator=operator, origin=origin)
            log = cls(connection, db_path, operator, lock_fds)
            log._load(origin=origin, full_check=full_check)
        except BaseException as error:
            if connection is not None:
                connection.close()
            _release(lock_fds)
            if isinstance(error, sqlite3.DatabaseError):
                raise StoreError(f"cannot open ledger database {db_path}: {error}") from error
            raise
        return log

    def close(self) -> None:
        if not self._lock_fds:
            return
        self._db.close()
        _release(self._lock_fds)
        self._lock_fds = []

    def __enter__(self) -> Log:
        return self

    # -- opening checks -------------------------------------------------------

    def _load(self, *, origin: str, full_check: bool) -> None:
        if self.origin != origin:
            raise StoreError(f"expected origin {origin!r} in {self.path}, got {self.origin!r}")
        expected_key = NoteVerifier.for_key(origin, self._operator.public_key_bytes).vkey()
        if self.log_key != expected_key:
            raise StoreError(f"expected log key {expected_key} in {self.path}, got {self.log_key}")
        size = self._count_entries()
        frontier_ids = [node_id(level, index) for level, index in merkle.frontier_nodes(size)]
        stored = self._hashes(frontier_ids) if size else {}
        frontier = [stored[i] for i in frontier_ids]
        if full_check:
            bad = self.first_bad_subtree(size)
            if bad is not None:
                raise StoreError(
                    f"expected stored subtree hashes to match the leaves in {self.path}: "
                    f"entry {bad[0]}: {bad[1]}"
                )
        latest = self.checkpoint()
        try:
            checkpoint = parse_checkpoint(latest, verifier=self.verifier, origin=origin)
        except CheckpointError as error:
            raise StoreError(f"last checkpoint in {self.path} does not verify: {error}") from error
        root = merkle.root_from_frontier(frontier)
        if (checkpoint.size, checkpoint.root_hash) != (size, root):
            raise StoreError(
                f"expected the tree in {self.path} to match its last signed checkpoint "
                f"(size {checkpoint.size}, root {checkpoint.root_hash.hex()}), "
                f"recomputed size {size}, root {root.hex()}"
            )
        for (leaf,) in self._db.execute(
            "SELECT CAST(leaf AS BLOB) FROM entries WHERE kind = ?", (KEY_KIND,)
        ):
            self._keys.admit(bytes(leaf))
        self._next_seq = {
            str(author): int(seq) + 1
            for author, seq in self._db.execute(
                "SELECT author, MAX(seq) FROM entries GROUP BY author"
            )
        }
        self._size, self._frontier = size, frontier

    # -- writes ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def root(self, size: int | None = None) -> bytes:
        if size is None or size == self._size:
            return merkle.root_from_frontier(self._frontier)
        return super().root(size)

    def next_seq(self, author: str) -> int:
        return self._next_seq.get(author, 0)

    def append(self, leaf: bytes) -> int:
        """Append one entry (see :meth:`append_many`); returns its index."""
        return self.append_many([leaf])[0]

    def append_many(self, leaves: Sequence[bytes]) -> list[int]:
        """Verify and append entries, then sign one checkpoint, in one durable transaction.

        Each leaf must be a validly signed entry (:mod:`ledger.entries`) by a
        registered author (or a ``key`` entry) carrying the author's next ``seq``.
        Resubmitting identical bytes at a used ``seq`` returns the existing index;
        different bytes at a used ``seq``, a gap, or any invalid entry raises
        :class:`EntryError` naming its position, and nothing of the batch is stored.
        """
        return self._append(leaves)

    def _append(
        self, leaves: Sequence[bytes], cosignature_rows: Sequence[tuple[int, str, str]] = ()
    ) -> list[int]:
        """:meth:`append_many`, with cosignature rows stored in the same transaction."""
        indexes: list[int] = []
        rows: list[tuple[int, bytes, str, int, str]] = []
        nodes: list[tuple[int, bytes]] = []
        next_seq: dict[str, int] = {}
        staged_keys = KeyRing()
        frontier, size = self._frontier, self._size
        for position, leaf in enumerate(leaves):
            if len(leaf) > MAX_ENTRY_SIZE:
                raise EntryError(
                    f"entry {position} of the batch: expected at most {MAX_ENTRY_SIZE} bytes "
                    f"(what a C2SP entry bundle carries; put bulk data in a blob), got {len(leaf)}"
                )
            try:
                entry = self._verify(leaf, staged_keys)
            except LedgerError as error:
                raise EntryError(f"entry {position} of the batch: {error}") from error
            expected = next_seq.get(entry.author, self.next_seq(entry.author))
            if entry.seq < expected:
                indexes.append(self._existing(entry, rows, position))
                continue
            if entry.seq > expected:
                raise EntryError(
                    f"entry {position} of the batch: expected seq {expected} for author "
                    f"{entry.author}, got {entry.seq}"
                )
            next_seq[entry.author] = expected + 1
            if entry.kind == KEY_KIND:
                staged_keys.admit(leaf)
            rows.append((size, bytes(leaf), entry.author, entry.seq, entry.kind))
            frontier, created = merkle.frontier_append(
                frontier, size=size, leaf_hash=merkle.hash_leaf(leaf)
            )
            nodes.extend((node_id(level, index), digest) for level, index, digest in created)
            indexes.append(size)
            size += 1
        if not rows:
            return indexes
        root = merkle.root_from_frontier(frontier)
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self._operator)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", rows)
            self._db.executemany("INSERT INTO nodes VALUES (?, ?)", nodes)
            self._db.execute(
                "INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)", (size, root, note)
            )
            self._db.executemany(
                "INSERT INTO cosignatures (checkpoint_id, witness, line) VALUES (?, ?, ?)",
                cosignature_rows,
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"append to {self.path} failed: {error}") from error
        for row in rows:
            if row[4] == KEY_KIND:
                self._keys.admit(row[1])
        self._next_seq.update(next_seq)
        self._frontier, self._size = frontier, size
        return indexes

    def _verify(self, leaf: bytes, staged_keys: KeyRing) -> Entry:
        entry = parse_entry(leaf)
        ring = staged_keys if entry.author in staged_keys else self._keys
        return ring.verify(leaf)

    def _existing(
        self, entry: Entry, staged: Sequence[tuple[int, bytes, str, int, str]], position: int
    ) -> int:
        """Index of an identical earlier entry (idempotent resubmission), else EntryError."""
        for index, leaf, author, seq, _ in staged:
            if (author, seq) == (entry.author, entry.seq):
                found: tuple[int, bytes] | None = (index, leaf)
                break
        else:
            row = self._db.execute(
                "SELECT idx, CAST(leaf AS BLOB) FROM entries WHERE author = ? AND seq = ?",
                (entry.author, entry.seq),
            ).fetchone()
            found = None if row is None else (int(row[0]), bytes(row[1]))
        if found is None or found[1] != entry.leaf:
            raise EntryError(
                f"entry {position} of the batch: author {entry.author} already has a different "
                f"entry at seq {entry.seq}"
            )
        return found[0]

    def add_cosignature(self, cosigned_note: str, *, witness: NoteVerifier) -> int:
        """Record one witness cosignature (see :meth:`add_cosignatures`); returns its index."""
        return self.add_cosignatures([(cosigned_note, witness)])[0]

    def add_cosignatures(self, cosigned: Sequence[tuple[str, NoteVerifier]]) -> list[int]:
        """Verify witnesses' cosignatures on our checkpoints and record them in the tree.

        Each ``(note, witness)`` is a checkpoint we signed with the witness's
        cosignature/v1 line added (:func:`ledger.checkpoint.cosign_checkpoint`); the
        witness key must be the key of an author registered in the log. Each becomes an
        operator-signed ``cosignature`` entry (:mod:`ledger.cosignatures`) and a row of
        the ``cosignatures`` table, both in one transaction. Returns the entries'
        indexes. Raises CheckpointError when a cosignature does not verify, StoreError
        when the checkpoint is not one of ours or the witness is not registered.
        """
        prepared: list[tuple[dict[str, object], tuple[int, str, str]]] = []
        for note_text, witness in cosigned:
            fields = cosignature_fields(
                note_text, log=self.verifier, witness=witness, origin=self.origin
            )
            author = key_id(witness.raw_key)
            if author not in self._keys:
                raise StoreError(f"expected witness {author} to be a registered author, it is not")
            checkpoint = Checkpoint.from_body(parse_note(str(fields["note"])).body)
            row = self._db.execute(
                "SELECT id FROM checkpoints WHERE size = ? AND root = ? ORDER BY id DESC LIMIT 1",
                (checkpoint.size, checkpoint.root_hash),
            ).fetchone()
            if row is None:
                raise StoreError(
                    f"expected a checkpoint of this log, got {checkpoint.origin!r} "
                    f"{checkpoint.size}"
                )
            note = parse_note(str(fields["note"]))
            witness_id = (witness.name, witness.key_id)
            line = next(s.line() for s in note.signatures if (s.name, s.key_id) == witness_id)
            prepared.append((fields, (int(row[0]), witness.vkey(), line)))
        if not prepared:
            return []
        operator = self._operator
        seq = self.next_seq(operator.key_id)
        leaves = [] if seq > 0 else [make_key_entry(operator)]
        seq = max(seq, 1)
        leaves += [
            sign_entry(operator, COSIGNATURE_KIND, seq=seq + offset, fields=fields)
            for offset, (fields, _) in enumerate(prepared)
        ]
        indexes = self._append(leaves, [row for _, row in prepared])
        return indexes[-len(prepared) :]

    def _bulk_load_unverified(self, leaves: Sequence[bytes]) -> None:
        """Benchmark fast path: append leaves WITHOUT entry checks. Never use on a real ledger."""
        frontier, size = self._frontier, self._size
        rows: list[tuple[int, bytes, str, int, str]] = []
        nodes: list[tuple[int, bytes]] = []
        for leaf in leaves:
            frontier, created = merkle.frontier_append(
                frontier, size=size, leaf_hash=merkle.hash_leaf(leaf)
            )
            nodes.extend((node_id(level, index), digest) for level, index, digest in created)
            rows.append((size, leaf, "bench", size, "bench"))
            size += 1
        root = merkle.root_from_frontier(frontier)
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self._operator)
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", rows)
        self._db.executemany("INSERT INTO nodes VALUES (?, ?)", nodes)
        self._db.execute(
            "INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)", (size, root, note)
        )
        self._db.execute("COMMIT")
        self._frontier, self._size = frontier, size


def _writer_locks(db_path: Path) -> list[int]:
    """Exclusive ``flock`` s held by the single writer; StoreError when another holds one.

    One on ``<db>.lock`` beside the file, and one keyed by the file's identity
    (device, inode) in ``<tmp>/poi-ledger-locks/``: a second writer reaching the same
    file through another path (a symlink, a hard link, ``dir/../ledger.db``, a bind
    mount) takes the same identity lock. The database file is created empty first
    when missing (an empty file is an empty SQLite database), so it has an inode;
    nothing opens the database itself, which would disturb SQLite's POSIX locks.
    """
    if not db_path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    identity = os.stat(db_path)
    lock_dir = Path(tempfile.gettempdir()) / "poi-ledger-locks"
    if not lock_dir.is_dir():
        with contextlib.suppress(FileExistsError):
            lock_dir.mkdir()
            os.chmod(lock_dir, 0o1777)  # shared by every user, like /tmp itself
    paths = [Path(f"{db_path}.lock"), lock_dir / f"{identity.st_dev}-{identity.st_ino}.lock"]
    fds: list[int] = []
    for lock_path in paths:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            _release(fds)
            raise StoreError(f"cannot create the writer lock {lock_path}: {error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            _release(fds)
            raise StoreError(f"another writer holds {db_path} (lock {lock_path})") from error
        fds.append(fd)
    return fds


def _release(fds: Sequence[int]) -> None:
    """Unlock and close the writer's lock files."""
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _create_if_missing(connection: sqlite3.Connection, *, operator: Signer, origin: str) -> None:
    """Create the schema, meta rows and the signed empty checkpoint of a new ledger."""
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if exists:
        return
    verifier = NoteVerifier.for_key(origin, operator.public_key_bytes)
    note = sign_checkpoint(Checkpoint(origin, 0, merkle.EMPTY_ROOT), operator)
    connection.execute("BEGIN IMMEDIATE")
    try:
        create_schema(connection)
        connection.executemany(
            "INSERT INTO meta VALUES (?, ?)", [("origin", origin), ("log_key", verifier.vkey())]
        )
        connection.execute(
            "INSERT INTO checkpoints (size, root, note) VALUES (0, ?, ?)", (merkle.EMPTY_ROOT, note)
        )
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def create_schema(connection: sqlite3.Connection) -> None:
    """Create the ledger's tables and append-only triggers (inside the caller's
    transaction): for a new log, or a mirror of one fetched from its tiles."""
    for statement in _statements(_SCHEMA):
        connection.execute(statement)


def _statements(script: str) -> Iterator[str]:
    """Split a schema script into statements (triggers hold ';' inside BEGIN ... END)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    assert not buffer.strip(), buffer
