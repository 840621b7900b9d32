"""Buyer vouchers: the signed, cumulative promise to pay that rides on every request.

A voucher is an RFC 8785 canonical JSON object

    {"v": 1, "task_id": str, "buyer": key id, "context_id": str, "nonce": int,
     "count": int, "cumulative": int, "body_sha256": hex}

``count`` is the number of predictions in this request, ``cumulative`` the total the
buyer has agreed to pay the service so far (minor units, this request included),
``nonce`` a strictly increasing integer per buyer (replays are refused), and
``body_sha256`` binds the voucher to the ciphertext it pays for. The buyer signs
``DOMAIN || canonical JSON`` with Ed25519. The service keeps the latest voucher per
buyer and the operator copies it into the periodic ``fee_settlement`` ledger entry, so
anyone can check what a buyer agreed to pay.

The voucher travels as base64 (RFC 4648 section 4, the standard alphabet with padding)
of any JSON text that parses to that flat object: it need not be canonical, because the
signature is over the canonical form of the parsed object. :func:`parse_json` refuses,
before parsing, anything longer than :data:`MAX_VOUCHER_BYTES` or nested at all (a
depth-1,000 array would otherwise exhaust the parser's recursion), and after parsing any
duplicate key. :func:`context_message` is what a buyer signs to register a context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DOMAIN = b"poi/voucher/v1\n"
FIELDS: dict[str, type] = {"v": int, "task_id": str, "buyer": str, "context_id": str,
                           "nonce": int, "count": int, "cumulative": int, "body_sha256": str}
MAX_INT = 2**53 - 1
MAX_VOUCHER_BYTES = 1024  # the JSON text; a real voucher is about 330 bytes
CONTEXT_DOMAIN = b"poi/context/v1\n"


class VoucherError(ValueError):
    """A voucher with missing, extra or ill-typed fields, or a bad signature."""


def check_fields(voucher: Mapping[str, Any]) -> dict[str, Any]:
    """The voucher as a plain dict, or :class:`VoucherError` naming the problem."""
    if not isinstance(voucher, Mapping):
        raise VoucherError(f"expected a voucher object, got {type(voucher).__name__}")
    extra = sorted(set(voucher) - set(FIELDS))
    missing = sorted(set(FIELDS) - set(voucher))
    if extra or missing:
        raise VoucherError(f"voucher: expected fields {sorted(FIELDS)}, "
                           f"missing {missing}, unexpected {extra}")
    for name, kind in FIELDS.items():
        value = voucher[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise VoucherError(f"voucher: expected {name} of type {kind.__name__}, "
                               f"got {type(value).__name__}")
        if isinstance(value, int) and not 0 <= value <= MAX_INT:
            raise VoucherError(f"voucher: expected 0 <= {name} <= {MAX_INT}, got {value}")
    if voucher["v"] != 1:
        raise VoucherError(f"voucher: expected v 1, got {voucher['v']}")
    return dict(voucher)


def parse_json(data: bytes) -> dict[str, Any]:
    """The voucher object in ``data`` (UTF-8 JSON), fields checked; :class:`VoucherError`
    for anything longer than :data:`MAX_VOUCHER_BYTES`, any nesting (a voucher is one flat
    object of strings and integers), invalid JSON or UTF-8, or a duplicate key."""
    if len(data) > MAX_VOUCHER_BYTES:
        raise VoucherError(f"voucher: expected at most {MAX_VOUCHER_BYTES} bytes of JSON, "
                           f"got {len(data)}")
    depth = _max_depth(data)
    if depth != 1:
        raise VoucherError(f"voucher: expected one flat JSON object (depth 1), got depth {depth}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise VoucherError(f"voucher: duplicate keys in {keys}")
        return dict(pairs)

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates,
                           parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VoucherError(f"voucher: expected UTF-8 JSON, got {exc}") from None
    return check_fields(value)


def _refuse_constant(name: str) -> Any:
    raise VoucherError(f"voucher: expected integers, got {name}")


def _max_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def context_message(task_id: str, layout: str, context_sha256: str) -> bytes:
    """The exact bytes a buyer signs to register a public context (``POST /v1/contexts``):
    it binds the context's SHA-256 (hex) to this task and layout."""
    return CONTEXT_DOMAIN + f"{task_id}\n{layout}\n{context_sha256}".encode()


def message(voucher: Mapping[str, Any]) -> bytes:
    """The exact bytes a buyer signs."""
    return DOMAIN + rfc8785.dumps(check_fields(voucher))


def verify(public_key_raw: bytes, voucher: Mapping[str, Any], signature: bytes) -> None:
    """Raise :class:`VoucherError` unless ``signature`` is the buyer's over the voucher."""
    verify_message(public_key_raw, message(voucher), signature)


def verify_message(public_key_raw: bytes, data: bytes, signature: bytes) -> None:
    """Raise :class:`VoucherError` unless ``signature`` is the buyer's over ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise VoucherError("voucher: signature does not verify with the buyer's key") from exc
