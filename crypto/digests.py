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
