"""The SQLite sequencer: group commit, idempotence, proofs, append-only, refusal to open."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import ORIGIN, candidate, populate

from ledger import merkle
from ledger.blobs import BlobStore
from ledger.checkpoint import (
    ALG_COSIGNATURE_V1,
    Checkpoint,
    NoteVerifier,
    cosign_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    verify_cosignature,
)
from ledger.entries import make_key_entry
from ledger.errors import CheckpointError, EntryError, StoreError
from ledger.keys import Signer
from ledger.log import Log, LogReader


def test_new_log_has_a_signed_empty_checkpoint(log: Log) -> None:
    checkpoint = parse_checkpoint(log.checkpoint(), verifier=log.verifier, origin=ORIGIN)
    assert (checkpoint.size, checkpoint.root_hash) == (0, merkle.EMPTY_ROOT)
    assert log.size == 0 and log.root() == merkle.EMPTY_ROOT


def test_group_commit_signs_one_checkpoint_per_batch(log: Log, authors: list[Signer]) -> None:
    assert log.append_many([make_key_entry(author) for author in authors]) == [0, 1, 2]
    batch = [candidate(author, seq) for author in authors for seq in (1, 2)]
    assert log.append_many(batch) == list(range(3, 9))
    assert [row.size for row in log.stored_checkpoints()] == [0, 3, 9]
    checkpoint = parse_checkpoint(log.checkpoint(), verifier=log.verifier)
    leaves = [log.entry(index) for index in range(9)]
    assert checkpoint.root_hash == merkle.root_from_leaf_hashes(
        [merkle.hash_leaf(x) for x in leaves]
    )
    assert leaves[3:] == batch


def test_resubmission_is_idempotent_and_conflicts_are_refused(
    log: Log, authors: list[Signer]
) -> None:
    populate(log, authors, batches=1)
    size, checkpoints = log.size, len(log.stored_checkpoints())
    again = candidate(authors[1], 2)
    assert log.append(again) == log.append(again) == 7
    assert (log.size, len(log.stored_checkpoints())) == (size, checkpoints)
    with pytest.raises(EntryError, match="already has a different entry at seq 2"):
        log.append(candidate(authors[1], 2, round_number=7))
    with pytest.raises(EntryError, match=r"expected seq 4 for author \w+, got 6"):
        log.append(candidate(authors[1], 6))
    with pytest.raises(EntryError, match="entry 1 of the batch: expected a registered author"):
        log.append_many([candidate(authors[0], 4), candidate(Signer.from_seed(b"z" * 32), 1)])
    assert log.size == size  # the whole batch was refused
    assert log.append_many([candidate(authors[0], 4), candidate(authors[0], 4)]) == [size, size]


def test_proofs_verify_against_signed_checkpoints(log: Log, authors: list[Signer]) -> None:
    populate(log, authors)
    sizes = [row.size for row in log.stored_checkpoints()]
    for size in sizes[1:]:
        checkpoint = parse_checkpoint(log.checkpoint_at(size), verifier=log.verifier)
        for index in range(size):
            merkle.verify_inclusion(
                index=index,
                size=size,
                leaf_hash=merkle.hash_leaf(log.entry(index)),
                proof=log.inclusion_proof(index, size),
                root=checkpoint.root_hash,
            )
    for old, new in zip(sizes[1:], sizes[2:], strict=False):
        merkle.verify_consistency(
            size1=old,
            size2=new,
            proof=log.consistency_proof(old, new),
            root1=parse_checkpoint(log.checkpoint_at(old), verifier=log.verifier).root_hash,
            root2=parse_checkpoint(log.checkpoint_at(new), verifier=log.verifier).root_hash,
        )
    leaves = [merkle.hash_leaf(log.entry(i)) for i in range(log.size)]
    for size in range(1, log.size + 1):
        assert log.root(size) == merkle.root_from_leaf_hashes(leaves[:size])
        assert log.inclusion_proof(size - 1, size) == merkle.inclusion_proof(size - 1, size, leaves)
        assert log.consistency_proof(1, size) == merkle.consistency_proof(1, size, leaves)
    with pytest.raises(StoreError, match="expected a signed checkpoint of size 1"):
        log.checkpoint_at(1)


def test_tables_are_append_only(log: Log, authors: list[Signer]) -> None:
    populate(log, authors, batches=1)
    raw = sqlite3.connect(log.path)
    for statement in (
        "UPDATE entries SET leaf = x'00' WHERE idx = 0",
        "DELETE FROM entries WHERE idx = 3",
        "DELETE FROM nodes",
        "UPDATE checkpoints SET note = ''",
        "DELETE FROM meta",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute(statement)
    raw.close()


def test_single_writer(tmp_path: Path, operator: Signer) -> None:
    with Log.open(tmp_path / "ledger.db", operator, ORIGIN):
        with pytest.raises(StoreError, match="another writer holds"):
            Log.open(tmp_path / "ledger.db", operator, ORIGIN)
        with LogReader.open(tmp_path) as reader:  # readers need no lock
            assert reader.size == 0


def test_single_writer_through_another_path(tmp_path: Path, operator: Signer) -> None:
    """The lock is keyed by the file's (device, inode), not by the path used (issue 13)."""
    (tmp_path / "run").mkdir()
    with Log.open(tmp_path / "run" / "ledger.db", operator, ORIGIN):
        (tmp_path / "alias").symlink_to(tmp_path / "run")
        os.link(tmp_path / "run" / "ledger.db", tmp_path / "hardlink.db")
        for other in (tmp_path / "alias" / "ledger.db", tmp_path / "hardlink.db",
                      tmp_path / "run" / ".." / "run" / "ledger.db"):
            with pytest.raises(StoreError, match="another writer holds"):
                Log.open(other, operator, ORIGIN)
    with Log.open(tmp_path / "hardlink.db", operator, ORIGIN) as log:  # released on close
        assert log.size == 0


def test_reopen_keeps_state(tmp_path: Path, operator: Signer, authors: list[Signer]) -> None:
    with Log.open(tmp_path / "ledger.db", operator, ORIGIN) as log:
        populate(log, authors, batches=2)
        root, size = log.root(), log.size
    with Log.open(tmp_path / "ledger.db", operator, ORIGIN) as log:
        assert (log.root(), log.size) == (root, size)
        assert log.next_seq(authors[0].key_id) == 7
        log.append(candidate(authors[0], 7))
    with pytest.raises(StoreError, match="expected origin 'other'"):
        Log.open(tmp_path / "ledger.db", operator, "other")
    with pytest.raises(StoreError, match="expected log key"):
        Log.open(tmp_path / "ledger.db", Signer.from_seed(b"q" * 32), ORIGIN)


def _tamper(path: Path, *statements: str) -> None:
    raw = sqlite3.connect(path)
    for table in ("entries", "nodes", "checkpoints"):
        raw.execute(f"DROP TRIGGER {table}_no_update")
        raw.execute(f"DROP TRIGGER {table}_no_delete")
    for statement in statements:
        raw.execute(statement)
    raw.commit()
    raw.close()


@pytest.mark.parametrize(
    ("statements", "full_check", "match"),
    [
        (["UPDATE entries SET leaf = x'00' || leaf WHERE idx = 4"], True, "match the leaves"),
        (["DELETE FROM entries WHERE idx = (SELECT MAX(idx) FROM entries)"], False, "recomputed"),
        (["UPDATE nodes SET hash = zeroblob(32) WHERE id = 0"], True, "match the leaves"),
        (["DELETE FROM checkpoints WHERE id = (SELECT MAX(id) FROM checkpoints)"], False, "match"),
        (["UPDATE checkpoints SET note = replace(note, '—', '-')"], False, "does not verify"),
    ],
    ids=["leaf", "truncated", "node", "checkpoint-dropped", "checkpoint-forged"],
)
def test_refuses_to_open_a_tampered_store(
    tmp_path: Path,
    operator: Signer,
    authors: list[Signer],
    statements: list[str],
    full_check: bool,
    match: str,
) -> None:
    with Log.open(tmp_path / "ledger.db", operator, ORIGIN) as log:
        populate(log, authors, batches=2)
    _tamper(tmp_path / "ledger.db", *statements)
    with pytest.raises(StoreError, match=match):
        Log.open(tmp_path / "ledger.db", operator, ORIGIN, full_check=full_check)


def test_cosignatures_are_verified_and_stored(log: Log, authors: list[Signer]) -> None:
    populate(log, authors, batches=1)
    witness = authors[0]  # a witness is a registered author (its key entry is in the log)
    verifier = NoteVerifier.for_key(
        "w.example", witness.public_key_bytes, algorithm=ALG_COSIGNATURE_V1
    )
    size = log.size
    cosigned = cosign_checkpoint(log.checkpoint(), witness, name="w.example", timestamp=7)
    index = log.add_cosignature(cosigned, witness=verifier)
    assert index == log.size - 1 > size  # recorded in the tree (after the operator's key)
    assert verify_cosignature(log.checkpoint_at(size), witness=verifier) == 7
    impostor = Signer.from_seed(b"i" * 32)
    plain = log.stored_checkpoints()[-1].note
    forged = cosign_checkpoint(plain, impostor, name="w.example", timestamp=8)
    with pytest.raises(CheckpointError, match="expected a cosignature by w.example"):
        log.add_cosignature(forged, witness=verifier)
    foreign = sign_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)), Signer.from_seed(b"f" * 32))
    foreign = cosign_checkpoint(foreign, witness, name="w.example", timestamp=9)
    with pytest.raises(CheckpointError, match="expected a signature by"):
        log.add_cosignature(foreign, witness=verifier)
    unsigned_tree = sign_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)), log._operator)
    unsigned_tree = cosign_checkpoint(unsigned_tree, witness, name="w.example", timestamp=9)
    with pytest.raises(StoreError, match="expected a checkpoint of this log"):
        log.add_cosignature(unsigned_tree, witness=verifier)
    stranger = NoteVerifier.for_key("s.example", impostor.public_key_bytes,
                                    algorithm=ALG_COSIGNATURE_V1)
    by_stranger = cosign_checkpoint(plain, impostor, name="s.example", timestamp=9)
    with pytest.raises(StoreError, match="to be a registered author"):
        log.add_cosignature(by_stranger, witness=stranger)


def test_blob_store(tmp_path: Path) -> None:
    store = BlobStore.beside(tmp_path / "ledger.db")
    digest = store.put(b"tensor bytes")
    assert digest == hashlib.sha256(b"tensor bytes").hexdigest()
    assert store.put(b"tensor bytes") == digest and digest in store
    assert store.get(digest) == b"tensor bytes"
    store.path(digest).write_bytes(b"swapped")
    with pytest.raises(StoreError, match=f"expected blob with digest {digest}"):
        store.get(digest)
    with pytest.raises(StoreError, match="found none"):
        store.get("0" * 64)
    with pytest.raises(StoreError, match="hex digest"):
        store.get("../etc/passwd")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]
