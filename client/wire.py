"""A model on PoI's messages: one Array, not one per tensor.

Flower sends every record, Array and Array chunk of a message as an object of its own:
in a deployment, one HTTPS request each. Our task model has 4 tensors, so a train
message was 12 objects and a vote message with the base model, the trusted mean and 2
candidates 39; on 2 busy cores pulling those objects was the largest part of a deployed
vote phase (docs/deployment.md "Latency").

:func:`pack` sends a name -> float32 tensor mapping as ``ArrayRecord({PACKED: Array})``,
the tensors flattened and concatenated in ascending UTF-8 name order (the order of
:func:`crypto.digests.canonical_tensor_bytes`). Nothing describes the layout on the
wire: both sides build the same task model from the run config, and :func:`unpack`
takes the receiver's own model as the layout and refuses anything that does not fit it
exactly (one float32 vector of exactly the model's size), naming what it expected and
what came. Digests are computed on the unpacked tensors, as before, so the ledger does
not see the difference.

Who packs: the PoI strategy, on its train and vote requests; a subscriber answers a
packed train request with a packed update and anything else (Flower's own strategies,
which average ArrayRecords tensor by tensor) as before. A mapping that is not all
float32 is sent as before.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

PACKED = "poi.packed-float32"


class WireError(ValueError):
    """A packed model that does not fit the task model."""


def _order(names: object) -> list[str]:
    return sorted(names, key=lambda n: n.encode("utf-8"))  # type: ignore[attr-defined]


def can_pack(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(tensors) and all(np.asarray(v).dtype == np.float32 for v in tensors.values())


def pack(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """One float32 Array holding every tensor (see the module docstring); a mapping that
    is not all float32 as one Array per tensor."""
    if not can_pack(tensors):
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
    flat = np.concatenate([np.asarray(tensors[name], dtype=np.float32).ravel()
                           for name in _order(tensors)])
    return ArrayRecord({PACKED: Array(flat)})


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED]


def _decode_vector(data: bytes, expected: int) -> np.ndarray:
    """The ``.npy`` payload of a packed model, read strictly and without ``np.load``: its
    header must declare exactly ``<f4``, C order and shape ``(expected,)``, and exactly
    ``4 * expected`` bytes must follow. A header may declare any shape; nothing is
    allocated before it has been checked."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"version {version}")
    except Exception as exc:  # noqa: BLE001 - any header failure is the sender's fault
        raise WireError(f"packed model: not a plain .npy vector ({type(exc).__name__}: "
                        f"{exc})") from exc
    if dtype != np.dtype("<f4") or fortran or tuple(shape) != (expected,):
        raise WireError(f"packed model: the data declares dtype {dtype.str} shape "
                        f"{tuple(shape)}{' (Fortran order)' if fortran else ''}, expected "
                        f"<f4 ({expected},)")
    offset = buffer.tell()
    if len(data) - offset != 4 * expected:
        raise WireError(f"packed model: expected {4 * expected} bytes of data after the "
                        f"header, got {len(data) - offset}")
    return np.frombuffer(data, dtype="<f4", offset=offset).astype(np.float32)  # a copy


def unpack(record: ArrayRecord, layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a packed ``record``, shaped as ``layout`` (the receiver's own
    model). Raises :class:`WireError` unless it is exactly one float32 vector of the
    model's size, in the Array's description and in its ``.npy`` header alike."""
    if not is_packed(record):
        raise WireError(f"expected one packed array '{PACKED}', got {sorted(record.keys())}")
    array = record[PACKED]
    names = _order(layout)
    expected = int(sum(np.asarray(layout[n]).size for n in names))
    shape = tuple(int(s) for s in array.shape)
    if str(array.dtype) != "float32" or shape != (expected,):
        model = ", ".join(f"{n} {tuple(np.asarray(layout[n]).shape)}" for n in names)
        raise WireError(f"packed model: expected one float32 vector of {expected} values "
                        f"({model}), got dtype {array.dtype} shape {shape}")
    flat = _decode_vector(bytes(array.data), expected)
    pieces: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        target = np.asarray(layout[name])
        pieces[name] = flat[offset:offset + target.size].reshape(target.shape)
        offset += target.size
    return {name: pieces[name] for name in layout}  # the receiver's own order
