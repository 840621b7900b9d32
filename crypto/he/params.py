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
_BLOCK = 32  # single layout: the fewest slots per input feature (the hidden units' block)
# The single layout's Galois keys: every power of two below the slot count. A block of B
# slots (B a power of two >= 32) sums the first layer with the steps B, 2B, ..., 2048 and
# the second with 1, 2, ..., B/2: the same key set serves every model width.
_L1_STEPS = (32, 64, 128, 256, 512, 1024, 2048)
_L2_STEPS = (1, 2, 4, 8, 16)
MAX_FEATURES = 1024  # client.schema's bounds (tests/crypto check they agree)
MAX_CLASSES = 256
MAX_HIDDEN = 4096
MAX_OUTPUT_WEIGHTS = 2048  # classes x hidden: the batch layout's plaintexts
MAX_INPUT_WEIGHTS = 1 << 18  # features x hidden: a request's ciphertext products
_OUTPUT_SCALE_BITS = 34
_JUNK_NOISE = 2.0**12
_MAX_FILE_BYTES = 256 * 2**20


class HEError(ValueError):
    """A refusal: bad parameters, context, ciphertext or argument (says expected vs got)."""


@dataclass(frozen=True)
class ModelShape:
    """The served model's widths: features in, hidden units, classes out. The batch
    layout carries one ciphertext per feature in a request and one per class in a reply;
    the single layout packs a sample into one ciphertext in blocks of :attr:`block`
    slots, so it serves a model only when ``(features + 1) * block`` (and ``classes *
    block``) fit the slots."""

    features: int = NUM_FEATURES
    classes: int = NUM_CLASSES
    hidden_units: int = _BLOCK

    def check(self) -> ModelShape:
        for name, value, low, high in (("features", self.features, 1, MAX_FEATURES),
                                       ("classes", self.classes, 2, MAX_CLASSES),
                                       ("hidden units", self.hidden_units, 1, MAX_HIDDEN)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise HEError(f"model shape: expected {name} in {low}..{high}, got {value!r}")
        for name, value, high in (
                ("classes x hidden units", self.classes * self.hidden_units,
                 MAX_OUTPUT_WEIGHTS),
                ("features x hidden units", self.features * self.hidden_units,
                 MAX_INPUT_WEIGHTS)):
            if value > high:
                raise HEError(f"model shape: expected {name} <= {high}, got {value}")
        return self

    @property
    def block(self) -> int:
        """Slots per feature in the single layout: the hidden units rounded up to a power
        of two, at least 32."""
        block = _BLOCK
        while block < self.hidden_units:
            block *= 2
        return block

    @property
    def single_slots(self) -> int:
        """Slots the single layout needs: the features and the bias, or the classes."""
        return max(self.features + 1, self.classes) * self.block

    def supports(self, layout: str) -> bool:
        return layout == "batch" or self.single_slots <= PARAMS["single"].slots

    @property
    def layouts(self) -> tuple[str, ...]:
        """The layouts that can serve this model, in :data:`LAYOUTS` order."""
        return tuple(name for name in LAYOUTS if self.supports(name))

    def check_layout(self, layout: str) -> None:
        """Raise :class:`HEError` when ``layout`` cannot serve this model, naming why."""
        if not self.supports(_check_layout(layout)):
            widest = (f"({self.features} + 1) x {self.block}"
                      if self.features + 1 >= self.classes else f"{self.classes} x {self.block}")
            raise HEError(
                f"layout {layout!r}: a model of {self.features} features, "
                f"{self.hidden_units} hidden units and {self.classes} classes needs "
                f"{self.single_slots} slots ({widest}), the "
                f"layout has {PARAMS['single'].slots}: expected one of {list(self.layouts)}")

    def single_steps(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The single layout's rotations: (first layer, second layer)."""
        steps = _L2_STEPS + _L1_STEPS  # every power of two below the slot count
        return (tuple(s for s in steps if s >= self.block),
                tuple(s for s in steps if s < self.block))

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "hidden_units": self.hidden_units,
                "classes": self.classes, "block": self.block}


DIGITS_SHAPE = ModelShape()


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

    def to_json(self, shape: ModelShape = DIGITS_SHAPE) -> dict[str, Any]:
        """What a buyer needs to know about the encryption of a model of ``shape`` (for
        ``GET /v1/model``)."""
        return {
            "scheme": "CKKS",
            "layout": self.layout,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "galois_steps": list(self.galois_steps),
            "slots": self.slots,
            "max_batch": max_batch(self.layout),
            "features": shape.features,
            "classes": shape.classes,
            "block": shape.block,
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


def _ct_count(layout: str, shape: ModelShape = DIGITS_SHAPE) -> tuple[int, int]:
    """(ciphertexts in a request, ciphertexts in a reply) for a model of ``shape``."""
    return (1, 1) if layout == "single" else (shape.features, shape.classes)


def _raw_ct_bytes(params: CkksParams, primes: int) -> int:
    """Upper bound of one uncompressed SEAL ciphertext of 2 polynomials over ``primes``."""
    return 16 * primes * params.poly_modulus_degree + 1024


def _blob_limit(raw: int) -> int:
    # zstd on incompressible data adds a few bytes per 128 KiB block.
    return raw + raw // 64 + 1024


def max_request_bytes(layout: str, shape: ModelShape = DIGITS_SHAPE) -> int:
    """The largest request :meth:`EncryptedModel.predict` parses for ``layout``."""
    params = PARAMS[_check_layout(layout)]
    count, _ = _ct_count(layout, shape)
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    return 14 + count * (4 + _blob_limit(_raw_ct_bytes(params, data_primes)))


def max_reply_bytes(layout: str, shape: ModelShape = DIGITS_SHAPE) -> int:
    params = PARAMS[_check_layout(layout)]
    _, count = _ct_count(layout, shape)
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
