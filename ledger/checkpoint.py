"""C2SP tlog-checkpoint signed notes, with Ed25519 signatures and witness cosignatures.

Implements C2SP ``signed-note`` v1 (note text, signature lines ``— name
base64(key_id || signature)``, verifier keys ``name+hexkeyid+base64(alg || key)``),
C2SP ``tlog-checkpoint`` v1 (body: origin, decimal tree size, base64 root hash,
optional extension lines) and C2SP ``tlog-cosignature`` v1 for Ed25519 (algorithm
byte 0x04, a ``timestamped_signature`` over ``cosignature/v1\\ntime T\\n`` || body).

Parsing and verification need no storage and no secret keys: a subscriber verifies
with this module and ``ledger.merkle`` alone. Every failure raises
:class:`CheckpointError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.errors import CheckpointError, PublicKeyError
from ledger.keys import parse_public_key, raw_public_key, verify_signature

__all__ = [
    "ALG_COSIGNATURE_V1",
    "ALG_ED25519",
    "Checkpoint",
    "Note",
    "NoteSignature",
    "NoteVerifier",
    "add_signature",
    "cosign_checkpoint",
    "note_key_id",
    "parse_checkpoint",
    "parse_note",
    "sign_checkpoint",
    "verify_cosignature",
]

# C2SP signed-note, "Signatures": signature type identifiers.
ALG_ED25519 = 0x01
# C2SP tlog-cosignature: Ed25519 cosignature/v1.
ALG_COSIGNATURE_V1 = 0x04
_SIGNATURE_PREFIX = "\u2014 "  # em dash, space
_MAX_SIGNATURES = 100  # C2SP signed-note: verifiers MAY reject notes with more
_COSIGNATURE_HEADER = "cosignature/v1\n"
_MAX_TIMESTAMP = 2**63 - 1


class _RawSigner(Protocol):
    """What signing needs: ``ledger.keys.Signer`` fits."""

    @property
    def public_key_bytes(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


def note_key_id(name: str, algorithm: int, raw_key: bytes) -> bytes:
    """C2SP signed-note key ID: SHA-256(name || 0x0A || alg || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([algorithm]) + raw_key).digest()[:4]


def _check_key_name(name: str) -> None:
    """C2SP signed-note: a key name is non-empty, with no whitespace and no '+'."""
    if not name or "+" in name or any(char.isspace() for char in name):
        raise CheckpointError(f"expected a key name with no spaces and no '+', got {name!r}")


def _b64decode(text: str, *, what: str) -> bytes:
    """Strict standard base64 (padding required, no stray characters)."""
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CheckpointError(f"expected base64 {what}, got {text!r}") from error
    if base64.b64encode(decoded).decode() != text:
        raise CheckpointError(f"expected canonical base64 {what}, got {text!r}")
    return decoded


@dataclass(frozen=True)
class NoteVerifier:
    """A note verifier key: name, 4-byte key ID, algorithm byte and Ed25519 key."""

    name: str
    algorithm: int
    public_key: Ed25519PublicKey

    @property
    def raw_key(self) -> bytes:
        return raw_public_key(self.public_key)

    @property
    def key_id(self) -> bytes:
        return note_key_id(self.name, self.algorithm, self.raw_key)

    @classmethod
    def for_key(cls, name: str, raw_key: bytes, *, algorithm: int = ALG_ED25519) -> NoteVerifier:
        """A verifier for ``raw_key`` under ``name``; refuses weak keys (PublicKeyError)."""
        _check_key_name(name)
        if algorithm not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise CheckpointError(f"expected algorithm 0x01 or 0x04, got {algorithm:#04x}")
        return cls(name=name, algorithm=algorithm, public_key=parse_public_key(raw_key))

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``name+hexkeyid+base64(alg || key)`` (C2SP signed-note, "Verifier keys")."""
        # The base64 key material may itself contain '+': split at the first two only.
        name, _, rest = vkey.partition("+")
        hex_id, _, encoded = rest.partition("+")
        if not (name and re.fullmatch(r"[0-9a-f]{8}", hex_id) and encoded):
            raise CheckpointError(f"expected a verifier key name+keyid+key, got {vkey!r}")
        key_material = _b64decode(encoded, what="verifier key")
        if len(key_material) != 33:
            raise CheckpointError(f"expected 33 bytes of key material, got {len(key_material)}")
        try:
            verifier = cls.for_key(name, key_material[1:], algorithm=key_material[0])
        except PublicKeyError as error:
            raise CheckpointError(f"verifier key {name!r}: {error}") from error
        if hex_id != verifier.key_id.hex():
            raise CheckpointError(
                f"expected key id {verifier.key_id.hex()} in verifier key, got {hex_id}"
            )
        return verifier

    def vkey(self) -> str:
        material = base64.b64encode(bytes([self.algorithm]) + self.raw_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{material}"


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID, and the signature bytes after it."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        encoded = base64.b64encode(self.key_id + self.signature).decode()
        return f"{_SIGNATURE_PREFIX}{self.name} {encoded}\n"


@dataclass(frozen=True)
class Note:
    """A parsed signed note: body text (ending in a newline) and its signatures."""

    body: str
    signatures: tuple[NoteSignature, ...]

    def text(self) -> str:
        return self.body + "\n" + "".join(signature.line() for signature in self.signatures)


def parse_note(text: str) -> Note:
    """Split a signed note into body and signature lines (C2SP signed-note, "Format").

    The body is everything up to the last blank line; it must be non-empty UTF-8
    with no control characters other than newline. Raises :class:`CheckpointError`.
    """
    if any(ord(char) < 0x20 and char != "\n" for char in text):
        raise CheckpointError("expected a note without control characters, got one")
    split = text.rfind("\n\n")
    if split < 0:
        raise CheckpointError(
            "expected a note body, a blank line, then signatures; got no blank line"
        )
    body, signature_block = text[: split + 1], text[split + 2 :]
    if not signature_block.endswith("\n"):
        raise CheckpointError("expected the note to end with a newline, got none")
    lines = signature_block[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise CheckpointError(f"expected at most {_MAX_SIGNATURES} signatures, got {len(lines)}")
    signatures = []
    for line in lines:
        if not line.startswith(_SIGNATURE_PREFIX):
            raise CheckpointError(f"expected a signature line '— name sig', got {line!r}")
        name, _, encoded = line[len(_SIGNATURE_PREFIX) :].partition(" ")
        _check_key_name(name)
        raw = _b64decode(encoded, what=f"signature from {name!r}")
        if len(raw) < 5:
            raise CheckpointError(
                f"expected a key id and a signature from {name!r}, got {len(raw)} bytes"
            )
        signatures.append(NoteSignature(name=name, key_id=raw[:4], signature=raw[4:]))
    return Note(body=body, signatures=tuple(signatures))


def add_signature(note_text: str, signature: NoteSignature) -> str:
    """Append one signature line to a note, keeping the existing ones."""
    note = parse_note(note_text)
    return Note(note.body, (*note.signatures, signature)).text()


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint body: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise CheckpointError(f"expected a one-line, non-empty origin, got {self.origin!r}")
        if self.size < 0:
            raise CheckpointError(f"expected a tree size >= 0, got {self.size}")
        if len(self.root_hash) != 32:
            raise CheckpointError(f"expected a 32-byte root hash, got {len(self.root_hash)} bytes")
        for line in self.extensions:
            if not line or "\n" in line:
                raise CheckpointError(f"expected non-empty one-line extensions, got {line!r}")

    def body(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode()]
        return "".join(line + "\n" for line in (*lines, *self.extensions))

    @classmethod
    def from_body(cls, body: str) -> Checkpoint:
        """Parse a checkpoint body (C2SP tlog-checkpoint, "Note text")."""
        if not body.endswith("\n"):
            raise CheckpointError("expected the checkpoint body to end with a newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"expected origin, size and root hash lines, got {len(lines)} lines"
            )
        origin, size_text, root_text, *extensions = lines
        if not re.fullmatch(r"0|[1-9][0-9]*", size_text):
            raise CheckpointError(
                f"expected a decimal tree size without leading zeros, got {size_text!r}"
            )
        root_hash = _b64decode(root_text, what="root hash")
        return cls(
            origin=origin, size=int(size_text), root_hash=root_hash, extensions=tuple(extensions)
        )


def _find(note: Note, verifier: NoteVerifier) -> list[NoteSignature]:
    return [
        signature
        for signature in note.signatures
        if signature.name == verifier.name and signature.key_id == verifier.key_id
    ]


def sign_checkpoint(checkpoint: Checkpoint, signer: _RawSigner, *, name: str | None = None) -> str:
    """Sign a checkpoint body as a note with an Ed25519 key; the key name defaults to the origin."""
    key_name = checkpoint.origin if name is None else name
    _check_key_name(key_name)
    body = checkpoint.body()
    signature = NoteSignature(
        name=key_name,
        key_id=note_key_id(key_name, ALG_ED25519, signer.public_key_bytes),
        signature=signer.sign(body.encode()),
    )
    return Note(body, (signature,)).text()


def parse_checkpoint(
    note_text: str, *, verifier: NoteVerifier, origin: str | None = None
) -> Checkpoint:
    """Parse a signed checkpoint and verify the log's Ed25519 signature on it.

    Signatures from other keys are ignored, as C2SP signed-note requires; every line
    by the log key must verify (a failing one is refused, as C2SP recommends); ``origin``,
    when given, must match the first line. Raises :class:`CheckpointError`.
    """
    if verifier.algorithm != ALG_ED25519:
        raise CheckpointError(f"expected an Ed25519 (0x01) log key, got {verifier.algorithm:#04x}")
    note = parse_note(note_text)
    matching = _find(note, verifier)
    if not matching:
        raise CheckpointError(
            f"expected a signature by {verifier.name}+{verifier.key_id.hex()}, got none"
        )
    message = note.body.encode()
    # C2SP signed-note: a verifier SHOULD reject a note with a failing signature by a
    # known key, so every line by the log key must verify, not just one.
    if not all(verify_signature(verifier.public_key, s.signature, message) for s in matching):
        raise CheckpointError(f"signature by {verifier.name} does not verify on this checkpoint")
    checkpoint = Checkpoint.from_body(note.body)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"expected origin {origin!r}, got {checkpoint.origin!r}")
    return checkpoint


def _cosigned_message(body: str, timestamp: int) -> bytes:
    """C2SP tlog-cosignature, "Ed25519 signed message"."""
    return f"{_COSIGNATURE_HEADER}time {timestamp}\n{body}".encode()


def cosign_checkpoint(note_text: str, witness: _RawSigner, *, name: str, timestamp: int) -> str:
    """Add a witness's cosignature/v1 line to a signed checkpoint note.

    The caller (the witness) must already have verified the log signature and the
    consistency with the largest checkpoint it has seen; this only signs.
    """
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise CheckpointError(f"expected 0 <= timestamp <= 2**63 - 1, got {timestamp}")
    _check_key_name(name)
    note = parse_note(note_text)
    Checkpoint.from_body(note.body)
    signature = witness.sign(_cosigned_message(note.body, timestamp))
    line = NoteSignature(
        name=name,
        key_id=note_key_id(name, ALG_COSIGNATURE_V1, witness.public_key_bytes),
        signature=timestamp.to_bytes(8, "big") + signature,
    )
    return Note(note.body, (*note.signatures, line)).text()


def verify_cosignature(note_text: str, *, witness: NoteVerifier) -> int:
    """Verify the witness's cosignature/v1 on a checkpoint note; returns its timestamp.

    Raises :class:`CheckpointError` when the witness has no line or it does not verify.
    """
    if witness.algorithm != ALG_COSIGNATURE_V1:
        raise CheckpointError(f"expected a cosignature/v1 (0x04) key, got {witness.algorithm:#04x}")
    note = parse_note(note_text)
    Checkpoint.from_body(note.body)
    matching = _find(note, witness)
    if not matching:
        raise CheckpointError(f"expected a cosignature by {witness.name}, got none")
    for line in matching:
        if len(line.signature) != 8 + 64:
            continue
        timestamp = int.from_bytes(line.signature[:8], "big")
        if timestamp > _MAX_TIMESTAMP:
            continue
        message = _cosigned_message(note.body, timestamp)
        if verify_signature(witness.public_key, line.signature[8:], message):
            return timestamp
    raise CheckpointError(f"cosignature by {witness.name} does not verify on this checkpoint")
