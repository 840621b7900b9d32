"""Witness cosignatures as evidence inside the tree (C2SP tlog-cosignature, issue 13).

A witness (a subscriber) cosigns a checkpoint it checked; the log operator records
each cosignature twice: as a row of the ``cosignatures`` table (so the checkpoint can
be handed out with its cosignatures) and as an operator-signed ``cosignature`` entry
in the log itself, so that deleting or altering one changes the tree. The entry's
fields:

- ``tree_size`` (int) and ``root_hash`` (standard base64, 32 bytes): the checkpoint's;
- ``witness``: the witness's note verifier key ``name+hexkeyid+base64(0x04 || key)``
  (C2SP signed-note), whose Ed25519 key must be registered in the log by a ``key``
  entry before this one (it is the witness's author key);
- ``note``: the cosigned checkpoint, reduced to its body, the log's signature line(s)
  and this witness's cosignature line(s).

Checking one needs this module, ``ledger.checkpoint`` and the log's verifier key.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledger.checkpoint import (
    ALG_COSIGNATURE_V1,
    Checkpoint,
    Note,
    NoteVerifier,
    parse_checkpoint,
    parse_note,
    verify_cosignature,
)
from ledger.errors import CheckpointError
from ledger.keys import key_id

__all__ = [
    "COSIGNATURE_KIND",
    "WitnessedCheckpoint",
    "check_cosignature_fields",
    "cosignature_fields",
    "verify_witnessed",
    "witness_verifier",
]

COSIGNATURE_KIND = "cosignature"


@dataclass(frozen=True)
class WitnessedCheckpoint:
    """A verified cosignature: the checkpoint, the witness's author key id and key, its line."""

    checkpoint: Checkpoint
    witness: NoteVerifier
    witness_author: str
    lines: tuple[str, ...]


def _reduced(note_text: str, *, log: NoteVerifier, witness: NoteVerifier) -> Note:
    note = parse_note(note_text)
    keep = {(log.name, log.key_id), (witness.name, witness.key_id)}
    return Note(note.body, tuple(s for s in note.signatures if (s.name, s.key_id) in keep))


def witness_verifier(vkey: str) -> NoteVerifier:
    """A witness's note verifier key; must be a cosignature/v1 (0x04) key."""
    witness = NoteVerifier.from_vkey(vkey)
    if witness.algorithm != ALG_COSIGNATURE_V1:
        raise CheckpointError(
            f"expected a cosignature/v1 (0x04) witness key, got {witness.algorithm:#04x}"
        )
    return witness


def verify_witnessed(
    note_text: str, *, log: NoteVerifier, witness: NoteVerifier, origin: str
) -> WitnessedCheckpoint:
    """The log's signature and the witness's cosignature on a checkpoint note.

    Raises :class:`CheckpointError` when either does not verify, or when the note
    carries a failing signature by the log key (C2SP signed-note: verifiers SHOULD
    reject a note with a known key whose signature fails).
    """
    note = _reduced(note_text, log=log, witness=witness)
    checkpoint = parse_checkpoint(note.text(), verifier=log, origin=origin)
    verify_cosignature(note.text(), witness=witness)
    lines = tuple(
        s.line() for s in note.signatures if (s.name, s.key_id) == (witness.name, witness.key_id)
    )
    return WitnessedCheckpoint(checkpoint, witness, key_id(witness.raw_key), lines)


def cosignature_fields(
    note_text: str, *, log: NoteVerifier, witness: NoteVerifier, origin: str
) -> dict[str, Any]:
    """The fields of the ``cosignature`` entry recording ``witness``'s cosignature.

    Raises :class:`CheckpointError` when the note or the cosignature does not verify.
    """
    verify_witnessed(note_text, log=log, witness=witness, origin=origin)
    note = _reduced(note_text, log=log, witness=witness)
    checkpoint = Checkpoint.from_body(note.body)
    return {
        "tree_size": checkpoint.size,
        "root_hash": base64.b64encode(checkpoint.root_hash).decode(),
        "witness": witness.vkey(),
        "note": note.text(),
    }


def check_cosignature_fields(
    fields: Mapping[str, Any], *, log: NoteVerifier, origin: str
) -> WitnessedCheckpoint:
    """Verify a ``cosignature`` entry's fields on their own (not yet against the tree).

    Checks the witness key, the log's signature, the cosignature, and that
    ``tree_size`` and ``root_hash`` are the note's. Raises :class:`CheckpointError`.
    Whether the witness key is registered and the root is the tree's is the caller's
    check (it needs the log).
    """
    witness = witness_verifier(str(fields["witness"]))
    witnessed = verify_witnessed(str(fields["note"]), log=log, witness=witness, origin=origin)
    claimed = (fields["tree_size"], fields["root_hash"])
    checkpoint = witnessed.checkpoint
    actual = (checkpoint.size, base64.b64encode(checkpoint.root_hash).decode())
    if claimed != actual:
        raise CheckpointError(
            f"cosignature entry says tree {claimed[0]} root {claimed[1]}, its note says "
            f"{actual[0]} {actual[1]}"
        )
    return witnessed
