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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DOMAIN = b"poi/voucher/v1\n"
FIELDS: dict[str, type] = {"v": int, "task_id": str, "buyer": str, "context_id": str,
                           "nonce": int, "count": int, "cumulative": int, "body_sha256": str}
MAX_INT = 2**53 - 1


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


def message(voucher: Mapping[str, Any]) -> bytes:
    """The exact bytes a buyer signs."""
    return DOMAIN + rfc8785.dumps(check_fields(voucher))


def verify(public_key_raw: bytes, voucher: Mapping[str, Any], signature: bytes) -> None:
    """Raise :class:`VoucherError` unless ``signature`` is the buyer's over the voucher."""
    data = message(voucher)
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise VoucherError("voucher: signature does not verify with the buyer's key") from exc
