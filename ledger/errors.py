"""The ledger's exception tree, rooted in ValueError like rfc8785's CanonicalizationError.

Untrusted input (a proof, a note, an entry, a database file) raises one of these;
our own bugs are assertions.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "CheckpointError",
    "EntryError",
    "LedgerError",
    "ProofError",
    "PublicKeyError",
    "StoreError",
]


class LedgerError(ValueError):
    """Base class of every error the ledger raises on untrusted input."""


class ProofError(LedgerError):
    """An inclusion or consistency proof does not verify (RFC 9162 section 2.1.3/2.1.4)."""


class CheckpointError(LedgerError):
    """A signed note or checkpoint is malformed or its signature does not verify (C2SP)."""


class PublicKeyError(LedgerError):
    """An Ed25519 public key is malformed, non-canonical or of small order."""


class EntryError(LedgerError):
    """A ledger entry is malformed, not canonical, badly signed or out of sequence."""


class StoreError(LedgerError):
    """The SQLite store or blob store is missing, locked, or disagrees with its checkpoints."""


class AuditError(LedgerError):
    """A full audit found a failure; the message names the entry index and why."""
