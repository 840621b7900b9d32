"""Buyer fees: the split of a fee settlement (conserved, proportional, never negative)
and the signed vouchers it rests on."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import vouchers
from ledger.keys import Signer
from server.market.fees import PPM, split_fee

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(0, 10**12), share=st.integers(0, PPM),
       contributions=st.dictionaries(KEYS, st.integers(-5, 10**9), max_size=5))
def test_the_split_is_conserved_proportional_and_never_negative(
        amount: int, share: int, contributions: dict[str, int]) -> None:
    split = split_fee(amount, scientist="S", share_ppm=share, contributions=contributions)
    assert sum(split.values()) == amount
    assert all(v > 0 for v in split.values())
    total = sum(v for v in contributions.values() if v > 0)
    if total == 0:
        assert split == ({"S": amount} if amount else {})
        return
    exact = {"S": Fraction(amount * share, PPM)}
    for key, paid in contributions.items():
        if paid > 0:
            exact[key] = Fraction(amount * (PPM - share) * paid, PPM * total)
    for key, share_exact in exact.items():  # largest remainder: floor or ceil of the quota
        assert abs(split.get(key, 0) - share_exact) < 1
    assert not set(split) - set(exact)


def test_a_known_split() -> None:
    # 1000 at 20% for the Scientist; subscribers paid 300 and 100 -> 800 * 3/4, 800 * 1/4
    assert split_fee(1000, scientist="S", share_ppm=200_000,
                     contributions={"a": 300, "b": 100, "c": 0}) == {"S": 200, "a": 600, "b": 200}
    # 10 in thirds (no Scientist share): 3.33.. each, the spare unit to the smallest key
    assert split_fee(10, scientist="S", share_ppm=0,
                     contributions={"c": 1, "a": 1, "b": 1}) == {"a": 4, "b": 3, "c": 3}
    # a Scientist share of 333,334 ppm: 3.33334 beats the subscribers' 3.33333 each
    assert split_fee(10, scientist="b", share_ppm=333_334,
                     contributions={"a": 1, "c": 1}) == {"a": 3, "b": 4, "c": 3}


@pytest.mark.parametrize(("amount", "share"), [(-1, 0), (1, -1), (1, PPM + 1)])
def test_bad_split_arguments_are_refused(amount: int, share: int) -> None:
    with pytest.raises(ValueError):
        split_fee(amount, scientist="S", share_ppm=share, contributions={"a": 1})


VOUCHER = {"v": 1, "task_id": "t", "buyer": "b", "context_id": "c", "nonce": 3, "count": 2,
           "cumulative": 40, "body_sha256": "00"}


def test_a_voucher_verifies_only_with_its_signer_and_its_exact_fields() -> None:
    signer = Signer.generate()
    signature = signer.sign(vouchers.message(VOUCHER))
    vouchers.verify(signer.public_key_bytes, VOUCHER, signature)
    with pytest.raises(vouchers.VoucherError, match="signature"):
        vouchers.verify(Signer.generate().public_key_bytes, VOUCHER, signature)
    for field, value in [("cumulative", 39), ("nonce", 4), ("body_sha256", "01")]:
        with pytest.raises(vouchers.VoucherError, match="signature"):
            vouchers.verify(signer.public_key_bytes, {**VOUCHER, field: value}, signature)


@pytest.mark.parametrize("bad", [
    {**VOUCHER, "extra": 1}, {k: v for k, v in VOUCHER.items() if k != "nonce"},
    {**VOUCHER, "count": True}, {**VOUCHER, "cumulative": -1}, {**VOUCHER, "nonce": 2**60},
    {**VOUCHER, "v": 2}, {**VOUCHER, "buyer": 5}, "not a voucher",
])
def test_malformed_vouchers_are_refused_with_the_reason(bad: object) -> None:
    with pytest.raises(vouchers.VoucherError, match="voucher"):
        vouchers.check_fields(bad)  # type: ignore[arg-type]
