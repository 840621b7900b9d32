"""Content-addressed blob store beside the ledger database (update tensors, models).

A blob is stored under its SHA-256 hex digest; the ledger records only the digest.
Writes are atomic and durable (temp file, fsync, rename, fsync of the folder), so a
crash leaves either the whole blob or nothing; reads recompute the digest.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.errors import StoreError

__all__ = ["BLOB_DIR", "BlobStore", "is_digest"]

BLOB_DIR = "blobs"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(text: object) -> bool:
    """Whether ``text`` is a blob's name: a lowercase SHA-256 hex digest."""
    return isinstance(text, str) and bool(_DIGEST.fullmatch(text))


@dataclass(frozen=True)
class BlobStore:
    """Blobs named by their SHA-256 hex digest in ``root``."""

    root: Path

    @classmethod
    def beside(cls, db_path: str | os.PathLike[str]) -> BlobStore:
        """The store in ``blobs/`` next to the ledger database, created if missing."""
        root = Path(db_path).parent / BLOB_DIR
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise StoreError(f"expected a lowercase SHA-256 hex digest, got {digest!r}")
        return self.root / digest

    def __contains__(self, digest: object) -> bool:
        return is_digest(digest) and self.path(str(digest)).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably; returns its digest. Idempotent."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.is_file():
            return digest
        descriptor, temporary = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        folder = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes; raises :class:`StoreError` if missing or its digest differs."""
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"expected blob {digest} in {self.root}, found none") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise StoreError(f"expected blob with digest {digest}, got content hashing to {actual}")
        return data


def sign_with_bulk(signer: Any, kind: str, *, seq: int, fields: Mapping[str, Any],
                   blobs: BlobStore) -> bytes:
    """:func:`~ledger.entries.sign_entry`, keeping a large entry's list and object fields
    (of the kinds that grow with the federation, :data:`~ledger.entries.BULK_KINDS`)
    in a blob of ``blobs`` named by its ``bulk_digest`` (:func:`~ledger.entries.split_bulk`;
    readers merge them back with :func:`~ledger.entries.with_bulk`)."""
    from ledger.entries import BULK_FIELD, BULK_KINDS, sign_entry, split_bulk

    inline, bulk = split_bulk(fields) if kind in BULK_KINDS else (dict(fields), None)
    if bulk is not None:
        inline[BULK_FIELD] = blobs.put(bulk)
    return sign_entry(signer, kind, seq=seq, fields=inline)
