"""Audit work is split in chunks: the answer must not depend on where the chunks fall.

A ledger of a little over two chunks (``ledger.audit._CHUNK`` entries each), with an
author whose key entry comes in the second chunk, is tampered with around the chunk
boundaries; the inline audit and the worker-pool audit must report the same first
failure, and node tamperings the same one as ``LogReader.first_bad_subtree``.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ORIGIN, candidate, populate, seeded_signer
from test_ledger_audit import _flip_leaf, _raw

import ledger.audit as audit
from ledger.entries import make_key_entry
from ledger.log import Log, LogReader, node_id

CHUNK = audit._CHUNK
LATE = seeded_signer("author-late")


@pytest.fixture(scope="module")
def chunked_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 * CHUNK + 100 entries; the late author's key entry sits in the second chunk."""
    path = tmp_path_factory.mktemp("chunks") / "ledger.db"
    authors = [seeded_signer(f"author-{number}") for number in range(3)]
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        populate(log, authors, batches=4, per_author=50)  # 603 entries
        log.append_many([make_key_entry(LATE)] + [candidate(LATE, seq) for seq in range(1, 300)])
        log.append_many([candidate(LATE, seq) for seq in range(300, 521)])
        assert log.size == 2 * CHUNK + 100
    return path


def _late_key_index(db: sqlite3.Connection) -> int:
    return int(
        db.execute("SELECT idx FROM entries WHERE kind = 'key' ORDER BY idx DESC").fetchone()[0]
    )


def _swap(db: sqlite3.Connection, first: int, second: int) -> None:
    rows = {
        row[0]: row
        for row in db.execute("SELECT * FROM entries WHERE idx IN (?, ?)", (first, second))
    }
    db.execute("DELETE FROM entries WHERE idx IN (?, ?)", (first, second))
    for at, row in ((first, rows[second]), (second, rows[first])):
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", (at, *row[1:]))


def _bad_signature(db: sqlite3.Connection, index: int) -> None:
    (leaf,) = db.execute("SELECT leaf FROM entries WHERE idx = ?", (index,)).fetchone()
    signature = bytearray(leaf[-88:])
    signature[10] = ord("A") if signature[10] != ord("A") else ord("B")
    db.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (leaf[:-88] + signature, index))


def _zero_node(level: int, index: int) -> Callable[[sqlite3.Connection], object]:
    return lambda db: db.execute(
        "UPDATE nodes SET hash = zeroblob(32) WHERE id = ?", (node_id(level, index),)
    )


TAMPERINGS: dict[str, tuple[Callable[[sqlite3.Connection], object], int | None, str]] = {
    # name: (change, expected first failure index or None to skip, reason fragment)
    "delete-last-of-chunk": (
        lambda db: db.execute("DELETE FROM entries WHERE idx = ?", (CHUNK - 1,)),
        CHUNK - 1,
        f"expected entry index {CHUNK - 1}, found {CHUNK}",
    ),
    "delete-first-of-chunk": (
        lambda db: db.execute("DELETE FROM entries WHERE idx = ?", (CHUNK,)),
        CHUNK,
        f"expected entry index {CHUNK}, found {CHUNK + 1}",
    ),
    "stray-row-before-zero": (
        lambda db: db.execute(
            "INSERT INTO entries VALUES (-1, ?, 'x', 0, 'task')", (candidate(LATE, 0),)
        ),
        0,
        "expected entry index 0, found -1",
    ),
    "chunk-subtree-hash": (_zero_node(audit._CHUNK_LEVEL, 1), CHUNK, "subtree hash"),
    "above-chunk-subtree-hash": (_zero_node(audit._CHUNK_LEVEL + 1, 0), 0, "subtree hash"),
    "missing-leaf-hash": (
        lambda db: db.execute("DELETE FROM nodes WHERE id = ?", (node_id(0, CHUNK + 7),)),
        CHUNK + 7,
        "stored leaf hash",
    ),
    "hash-beyond-the-tree": (
        lambda db: db.execute(
            "INSERT INTO nodes VALUES (?, zeroblob(32))", (node_id(2, (2 * CHUNK + 100) // 4),)
        ),
        2 * CHUNK + 100,
        "beyond the tree",
    ),
    "bad-signatures-then-bad-leaf": (
        lambda db: (
            _bad_signature(db, CHUNK + 200),
            _bad_signature(db, 40),
            _flip_leaf(db, CHUNK + 300, 5, 0x04),
        ),
        40,
        "author signature does not verify",
    ),
    "key-entry-moved-after-its-author": (
        lambda db: _swap(db, _late_key_index(db), _late_key_index(db) + CHUNK - 3),
        603,
        "expected seq 0",
    ),
    "key-entry-kind-column": (
        lambda db: db.execute(
            "UPDATE entries SET kind = 'task' WHERE idx = ?", (_late_key_index(db),)
        ),
        603,
        "indexed columns",
    ),
    "late-author-starts-without-a-key-entry": (
        lambda db: db.execute(
            "UPDATE entries SET leaf = ?, kind = 'candidate' WHERE idx = 603",
            (candidate(LATE, 0),),
        ),
        603,
        "has no key entry before this one",
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_chunked_audit_agrees_inline_and_parallel(
    name: str, chunked_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    change, expected_index, fragment = TAMPERINGS[name]
    copy = tmp_path / "ledger.db"
    shutil.copyfile(chunked_db, copy)
    _raw(copy, change)
    inline = audit.verify_log(copy, workers=1)
    monkeypatch.setattr(audit, "_PARALLEL_THRESHOLD", 0)
    parallel = audit.verify_log(copy, workers=2)
    assert inline.failure is not None, name
    assert (inline.failure.index, inline.failure.reason, inline.authors) == (
        parallel.failure.index if parallel.failure else None,
        parallel.failure.reason if parallel.failure else None,
        parallel.authors,
    )
    assert inline.failure.index == expected_index, inline.failure
    assert fragment in inline.failure.reason, inline.failure
    with LogReader.open(copy) as reader:
        bad_node = reader.first_bad_subtree(reader.size)
    if "hash" in name:  # the node checks alone decide these
        assert bad_node == (inline.failure.index, inline.failure.reason)


def test_chunked_clean_log_verifies_both_ways(
    chunked_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = []
    with LogReader.open(chunked_db) as reader:
        published = [row.note for row in reader.stored_checkpoints()]
    inline = audit.verify_log(chunked_db, workers=1, trusted_checkpoints=published)
    monkeypatch.setattr(audit, "_PARALLEL_THRESHOLD", 0)
    parallel = audit.verify_log(chunked_db, workers=2, trusted_checkpoints=published)
    assert inline.ok and parallel.ok, (inline.failure, parallel.failure)
    assert (
        (inline.size, inline.authors) == (parallel.size, parallel.authors) == (2 * CHUNK + 100, 4)
    )
