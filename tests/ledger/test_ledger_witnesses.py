"""Cosignatures are evidence: verified against the witness's registered key, recorded
in the tree, never handed out when forged (issue 13, finding 3)."""

from __future__ import annotations

import base64
import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ORIGIN, candidate, populate, seeded_signer
from test_ledger_audit import _rebuild
from typer.testing import CliRunner

from ledger.audit import verify_log
from ledger.checkpoint import (
    ALG_COSIGNATURE_V1,
    Note,
    NoteSignature,
    NoteVerifier,
    add_signature,
    cosign_checkpoint,
    parse_checkpoint,
    parse_note,
    verify_cosignature,
)
from ledger.errors import CheckpointError, StoreError
from ledger.log import Log, LogReader
from server.cli.ledger import ledger_app

AUTHORS = [seeded_signer(f"author-{number}") for number in range(3)]


def _verifier(number: int) -> NoteVerifier:
    return NoteVerifier.for_key(
        f"subscriber-{AUTHORS[number].key_id}", AUTHORS[number].public_key_bytes,
        algorithm=ALG_COSIGNATURE_V1,
    )


def _cosign_all(log: Log, timestamp: int) -> None:
    note = log.checkpoint()
    log.add_cosignatures([
        (cosign_checkpoint(note, author, name=_verifier(n).name, timestamp=timestamp), _verifier(n))
        for n, author in enumerate(AUTHORS)
    ])


@pytest.fixture(scope="module")
def witnessed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """3 authors who cosign the tree after each of 3 group commits."""
    path = tmp_path_factory.mktemp("witnessed") / "ledger.db"
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        populate(log, AUTHORS, batches=1, per_author=2)
        _cosign_all(log, 1)
        for batch in range(2):
            log.append_many([candidate(a, log.next_seq(a.key_id)) for a in AUTHORS])
            _cosign_all(log, 2 + batch)
        published = [row.note for row in log.stored_checkpoints()]
    return path, published


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ledger.db"
    shutil.copy(source, target)
    return target


def _raw(path: Path, change: Callable[[sqlite3.Connection], None]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for table in ("entries", "nodes", "checkpoints", "meta", "cosignatures"):
        db.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        db.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    db.execute("BEGIN")
    change(db)
    db.execute("COMMIT")
    db.close()


def _rows(path: Path) -> list[tuple[int, int, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, checkpoint_id, witness, line FROM cosignatures").fetchall()


def test_cosignatures_are_entries_and_verify(witnessed: tuple[Path, list[str]]) -> None:
    path, published = witnessed
    assert verify_log(path, trusted_checkpoints=published).ok
    with LogReader.open(path) as reader:
        kinds = [entry.kind for _, entry in reader.entries()]
        assert kinds.count("cosignature") == len(_rows(path)) == 9
        note = reader.checkpoint_at(int(parse_checkpoint(
            reader.stored_checkpoints()[2].note, verifier=reader.verifier).size))
    for number in range(3):
        assert verify_cosignature(note, witness=_verifier(number)) == 1


def _flip_line(db: sqlite3.Connection) -> None:
    row_id, line = db.execute("SELECT id, line FROM cosignatures LIMIT 1").fetchone()
    name, encoded = line.rstrip("\n").rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[-1] ^= 0x01
    flipped = f"{name} {base64.b64encode(bytes(raw)).decode()}\n"
    db.execute("UPDATE cosignatures SET line = ? WHERE id = ?", (flipped, row_id))


def _forge_line(db: sqlite3.Connection) -> None:
    """A line by an impostor under the witness's name and key id."""
    row_id, checkpoint_id, line = db.execute(
        "SELECT id, checkpoint_id, line FROM cosignatures LIMIT 1").fetchone()
    (note,) = db.execute("SELECT note FROM checkpoints WHERE id = ?", (checkpoint_id,)).fetchone()
    impostor = seeded_signer("impostor")
    forged = cosign_checkpoint(note, impostor, name=_verifier(0).name, timestamp=1)
    forged_line = forged.rstrip("\n").rsplit("\n", 1)[1] + "\n"
    name, encoded = forged_line.rstrip("\n").rsplit(" ", 1)
    raw = _verifier(0).key_id + base64.b64decode(encoded)[4:]
    forged_line = f"{name} {base64.b64encode(raw).decode()}\n"
    db.execute("INSERT INTO cosignatures (checkpoint_id, witness, line) VALUES (?, ?, ?)",
               (checkpoint_id, _verifier(0).vkey(), forged_line))


def _reattach(db: sqlite3.Connection) -> None:
    """A genuine line moved to another checkpoint."""
    row_id, checkpoint_id = db.execute(
        "SELECT id, checkpoint_id FROM cosignatures ORDER BY id LIMIT 1").fetchone()
    (last,) = db.execute("SELECT MAX(id) FROM checkpoints").fetchone()
    db.execute("UPDATE cosignatures SET checkpoint_id = ? WHERE id = ?", (last, row_id))


def _delete_row(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM cosignatures WHERE id = (SELECT MAX(id) FROM cosignatures)")


def _delete_entry_resigned(db: sqlite3.Connection) -> None:
    """Drop the last cosignature entry and re-sign the shorter tree."""
    (index,) = db.execute("SELECT MAX(idx) FROM entries").fetchone()
    db.execute("DELETE FROM entries WHERE idx = ?", (index,))
    db.execute("DELETE FROM checkpoints WHERE size > ?", (index,))
    _rebuild(db, keep_old_checkpoints=False, sign_all=True)


@pytest.mark.parametrize(
    "change, reason",
    [
        (_flip_line, "does not verify"),
        (_forge_line, "does not verify"),
        (_reattach, "does not verify"),
        (_delete_row, "has no stored cosignature row"),
        (_delete_entry_resigned, "recorded by no cosignature entry"),
    ],
    ids=["flipped", "forged", "re-attached", "row-deleted", "entry-deleted-resigned"],
)
def test_tampered_cosignatures_fail_verify(
    witnessed: tuple[Path, list[str]], tmp_path: Path,
    change: Callable[[sqlite3.Connection], None], reason: str,
) -> None:
    path = _copy(witnessed[0], tmp_path)
    _raw(path, change)
    report = verify_log(path)
    assert report.failure is not None and reason in report.failure.reason, report.failure
    # with the notes the subscribers were handed, the re-signed deletion is a tree mismatch
    if change is _delete_entry_resigned:
        report = verify_log(path, trusted_checkpoints=witnessed[1])
        assert report.failure is not None


def _every_line_verifies(note_text: str) -> int:
    """Each cosignature line of a handed-out note verifies on its own; returns how many."""
    note = parse_note(note_text)
    witnesses = {_verifier(n).key_id: _verifier(n) for n in range(3)}
    lines = [s for s in note.signatures if s.key_id in witnesses]
    for line in lines:
        verify_cosignature(Note(note.body, (line,)).text(), witness=witnesses[line.key_id])
    return len(lines)


@pytest.mark.parametrize("change", [_flip_line, _forge_line, _reattach])
def test_prove_hands_out_only_verified_cosignatures(
    witnessed: tuple[Path, list[str]], tmp_path: Path, change: Callable[[sqlite3.Connection], None]
) -> None:
    path = _copy(witnessed[0], tmp_path)
    _raw(path, change)
    with LogReader.open(path) as reader:
        sizes = sorted({row.size for row in reader.stored_checkpoints() if row.size})
    handed = 0
    for size in sizes:
        result = CliRunner().invoke(ledger_app, ["prove", str(path), "--index", "0",
                                                 "--size", str(size)])
        assert result.exit_code == 0, result.output
        handed += _every_line_verifies(json.loads(result.output)["checkpoint"])
    assert handed == (8 if change is _flip_line or change is _reattach else 9)


def test_a_failing_signature_by_the_log_key_is_refused(
    witnessed: tuple[Path, list[str]]
) -> None:
    path, published = witnessed
    with LogReader.open(path) as reader:
        verifier = reader.verifier
    note = published[-1]
    parse_checkpoint(note, verifier=verifier)
    bogus = NoteSignature(name=verifier.name, key_id=verifier.key_id, signature=bytes(64))
    with pytest.raises(CheckpointError, match="does not verify"):
        parse_checkpoint(add_signature(note, bogus), verifier=verifier)
    report = verify_log(path, trusted_checkpoints=[add_signature(note, bogus)])
    assert report.failure is not None and "does not verify" in report.failure.reason


# --------------------------------------------------------------------------
# Random mutations over every table and column of a witnessed ledger.
# --------------------------------------------------------------------------

MUTATIONS = 240
COLUMNS = {
    "entries": ("idx", "leaf", "author", "seq", "kind"),
    "nodes": ("id", "hash"),
    "checkpoints": ("id", "size", "root", "note"),
    "cosignatures": ("id", "checkpoint_id", "witness", "line"),
    "meta": ("key", "value"),
}


def _changed(value: object, rng: random.Random) -> object:
    if isinstance(value, int):
        return value + rng.choice([-2, -1, 1, 2, 1 << 48])
    if isinstance(value, bytes):
        changed = bytearray(value)
        changed[rng.randrange(len(changed))] ^= 1 << rng.randrange(8)
        return bytes(changed)
    assert isinstance(value, str) and value
    at = rng.randrange(len(value))
    replacement = rng.choice([c for c in "AZaz09+/=-_ .\n" if c != value[at]])
    return value[:at] + replacement + value[at + 1:]


def _random_mutation(db: sqlite3.Connection, rng: random.Random) -> str:
    """Change one column of one row, or delete one row, anywhere; returns what it did."""
    while True:
        table = rng.choice(list(COLUMNS))
        rows = db.execute(f"SELECT rowid, * FROM {table}").fetchall()
        names = [d[0] for d in db.execute(f"SELECT * FROM {table} LIMIT 0").description]
        rowid, *values = rng.choice(rows)
        if rng.random() < 0.25:
            db.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
            return f"delete {table} row {rowid}"
        column = rng.choice(COLUMNS[table])
        old = values[names.index(column)]
        new = _changed(old, rng)
        try:
            db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (new, rowid))
        except sqlite3.IntegrityError:
            continue  # a key that exists already: draw again
        return f"{table}.{column} row {rowid}: {old!r:.40} -> {new!r:.40}"


def test_every_random_mutation_of_a_witnessed_ledger_is_detected(
    witnessed: tuple[Path, list[str]], tmp_path: Path
) -> None:
    rng = random.Random(13)
    missed = []
    for number in range(MUTATIONS):
        path = tmp_path / f"m{number}" / "ledger.db"
        path.parent.mkdir()
        shutil.copy(witnessed[0], path)
        what: list[str] = []
        _raw(path, lambda db, what=what: what.append(_random_mutation(db, rng)))
        try:
            report = verify_log(path, workers=1)
        except StoreError:
            continue  # unreadable: `poi ledger verify` says so and exits 2
        if report.ok:
            missed.append(what[0])
    assert missed == [], missed[:5]
