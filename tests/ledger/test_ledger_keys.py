"""Strict Ed25519 public keys (RFC 8032) and the Signer's key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ledger.entries import KeyRing
from ledger.errors import PublicKeyError
from ledger.keys import Signer, load_public_key, parse_public_key

P = 2**255 - 19


def encode(y: int, *, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


# Points of order 1, 2, 4 and 8 (the cofactor subgroup), e.g. libsodium's blocklist.
SMALL_ORDER = {
    "identity (order 1)": encode(1),
    "(0, -1) (order 2)": encode(P - 1),
    "(sqrt(-1), 0) (order 4)": encode(0),
    "(-sqrt(-1), 0) (order 4)": encode(0, sign=1),
    "order 8, a": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order 8, a negated": bytes.fromhex(
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"
    ),
    "order 8, b": bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
}
NON_CANONICAL = {
    "y = p (is 0)": encode(P),
    "y = p + 1 (is 1)": encode(P + 1),
    "y = 2**255 - 1": encode(2**255 - 1),
    "x = 0 with sign bit (y = 1)": encode(1, sign=1),
    "x = 0 with sign bit (y = p - 1)": encode(P - 1, sign=1),
}


@pytest.mark.parametrize("raw", SMALL_ORDER.values(), ids=SMALL_ORDER.keys())
def test_small_order_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(PublicKeyError, match="small-order|non-canonical|x = 0"):
        parse_public_key(raw)
    with pytest.raises(PublicKeyError):
        KeyRing().register_key(raw)


@pytest.mark.parametrize("raw", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(PublicKeyError, match="canonical"):
        parse_public_key(raw)


def test_non_points_and_wrong_lengths_are_refused() -> None:
    with pytest.raises(PublicKeyError, match="expected a 32-byte Ed25519 key, got 31 bytes"):
        parse_public_key(bytes(31))
    with pytest.raises(PublicKeyError, match="on the curve"):
        parse_public_key(encode(2))  # y = 2 has no x on edwards25519


def test_real_keys_are_accepted() -> None:
    for seed in range(20):
        signer = Signer.from_seed(bytes([seed]) * 32)
        parse_public_key(signer.public_key_bytes)
        assert KeyRing().register_key(signer.public_key_bytes) == signer.key_id


def test_signer_never_shows_or_writes_its_secret_unless_asked(tmp_path: Path) -> None:
    signer = Signer.from_seed(b"k" * 32)
    assert "private" not in repr(signer)
    public_path, private_path = tmp_path / "key.pub", tmp_path / "key.pem"
    signer.save(public_path)
    assert b"PRIVATE" not in public_path.read_bytes()
    assert load_public_key(public_path) is not None
    signer.save(private_path, private=True)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert Signer.load(private_path).key_id == signer.key_id
    with pytest.raises(FileExistsError):
        signer.save(private_path, private=True)
