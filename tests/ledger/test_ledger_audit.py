"""Audit: a clean log verifies, 1,000 random tamperings are all caught, crashes lose nothing."""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ORIGIN, candidate, populate, seeded_signer

from ledger import merkle
from ledger.audit import verify_log
from ledger.checkpoint import Checkpoint, sign_checkpoint
from ledger.entries import make_key_entry
from ledger.errors import AuditError
from ledger.keys import Signer
from ledger.log import Log, node_id

MUTATIONS = 1000
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clean_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A small ledger (3 authors, 5 group commits) and the checkpoint notes it published."""
    path = tmp_path_factory.mktemp("clean") / "ledger.db"
    authors = [seeded_signer(f"author-{number}") for number in range(3)]
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        populate(log, authors, batches=4, per_author=2)
        published = [row.note for row in log.stored_checkpoints()]
    return path, published


def test_clean_log_verifies(clean_db: tuple[Path, list[str]]) -> None:
    path, published = clean_db
    report = verify_log(path, trusted_checkpoints=published)
    assert report.ok, report.failure
    assert (report.size, report.checkpoints, report.authors) == (27, 6, 3)
    report.raise_for_failure()


def test_parallel_signature_checks_agree(tmp_path: Path) -> None:
    author = seeded_signer("author-0")
    with Log.open(tmp_path / "ledger.db", seeded_signer("operator"), ORIGIN) as log:
        log.append(make_key_entry(author))
        log.append_many([candidate(author, seq) for seq in range(1, 4200)])
    assert verify_log(tmp_path, workers=2).ok
    _raw(tmp_path / "ledger.db", lambda db: _flip_leaf(db, 4000, 10, 0x01))
    report = verify_log(tmp_path, workers=2)
    assert report.failure is not None and report.failure.index == 4000


# --------------------------------------------------------------------------
# Tampering through raw SQLite, triggers dropped. Every mutation must be caught.
# --------------------------------------------------------------------------


def _raw(path: Path, change: Callable[[sqlite3.Connection], None]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for table in ("entries", "nodes", "checkpoints", "meta"):
        db.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        db.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    db.execute("BEGIN")
    change(db)
    db.execute("COMMIT")
    db.close()


def _leaves(db: sqlite3.Connection) -> list[tuple[int, bytes, str, int, str]]:
    return db.execute("SELECT idx, leaf, author, seq, kind FROM entries ORDER BY idx").fetchall()


def _flip_leaf(db: sqlite3.Connection, index: int, offset: int, mask: int) -> None:
    (leaf,) = db.execute("SELECT leaf FROM entries WHERE idx = ?", (index,)).fetchone()
    changed = bytearray(leaf)
    changed[offset % len(changed)] ^= mask
    db.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (bytes(changed), index))


def _rebuild(db: sqlite3.Connection, *, keep_old_checkpoints: bool, sign_all: bool) -> None:
    """What a dishonest operator does after rewriting history: recompute and re-sign."""
    leaves = [bytes(row[1]) for row in _leaves(db)]
    db.execute("DELETE FROM nodes")
    frontier: list[bytes] = []
    for size, leaf in enumerate(leaves):
        frontier, created = merkle.frontier_append(
            frontier, size=size, leaf_hash=merkle.hash_leaf(leaf)
        )
        db.executemany(
            "INSERT INTO nodes VALUES (?, ?)", [(node_id(lv, ix), h) for lv, ix, h in created]
        )
    sizes = sorted({int(s) for (s,) in db.execute("SELECT size FROM checkpoints")} | {len(leaves)})
    if not keep_old_checkpoints:
        db.execute("DELETE FROM checkpoints")
    hashes = [merkle.hash_leaf(leaf) for leaf in leaves]
    operator = seeded_signer("operator")
    for size in sizes if sign_all else [len(leaves)]:
        if size > len(leaves):
            continue
        root = merkle.root_from_leaf_hashes(hashes[:size])
        note = sign_checkpoint(Checkpoint(ORIGIN, size, root), operator)
        db.execute(
            "INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)", (size, root, note)
        )


def _mutation(
    rng: random.Random, size: int, index: int
) -> tuple[str, Callable[[sqlite3.Connection], None]]:
    """A random tampering aimed at entry ``index``; returns its name and how to apply it."""
    other = rng.choice([i for i in range(size) if i != index])
    choice = rng.randrange(11)
    if choice == 0:
        offset, mask = rng.randrange(400), rng.randrange(1, 256)
        return "flip-byte", lambda db: _flip_leaf(db, index, offset, mask)
    if choice == 1:
        return "delete", lambda db: db.execute("DELETE FROM entries WHERE idx = ?", (index,))
    if choice == 2:

        def swap(db: sqlite3.Connection) -> None:
            rows = {row[0]: row for row in _leaves(db)}
            db.execute("DELETE FROM entries WHERE idx IN (?, ?)", (index, other))
            for at, row in ((index, rows[other]), (other, rows[index])):
                db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", (at, *row[1:]))

        return "reorder", swap
    if choice == 3:
        return "truncate", lambda db: db.execute("DELETE FROM entries WHERE idx >= ?", (index,))
    if choice == 4:  # drop an entry, renumber, recompute, re-sign every size, keep old notes

        def rewrite(db: sqlite3.Connection) -> None:
            rows = _leaves(db)
            db.execute("DELETE FROM entries")
            kept = [row for row in rows if row[0] != index]
            db.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                [(at, *row[1:]) for at, row in enumerate(kept)],
            )
            _rebuild(db, keep_old_checkpoints=rng.random() < 0.5, sign_all=True)

        return "rewrite-and-resign", rewrite
    if choice == 5:  # an author equivocates; the operator swaps the entry in and re-signs

        def equivocate(db: sqlite3.Connection) -> None:
            idx, _, author, seq, kind = _leaves(db)[index]
            if kind == "key":
                _flip_leaf(db, idx, 3, 0x20)
                return
            signer = next(
                s for s in (seeded_signer(f"author-{n}") for n in range(3)) if s.key_id == author
            )
            forged = candidate(signer, seq, round_number=99)
            db.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (forged, idx))
            _rebuild(db, keep_old_checkpoints=False, sign_all=rng.random() < 0.5)

        return "equivocate-and-resign", equivocate
    if choice == 6:

        def conflict(db: sqlite3.Connection) -> None:
            size_at = rng.randrange(1, size + 1)
            fake_root = rng.randbytes(32)
            note = sign_checkpoint(
                Checkpoint(ORIGIN, size_at, fake_root), seeded_signer("operator")
            )
            db.execute(
                "INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)",
                (size_at, fake_root, note),
            )

        return "conflicting-checkpoint", conflict
    if choice == 7:  # a stored subtree hash that exists
        level = rng.choice([lv for lv in range(5) if ((index >> lv) + 1) << lv <= size])
        return "flip-node", lambda db: db.execute(
            "UPDATE nodes SET hash = zeroblob(32) WHERE id = ?", (node_id(level, index >> level),)
        )
    if choice == 8:
        pick, offset = rng.random(), rng.randrange(1000)

        def flip_note(db: sqlite3.Connection) -> None:
            rows = db.execute("SELECT id, note FROM checkpoints ORDER BY id").fetchall()
            row_id, note = rows[int(pick * len(rows))]
            at = offset % len(note)
            changed = note[:at] + ("y" if note[at] == "x" else "x") + note[at + 1 :]
            db.execute("UPDATE checkpoints SET note = ? WHERE id = ?", (changed, row_id))

        return "flip-checkpoint-note", flip_note
    if choice == 9:
        column, value = rng.choice(
            [("author", "'mallory'"), ("seq", "seq + 1000"), ("kind", "'vote'")]
        )
        return "flip-column", lambda db: db.execute(
            f"UPDATE entries SET {column} = {value} WHERE idx = ?", (index,)
        )

    def append_unsigned(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO entries VALUES (?, ?, 'x', 0, 'task')",
            (size, candidate(seeded_signer("author-0"), 99)),
        )

    return "append-without-checkpoint", append_unsigned


def test_every_random_tampering_is_detected(
    clean_db: tuple[Path, list[str]], tmp_path: Path
) -> None:
    clean, published = clean_db
    size = verify_log(clean).size
    rng = random.Random(20240601)
    seen: dict[str, int] = {}
    started = time.perf_counter()
    for trial in range(MUTATIONS):
        index = rng.randrange(size)
        name, change = _mutation(rng, size, index)
        copy = tmp_path / f"trial-{trial % 4}.db"
        shutil.copyfile(clean, copy)
        _raw(copy, change)
        trusted = published if name in ("rewrite-and-resign", "equivocate-and-resign") else ()
        report = verify_log(copy, trusted_checkpoints=trusted, workers=1)
        assert report.failure is not None, f"trial {trial}: {name} went undetected"
        seen[name] = seen.get(name, 0) + 1
        if name == "flip-byte":
            assert report.failure.index == index, (trial, report.failure)
    assert len(seen) == 11 and sum(seen.values()) == MUTATIONS, seen
    assert time.perf_counter() - started < 60


def test_first_failure_names_the_entry(clean_db: tuple[Path, list[str]], tmp_path: Path) -> None:
    copy = tmp_path / "ledger.db"
    shutil.copyfile(clean_db[0], copy)
    _raw(copy, lambda db: (_flip_leaf(db, 20, 5, 0x04), _flip_leaf(db, 9, 5, 0x04)))
    report = verify_log(copy)
    assert report.failure is not None and report.failure.index == 9
    with pytest.raises(AuditError, match="entry 9: "):
        report.raise_for_failure()


def test_sequence_gap_is_named(clean_db: tuple[Path, list[str]], tmp_path: Path) -> None:
    copy = tmp_path / "ledger.db"
    shutil.copyfile(clean_db[0], copy)
    _raw(copy, lambda db: db.execute("DELETE FROM entries WHERE idx = 5"))
    report = verify_log(copy)
    assert report.failure is not None and report.failure.index == 5
    assert "expected entry index 5, found 6" in report.failure.reason


def test_pinned_log_key(clean_db: tuple[Path, list[str]]) -> None:
    other = Signer.from_seed(b"o" * 32)
    from ledger.checkpoint import NoteVerifier

    wrong = NoteVerifier.for_key(ORIGIN, other.public_key_bytes).vkey()
    report = verify_log(clean_db[0], log_key=wrong)
    assert report.failure is not None and "expected log key" in report.failure.reason


# --------------------------------------------------------------------------
# Crash safety: SIGKILL a writer during appends; acknowledged entries survive.
# --------------------------------------------------------------------------

WRITER = f"""
import random, sys
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import ORIGIN, candidate, seeded_signer
from ledger.log import Log
from ledger.entries import make_key_entry
log = Log.open(sys.argv[1], seeded_signer("operator"), ORIGIN)
author = seeded_signer("author-0")
if log.next_seq(author.key_id) == 0:
    log.append(make_key_entry(author))
rng = random.Random(int(sys.argv[2]))
while True:
    start = log.next_seq(author.key_id)
    batch = [candidate(author, seq) for seq in range(start, start + rng.randint(1, 30))]
    indexes = log.append_many(batch)
    print(indexes[-1], batch[-1].hex(), flush=True)
"""


def test_sigkill_during_appends_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    acknowledged: dict[int, bytes] = {}
    for run in range(20):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(run)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        first = writer.stdout.readline()  # at least one commit acknowledged this run
        time.sleep(random.Random(run).uniform(0.0, 0.15))
        writer.send_signal(signal.SIGKILL)
        rest = writer.communicate()[0]
        output = first + rest
        # a line the kill cut short was never acknowledged: count whole lines only
        complete = output if output.endswith("\n") else output[:output.rfind("\n") + 1]
        for line in complete.splitlines():
            index, leaf = line.split()
            acknowledged[int(index)] = bytes.fromhex(leaf)
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        assert log.size > max(acknowledged)
        for index, leaf in acknowledged.items():
            assert log.entry(index) == leaf
    report = verify_log(path)
    assert report.ok, report.failure
