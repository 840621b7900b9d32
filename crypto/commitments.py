"""Salted commitments to the Scientist's validation examples, and the reveal blob.

A commitment hides one example until the reveal and binds the Scientist to it:

    commitment_i = SHA-256( "poi/validation-example/v1" || 0x00 || salt_i (32 bytes)
                            || canonical_tensor_bytes({"x": x_i (float32, (d,)),
                                                       "y": y_i (int64, ())}) )

The salt (32 random bytes per example, from ``os.urandom``) stops anyone from testing
a guessed example against a commitment. The task entry holds the RFC 9162 Merkle root
over the commitments (computed by the caller with :mod:`ledger.merkle`: this package
imports nothing of ours outside ``crypto``).

The reveal is one blob, the canonical tensor encoding of
``{"salt": uint8 (n, 32), "x": float32 (n, d), "y": int64 (n,)}``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from crypto.digests import (
    TensorEncodingError,
    canonical_tensor_bytes,
    parse_canonical_tensor_bytes,
)

DOMAIN = b"poi/validation-example/v1\x00"
SALT_BYTES = 32


class RevealError(ValueError):
    """A reveal blob that cannot be decoded into examples and salts."""


@dataclass(frozen=True)
class Revealed:
    """The validation set as revealed: features, labels and each example's salt."""

    x: np.ndarray  # float32 (n, d)
    y: np.ndarray  # int64 (n,)
    salts: np.ndarray  # uint8 (n, 32)

    def __len__(self) -> int:
        return int(self.y.shape[0])


def new_salts(count: int) -> np.ndarray:
    """``count`` fresh 32-byte salts from the OS's CSPRNG."""
    return np.frombuffer(os.urandom(SALT_BYTES * count), dtype=np.uint8).reshape(
        count, SALT_BYTES).copy()


def commit_example(salt: bytes, x: np.ndarray, y: int) -> bytes:
    """The 32-byte commitment to one example (see the module docstring)."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"expected a {SALT_BYTES}-byte salt, got {len(salt)} bytes")
    body = canonical_tensor_bytes({
        "x": np.asarray(x, dtype=np.float32).reshape(-1),
        "y": np.asarray(int(y), dtype=np.int64),
    })
    return hashlib.sha256(DOMAIN + salt + body).digest()


def commitments(revealed: Revealed) -> list[bytes]:
    """One commitment per example, in order."""
    return [commit_example(bytes(revealed.salts[i]), revealed.x[i], int(revealed.y[i]))
            for i in range(len(revealed))]


def encode_reveal(revealed: Revealed) -> bytes:
    return canonical_tensor_bytes({
        "salt": np.asarray(revealed.salts, dtype=np.uint8),
        "x": np.asarray(revealed.x, dtype=np.float32),
        "y": np.asarray(revealed.y, dtype=np.int64),
    })


def decode_reveal(data: bytes) -> Revealed:
    """Parse a reveal blob; raises :class:`RevealError` naming what is wrong."""
    try:
        tensors = parse_canonical_tensor_bytes(data, max_tensors=3, max_ndim=2)
    except TensorEncodingError as exc:
        raise RevealError(f"reveal blob: {exc}") from exc
    if set(tensors) != {"salt", "x", "y"}:
        raise RevealError(
            f"reveal blob: expected tensors ['salt', 'x', 'y'], got {sorted(tensors)}")
    salts, x, y = tensors["salt"], tensors["x"], tensors["y"]
    expected = {"salt": "|u1", "x": "<f4", "y": "<i8"}
    for name, dtype in expected.items():
        if tensors[name].dtype.str != dtype:
            raise RevealError(
                f"reveal blob: expected {name} of dtype {dtype}, got {tensors[name].dtype.str}")
    n = y.shape[0] if y.ndim == 1 else -1
    if y.ndim != 1 or x.ndim != 2 or x.shape[0] != n or salts.shape != (n, SALT_BYTES):
        raise RevealError(
            f"reveal blob: expected y (n,), x (n, d), salt (n, {SALT_BYTES}), got "
            f"y {y.shape}, x {x.shape}, salt {salts.shape}")
    return Revealed(x=x, y=y, salts=salts)
