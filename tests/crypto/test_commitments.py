"""Salted example commitments and the reveal blob (``crypto.commitments``), and the strict
parser of the canonical tensor encoding they rest on (``crypto.digests``)."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.commitments import (
    DOMAIN,
    SALT_BYTES,
    Revealed,
    RevealError,
    commit_example,
    commitments,
    decode_reveal,
    encode_reveal,
    new_salts,
)
from crypto.digests import (
    TensorEncodingError,
    canonical_tensor_bytes,
    parse_canonical_tensor_bytes,
)


def header(name: bytes, dtype: bytes, shape: tuple[int, ...]) -> bytes:
    """One tensor's header, by the format in ``crypto.digests``' docstring."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(dtype)) + dtype
            + struct.pack(">I", len(shape)) + b"".join(struct.pack(">Q", d) for d in shape))


# ------------------------------------------------------------------------ known answer
def test_commitment_known_answer() -> None:
    salt = bytes(range(32))
    # x = [1.0, -2.5, 0.5] as little-endian float32: 0x3f800000, 0xc0200000, 0x3f000000
    x_bytes = b"\x00\x00\x80\x3f" + b"\x00\x00\x20\xc0" + b"\x00\x00\x00\x3f"
    # y = -3 as little-endian int64 (two's complement): fd ff ff ff ff ff ff ff
    y_bytes = b"\xfd" + b"\xff" * 7
    body = (
        b"\x00\x00\x00\x01" + b"x"              # name length 1, name
        + b"\x00\x00\x00\x03" + b"<f4"          # dtype length 3, dtype
        + b"\x00\x00\x00\x01"                   # ndim 1
        + b"\x00" * 7 + b"\x03"                 # dim 0 = 3 (u64 big-endian)
        + x_bytes
        + b"\x00\x00\x00\x01" + b"y"
        + b"\x00\x00\x00\x03" + b"<i8"
        + b"\x00\x00\x00\x00"                   # ndim 0: a scalar, no dims
        + y_bytes
    )
    assert DOMAIN == b"poi/validation-example/v1\x00"
    assert body == header(b"x", b"<f4", (3,)) + struct.pack("<3f", 1.0, -2.5, 0.5) \
        + header(b"y", b"<i8", ()) + struct.pack("<q", -3)
    expected = hashlib.sha256(b"poi/validation-example/v1\x00" + salt + body).digest()
    x = np.array([1.0, -2.5, 0.5], dtype=np.float32)
    assert commit_example(salt, x, -3) == expected
    # the same example given as a float64 list, a big-endian array, a numpy integer label
    assert commit_example(salt, [1.0, -2.5, 0.5], np.int64(-3)) == expected
    assert commit_example(salt, x.astype(">f4"), -3) == expected
    # the commitments of a Revealed set are the per-example ones, in order
    other = bytes(32)
    revealed = Revealed(x=np.stack([x, x[::-1]]), y=np.array([-3, 7]),
                        salts=np.frombuffer(salt + other, dtype=np.uint8).reshape(2, 32))
    assert commitments(revealed) == [expected, commit_example(other, x[::-1], 7)]


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_a_salt_of_the_wrong_length_is_rejected(length: int) -> None:
    with pytest.raises(ValueError, match="32-byte salt"):
        commit_example(bytes(length), np.zeros(2, dtype=np.float32), 0)


# ------------------------------------------------------------------------------ binding
examples = st.integers(1, 6).flatmap(lambda d: st.tuples(
    st.lists(st.integers(0, 2**32 - 1), min_size=d, max_size=d),  # float32 bit patterns
    st.integers(-(2**63), 2**63 - 1),
    st.binary(min_size=32, max_size=32),
    st.integers(0, d - 1),
    st.integers(1, 2**32 - 1),  # a non-zero xor mask: a different float32 bit pattern
    st.integers(0, 31),
    st.integers(1, 255),
))


@settings(max_examples=150, deadline=None)
@given(examples, st.integers(-(2**63), 2**63 - 1))
def test_a_commitment_binds_every_feature_the_label_and_the_salt(
        example: tuple[list[int], int, bytes, int, int, int, int], other_label: int) -> None:
    bits, y, salt, i, mask, j, flip = example
    x = np.array(bits, dtype=np.uint32).view(np.float32)
    base = commit_example(salt, x, y)
    assert len(base) == 32
    assert commit_example(salt, x.copy(), y) == base  # deterministic
    changed = np.array(bits, dtype=np.uint32)
    changed[i] ^= mask  # includes 0.0 -> -0.0 and NaN payload changes
    assert commit_example(salt, changed.view(np.float32), y) != base
    if other_label != y:
        assert commit_example(salt, x, other_label) != base
    salt2 = bytearray(salt)
    salt2[j] ^= flip
    assert commit_example(bytes(salt2), x, y) != base
    # dropping or adding a feature changes the commitment too
    assert commit_example(salt, np.append(x, np.float32(0)), y) != base
    if len(x) > 1:
        assert commit_example(salt, x[:-1], y) != base


# ------------------------------------------------------------------------ reveal blobs
@st.composite
def revealed_sets(draw: st.DrawFn) -> Revealed:
    n = draw(st.integers(0, 5))
    d = draw(st.integers(0, 4))
    bits = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n * d, max_size=n * d))
    labels = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n))
    salts = draw(st.binary(min_size=32 * n, max_size=32 * n))
    return Revealed(x=np.array(bits, dtype=np.uint32).view(np.float32).reshape(n, d),
                    y=np.array(labels, dtype=np.int64),
                    salts=np.frombuffer(salts, dtype=np.uint8).reshape(n, 32))


def same(a: Revealed, b: Revealed) -> bool:
    return all(p.dtype == q.dtype and p.shape == q.shape and p.tobytes() == q.tobytes()
               for p, q in ((a.x, b.x), (a.y, b.y), (a.salts, b.salts)))


@settings(max_examples=100, deadline=None)
@given(revealed_sets())
def test_reveal_round_trip(revealed: Revealed) -> None:
    blob = encode_reveal(revealed)
    n, d = revealed.x.shape
    # layout: salt (n, 32) u1, then x (n, d) <f4, then y (n,) <i8 -- names in byte order
    assert blob == (header(b"salt", b"|u1", (n, 32)) + revealed.salts.tobytes()
                    + header(b"x", b"<f4", (n, d)) + revealed.x.astype("<f4").tobytes()
                    + header(b"y", b"<i8", (n,)) + revealed.y.astype("<i8").tobytes())
    back = decode_reveal(blob)
    assert same(back, revealed)
    assert len(back) == n
    assert commitments(back) == commitments(revealed)
    assert encode_reveal(back) == blob


def blob_of(tensors: dict[str, np.ndarray]) -> bytes:
    return canonical_tensor_bytes(tensors)


GOOD = {"salt": np.zeros((2, 32), dtype=np.uint8), "x": np.ones((2, 3), dtype=np.float32),
        "y": np.array([0, 1], dtype=np.int64)}


@pytest.mark.parametrize("tensors", [
    pytest.param({**GOOD, "z": np.zeros(1, dtype=np.uint8)}, id="extra-tensor"),
    pytest.param({k: v for k, v in GOOD.items() if k != "y"}, id="missing-y"),
    pytest.param({"salt": GOOD["salt"], "x": GOOD["x"], "yy": GOOD["y"]}, id="renamed-y"),
    pytest.param({**GOOD, "x": GOOD["x"].astype(np.float64)}, id="x-float64"),
    pytest.param({**GOOD, "y": GOOD["y"].astype(np.int32)}, id="y-int32"),
    pytest.param({**GOOD, "salt": GOOD["salt"].astype(np.int8)}, id="salt-int8"),
    pytest.param({**GOOD, "y": np.array([0, 1, 2], dtype=np.int64)}, id="n-of-y"),
    pytest.param({**GOOD, "x": np.ones((3, 3), dtype=np.float32)}, id="n-of-x"),
    pytest.param({**GOOD, "salt": np.zeros((3, 32), dtype=np.uint8)}, id="n-of-salt"),
    pytest.param({**GOOD, "salt": np.zeros((2, 31), dtype=np.uint8)}, id="salt-31-bytes"),
    pytest.param({**GOOD, "salt": np.zeros(64, dtype=np.uint8)}, id="salt-flat"),
    pytest.param({**GOOD, "x": np.ones(6, dtype=np.float32)}, id="x-flat"),
    pytest.param({**GOOD, "y": np.array(1, dtype=np.int64)}, id="y-scalar"),
    pytest.param({**GOOD, "x": np.ones((2, 3, 1), dtype=np.float32)}, id="x-3d"),
])
def test_decode_reveal_rejects_a_blob_of_the_wrong_shape(tensors: dict[str, np.ndarray]) -> None:
    decode_reveal(blob_of(GOOD))  # the unmutated blob decodes
    with pytest.raises(RevealError, match="reveal blob"):
        decode_reveal(blob_of(tensors))


def test_decode_reveal_rejects_truncated_extended_and_garbage_blobs() -> None:
    blob = blob_of(GOOD)
    for cut in (1, 4, 8, len(blob) // 2, len(blob) - 1):
        with pytest.raises(RevealError):
            decode_reveal(blob[:-cut])
    for tail in (b"\x00", b"\x00" * 4):
        with pytest.raises(RevealError):
            decode_reveal(blob + tail)
    # a fourth tensor is refused before it is parsed (the parser's limit is 3)
    with pytest.raises(RevealError, match="at most 3 tensors"):
        decode_reveal(blob + blob)
    for garbage in (b"\xff" * 64, b"not a reveal blob", bytes(3)):
        with pytest.raises(RevealError):
            decode_reveal(garbage)
    with pytest.raises(RevealError):  # empty: no tensors at all
        decode_reveal(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_reveal_raises_only_reveal_errors_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(RevealError):
        decode_reveal(data)


@settings(max_examples=200, deadline=None)
@given(revealed_sets(), st.data())
def test_a_mutated_reveal_blob_is_rejected_or_decodes_to_something_else(
        revealed: Revealed, data: st.DataObject) -> None:
    blob = bytearray(encode_reveal(revealed))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    try:
        back = decode_reveal(bytes(blob))
    except RevealError:
        return
    assert not same(back, revealed)
    assert encode_reveal(back) == bytes(blob)  # the encoding is canonical


# ------------------------------------------------------------------- the strict parser
SMALL = {"a": np.array([[1, 2]], dtype=np.int32), "b": np.array(7, dtype=np.int64),
         "c": np.array([0.5], dtype=np.float32)}


def test_parse_round_trips_every_accepted_dtype() -> None:
    tensors = {f"t{i}": np.arange(6).astype(dt).reshape(2, 3)
               for i, dt in enumerate(["<f4", "<f8", "<i8", "<i4", "|u1", "|i1"])}
    back = parse_canonical_tensor_bytes(canonical_tensor_bytes(tensors))
    assert list(back) == list(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)


def test_parse_rejects_names_out_of_order_or_repeated() -> None:
    a = header(b"a", b"|u1", (1,)) + b"\x01"
    b = header(b"b", b"|u1", (1,)) + b"\x02"
    assert list(parse_canonical_tensor_bytes(a + b)) == ["a", "b"]
    for data in (b + a, a + a, b + b):
        with pytest.raises(TensorEncodingError, match="ascending"):
            parse_canonical_tensor_bytes(data)
    # byte order, not code point order of a case-folded name: "B" (0x42) before "a" (0x61)
    big_b = header(b"B", b"|u1", (1,)) + b"\x03"
    assert list(parse_canonical_tensor_bytes(big_b + a)) == ["B", "a"]
    with pytest.raises(TensorEncodingError):
        parse_canonical_tensor_bytes(a + big_b)
    # a prefix sorts first: "a" before "aa"
    aa = header(b"aa", b"|u1", (1,)) + b"\x04"
    assert list(parse_canonical_tensor_bytes(a + aa)) == ["a", "aa"]
    with pytest.raises(TensorEncodingError):
        parse_canonical_tensor_bytes(aa + a)


@pytest.mark.parametrize("dtype", [b">f4", b"<f2", b"<u8", b"float32", b"", b"<f4 ", b"\xff\xfe",
                                   b"|b1", b"O"])
def test_parse_rejects_unknown_dtypes(dtype: bytes) -> None:
    with pytest.raises(TensorEncodingError, match="dtype"):
        parse_canonical_tensor_bytes(header(b"x", dtype, (1,)) + b"\x00" * 16)


def test_parse_rejects_bad_names_and_limits() -> None:
    with pytest.raises(TensorEncodingError, match="UTF-8"):
        parse_canonical_tensor_bytes(header(b"\xff", b"|u1", (1,)) + b"\x00")
    with pytest.raises(TensorEncodingError, match="ndim"):
        parse_canonical_tensor_bytes(header(b"x", b"|u1", (1,) * 3) + b"\x00", max_ndim=2)
    three = b"".join(header(n, b"|u1", ()) + b"\x00" for n in (b"a", b"b", b"c"))
    assert len(parse_canonical_tensor_bytes(three, max_tensors=3)) == 3
    with pytest.raises(TensorEncodingError, match="at most 2"):
        parse_canonical_tensor_bytes(three, max_tensors=2)
    # a name length far past the end
    with pytest.raises(TensorEncodingError):
        parse_canonical_tensor_bytes(struct.pack(">I", 2**32 - 1) + b"x")


@pytest.mark.parametrize("shape", [(2**40,), (2**32, 2**32), (2**64 - 1,), (2**20,) * 8,
                                   (3,), (2, 2)])
def test_parse_rejects_a_shape_larger_than_the_data_without_allocating(
        shape: tuple[int, ...]) -> None:
    # 12 bytes of data follow; every shape here needs more (3 float32 = 12 would fit:
    # use float64, 3 * 8 = 24 > 12). Fails fast: the check is on sizes, not on an
    # allocation (a 2**40-element array would need 8 TiB).
    with pytest.raises(TensorEncodingError, match="needs"):
        parse_canonical_tensor_bytes(header(b"x", b"<f8", shape) + b"\x00" * 12)


@pytest.mark.parametrize("shape", [(0, 2**63), (2**64 - 1, 0), (0, 2**62), (0, 2**40)])
def test_parse_rejects_an_impossible_zero_size_shape(shape: tuple[int, ...]) -> None:
    # a zero-size tensor needs no bytes, so the size check alone would let it through
    with pytest.raises(TensorEncodingError, match="dimension"):
        parse_canonical_tensor_bytes(header(b"x", b"<f4", shape))


def test_decode_reveal_rejects_an_impossible_zero_size_shape() -> None:
    blob = (header(b"salt", b"|u1", (0, 32)) + header(b"x", b"<f4", (0, 2**63))
            + header(b"y", b"<i8", (0,)))
    with pytest.raises(RevealError):
        decode_reveal(blob)


def test_parse_rejects_every_truncation_of_a_valid_encoding() -> None:
    data = canonical_tensor_bytes(SMALL)
    names = list(SMALL)
    # where each tensor's encoding ends: a prefix ending there is a valid smaller encoding
    ends = {len(canonical_tensor_bytes({n: SMALL[n] for n in names[:i]})): names[:i]
            for i in range(len(names) + 1)}
    assert len(ends) == 4 and len(data) in ends
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        if cut in ends:
            parsed = parse_canonical_tensor_bytes(prefix)
            assert list(parsed) == ends[cut]
            assert all(np.array_equal(parsed[n], SMALL[n]) for n in parsed)
            continue
        try:
            parse_canonical_tensor_bytes(prefix)
        except TensorEncodingError:
            continue
        raise AssertionError(f"prefix of {cut} bytes parsed")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_parse_raises_only_encoding_errors_and_accepts_only_canonical_bytes(data: bytes) -> None:
    try:
        parsed = parse_canonical_tensor_bytes(data)
    except TensorEncodingError:
        return
    assert canonical_tensor_bytes(parsed) == data


# ------------------------------------------------------------------------------- salts
def test_new_salts() -> None:
    salts = new_salts(64)
    assert salts.shape == (64, SALT_BYTES) == (64, 32)
    assert salts.dtype == np.uint8
    assert len({bytes(row) for row in salts}) == 64  # distinct (a collision has p ~ 2**-244)
    assert salts.flags.writeable and salts.flags.c_contiguous
    assert not np.array_equal(new_salts(1), new_salts(1))
    # not a constant pattern: 64 * 32 random bytes take many distinct values
    assert len(np.unique(salts)) > 100
    empty = new_salts(0)
    assert empty.shape == (0, 32) and empty.dtype == np.uint8
