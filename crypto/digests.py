"""Digests of model tensors over our own canonical byte encoding.

Flower's ``ArrayRecord.object_id`` hashes Flower's serialization, which can change between
releases; ledger entries must not depend on it. The canonical encoding here is fixed:

    for each tensor, names in ascending UTF-8 byte order:
        u32 len(name) || name (UTF-8) || u32 len(dtype) || dtype ('<f4', numpy ``.str``)
        || u32 ndim || u64 dim_0 .. dim_{ndim-1} || raw little-endian C-order bytes

all integers big-endian, then SHA-256 over the concatenation.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np


def canonical_tensor_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The canonical encoding of a name -> tensor mapping (see the module docstring)."""
    parts: list[bytes] = []
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        array = np.asarray(tensors[name])
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        dtype = little.dtype.str.encode("ascii")
        encoded_name = name.encode("utf-8")
        parts.append(struct.pack(">I", len(encoded_name)) + encoded_name)
        parts.append(struct.pack(">I", len(dtype)) + dtype)
        parts.append(struct.pack(">I", array.ndim))
        parts.append(b"".join(struct.pack(">Q", d) for d in array.shape))
        parts.append(np.ascontiguousarray(little).tobytes())
    return b"".join(parts)


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """Hex SHA-256 of :func:`canonical_tensor_bytes`."""
    return hashlib.sha256(canonical_tensor_bytes(tensors)).hexdigest()


class TensorEncodingError(ValueError):
    """Bytes that are not a canonical tensor encoding (see the module docstring)."""


_MAX_DIM = 2**32  # no tensor of ours comes near; refuses absurd zero-size shapes too
_DTYPES = frozenset({"<f4", "<f8", "<i8", "<i4", "|u1", "|i1"})


def parse_canonical_tensor_bytes(
    data: bytes, *, max_tensors: int = 64, max_ndim: int = 8
) -> dict[str, np.ndarray]:
    """Decode :func:`canonical_tensor_bytes` strictly: names in ascending order without
    repeats, a known little-endian dtype, sizes that fit the data exactly. Raises
    :class:`TensorEncodingError` naming what was expected and what came."""
    view = memoryview(data)
    offset = 0
    out: dict[str, np.ndarray] = {}
    previous: bytes | None = None

    def take(count: int, what: str) -> bytes:
        nonlocal offset
        if count < 0 or offset + count > len(view):
            raise TensorEncodingError(
                f"expected {count} bytes of {what} at offset {offset}, "
                f"only {len(view) - offset} left")
        chunk = bytes(view[offset:offset + count])
        offset += count
        return chunk

    while offset < len(view):
        if len(out) >= max_tensors:
            raise TensorEncodingError(f"expected at most {max_tensors} tensors")
        (name_len,) = struct.unpack(">I", take(4, "name length"))
        raw_name = take(name_len, "name")
        if previous is not None and raw_name <= previous:
            raise TensorEncodingError(
                f"expected tensor names in ascending order without repeats, got "
                f"{raw_name!r} after {previous!r}")
        previous = raw_name
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise TensorEncodingError(f"expected a UTF-8 tensor name, got {raw_name!r}") from None
        (dtype_len,) = struct.unpack(">I", take(4, "dtype length"))
        dtype = take(dtype_len, "dtype").decode("ascii", errors="replace")
        if dtype not in _DTYPES:
            raise TensorEncodingError(
                f"tensor {name!r}: expected a dtype in {sorted(_DTYPES)}, got {dtype!r}")
        (ndim,) = struct.unpack(">I", take(4, "ndim"))
        if ndim > max_ndim:
            raise TensorEncodingError(f"tensor {name!r}: expected ndim <= {max_ndim}, got {ndim}")
        shape = struct.unpack(f">{ndim}Q", take(8 * ndim, "shape")) if ndim else ()
        itemsize = np.dtype(dtype).itemsize
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if nbytes > len(view) - offset:
            raise TensorEncodingError(
                f"tensor {name!r}: shape {tuple(shape)} needs {nbytes} bytes, "
                f"only {len(view) - offset} left")
        if any(dim > _MAX_DIM for dim in shape):
            raise TensorEncodingError(
                f"tensor {name!r}: expected every dimension <= {_MAX_DIM}, got {tuple(shape)}")
        raw = take(nbytes, f"tensor {name!r}")
        out[name] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    return out
