"""Ledger entries: author-signed RFC 8785 canonical JSON, stored as the exact signed bytes.

Leaf framing (what a Merkle leaf holds, byte for byte)::

    leaf      = payload || 0x0A || base64(signature)      (88 base64 characters)
    payload   = RFC 8785 canonical JSON object, UTF-8, with at least
                {"kind": str, "v": int, "author": key id, "seq": int}
    signature = Ed25519(author key, b"poi/ledger/entry/v1\\n" || payload)

Canonical JSON never contains a raw newline (RFC 8785 section 3.2.2.2 escapes it
inside strings and emits no whitespace), so the last 0x0A splits the leaf
unambiguously. Verification never re-serializes anything it then trusts: it checks
that the stored payload bytes *are* canonical (parse, canonicalize, compare) and
verifies the signature over the stored bytes.

Only integers are allowed (no floats anywhere): losses and scores go in micro-units
(``loss_micro``), amounts in minor units. Integers must fit I-JSON's +-(2**53 - 1)
(RFC 8785 section 3.2.2.3). Each author numbers its entries 0, 1, 2, ... (``seq``),
so a resubmission of identical bytes is idempotent and a different body at a used
``seq`` is a conflict. An author's first entry (seq 0) is its ``key`` entry, which
registers its public key in the ledger itself, so an audit needs nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.errors import EntryError, PublicKeyError
from ledger.keys import Signer, key_id, parse_public_key, verify_signature

__all__ = [
    "DOMAIN",
    "BULK_FIELD",
    "BULK_KINDS",
    "ENVELOPE_FIELDS",
    "KEY_KIND",
    "Entry",
    "KeyRing",
    "KindSpec",
    "encode_payload",
    "kind_spec",
    "make_key_entry",
    "parse_entry",
    "register_kind",
    "sign_entry",
    "split_bulk",
    "with_bulk",
]

DOMAIN = b"poi/ledger/entry/v1\n"
SEPARATOR = b"\n"
_SIGNATURE_TEXT_SIZE = 88  # base64 of 64 bytes
ENVELOPE_FIELDS = ("kind", "v", "author", "seq")
KEY_KIND = "key"
_MAX_JSON_INTEGER = 2**53 - 1  # RFC 8785 section 3.2.2.3 / I-JSON
# Bulk fields: an entry whose payload would pass BULK_THRESHOLD bytes (a round's lists at
# 1,024 subscribers) carries its list and object fields in a blob instead, named by
# this field (the blob's SHA-256, so the signature covers its bytes).
BULK_FIELD = "bulk_digest"
BULK_THRESHOLD = 16 * 1024
# Only the operator's and the Scientist's entries that grow with the federation may
# spill; any other kind carrying bulk_digest is malformed (a subscriber cannot make its
# candidate or ballot unreadable by naming a blob nobody has).
BULK_KINDS = frozenset({"selection", "validation_marginals", "settlement", "fee_settlement"})
MAX_BULK_BYTES = 4 * 2**20  # 1,024 subscribers' settlement is about 140 KB

JsonType = type | tuple[type, ...]


@dataclass(frozen=True)
class KindSpec:
    """An entry kind, its current version and its required fields with their JSON types."""

    kind: str
    version: int
    required: Mapping[str, JsonType]

    def check(self, fields: Mapping[str, Any]) -> None:
        """Raise :class:`EntryError` unless every required field is present with its type
        (an entry with ``bulk_digest`` may keep required fields in its bulk blob: they
        are checked when :func:`with_bulk` merges it)."""
        spilled = BULK_FIELD in fields
        if spilled:
            digest = fields[BULK_FIELD]
            if self.kind not in BULK_KINDS:
                raise EntryError(f"expected no {BULK_FIELD!r} in a {self.kind!r} entry (only "
                                 f"{sorted(BULK_KINDS)} may keep fields in a blob), got one")
            if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
                raise EntryError(f"expected {BULK_FIELD} as 64 lowercase hex digits, got "
                                 f"{digest!r}")
        for name, expected in self.required.items():
            if name not in fields:
                if spilled:
                    continue
                raise EntryError(f"expected field {name!r} in a {self.kind!r} entry, got none")
            value = fields[name]
            if isinstance(value, bool) and bool not in _as_tuple(expected):
                raise EntryError(f"expected {name!r} of type {expected}, got a boolean")
            if not isinstance(value, expected):
                raise EntryError(
                    f"expected {name!r} of type {_type_names(expected)} in a {self.kind!r} "
                    f"entry, got {type(value).__name__}"
                )


def _as_tuple(expected: JsonType) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _type_names(expected: JsonType) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(expected))


_KINDS: dict[str, KindSpec] = {}


def register_kind(kind: str, *, required: Mapping[str, JsonType], version: int = 1) -> KindSpec:
    """Register an entry kind (market code adds ``reveal``, ``settlement``, ``fund``...).

    Re-registering an identical spec is a no-op; a different spec for a known kind
    raises :class:`EntryError`, so two modules cannot silently disagree.
    """
    reserved = set(required) & set(ENVELOPE_FIELDS)
    if reserved:
        raise EntryError(
            f"expected no envelope fields among required fields, got {sorted(reserved)}"
        )
    spec = KindSpec(kind=kind, version=version, required=MappingProxyType(dict(required)))
    known = _KINDS.get(kind)
    if known is not None and (known.version, dict(known.required)) != (version, dict(required)):
        raise EntryError(f"kind {kind!r} is already registered with a different spec")
    _KINDS[kind] = spec
    return spec


def kind_spec(kind: str) -> KindSpec:
    """The registered spec of ``kind``; raises :class:`EntryError` for an unknown kind."""
    try:
        return _KINDS[kind]
    except KeyError:
        raise EntryError(f"expected a registered entry kind, got {kind!r}") from None


_ROUND = {"task_id": str, "round": int}
register_kind(KEY_KIND, required={"public_key": str})
register_kind("task", required={"task_id": str})
register_kind("candidate", required={**_ROUND, "update_digest": str})
register_kind(
    "vote",
    required={**_ROUND, "candidate": str, "base_loss_micro": int, "candidate_loss_micro": int},
)
# the marginal vote: one ballot per voter and round, then the Scientist's numbers
register_kind("ballot", required={**_ROUND, "base_digest": str, "trusted_digest": str,
                                  "aggregate_digest": str, "trusted_size": int,
                                  "marginals_micro": dict})
register_kind("validation_marginals", required={**_ROUND, "base_digest": str,
                                                "trusted_digest": str, "aggregate_digest": str,
                                                "marginals_micro": dict})
register_kind("rejection", required={**_ROUND, "reason": str})
register_kind("selection", required={**_ROUND, "selected": list})
register_kind("score", required={**_ROUND, "loss_micro": int})
register_kind("model", required={**_ROUND, "model_digest": str})
register_kind(
    "cosignature", required={"tree_size": int, "root_hash": str, "witness": str, "note": str}
)
# The market (docs/market.md). Amounts are integers in minor units.
register_kind("fund", required={"account": str, "amount": int, "memo": str})
register_kind("offer", required={
    "task_id": str, "model_digest": str, "architecture": dict, "validation_root": str,
    "validation_count": int, "reward": int, "deposit": int, "update_fee": int,
    "max_updates": int, "buyer_fee": int, "scientist_fee_share_ppm": int,
    "reveal_deadline_rounds": int, "score_tolerance_micro": int, "patience": int,
})
register_kind("escrow", required={"task_id": str, "account": str, "amount": int})
register_kind("close", required={**_ROUND, "reason": str})
register_kind("reveal", required={"task_id": str, "validation_digest": str, "count": int})
register_kind("deadline", required={**_ROUND})
register_kind("fee_settlement", required={
    "task_id": str, "buyer": str, "voucher": dict, "voucher_signature": str, "amount": int,
    "cumulative": int, "payouts": dict,
})
register_kind("settlement", required={
    "task_id": str, "forfeited": bool, "reason": str, "payouts": dict,
    "reward_payouts": dict, "fee_payouts": dict, "scientist_refund": int, "losses_micro": list,
})


def _check_json_value(value: object, path: str) -> None:
    """Refuse anything but null, booleans, integers, strings, lists and str-keyed objects."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > _MAX_JSON_INTEGER:
            raise EntryError(f"expected |integer| <= 2**53 - 1 at {path}, got {value}")
        return
    if isinstance(value, float):
        raise EntryError(
            f"expected an integer at {path}, got float {value!r}: "
            "store micro-units (loss_micro = round(loss * 1e6)), not floats"
        )
    if isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            _check_json_value(item, f"{path}[{position}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EntryError(f"expected string keys at {path}, got {key!r}")
            _check_json_value(item, f"{path}.{key}")
        return
    raise EntryError(f"expected a JSON value at {path}, got {type(value).__name__}")


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """RFC 8785 canonical JSON of an integers-only payload; raises :class:`EntryError`."""
    _check_json_value(payload, "$")
    try:
        return rfc8785.dumps(payload)
    except rfc8785.CanonicalizationError as error:
        raise EntryError(f"expected a canonicalizable payload, got: {error}") from error


# The stdlib's C JSON encoder, configured like RFC 8785 for what _check_json_value lets
# through (no floats): same separators, same string escaping (\b \f \n \r \t \" \\,
# other controls as lowercase \u00xx, everything else raw UTF-8), same integers. It
# differs only in key order, by code point instead of UTF-16 code unit, and the two
# orders agree unless a key holds a character >= U+E000 (UTF-8 lead bytes 0xEE-0xF4).
_FAST_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)
_AT_OR_ABOVE_U_E000 = re.compile(rb"[\xee-\xff]")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def _is_canonical(decoded: dict[str, Any], payload: bytes) -> bool:
    """True when ``payload`` is exactly the RFC 8785 encoding of ``decoded``.

    Raises :class:`EntryError` as :func:`encode_payload` does. A payload the fast C
    encoder reproduces byte for byte, with no character >= U+E000, is canonical;
    anything else is decided by ``rfc8785`` itself, so the answer never differs.
    """
    _check_json_value(decoded, "$")
    if _AT_OR_ABOVE_U_E000.search(payload) is None:
        try:
            if _FAST_ENCODER.encode(decoded).encode("utf-8") == payload:
                return True
        except (UnicodeEncodeError, ValueError):
            pass
    return encode_payload(decoded) == payload


@dataclass(frozen=True)
class Entry:
    """A parsed leaf: the envelope, the kind's fields, and the exact stored bytes."""

    kind: str
    version: int
    author: str
    seq: int
    fields: Mapping[str, Any] = field(repr=False)
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    leaf: bytes = field(repr=False)

    def signed_message(self) -> bytes:
        return DOMAIN + self.payload


def sign_entry(
    signer: Signer,
    kind: str,
    *,
    seq: int,
    fields: Mapping[str, Any],
    version: int | None = None,
) -> bytes:
    """Build, check and sign an entry; returns the leaf bytes to append.

    ``fields`` must hold the kind's required fields and no envelope field; ``version``
    defaults to the kind's registered version. Raises :class:`EntryError`.
    """
    spec = kind_spec(kind)
    clash = set(fields) & set(ENVELOPE_FIELDS)
    if clash:
        raise EntryError(f"expected no envelope fields in fields, got {sorted(clash)}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise EntryError(f"expected seq to be an integer >= 0, got {seq!r}")
    _check_json_value(fields, "$")
    spec.check(fields)
    payload = encode_payload(
        {
            **fields,
            "kind": kind,
            "v": spec.version if version is None else version,
            "author": signer.key_id,
            "seq": seq,
        }
    )
    signature = signer.sign(DOMAIN + payload)
    return payload + SEPARATOR + base64.b64encode(signature)


def make_key_entry(signer: Signer) -> bytes:
    """The author's ``key`` entry (seq 0), registering its public key in the ledger."""
    public_key = base64.b64encode(signer.public_key_bytes).decode()
    return sign_entry(signer, kind=KEY_KIND, seq=0, fields={"public_key": public_key})


def split_bulk(fields: Mapping[str, Any], *, threshold: int | None = None
               ) -> tuple[dict[str, Any], bytes | None]:
    """``(inline fields, bulk blob)`` for an entry about to be signed: when the canonical
    JSON of ``fields`` passes ``threshold`` bytes (default :data:`BULK_THRESHOLD`), every
    list- or object-valued field moves into the blob (RFC 8785 canonical JSON of an
    object), and the caller stores it and adds its digest as ``bulk_digest``. Small
    entries come back unchanged with no blob."""
    _check_json_value(fields, "$")
    limit = BULK_THRESHOLD if threshold is None else threshold
    if BULK_FIELD in fields:
        raise EntryError(f"expected no {BULK_FIELD!r} among the fields to split, got one")
    if len(encode_payload(fields)) <= limit:
        return dict(fields), None
    bulk = {k: v for k, v in fields.items() if isinstance(v, list | tuple | Mapping)}
    if not bulk:
        return dict(fields), None
    inline = {k: v for k, v in fields.items() if k not in bulk}
    return inline, encode_payload(bulk)


def with_bulk(entry: Entry, get: Callable[[str], bytes]) -> Entry:
    """``entry`` with its bulk blob's fields merged in (``entry`` itself when it has
    none). ``get(digest)`` returns the blob's bytes checked against the digest (a
    :class:`~ledger.blobs.BlobStore`'s ``get``). Raises :class:`EntryError` when the
    blob is not canonical JSON of an object, names an envelope field, ``bulk_digest``
    or an inline field again, or the merged fields miss a required one."""
    if BULK_FIELD not in entry.fields:
        return entry
    kind_spec(entry.kind).check(entry.fields)  # a bulk kind and a digest, as parse_entry
    digest = str(entry.fields[BULK_FIELD])
    where = f"{entry.kind!r} entry's bulk blob"
    data = get(digest)
    if len(data) > MAX_BULK_BYTES:
        raise EntryError(f"{where}: expected at most {MAX_BULK_BYTES} bytes, got {len(data)}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise EntryError(f"{where}: expected bytes hashing to {digest}, got others")
    try:
        decoded = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise EntryError(f"{where}: expected JSON, got: {error!r}"[:300]) from None
    if not isinstance(decoded, dict) or not decoded:
        raise EntryError(f"{where}: expected a non-empty JSON object, got "
                         f"{type(decoded).__name__}")
    try:
        canonical = _is_canonical(decoded, data)
    except RecursionError:
        canonical = False
    if not canonical:
        raise EntryError(f"{where}: expected RFC 8785 canonical JSON, got bytes that "
                         "re-encode differently")
    scalar = sorted(k for k, v in decoded.items() if not isinstance(v, list | dict))
    if scalar:
        raise EntryError(f"{where}: expected only list and object fields, got {scalar}")
    clash = sorted(set(decoded) & (set(entry.fields) | set(ENVELOPE_FIELDS) | {BULK_FIELD}))
    if clash:
        raise EntryError(f"{where}: expected fields the entry does not carry, got {clash} "
                         "again")
    merged = {**entry.fields, **decoded}
    del merged[BULK_FIELD]
    spec = kind_spec(entry.kind)
    spec.check(merged)
    return replace(entry, fields=MappingProxyType(merged))


def _reject_constant(name: str) -> None:
    raise EntryError(f"expected an integer, got {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_entry(leaf: bytes) -> Entry:
    """Split a leaf, check its payload is canonical JSON of a known kind; no signature check.

    Raises :class:`EntryError` naming what was expected and what came.
    """
    cut = len(leaf) - _SIGNATURE_TEXT_SIZE - 1
    if cut <= 0 or leaf[cut : cut + 1] != SEPARATOR:
        raise EntryError(
            f"expected payload || 0x0A || 88 base64 characters, got {len(leaf)} bytes without it"
        )
    payload, signature_text = leaf[:cut], leaf[cut + 1 :]
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise EntryError("expected a base64 signature after the payload") from error
    if base64.b64encode(signature) != signature_text:
        raise EntryError("expected canonical base64 for the signature")
    try:
        # json.loads(payload, parse_constant=...) without building a decoder per call.
        decoded = _DECODER.decode(payload.decode(json.detect_encoding(payload), "surrogatepass"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise EntryError(f"expected a JSON payload, got: {error!r}"[:300]) from None
    if not isinstance(decoded, dict):
        raise EntryError(f"expected a JSON object payload, got {type(decoded).__name__}")
    if not _is_canonical(decoded, payload):
        raise EntryError("expected RFC 8785 canonical JSON, got bytes that re-encode differently")
    kind, version, author, seq = (decoded.get(name) for name in ENVELOPE_FIELDS)
    if not isinstance(kind, str):
        raise EntryError(f"expected a string 'kind', got {kind!r}")
    spec = kind_spec(kind)
    for name, value in (("v", version), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EntryError(f"expected {name!r} to be an integer >= 0, got {value!r}")
    if not isinstance(author, str) or not author:
        raise EntryError(f"expected a key id in 'author', got {author!r}")
    assert isinstance(version, int) and isinstance(seq, int)
    fields = {name: value for name, value in decoded.items() if name not in ENVELOPE_FIELDS}
    spec.check(fields)
    return Entry(
        kind=kind,
        version=version,
        author=author,
        seq=seq,
        fields=MappingProxyType(fields),
        payload=payload,
        signature=signature,
        leaf=leaf,
    )


class KeyRing:
    """Authors' public keys by key id, filled from ``key`` entries; verifies entries.

    Keys are checked by :func:`ledger.keys.parse_public_key` on registration, so a
    small-order or non-canonical key never gets in.
    """

    def __init__(self) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}

    def __contains__(self, author: object) -> bool:
        return author in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def public_key(self, author: str) -> Ed25519PublicKey:
        """The registered key of ``author``; raises :class:`EntryError` if unknown."""
        try:
            return self._keys[author]
        except KeyError:
            raise EntryError(f"expected a registered author, got unknown key id {author}") from None

    def register_key(self, raw: bytes) -> str:
        """Register a raw Ed25519 key; returns its key id. Raises PublicKeyError."""
        public_key = parse_public_key(raw)
        author = key_id(raw)
        self._keys[author] = public_key
        return author

    def verify(self, leaf: bytes) -> Entry:
        """Parse ``leaf`` and verify its signature; ``key`` entries verify with their own key.

        Does not register anything. Raises :class:`EntryError` (a weak key in a ``key``
        entry included).
        """
        entry = parse_entry(leaf)
        if entry.kind == KEY_KIND:
            public_key = self._key_from_key_entry(entry)
        else:
            public_key = self.public_key(entry.author)
        if not verify_signature(public_key, entry.signature, entry.signed_message()):
            raise EntryError(f"signature by {entry.author} (seq {entry.seq}) does not verify")
        return entry

    def admit(self, leaf: bytes) -> Entry:
        """:meth:`verify`, then register the key of a ``key`` entry."""
        entry = self.verify(leaf)
        if entry.kind == KEY_KIND:
            self._keys[entry.author] = self._key_from_key_entry(entry)
        return entry

    @staticmethod
    def _key_from_key_entry(entry: Entry) -> Ed25519PublicKey:
        try:
            raw = base64.b64decode(entry.fields["public_key"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise EntryError("expected a base64 public key in the key entry") from error
        if key_id(raw) != entry.author:
            raise EntryError(f"expected author {key_id(raw)} for this key, got {entry.author}")
        if entry.seq != 0:
            raise EntryError(f"expected a key entry at seq 0, got seq {entry.seq}")
        try:
            return parse_public_key(raw)
        except PublicKeyError as error:
            raise EntryError(f"key entry of {entry.author}: {error}") from error
