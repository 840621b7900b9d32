"""Entries: RFC 8785 canonical JSON, integers only, author signatures over exact bytes."""

from __future__ import annotations

import base64
import json

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.entries import (
    DOMAIN,
    KeyRing,
    _is_canonical,
    make_key_entry,
    parse_entry,
    register_kind,
    sign_entry,
)
from ledger.errors import EntryError
from ledger.keys import Signer, key_id

AUTHOR = Signer.from_seed(b"a" * 32)
VOTE = {
    "task_id": "task-1",
    "round": 3,
    "candidate": "ab" * 32,
    "base_loss_micro": 693_147,
    "candidate_loss_micro": 512_000,
}


def ring_with(*signers: Signer) -> KeyRing:
    ring = KeyRing()
    for signer in signers:
        ring.admit(make_key_entry(signer))
    return ring


def frame(payload: bytes, signer: Signer = AUTHOR) -> bytes:
    return payload + b"\n" + base64.b64encode(signer.sign(DOMAIN + payload))


def test_leaf_is_canonical_payload_newline_signature() -> None:
    leaf = sign_entry(AUTHOR, "vote", seq=1, fields=VOTE)
    payload, signature = leaf.rsplit(b"\n", 1)
    decoded = json.loads(payload)
    assert rfc8785.dumps(decoded) == payload
    assert decoded == {**VOTE, "kind": "vote", "v": 1, "author": AUTHOR.key_id, "seq": 1}
    AUTHOR.public_key.verify(base64.b64decode(signature), DOMAIN + payload)
    entry = ring_with(AUTHOR).verify(leaf)
    assert (entry.kind, entry.author, entry.seq, entry.leaf) == ("vote", AUTHOR.key_id, 1, leaf)
    assert dict(entry.fields) == VOTE


def test_floats_are_refused_with_a_clear_error() -> None:
    with pytest.raises(EntryError, match=r"expected an integer at \$.base_loss_micro, got float"):
        sign_entry(AUTHOR, "vote", seq=1, fields={**VOTE, "base_loss_micro": 0.69})
    with pytest.raises(EntryError, match=r"at \$.extra\[1\].x, got float"):
        sign_entry(AUTHOR, "vote", seq=1, fields={**VOTE, "extra": [1, {"x": 1.0}]})
    with pytest.raises(EntryError, match=r"2\*\*53 - 1"):
        sign_entry(AUTHOR, "vote", seq=1, fields={**VOTE, "round": 2**53})


def test_required_fields_and_types() -> None:
    with pytest.raises(EntryError, match="expected field 'candidate' in a 'vote' entry"):
        sign_entry(AUTHOR, "vote", seq=1, fields={k: v for k, v in VOTE.items() if k != "candidate"})
    with pytest.raises(EntryError, match="expected 'round' of type int .* got str"):
        sign_entry(AUTHOR, "vote", seq=1, fields={**VOTE, "round": "3"})
    with pytest.raises(EntryError, match="got a boolean"):
        sign_entry(AUTHOR, "vote", seq=1, fields={**VOTE, "round": True})
    with pytest.raises(EntryError, match="expected a registered entry kind, got 'nope'"):
        sign_entry(AUTHOR, "nope", seq=1, fields={})
    with pytest.raises(EntryError, match="no envelope fields"):
        sign_entry(AUTHOR, "vote", seq=1, fields={**VOTE, "seq": 9})


def test_later_code_can_register_kinds() -> None:
    register_kind("test-settlement", required={"task_id": str, "payouts_minor": dict})
    register_kind("test-settlement", required={"task_id": str, "payouts_minor": dict})
    leaf = sign_entry(AUTHOR,
        "test-settlement", seq=1, fields={"task_id": "t", "payouts_minor": {"a": 10}}
    )
    assert ring_with(AUTHOR).verify(leaf).kind == "test-settlement"
    with pytest.raises(EntryError, match="already registered with a different spec"):
        register_kind("test-settlement", required={"task_id": str})
    with pytest.raises(EntryError, match="payouts_minor"):
        sign_entry(AUTHOR, "test-settlement", seq=1, fields={"task_id": "t"})


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"kind": "task"}', "canonical"),  # whitespace
        (b'{"v":1,"kind":"task"}', "canonical"),  # key order
        (b'{"a":1.0}', "canonical|integer"),
        (b'{"a":1e2}', "canonical|integer"),
        (b'{"a":NaN}', "integer, got NaN"),
        (b'{"a":1,"a":2}', "canonical"),  # duplicate keys
        (b'{"a":"\\u0041"}', "canonical"),  # needless escape
        (b"[1,2]", "JSON object"),
        (b"\xff", "JSON payload"),
    ],
    ids=["space", "order", "float", "exponent", "nan", "duplicate", "escape", "array", "utf8"],
)
def test_non_canonical_payloads_are_rejected(payload: bytes, match: str) -> None:
    with pytest.raises(EntryError, match=match):
        parse_entry(frame(payload))


_JSON_TEXT = st.text(
    st.characters(exclude_categories=("Cs",))
    | st.sampled_from('\x00\x1f\x7f"\\\ue000\uffff\U0001f600'),
    max_size=6,
)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | _JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_JSON_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_JSON_TEXT, _JSON_VALUES, max_size=6))
def test_fast_canonical_check_agrees_with_rfc8785(value: dict[str, object]) -> None:
    """The C-encoder fast path accepts exactly what rfc8785 produces, and nothing else."""
    canonical = rfc8785.dumps(value)
    assert _is_canonical(json.loads(canonical), canonical)
    for other in (
        json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps(value, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(),
    ):
        assert _is_canonical(json.loads(other), other) == (other == canonical)


def test_fast_canonical_check_orders_keys_by_utf16() -> None:
    """Code point order and UTF-16 order differ for U+E000..U+FFFF against astral keys."""
    value = {"\ue000": 1, "\U0001f600": 2}
    canonical = rfc8785.dumps(value)
    by_code_point = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert canonical.decode().index("\U0001f600") < canonical.decode().index("\ue000")
    assert _is_canonical(value, canonical)
    assert not _is_canonical(value, by_code_point.encode())


def test_signature_is_over_the_stored_bytes() -> None:
    ring = ring_with(AUTHOR)
    leaf = sign_entry(AUTHOR, "vote", seq=1, fields=VOTE)
    forged = leaf.replace(b'"round":3', b'"round":4')
    with pytest.raises(EntryError, match="does not verify"):
        ring.verify(forged)
    other = Signer.from_seed(b"b" * 32)
    stolen = leaf.rsplit(b"\n", 1)[0] + b"\n" + base64.b64encode(other.sign(DOMAIN + leaf[:-89]))
    with pytest.raises(EntryError, match="does not verify"):
        ring.verify(stolen)
    undomained = leaf[:-88] + base64.b64encode(AUTHOR.sign(leaf[:-89]))
    with pytest.raises(EntryError, match="does not verify"):
        ring.verify(undomained)


@pytest.mark.parametrize(
    ("leaf", "match"),
    [
        (b"", "88 base64 characters"),
        (b"{}" + b"\n" + b"A" * 87, "88 base64 characters"),
        (b"{}" + b"|" + b"A" * 88, "88 base64 characters"),
        (b"{}" + b"\n" + b"!" * 88, "base64 signature"),
    ],
    ids=["empty", "short", "separator", "alphabet"],
)
def test_bad_framing(leaf: bytes, match: str) -> None:
    with pytest.raises(EntryError, match=match):
        parse_entry(leaf)


def test_unknown_author_and_bad_key_entries() -> None:
    other = Signer.from_seed(b"c" * 32)
    with pytest.raises(EntryError, match="expected a registered author"):
        ring_with(AUTHOR).verify(sign_entry(other, "vote", seq=1, fields=VOTE))
    claimed = sign_entry(
        AUTHOR,
        kind="key",
        seq=0,
        fields={"public_key": base64.b64encode(other.public_key_bytes).decode()},
    )
    with pytest.raises(EntryError, match="expected author"):
        KeyRing().admit(claimed)
    weak = bytes(32)  # order 4: "signatures" by it can be forged for many messages
    payload = rfc8785.dumps(
        {
            "kind": "key",
            "v": 1,
            "author": key_id(weak),
            "seq": 0,
            "public_key": base64.b64encode(weak).decode(),
        }
    )
    with pytest.raises(EntryError, match="small-order"):
        KeyRing().admit(payload + b"\n" + base64.b64encode(bytes(64)))
