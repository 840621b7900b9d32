"""The pinned CKKS parameters of both layouts and everything derived from them without SEAL:
the layout names and wire constants, :class:`HEError`, :class:`CkksParams` and
:data:`PARAMS`, the size limits of requests, replies, ciphertexts and keys checked before
any parsing, the argument checks for a layout and a sample count, and :func:`context_id`.
Imports no ``tenseal``: the rest of :mod:`crypto.he` builds on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

LAYOUTS = ("single", "batch")
NUM_FEATURES = 64
NUM_CLASSES = 10
ACTIVATIONS = ("square", "poly2")
WIRE_VERSION = 1

_LAYOUT_CODE = {"single": 1, "batch": 2}
_CTX_MAGIC = b"PHEC"
_REQ_MAGIC = b"PHEQ"
_REP_MAGIC = b"PHER"
_BLOCK = 32  # single layout: slots per input feature (max hidden units)
_L1_STEPS = (32, 64, 128, 256, 512, 1024, 2048)
_L2_STEPS = (1, 2, 4, 8, 16)
_OUTPUT_SCALE_BITS = 34
_JUNK_NOISE = 2.0**12
_BATCH_INPUTS = NUM_FEATURES  # ciphertexts per batch request (bias is a plaintext)
_MAX_FILE_BYTES = 256 * 2**20


class HEError(ValueError):
    """A refusal: bad parameters, context, ciphertext or argument (says expected vs got)."""


@dataclass(frozen=True)
class CkksParams:
    """The pinned CKKS parameters of one layout."""

    layout: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    galois_steps: tuple[int, ...]  # rotation steps whose Galois keys the layout needs

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def to_json(self) -> dict[str, Any]:
        """What a buyer needs to know about the encryption (for ``GET /v1/model``)."""
        return {
            "scheme": "CKKS",
            "layout": self.layout,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "galois_steps": list(self.galois_steps),
            "slots": self.slots,
            "max_batch": max_batch(self.layout),
            "features": NUM_FEATURES,
            "classes": NUM_CLASSES,
            "security_bits": 128,
            "wire_version": WIRE_VERSION,
        }


_BITS = (50, 38, 38, 38, 50)
PARAMS: dict[str, CkksParams] = {
    "single": CkksParams("single", 8192, _BITS, 38, _L1_STEPS + _L2_STEPS),
    "batch": CkksParams("batch", 8192, _BITS, 38, ()),
}


def _check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise HEError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    return str(layout)


def max_batch(layout: str) -> int:
    """Samples per request: the slot count for "batch", 1 for "single"."""
    params = PARAMS[_check_layout(layout)]
    return params.slots if layout == "batch" else 1


def _ct_count(layout: str) -> tuple[int, int]:
    """(ciphertexts in a request, ciphertexts in a reply)."""
    return (1, 1) if layout == "single" else (_BATCH_INPUTS, NUM_CLASSES)


def _raw_ct_bytes(params: CkksParams, primes: int) -> int:
    """Upper bound of one uncompressed SEAL ciphertext of 2 polynomials over ``primes``."""
    return 16 * primes * params.poly_modulus_degree + 1024


def _blob_limit(raw: int) -> int:
    # zstd on incompressible data adds a few bytes per 128 KiB block.
    return raw + raw // 64 + 1024


def max_request_bytes(layout: str) -> int:
    """The largest request :meth:`EncryptedModel.predict` parses for ``layout``."""
    params = PARAMS[_check_layout(layout)]
    count, _ = _ct_count(layout)
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    return 14 + count * (4 + _blob_limit(_raw_ct_bytes(params, data_primes)))


def max_reply_bytes(layout: str) -> int:
    params = PARAMS[_check_layout(layout)]
    _, count = _ct_count(layout)
    return 14 + count * (4 + _blob_limit(_raw_ct_bytes(params, 1)))


def _key_raw(params: CkksParams, keys: int) -> int:
    """Upper bound of an uncompressed SEAL key-switching key set of ``keys`` keys."""
    total = len(params.coeff_mod_bit_sizes)
    per_key = (total - 1) * (16 * total * params.poly_modulus_degree + 1024)
    return keys * per_key + 4096


def _check_n(layout: str, n: object) -> int:
    top = max_batch(layout)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= int(n) <= top:
        raise HEError(f"n: expected an integer in 1..{top} for layout {layout!r}, got {n!r}")
    return int(n)


def context_id(public_bytes: bytes) -> str:
    """Hex SHA-256 of a public context's bytes (the id the service registers it under)."""
    return hashlib.sha256(bytes(public_bytes)).hexdigest()
