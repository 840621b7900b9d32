"""A model on PoI's messages: one Array, not one per tensor.

Flower sends every record, Array and Array chunk of a message as an object of its own:
in a deployment, one HTTPS request each. Our task model has 4 tensors, so a train
message was 12 objects and a vote message with the base model, the trusted mean and 2
candidates 39 (now 6 and 15); on 2 busy cores pulling those objects was the largest
part of a deployed
vote phase (docs/deployment.md "Latency").

:func:`pack` sends a name -> tensor mapping whose tensors share one dtype, float32 (a
model or an update) or float64 (the marginal vote's trusted mean), as
``ArrayRecord({KEY: Array})`` with ``KEY`` naming the dtype (:data:`PACKED_KEYS`), the
tensors flattened and concatenated in ascending UTF-8 name order (the order of
:func:`crypto.digests.canonical_tensor_bytes`). Nothing describes the layout on the
wire: both sides build the same task model from the run config, and :func:`unpack`
takes the receiver's own model as the layout and refuses anything that does not fit it
exactly (one vector of the key's dtype and exactly the model's size), naming what it
expected and what came. Digests are computed on the unpacked tensors, as before, so the ledger does
not see the difference.

Who packs: the PoI strategy, on its train and vote requests; a subscriber answers a
packed train request with a packed update and anything else (Flower's own strategies,
which average ArrayRecords tensor by tensor) as before. A mapping of mixed or other
dtypes is sent as before.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

PACKED = "poi.packed-float32"
PACKED_FLOAT64 = "poi.packed-float64"
PACKED_KEYS: dict[str, np.dtype[Any]] = {PACKED: np.dtype("<f4"),
                                          PACKED_FLOAT64: np.dtype("<f8")}


class WireError(ValueError):
    """A packed model that does not fit the task model."""


def _order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: n.encode("utf-8"))


def _key_for(tensors: Mapping[str, np.ndarray]) -> str | None:
    dtypes = {np.asarray(v).dtype for v in tensors.values()}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    return next((key for key, wire in PACKED_KEYS.items() if dtype == wire), None)


def can_pack(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(tensors) and _key_for(tensors) is not None


def pack(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """One Array holding every tensor (see the module docstring); a mapping of mixed or
    other dtypes as one Array per tensor."""
    key = _key_for(tensors) if tensors else None
    if key is None:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
    dtype = PACKED_KEYS[key]
    flat = np.concatenate([np.asarray(tensors[name], dtype=dtype).ravel()
                           for name in _order(tensors)])
    return ArrayRecord({key: Array(flat)})


def is_packed(record: ArrayRecord) -> bool:
    keys = list(record.keys())
    return len(keys) == 1 and keys[0] in PACKED_KEYS


def _decode_vector(data: bytes, expected: int, dtype: np.dtype[Any]) -> np.ndarray:
    """The ``.npy`` payload of a packed model, read strictly and without ``np.load``: its
    header must declare exactly ``dtype``, C order and shape ``(expected,)``, and exactly
    ``expected * itemsize`` bytes must follow. A header may declare any shape; nothing is
    allocated before it has been checked."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, declared = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, declared = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"version {version}")
    except Exception as exc:  # noqa: BLE001 - any header failure is the sender's fault
        raise WireError(f"packed model: not a plain .npy vector ({type(exc).__name__}: "
                        f"{exc})") from exc
    if declared != dtype or fortran or tuple(shape) != (expected,):
        raise WireError(f"packed model: the data declares dtype {declared.str} shape "
                        f"{tuple(shape)}{' (Fortran order)' if fortran else ''}, expected "
                        f"{dtype.str} ({expected},)")
    offset = buffer.tell()
    size = expected * dtype.itemsize
    if len(data) - offset != size:
        raise WireError(f"packed model: expected {size} bytes of data after the "
                        f"header, got {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).astype(dtype.newbyteorder("="))


def unpack(record: ArrayRecord, layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a packed ``record``, shaped as ``layout`` (the receiver's own
    model; its dtypes do not matter, the key's does). Raises :class:`WireError` unless
    it is exactly one vector of the key's dtype and the model's size, in the Array's
    description and in its ``.npy`` header alike."""
    if not is_packed(record):
        raise WireError(f"expected one packed array ({' or '.join(PACKED_KEYS)}), got "
                        f"{sorted(record.keys())}")
    (key,) = record.keys()
    dtype = PACKED_KEYS[key]
    array = record[key]
    names = _order(layout)
    expected = int(sum(np.asarray(layout[n]).size for n in names))
    shape = tuple(int(s) for s in array.shape)
    if str(array.dtype) != dtype.name or shape != (expected,):
        model = ", ".join(f"{n} {tuple(np.asarray(layout[n]).shape)}" for n in names)
        raise WireError(f"packed model: expected one {dtype.name} vector of {expected} values "
                        f"({model}), got dtype {array.dtype} shape {shape}")
    flat = _decode_vector(bytes(array.data), expected, dtype)
    pieces: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        target = np.asarray(layout[name])
        pieces[name] = flat[offset:offset + target.size].reshape(target.shape)
        offset += target.size
    return {name: pieces[name] for name in layout}  # the receiver's own order
