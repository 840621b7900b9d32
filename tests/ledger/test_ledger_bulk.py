"""Bulk fields: an entry past 16 KiB keeps its list and object fields in a blob its
signature names (``bulk_digest``); readers merge them back and refuse a blob that is
missing, altered, not canonical, or that overrides what the entry itself says."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import Log
from ledger.blobs import BlobStore, sign_with_bulk
from ledger.entries import (
    BULK_FIELD,
    BULK_THRESHOLD,
    encode_payload,
    make_key_entry,
    parse_entry,
    sign_entry,
    split_bulk,
    with_bulk,
)
from ledger.errors import EntryError, LedgerError
from tests.ledger.conftest import ORIGIN, seeded_signer

OPERATOR = seeded_signer("operator")


def _settlement(lines: int) -> dict[str, object]:
    payouts = {f"{i:032x}": 1000 + i for i in range(lines)}
    return {"task_id": "t" * 64, "forfeited": False, "reason": "", "payouts": payouts,
            "reward_payouts": dict(payouts), "fee_payouts": {}, "scientist_refund": 7,
            "losses_micro": [5, 4, 3]}


def test_small_entries_stay_whole_and_large_ones_move_their_lists() -> None:
    small = _settlement(3)
    assert split_bulk(small) == (small, None)
    large = _settlement(300)
    assert len(encode_payload(large)) > BULK_THRESHOLD
    inline, bulk = split_bulk(large)
    assert bulk is not None
    assert inline == {"task_id": "t" * 64, "forfeited": False, "reason": "",
                      "scientist_refund": 7}
    assert bulk == encode_payload({k: large[k] for k in ("payouts", "reward_payouts",
                                                         "fee_payouts", "losses_micro")})


def test_a_spilled_entry_signs_parses_and_merges_to_the_original(tmp_path: Path) -> None:
    blobs = BlobStore.beside(tmp_path / "ledger.db")
    fields = _settlement(400)
    leaf = sign_with_bulk(OPERATOR, "settlement", seq=1, fields=fields, blobs=blobs)
    assert len(leaf) < 1024  # the leaf holds the digest, not the 400 lines
    stored = parse_entry(leaf)
    assert BULK_FIELD in stored.fields and "payouts" not in stored.fields
    merged = with_bulk(stored, blobs.get)
    assert dict(merged.fields) == fields
    assert merged.payload == stored.payload and merged.signature == stored.signature


def _forge(fields_inline: dict[str, object], bulk: bytes) -> bytes:
    digest = hashlib.sha256(bulk).hexdigest()
    return sign_entry(OPERATOR, "settlement", seq=1, fields={**fields_inline,
                                                             BULK_FIELD: digest})


INLINE = {"task_id": "t", "forfeited": False, "reason": "", "scientist_refund": 0}
LISTS = {"payouts": {"a": 1}, "reward_payouts": {}, "fee_payouts": {}, "losses_micro": []}


@pytest.mark.parametrize(("inline", "bulk", "match"), [
    (INLINE, b'{"payouts":{"a":1}, "reward_payouts":{}}', "canonical"),
    (INLINE, b"[1,2]", "expected a non-empty JSON object"),
    (INLINE, b"{}", "expected a non-empty JSON object"),
    (INLINE, b"\xff\xfe", "expected JSON"),
    (INLINE, encode_payload({**LISTS, "scientist_refund": 5}),  # overrides an inline field
     r"expected only list and object fields, got \['scientist_refund'\]"),
    ({**INLINE, "payouts": {"a": 2}}, encode_payload(LISTS),  # says payouts twice
     r"expected fields the entry does not carry, got \['payouts'\] again"),
    (INLINE, encode_payload({**LISTS, "author": []}), r"got \['author'\] again"),
    (INLINE, encode_payload({**LISTS, BULK_FIELD: []}), r"got \['bulk_digest'\] again"),
    (INLINE, encode_payload({"payouts": {}, "reward_payouts": {}}),  # a required field lost
     "expected field 'fee_payouts'"),
    (INLINE, encode_payload({**LISTS, "losses_micro": {"x": 1}}),  # a required type wrong
     "expected 'losses_micro' of type list"),
])
def test_a_bulk_blob_that_does_not_fit_its_entry_is_refused(inline, bulk, match) -> None:
    entry = parse_entry(_forge(inline, bulk))
    with pytest.raises(EntryError, match=match):
        with_bulk(entry, lambda digest: bulk)


def test_an_altered_or_missing_blob_is_refused(tmp_path: Path) -> None:
    blobs = BlobStore.beside(tmp_path / "ledger.db")
    entry = parse_entry(sign_with_bulk(OPERATOR, "settlement", seq=1,
                                       fields=_settlement(400), blobs=blobs))
    digest = entry.fields[BULK_FIELD]
    with pytest.raises(EntryError, match="expected bytes hashing to"):
        with_bulk(entry, lambda d: blobs.get(d).replace(b"1000", b"9000", 1))
    blobs.path(digest).unlink()
    with pytest.raises(LedgerError, match="found none"):
        with_bulk(entry, blobs.get)
    with pytest.raises(EntryError, match="64 lowercase hex"):
        with_bulk(parse_entry(sign_entry(OPERATOR, "settlement", seq=1,
                                         fields={**INLINE, BULK_FIELD: "ABC"})), blobs.get)


def test_the_log_reader_merges_and_names_the_entry_it_cannot(tmp_path: Path) -> None:
    with Log.open(tmp_path / "ledger.db", OPERATOR, ORIGIN) as log:
        blobs = BlobStore.beside(tmp_path / "ledger.db")
        log.append_many([make_key_entry(OPERATOR),
                         sign_with_bulk(OPERATOR, "settlement", seq=1,
                                        fields=_settlement(400), blobs=blobs)])
        (index, merged), = log.entries(kind="settlement")
        assert merged.fields["payouts"] == _settlement(400)["payouts"]
        (_, stored), = log.entries(kind="settlement", bulk=False)
        digest = stored.fields[BULK_FIELD]
        blobs.path(digest).write_bytes(blobs.get(digest) + b" ")
        with pytest.raises(LedgerError, match=rf"entry {index} \(settlement\): .*hashing"):
            list(log.entries())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=8),
    max_leaves=40)


@settings(max_examples=60, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10).filter(
           lambda k: k not in ("kind", "v", "author", "seq", BULK_FIELD, "task_id", "round",
                               "selected")),
           json_values, max_size=6),
       threshold=st.integers(0, 400))
def test_split_then_merge_is_the_identity(tmp_path_factory, extra, threshold) -> None:
    """Whatever the fields and wherever the threshold, a reader sees what was signed."""
    fields = {"task_id": "t", "round": 1, "selected": ["a", "b"], **extra}
    inline, bulk = split_bulk(fields, threshold=threshold)
    if bulk is None:
        assert inline == fields
        return
    digest = hashlib.sha256(bulk).hexdigest()
    leaf = sign_entry(OPERATOR, "selection", seq=1, fields={**inline, BULK_FIELD: digest})
    merged = with_bulk(parse_entry(leaf), lambda d: bulk)
    assert dict(merged.fields) == fields


# ------------------------------------------------------------------ attacker review
def _with_digest(kind: str, fields: dict[str, object], digest: object) -> bytes:
    """A leaf signed by hand: sign_entry itself refuses what parse_entry refuses, so
    the payload is built and signed here as a hostile author would."""
    import base64

    from ledger.entries import DOMAIN

    payload = encode_payload({**fields, BULK_FIELD: digest, "kind": kind, "v": 1,
                              "author": OPERATOR.key_id, "seq": 1})
    return payload + b"\n" + base64.b64encode(OPERATOR.sign(DOMAIN + payload))


@pytest.mark.parametrize(("kind", "fields", "digest", "match"), [
    # a subscriber naming a blob nobody has would make every reader of the log fail
    ("candidate", {"task_id": "t", "round": 1, "update_digest": "0" * 64}, "a" * 64,
     r"expected no 'bulk_digest' in a 'candidate' entry"),
    ("ballot", {"task_id": "t", "round": 1}, "a" * 64, r"in a 'ballot' entry"),
    ("cosignature", {}, "a" * 64, r"in a 'cosignature' entry"),
    ("key", {}, "a" * 64, r"in a 'key' entry"),
    # null is not a digest: the required fields may not go missing with it
    ("settlement", {"task_id": "t"}, None, r"expected bulk_digest as 64 lowercase hex"),
    ("settlement", {"task_id": "t"}, "A" * 64, r"expected bulk_digest as 64 lowercase hex"),
])
def test_bulk_is_only_for_the_kinds_that_grow(kind, fields, digest, match) -> None:
    with pytest.raises(EntryError, match=match):
        parse_entry(_with_digest(kind, fields, digest))
    with pytest.raises(EntryError, match=match):
        sign_entry(OPERATOR, kind, seq=1, fields={**fields, BULK_FIELD: digest})


def test_a_huge_or_deeply_nested_blob_is_refused_not_a_crash() -> None:
    deep = b'{"payouts":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    entry = parse_entry(_forge(INLINE, deep))
    with pytest.raises(EntryError, match="expected JSON|canonical"):
        with_bulk(entry, lambda digest: deep)
    from ledger.entries import MAX_BULK_BYTES

    huge = encode_payload({"payouts": {f"{i:032x}": i for i in range(120_000)},
                           "reward_payouts": {}, "fee_payouts": {}, "losses_micro": []})
    assert len(huge) > MAX_BULK_BYTES
    entry = parse_entry(_forge(INLINE, huge))
    with pytest.raises(EntryError, match=rf"expected at most {MAX_BULK_BYTES} bytes"):
        with_bulk(entry, lambda digest: huge)


def test_reading_creates_no_blob_folder(tmp_path: Path) -> None:
    from ledger import LogReader

    with Log.open(tmp_path / "ledger.db", OPERATOR, ORIGIN) as log:
        log.append_many([make_key_entry(OPERATOR)])
    with LogReader.open(tmp_path / "ledger.db") as reader:
        assert len(list(reader.entries())) == 1
    assert not (tmp_path / "blobs").exists()
