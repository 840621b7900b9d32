"""A full, independent audit of a ledger file (RFC 9162 tree, C2SP checkpoints, entries).

:func:`verify_log` trusts nothing in the database but its origin and log key (which
the caller may pin) and checks:

- every stored checkpoint's note signature, origin, and that its row matches its note;
- checkpoint sizes never go backwards, and no two checkpoints of one size differ;
- every entry: leaf framing, canonical RFC 8785 payload, known kind and fields,
  its indexed columns, its author's registered key and signature, and per-author
  ``seq`` without gaps or replays;
- the Merkle root recomputed from the leaves against every stored (and every
  externally trusted) checkpoint, and RFC 9162 consistency between successive
  checkpoints using the stored subtree hashes, each of which is recomputed too.

It returns an :class:`AuditReport` whose ``failure`` is the FIRST failure in log
order (the lowest entry index it concerns), naming the entry index and why.

How the work is split: the leaves are cut into aligned chunks of ``2**_CHUNK_LEVEL``
entries. A chunk checker (in a pool of worker processes for large logs, each with
its own read-only connection; inline for small ones) reads its chunk's rows and
does everything that needs no state from earlier chunks: the entry index, parsing
and the canonical-encoding check, the indexed columns, a ``key`` entry's own
checks, every signature, the leaf hashes and the chunk's subtree hashes (compared
with the stored ones, levels 0 to ``_CHUNK_LEVEL``), and the partial roots of the
checkpoint sizes that end inside it. It returns one small tuple per entry. The
main process keeps only the state that runs through the log (each author's next
``seq`` and registered key, the Merkle frontier at chunk boundaries) and walks the
tuples in log order, so failures are found and ranked exactly as one sequential
pass would.

A worker verifies a signature with the key whose key id is the entry's author,
taken from a ``key`` entry of its own chunk or from a hint the main process read
beforehand (rows whose ``kind`` column says ``key``). Key ids are hashes of keys,
so that is the key the sequential pass would use; whether it was registered
*before* the entry is decided in the main process, which verifies inline the rare
entries a worker had no key for.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import merkle
from ledger.checkpoint import parse_checkpoint, verify_cosignature
from ledger.cosignatures import COSIGNATURE_KIND, check_cosignature_fields, witness_verifier
from ledger.entries import KEY_KIND, KeyRing, parse_entry
from ledger.errors import AuditError, LedgerError
from ledger.keys import key_id, parse_public_key, raw_public_key, verify_signature
from ledger.log import LogReader, StoredCheckpoint, node_id
from ledger.tiles import MAX_ENTRY_SIZE

__all__ = ["AuditFailure", "AuditReport", "verify_log"]

_PARALLEL_THRESHOLD = 4096  # below this many entries, check every chunk inline
_CHUNK_LEVEL = 9
_CHUNK = 1 << _CHUNK_LEVEL  # entries per chunk (aligned, so a chunk is a subtree)
_FIRST_ROW = -(2**63)  # the first chunk reads from the very first row, whatever its idx

# What a chunk checker says about one entry: (author, seq, outcome, detail).
_SIGNED = 0  # signature verified
_BAD_SIGNATURE = 1  # signature does not verify
_UNCHECKED = 2  # no key at hand; detail = (message, signature) for the main process
_KEY = 3  # a ``key`` entry that passed its own checks; detail = raw public key
_KEY_FAILED = 4  # a ``key`` entry that did not; detail = why
_FAILED = 5  # framing, encoding, kind or columns are wrong; detail = why

_ROWS = (
    "SELECT idx, CAST(leaf AS BLOB), author, seq, kind FROM entries "
    "WHERE idx >= ? ORDER BY idx LIMIT ?"
)
_NODES = "SELECT id, CAST(hash AS BLOB) FROM nodes WHERE id >= ? AND id < ? ORDER BY id"

Outcome = tuple[Any, Any, int, Any]
Task = tuple[int, int, tuple[int, ...]]


@dataclass(frozen=True)
class _ChunkResult:
    """A chunk checker's answer for the entries [start, end)."""

    start: int
    outcomes: list[Outcome] | None  # None once the main process needs no more
    mismatch: tuple[int, int] | None  # (position, idx found) where the rows skip
    first_bad_nodes: list[tuple[int, str] | None]  # per level 0 .. _CHUNK_LEVEL
    partial_roots: dict[int, list[tuple[int, bytes]]]  # size -> (level, hash) pieces
    chunk_root: bytes | None  # the whole chunk's subtree hash, when it is complete


@dataclass(frozen=True, order=True)
class AuditFailure:
    """One failed check: the entry index it concerns (-1 for the log as a whole) and why."""

    index: int
    reason: str = field(compare=False)

    def __str__(self) -> str:
        where = "log" if self.index < 0 else f"entry {self.index}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify_log` checked, and its first failure (None when all holds)."""

    path: Path
    size: int
    checkpoints: int
    authors: int
    failure: AuditFailure | None
    # subscribers the verifier named as excused from witnessing the end, who did not
    excused: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failure is None

    def raise_for_failure(self) -> None:
        """Raise :class:`AuditError` naming the first failure, if any."""
        if self.failure is not None:
            raise AuditError(f"{self.path}: {self.failure}")


class _Flag(Protocol):
    def is_set(self) -> bool: ...

    def set(self) -> None: ...


class _InlineFlag:
    """Stands in for a multiprocessing.Event when chunks are checked inline."""

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True


class _ChunkChecker:
    """Checks one chunk of entries at a time (in a worker process or inline)."""

    def __init__(self, db: sqlite3.Connection, hints: dict[str, bytes], stop: _Flag) -> None:
        self.db = db
        self.hints = hints
        self.stop = stop  # set by the main process once it has found an entry failure
        self.keys: dict[bytes, Ed25519PublicKey | None] = {}

    def check(self, task: Task) -> _ChunkResult:
        start, end, claims = task
        rows = self.db.execute(_ROWS, (start or _FIRST_ROW, max(end - start, 1))).fetchall()
        mismatch = None
        for offset, row in enumerate(rows):
            if row[0] != start + offset:
                mismatch = (start + offset, row[0])
                rows = rows[:offset]
                break
        outcomes = None
        if not self.stop.is_set():
            local_keys: dict[str, bytes] = {}
            outcomes = [self.check_entry(row, local_keys) for row in rows]
        hash_leaf, hash_children = merkle.hash_leaf, merkle.hash_children
        levels = [[hash_leaf(bytes(row[1])) for row in rows]]
        first_bad: list[tuple[int, str] | None] = []
        for level in range(_CHUNK_LEVEL + 1):
            if level:
                below = levels[-1]
                pairs = zip(below[::2], below[1::2], strict=False)  # an odd last one waits
                levels.append([hash_children(left, right) for left, right in pairs])
            bad = self.first_bad_node(level, start >> level, end >> level, levels[level])
            if level == 0:
                if mismatch is not None and (bad is None or mismatch[0] <= bad):
                    first_bad.append((mismatch[0], _index_mismatch(*mismatch)))
                    continue
                reason = "stored leaf hash differs from the hash of the leaf"
            else:
                reason = f"stored subtree hash ({level}, {bad}) is wrong"
            first_bad.append(None if bad is None else (bad << level, reason))
        partial_roots = {}
        for size in claims:
            count = size - start
            if count > len(rows):
                continue  # beyond a skip in the rows: the main process stops before
            pieces, offset = [], 0
            for level in range(_CHUNK_LEVEL, -1, -1):
                if count >> level & 1:
                    pieces.append((level, levels[level][offset >> level]))
                    offset += 1 << level
            partial_roots[size] = pieces
        complete = end - start == _CHUNK and len(rows) == _CHUNK
        return _ChunkResult(
            start=start,
            outcomes=outcomes,
            mismatch=mismatch,
            first_bad_nodes=first_bad,
            partial_roots=partial_roots,
            chunk_root=levels[_CHUNK_LEVEL][0] if complete else None,
        )

    def first_bad_node(
        self, level: int, low: int, high: int, recomputed: list[bytes]
    ) -> int | None:
        """The first node index in [low, high) at ``level`` whose stored hash is wrong.

        Compared with the hash recomputed from the leaves; at the first level with a
        wrong node anywhere, that is the same as comparing with the hash of its stored
        children, as :meth:`LogReader.first_bad_subtree` does.
        """
        if high <= low:
            return None
        rows = self.db.execute(_NODES, (node_id(level, low), node_id(level, high))).fetchall()
        if len(rows) == high - low and [digest for _, digest in rows] == recomputed:
            return None
        for offset in range(high - low):
            if (
                offset >= len(rows)
                or offset >= len(recomputed)
                or rows[offset][0] != node_id(level, low + offset)
                or rows[offset][1] != recomputed[offset]
            ):
                return low + offset
        return None

    def check_entry(self, row: tuple[Any, ...], local_keys: dict[str, bytes]) -> Outcome:
        """What the sequential pass would find on this entry, short of cross-chunk state."""
        _, leaf, *columns = row
        if len(leaf) > MAX_ENTRY_SIZE:
            return None, None, _FAILED, (
                f"expected an entry of at most {MAX_ENTRY_SIZE} bytes (what an entry bundle "
                f"carries), got {len(leaf)}"
            )
        try:
            entry = parse_entry(leaf)
            if tuple(columns) != (entry.author, entry.seq, entry.kind):
                raise AuditError(
                    f"indexed columns {tuple(columns)} disagree with the signed payload"
                )
        except LedgerError as error:
            return None, None, _FAILED, str(error)
        if entry.kind == KEY_KIND:
            ring = KeyRing()
            try:
                ring.admit(leaf)  # verifies the self-signature
            except LedgerError as error:
                return entry.author, entry.seq, _KEY_FAILED, str(error)
            own = raw_public_key(ring.public_key(entry.author))
            local_keys[entry.author] = own
            return entry.author, entry.seq, _KEY, own
        raw = local_keys.get(entry.author) or self.hints.get(entry.author)
        key = None if raw is None else self.key(raw)
        message = entry.signed_message()
        if key is None:
            return entry.author, entry.seq, _UNCHECKED, (message, entry.signature)
        good = verify_signature(key, entry.signature, message)
        return entry.author, entry.seq, _SIGNED if good else _BAD_SIGNATURE, None

    def key(self, raw: bytes) -> Ed25519PublicKey | None:
        if raw not in self.keys:
            try:
                self.keys[raw] = parse_public_key(raw)
            except (LedgerError, ValueError):
                self.keys[raw] = None
        return self.keys[raw]


def _index_mismatch(position: int, found: object) -> str:
    return f"expected entry index {position}, found {found}"


_WORKER: _ChunkChecker | None = None


def _start_worker(path: str, hints: dict[str, bytes], stop: _Flag) -> None:
    global _WORKER
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    _WORKER = _ChunkChecker(db, hints, stop)


def _check_chunk(task: Task) -> _ChunkResult:
    assert _WORKER is not None
    return _WORKER.check(task)


def _key_hints(db: sqlite3.Connection) -> dict[str, bytes]:
    """Raw keys of the rows whose ``kind`` column says ``key``, by key id (unverified)."""
    hints = {}
    for (leaf,) in db.execute("SELECT CAST(leaf AS BLOB) FROM entries WHERE kind = ?", (KEY_KIND,)):
        try:
            fields = json.loads(bytes(leaf).rpartition(b"\n")[0])
            raw = base64.b64decode(fields["public_key"], validate=True)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue
        hints[key_id(raw)] = raw
    return hints


def _push(frontier: list[bytes], size: int, node: bytes, level: int) -> list[bytes]:
    """The frontier after appending a complete subtree of ``2**level`` leaves at ``size``."""
    frontier = list(frontier)
    index = size >> level
    while index & 1:
        node = merkle.hash_children(frontier.pop(), node)
        index >>= 1
    frontier.append(node)
    return frontier


class _Auditor:
    def __init__(
        self, reader: LogReader, *, trusted: Sequence[str], workers: int, size: int
    ) -> None:
        self.reader = reader
        self.db = reader.connection
        self.trusted = trusted
        self.workers = workers
        self.size = size
        self.failures: list[AuditFailure] = []
        self.raw_keys: dict[str, bytes] = {}
        self.public_keys: dict[bytes, Ed25519PublicKey] = {}
        self.authors_next_seq: dict[str, int] = {}
        self.first_bad_nodes: list[tuple[int, str] | None] = [None] * (_CHUNK_LEVEL + 1)
        self.cosigned: dict[str, int] = {}  # witness author -> largest tree it cosigned

    def fail(self, index: int, reason: str) -> None:
        self.failures.append(AuditFailure(index, reason))

    # -- checkpoints ----------------------------------------------------------

    def check_checkpoints(self, stored: Sequence[StoredCheckpoint]) -> dict[int, set[bytes]]:
        """Verify every note; returns the roots claimed at each size."""
        claimed: dict[int, set[bytes]] = {}
        previous = 0
        for position, row in enumerate(stored, 1):
            where = max(row.size - 1, -1)
            if row.id != position:  # the sequencer numbers them 1, 2, ...; none is deleted
                self.fail(where, f"expected checkpoint #{position}, found #{row.id} (deleted?)")
            try:
                checkpoint = parse_checkpoint(
                    row.note, verifier=self.reader.verifier, origin=self.reader.origin
                )
            except LedgerError as error:
                self.fail(where, f"checkpoint #{row.id} (size {row.size}): {error}")
                continue
            if (checkpoint.size, checkpoint.root_hash) != (row.size, row.root):
                self.fail(where, f"checkpoint #{row.id}: its row disagrees with its signed note")
                continue
            if row.size < previous:
                self.fail(where, f"checkpoint #{row.id}: size {row.size} after size {previous}")
            previous = max(previous, row.size)
            roots = claimed.setdefault(row.size, set())
            roots.add(row.root)
            if len(roots) > 1:
                self.fail(where, f"two signed checkpoints of size {row.size} with different roots")
        if previous != self.size:
            self.fail(
                min(previous, self.size),
                f"expected {previous} entries (last checkpoint), found {self.size}",
            )
        for note in self.trusted:
            try:
                checkpoint = parse_checkpoint(
                    note, verifier=self.reader.verifier, origin=self.reader.origin
                )
            except LedgerError as error:
                self.fail(-1, f"trusted checkpoint does not verify: {error}")
                continue
            if checkpoint.size > self.size:
                self.fail(self.size, f"trusted checkpoint of size {checkpoint.size} is missing")
                continue
            claimed.setdefault(checkpoint.size, set()).add(checkpoint.root_hash)
            if len(claimed[checkpoint.size]) > 1:
                self.fail(
                    checkpoint.size - 1,
                    f"trusted checkpoint of size {checkpoint.size} conflicts with a stored one",
                )
        return claimed

    def check_consistency(self, stored: Sequence[StoredCheckpoint]) -> None:
        """RFC 9162 consistency between successive checkpoints, from stored subtrees."""
        sizes = sorted({row.size: row.root for row in stored if 0 < row.size <= self.size}.items())
        for (old_size, old_root), (new_size, new_root) in zip(sizes, sizes[1:], strict=False):
            try:
                proof = self.reader.consistency_proof(old_size, new_size)
                merkle.verify_consistency(
                    size1=old_size, size2=new_size, proof=proof, root1=old_root, root2=new_root
                )
            except LedgerError as error:
                self.fail(old_size - 1, f"checkpoints {old_size} -> {new_size}: {error}")
                return

    # -- entries ----------------------------------------------------------------

    def check_entries(self, claimed: dict[int, set[bytes]]) -> None:
        """Every entry in log order, with the leaves' roots at every claimed size.

        Also gathers, per level up to ``_CHUNK_LEVEL``, the first wrong stored subtree
        hash, for :meth:`check_nodes`.
        """
        sizes = sorted(size for size in claimed if size > 0)
        tasks: list[Task] = []
        # A renumbered or deleted row leaves a gap before the row count: the chunks up
        # to it find the first failure, and a hostile idx near 2**63 costs nothing.
        (rows,) = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()
        span = self.size if rows == self.size else min(self.size, int(rows) + 1)
        for start in range(0, max(span, 1), _CHUNK):
            end = min(start + _CHUNK, self.size)
            tasks.append((start, end, tuple(s for s in sizes if start < s <= end)))
        hints = _key_hints(self.db)
        if self.workers > 1 and self.size >= _PARALLEL_THRESHOLD:
            context = multiprocessing.get_context()
            stop = context.Event()
            pool = ProcessPoolExecutor(
                max_workers=min(self.workers, len(tasks)),
                mp_context=context,
                initializer=_start_worker,
                initargs=(str(self.reader.path), hints, stop),
            )
            try:
                self.walk(pool.map(_check_chunk, tasks), claimed, stop)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            inline_stop = _InlineFlag()
            checker = _ChunkChecker(self.db, hints, inline_stop)
            self.walk(map(checker.check, tasks), claimed, inline_stop)

    def walk(
        self, results: Iterable[_ChunkResult], claimed: dict[int, set[bytes]], stop: _Flag
    ) -> None:
        """Consume chunk results in log order; stops checking entries at the first failure."""
        bad_signatures: list[int] = []
        frontier: list[bytes] = []
        walking = True
        for result in results:
            for level, bad in enumerate(result.first_bad_nodes):
                if bad is not None and self.first_bad_nodes[level] is None:
                    self.first_bad_nodes[level] = bad
            if not walking:
                continue  # node checks still come from every chunk
            walking = self.walk_chunk(result, frontier, claimed, bad_signatures)
            if not walking:
                stop.set()
            elif result.chunk_root is not None:
                frontier = _push(frontier, result.start, result.chunk_root, _CHUNK_LEVEL)
        for index in bad_signatures:
            self.fail(index, "author signature does not verify")

    def walk_chunk(
        self,
        result: _ChunkResult,
        frontier: list[bytes],
        claimed: dict[int, set[bytes]],
        bad_signatures: list[int],
    ) -> bool:
        """The sequential checks of one chunk's entries; False at the first failure."""
        assert result.outcomes is not None
        next_seq, raw_keys = self.authors_next_seq, self.raw_keys
        for index, (author, seq, outcome, detail) in enumerate(result.outcomes, result.start):
            if outcome == _FAILED:
                self.fail(index, detail)
                return False
            expected = next_seq.get(author, 0)
            if seq != expected:
                self.fail(index, f"expected seq {expected} for author {author}, got {seq}")
                return False
            if outcome == _KEY:
                raw_keys[author] = detail
            elif outcome == _KEY_FAILED:
                self.fail(index, detail)
                return False
            elif author not in raw_keys:
                self.fail(index, f"author {author} has no key entry before this one")
                return False
            elif outcome == _BAD_SIGNATURE or (
                outcome == _UNCHECKED and not self.verify_inline(raw_keys[author], *detail)
            ):
                bad_signatures.append(index)
            next_seq[author] = expected + 1
            roots = claimed.get(index + 1)
            if roots is not None:
                pieces = result.partial_roots[index + 1]
                whole, at = frontier, result.start
                for level, node in pieces:
                    whole = _push(whole, at, node, level)
                    at += 1 << level
                root = merkle.root_from_frontier(whole)
                if roots != {root}:
                    self.fail(
                        index,
                        f"signed checkpoint of size {index + 1} has root "
                        f"{sorted(r.hex() for r in roots)}, the leaves give {root.hex()}",
                    )
                    return False
        if result.mismatch is not None:
            self.fail(result.mismatch[0], _index_mismatch(*result.mismatch))
            return False
        return True

    def verify_inline(self, raw: bytes, message: bytes, signature: bytes) -> bool:
        """A signature no worker had the key for (its key entry came in a later chunk)."""
        key = self.public_keys.get(raw)
        if key is None:
            key = self.public_keys[raw] = parse_public_key(raw)
        return verify_signature(key, signature, message)

    # -- witnesses ------------------------------------------------------------------

    def check_cosignatures(self, stored: Sequence[StoredCheckpoint]) -> None:
        """Every cosignature, in the tree and in the table, against the witness's key.

        Runs after the entries and nodes verified, so the ``kind`` column and the stored
        subtree hashes can be trusted. A ``cosignature`` entry must be the operator's,
        name a witness whose ``key`` entry comes before it, carry a note the log signed
        and the witness cosigned, over a tree no larger than the entry's own index whose
        root is the tree's. Every row of the ``cosignatures`` table must verify on the
        checkpoint it is attached to and be recorded by such an entry, and every such
        entry must have its row (both are written in one transaction): deleting either
        is a failure.
        """
        size, db = self.size, self.db
        registered: dict[str, int] = {}
        for index, leaf in db.execute(
            "SELECT idx, CAST(leaf AS BLOB) FROM entries WHERE kind = ? AND idx < ? ORDER BY idx",
            (KEY_KIND, size),
        ):
            registered.setdefault(parse_entry(bytes(leaf)).author, int(index))
        operator = key_id(self.reader.verifier.raw_key)
        recorded: dict[tuple[str, int, bytes, str], int] = {}
        for index, leaf in db.execute(
            "SELECT idx, CAST(leaf AS BLOB) FROM entries WHERE kind = ? AND idx < ? ORDER BY idx",
            (COSIGNATURE_KIND, size),
        ):
            entry = parse_entry(bytes(leaf))
            try:
                if entry.author != operator:
                    raise AuditError(
                        f"expected the operator {operator} to record it, got {entry.author}"
                    )
                witnessed = check_cosignature_fields(
                    entry.fields, log=self.reader.verifier, origin=self.reader.origin
                )
                checkpoint = witnessed.checkpoint
                if registered.get(witnessed.witness_author, size) >= index:
                    raise AuditError(
                        f"witness {witnessed.witness_author} has no key entry before it"
                    )
                if checkpoint.size > index:
                    raise AuditError(f"cosigns tree {checkpoint.size}, beyond its own index")
                if checkpoint.root_hash != self.reader.root(checkpoint.size):
                    raise AuditError(
                        f"cosigns a root of tree {checkpoint.size} the leaves do not give"
                    )
            except LedgerError as error:
                self.fail(int(index), f"cosignature entry: {error}")
                return
            for line in witnessed.lines:
                key = (witnessed.witness.vkey(), checkpoint.size, checkpoint.root_hash, line)
                recorded.setdefault(key, int(index))
            author = witnessed.witness_author
            self.cosigned[author] = max(self.cosigned.get(author, 0), checkpoint.size)
        notes = {row.id: row for row in stored}
        seen: set[tuple[str, int, bytes, str]] = set()
        for position, (row_id, checkpoint_id, vkey, line) in enumerate(db.execute(
            "SELECT id, checkpoint_id, CAST(witness AS TEXT), CAST(line AS TEXT) "
            "FROM cosignatures ORDER BY id"
        ), 1):
            row = notes.get(int(checkpoint_id))
            where = f"cosignature #{row_id}"
            if row_id != position:
                self.fail(-1, f"expected cosignature #{position}, found #{row_id} (deleted?)")
                return
            if row is None:
                self.fail(-1, f"{where}: on checkpoint #{checkpoint_id}, which does not exist")
                return
            try:
                witness = witness_verifier(str(vkey))
                verify_cosignature(row.note + str(line), witness=witness)
            except LedgerError as error:
                self.fail(max(row.size - 1, -1), f"{where} (tree {row.size}): {error}")
                return
            key = (witness.vkey(), row.size, row.root, str(line))
            if key not in recorded:
                self.fail(
                    max(row.size - 1, -1),
                    f"{where} (tree {row.size}) is recorded by no cosignature entry in the tree",
                )
                return
            seen.add(key)
        for key, index in recorded.items():
            if key not in seen:  # both are written in one transaction: a row was deleted
                self.fail(index, "cosignature entry has no stored cosignature row (deleted?)")
                return

    def check_witnessed(self, closing_kind: str, witness_kinds: Sequence[str],
                        excused: Sequence[str] = ()) -> list[str]:
        """Witnessed to the end: once the log holds a ``closing_kind`` entry (the
        settlement), every author of a ``witness_kinds`` entry before it (every
        subscriber) must have cosigned a tree that holds it.

        This binds each subscriber's key to the tree: a history rewritten from any entry
        before the settlement (a subscriber's key entry replaced, votes or scores
        swapped) and re-signed changes the root of that final tree, so the other
        subscribers' final cosignatures no longer verify, and the operator cannot make
        new ones.

        ``excused`` are key ids the verifier accepts as missing (a subscriber that went
        away before the end); the ones that did miss are returned, so the report names
        them. Everyone else is still required.
        """
        rows = self.db.execute(
            "SELECT MAX(idx) FROM entries WHERE kind = ? AND idx < ?", (closing_kind, self.size)
        ).fetchone()
        if rows is None or rows[0] is None:
            return []
        closing = int(rows[0])
        missing: list[str] = []
        marks = ",".join("?" * len(witness_kinds))
        witnesses = [
            str(author)
            for (author,) in self.db.execute(
                f"SELECT DISTINCT author FROM entries WHERE kind IN ({marks}) AND idx < ? "
                "ORDER BY author",
                (*witness_kinds, closing),
            )
        ]
        for author in witnesses:
            if self.cosigned.get(author, 0) <= closing:
                if author in excused:
                    missing.append(author)
                    continue
                self.fail(
                    closing,
                    f"not witnessed to the end: subscriber {author} cosigned no tree holding "
                    f"the {closing_kind} (its largest: {self.cosigned.get(author, 0)} entries)",
                )
                return missing
        return missing

    # -- interior nodes -----------------------------------------------------------

    def check_nodes(self) -> None:
        """Every stored subtree hash (leaf hashes included) recomputes from the leaves.

        The same answer as ``LogReader.first_bad_subtree``: the first wrong hash of the
        lowest level that has one. Levels up to ``_CHUNK_LEVEL`` were checked chunk by
        chunk in :meth:`check_entries`; the reader checks the levels above.
        """
        bad = next((found for found in self.first_bad_nodes if found is not None), None)
        if bad is None:
            bad = self.reader.first_bad_subtree(self.size, from_level=_CHUNK_LEVEL + 1)
        if bad is not None:
            self.fail(*bad)


def verify_log(
    path: str | os.PathLike[str],
    *,
    log_key: str | None = None,
    trusted_checkpoints: Sequence[str] = (),
    workers: int | None = None,
    closing_kind: str | None = "settlement",
    witness_kinds: Sequence[str] = ("candidate",),
    excused_witnesses: Sequence[str] = (),
) -> AuditReport:
    """Audit the ledger at ``path`` (a database file or a run folder with ``ledger.db``).

    ``log_key`` pins the operator's note verifier key (else the stored one is used);
    ``trusted_checkpoints`` are notes held elsewhere (by subscribers) that the
    leaves must reproduce. Once the log holds a ``closing_kind`` entry, every author
    of a ``witness_kinds`` entry must have cosigned a tree holding it (``None``: no
    such requirement), except the key ids in ``excused_witnesses`` (the verifier's own
    choice; the report's ``excused`` names those that did miss). Returns the report;
    its ``failure`` is the first failure.
    Raises :class:`ledger.errors.StoreError` only when the file cannot be read at all.
    """
    reader = LogReader.open(path)
    try:
        with reader.snapshot():
            return _verify_snapshot(
                reader, log_key=log_key, trusted_checkpoints=trusted_checkpoints,
                workers=workers, closing_kind=closing_kind, witness_kinds=witness_kinds,
                excused_witnesses=excused_witnesses,
            )
    except sqlite3.DatabaseError as error:
        failure = AuditFailure(-1, f"database is unreadable: {error}")
        return AuditReport(path=reader.path, size=0, checkpoints=0, authors=0, failure=failure)
    finally:
        reader.close()


def _verify_snapshot(
    reader: LogReader,
    *,
    log_key: str | None,
    trusted_checkpoints: Sequence[str],
    workers: int | None,
    closing_kind: str | None,
    witness_kinds: Sequence[str],
    excused_witnesses: Sequence[str] = (),
) -> AuditReport:
    """:func:`verify_log` inside one read transaction of ``reader``.

    The main connection sees one state of the log throughout. Worker processes read
    with their own connections, but only entries below the snapshot's size and the
    subtree hashes of that tree: the tables are append-only, so those rows are the
    ones the snapshot holds.
    """
    size = reader.size
    stored = reader.stored_checkpoints()
    excused: list[str] = []
    auditor = _Auditor(
        reader, trusted=trusted_checkpoints, workers=workers or os.cpu_count() or 1, size=size
    )
    if log_key is not None and reader.log_key != log_key:
        auditor.fail(-1, f"expected log key {log_key}, the database holds {reader.log_key}")
    else:
        claimed = auditor.check_checkpoints(stored)
        auditor.check_entries(claimed)
        auditor.check_nodes()
        if not auditor.failures:
            auditor.check_consistency(stored)
        if not auditor.failures:
            auditor.check_cosignatures(stored)
        if not auditor.failures and closing_kind is not None:
            excused = auditor.check_witnessed(closing_kind, witness_kinds, excused_witnesses)
    return AuditReport(
        path=reader.path,
        size=size,
        checkpoints=len(stored),
        authors=len(auditor.authors_next_seq),
        failure=min(auditor.failures, default=None),
        excused=tuple(excused),
    )
