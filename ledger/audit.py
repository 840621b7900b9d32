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
Signatures are verified in worker processes for large logs.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import merkle
from ledger.checkpoint import parse_checkpoint
from ledger.entries import KEY_KIND, KeyRing, parse_entry
from ledger.errors import AuditError, LedgerError
from ledger.keys import parse_public_key, raw_public_key, verify_signature
from ledger.log import LogReader, StoredCheckpoint

__all__ = ["AuditFailure", "AuditReport", "verify_log"]

_PARALLEL_THRESHOLD = 4096  # below this, verify signatures inline
_SIGNATURE_CHUNK = 2048


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

    @property
    def ok(self) -> bool:
        return self.failure is None

    def raise_for_failure(self) -> None:
        """Raise :class:`AuditError` naming the first failure, if any."""
        if self.failure is not None:
            raise AuditError(f"{self.path}: {self.failure}")


def _verify_chunk(
    items: Sequence[tuple[int, bytes, bytes, bytes]],
) -> list[int]:
    """Worker: indexes whose Ed25519 signature over the message does not verify."""
    keys: dict[bytes, Ed25519PublicKey] = {}
    bad = []
    for index, raw_key, message, signature in items:
        key = keys.get(raw_key)
        if key is None:
            key = keys[raw_key] = parse_public_key(raw_key)
        if not verify_signature(key, signature, message):
            bad.append(index)
    return bad


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
        self.keys = KeyRing()
        self.raw_keys: dict[str, bytes] = {}
        self.authors_next_seq: dict[str, int] = {}

    def fail(self, index: int, reason: str) -> None:
        self.failures.append(AuditFailure(index, reason))

    # -- checkpoints ----------------------------------------------------------

    def check_checkpoints(self, stored: Sequence[StoredCheckpoint]) -> dict[int, set[bytes]]:
        """Verify every note; returns the roots claimed at each size."""
        claimed: dict[int, set[bytes]] = {}
        previous = 0
        for row in stored:
            where = max(row.size - 1, -1)
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
        frontier: list[bytes] = []
        pending: list[tuple[int, bytes, bytes, bytes]] = []
        rows = self.db.execute(
            "SELECT idx, CAST(leaf AS BLOB), author, seq, kind FROM entries ORDER BY idx"
        )
        with _pool(self.workers if self.size >= _PARALLEL_THRESHOLD else 0) as pool:
            futures = []
            for position, (index, leaf_raw, author, seq, kind) in enumerate(rows):
                leaf = bytes(leaf_raw)
                if index != position:
                    self.fail(position, f"expected entry index {position}, found {index}")
                    break
                if not self.check_entry(index, leaf, (author, seq, kind), pending):
                    break
                leaf_hash = merkle.hash_leaf(leaf)
                frontier, _ = merkle.frontier_append(frontier, size=index, leaf_hash=leaf_hash)
                roots = claimed.get(index + 1)
                if roots is not None:
                    root = merkle.root_from_frontier(frontier)
                    if roots != {root}:
                        self.fail(
                            index,
                            f"signed checkpoint of size {index + 1} has root "
                            f"{sorted(r.hex() for r in roots)}, the leaves give {root.hex()}",
                        )
                        break
                if len(pending) >= _SIGNATURE_CHUNK:
                    futures.append(_submit(pool, pending))
                    pending = []
            futures.append(_submit(pool, pending))
            for future in futures:
                for index in future():
                    self.fail(index, "author signature does not verify")

    def check_entry(
        self,
        index: int,
        leaf: bytes,
        columns: tuple[str, int, str],
        pending: list[tuple[int, bytes, bytes, bytes]],
    ) -> bool:
        try:
            entry = parse_entry(leaf)
            if columns != (entry.author, entry.seq, entry.kind):
                raise AuditError(f"indexed columns {columns} disagree with the signed payload")
            expected = self.authors_next_seq.get(entry.author, 0)
            if entry.seq != expected:
                raise AuditError(
                    f"expected seq {expected} for author {entry.author}, got {entry.seq}"
                )
            if entry.kind == KEY_KIND:
                self.keys.admit(leaf)  # verifies the self-signature inline
                self.raw_keys[entry.author] = raw_public_key(self.keys.public_key(entry.author))
            elif entry.author not in self.raw_keys:
                raise AuditError(f"author {entry.author} has no key entry before this one")
            else:
                pending.append(
                    (index, self.raw_keys[entry.author], entry.signed_message(), entry.signature)
                )
            self.authors_next_seq[entry.author] = expected + 1
        except LedgerError as error:
            self.fail(index, str(error))
            return False
        return True

    # -- interior nodes -----------------------------------------------------------

    def check_nodes(self) -> None:
        """Every stored subtree hash (leaf hashes included) recomputes from the leaves."""
        bad = self.reader.first_bad_subtree(self.size)
        if bad is not None:
            self.fail(*bad)


class _Inline:
    """Stands in for a process pool on small logs: signatures are checked inline."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _pool(workers: int) -> ProcessPoolExecutor | _Inline:
    return ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Inline()


def _submit(
    pool: ProcessPoolExecutor | None, items: list[tuple[int, bytes, bytes, bytes]]
) -> Callable[[], list[int]]:
    """Verify ``items`` now (no pool) or in a worker; returns how to get the bad indexes."""
    if pool is None:
        result = _verify_chunk(items)
        return lambda: result
    future = pool.submit(_verify_chunk, items)
    return future.result


def verify_log(
    path: str | os.PathLike[str],
    *,
    log_key: str | None = None,
    trusted_checkpoints: Sequence[str] = (),
    workers: int | None = None,
) -> AuditReport:
    """Audit the ledger at ``path`` (a database file or a run folder with ``ledger.db``).

    ``log_key`` pins the operator's note verifier key (else the stored one is used);
    ``trusted_checkpoints`` are notes held elsewhere (by subscribers) that the
    leaves must reproduce. Returns the report; its ``failure`` is the first failure.
    Raises :class:`ledger.errors.StoreError` only when the file cannot be read at all.
    """
    reader = LogReader.open(path)
    try:
        size = reader.size
        stored = reader.stored_checkpoints()
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
        return AuditReport(
            path=reader.path,
            size=size,
            checkpoints=len(stored),
            authors=len(auditor.authors_next_seq),
            failure=min(auditor.failures, default=None),
        )
    except sqlite3.DatabaseError as error:
        failure = AuditFailure(-1, f"database is unreadable: {error}")
        return AuditReport(path=reader.path, size=0, checkpoints=0, authors=0, failure=failure)
    finally:
        reader.close()
