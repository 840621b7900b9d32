"""The Proof-of-Intelligence ledger: an RFC 9162 transparency log of signed entries.

- :mod:`ledger.merkle`: RFC 9162 hashing, inclusion and consistency proofs (stdlib only).
- :mod:`ledger.checkpoint`: C2SP tlog-checkpoint signed notes and tlog-cosignature.
- :mod:`ledger.keys`: strict Ed25519 public keys, author key ids, :class:`Signer`.
- :mod:`ledger.entries`: RFC 8785 canonical-JSON entries signed by their authors.
- :mod:`ledger.log`: the SQLite sequencer (WAL, group commit, append-only).
- :mod:`ledger.blobs`: content-addressed blobs beside the database.
- :mod:`ledger.audit`: a full, independent re-verification of a ledger file.

Verification needs only ``merkle`` and ``checkpoint``; nothing here imports code of
ours outside ``ledger``.
"""

from __future__ import annotations

from ledger.audit import AuditFailure, AuditReport, verify_log
from ledger.blobs import BlobStore
from ledger.checkpoint import (
    Checkpoint,
    NoteVerifier,
    cosign_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    verify_cosignature,
)
from ledger.entries import Entry, KeyRing, parse_entry, register_kind, sign_entry
from ledger.errors import (
    AuditError,
    CheckpointError,
    EntryError,
    LedgerError,
    ProofError,
    PublicKeyError,
    StoreError,
)
from ledger.keys import Signer, key_id, parse_public_key
from ledger.log import Log, LogReader
from ledger.merkle import hash_leaf, verify_consistency, verify_inclusion

__all__ = [
    "AuditError",
    "AuditFailure",
    "AuditReport",
    "BlobStore",
    "Checkpoint",
    "CheckpointError",
    "Entry",
    "EntryError",
    "KeyRing",
    "LedgerError",
    "Log",
    "LogReader",
    "NoteVerifier",
    "ProofError",
    "PublicKeyError",
    "Signer",
    "StoreError",
    "cosign_checkpoint",
    "hash_leaf",
    "key_id",
    "parse_checkpoint",
    "parse_entry",
    "parse_public_key",
    "register_kind",
    "sign_checkpoint",
    "sign_entry",
    "verify_consistency",
    "verify_cosignature",
    "verify_inclusion",
    "verify_log",
]
