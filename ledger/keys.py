"""Ed25519 keys for the ledger (RFC 8032): strict public-key parsing, key ids, signers.

Every verifier must agree on which signatures are valid, so public keys are refused
at registration when their encoding is non-canonical (y >= p, or x = 0 with the sign
bit set, RFC 8032 section 5.1.3) or when the point has small order (its order
divides the cofactor 8): such keys admit signatures that verify for many messages,
and libraries disagree on them.

Secret keys follow TenSEAL's safe default: never serialized unless asked
(``Signer.save(path, private=True)``, written with mode 0600).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.errors import PublicKeyError

__all__ = [
    "KEY_ID_PREFIX",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "Signer",
    "key_id",
    "parse_public_key",
    "verify_signature",
]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# Domain separation for author key ids, so they never collide with C2SP note key ids.
KEY_ID_PREFIX = b"poi/ledger/key/v1\n"

# RFC 8032 section 5.1: edwards25519 field prime and curve constant d.
_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(encoded: bytes) -> tuple[int, int]:
    """Decode an edwards25519 point (RFC 8032 section 5.1.3), refusing non-canonical input."""
    y = int.from_bytes(encoded, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        raise PublicKeyError(f"expected a canonical Ed25519 key with y < p, got y = p + {y - _P}")
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    # x = (u/v)^((p+3)/8) candidate, RFC 8032 section 5.1.3 step 3.
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            raise PublicKeyError("expected an Ed25519 public key on the curve, got a non-point")
    if x == 0 and sign:
        raise PublicKeyError("expected a canonical Ed25519 key, got x = 0 with the sign bit set")
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(point: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Point doubling in extended coordinates (RFC 8032 section 5.1.4)."""
    x1, y1, z1, _ = point
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = (a + b) % _P
    e = (h - (x1 + y1) ** 2) % _P
    g = (a - b) % _P
    f = (c + g) % _P
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _has_small_order(x: int, y: int) -> bool:
    """True when 8 * (x, y) is the identity, i.e. the point's order divides 8."""
    point = (x, y, 1, x * y % _P)
    for _ in range(3):
        point = _double(point)
    px, py, pz, _ = point
    return px % _P == 0 and (py - pz) % _P == 0


def parse_public_key(raw: bytes) -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key, strictly.

    Raises :class:`PublicKeyError` for a wrong length, a non-canonical encoding
    (y >= p, or x = 0 with the sign bit set), a non-point, or a point of small order.
    """
    if len(raw) != PUBLIC_KEY_SIZE:
        raise PublicKeyError(f"expected a {PUBLIC_KEY_SIZE}-byte Ed25519 key, got {len(raw)} bytes")
    x, y = _decode_point(raw)
    if _has_small_order(x, y):
        raise PublicKeyError(f"expected an Ed25519 key of large order, got small-order {raw.hex()}")
    return Ed25519PublicKey.from_public_bytes(raw)


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The 32-byte RFC 8032 encoding of ``public_key``."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw: bytes) -> str:
    """An author's key id: hex of the first 16 bytes of SHA-256(KEY_ID_PREFIX || key)."""
    return hashlib.sha256(KEY_ID_PREFIX + raw).hexdigest()[:32]


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification as a predicate, for callers that raise their own error.

    libsodium (PyNaCl) first: it verifies in about half the time of OpenSSL through
    ``cryptography`` here (54 against 105 us), and the audit spends most of its time
    here. libsodium accepts a subset of what OpenSSL accepts (it also refuses
    small-order and non-canonical points), so a signature it refuses is checked again
    by ``cryptography``, whose answer stands: the rule is OpenSSL's, as it always was.
    """
    raw = public_key.public_bytes_raw()
    if len(signature) == 64:
        try:
            nacl.bindings.crypto_sign_open(signature + message, raw)
            return True
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
            pass
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Signer:
    """An Ed25519 private key with its public key and key id; signs bytes.

    ``repr`` never shows the secret; it is written to disk only by
    ``save(path, private=True)``.
    """

    private_key: Ed25519PrivateKey = field(repr=False)
    public_key_bytes: bytes = field(init=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        raw = raw_public_key(self.private_key.public_key())
        object.__setattr__(self, "public_key_bytes", raw)
        object.__setattr__(self, "key_id", key_id(raw))

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A deterministic signer from a 32-byte seed (tests and simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, path: str | os.PathLike[str], *, private: bool = False) -> None:
        """Write the public key as PEM, or the private key (PKCS#8 PEM, mode 0600) if asked.

        Refuses to overwrite an existing private key file (``FileExistsError``).
        """
        target = Path(path)
        if not private:
            target.write_bytes(self.public_key_pem())
            return
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Signer:
        """Load a private key written by ``save(path, private=True)``."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise PublicKeyError(f"expected an Ed25519 private key in {path}, got {type(key)}")
        return cls(key)


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a PEM public key written by ``Signer.save(path)``, checked by parse_public_key."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise PublicKeyError(f"expected an Ed25519 public key in {path}, got {type(key)}")
    return parse_public_key(raw_public_key(key))
