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


def unpack(record: ArrayRecord, layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a packed ``record``, shaped as ``layout`` (the receiver's own
    model). Raises :class:`WireError` unless it is exactly one float32 vector of the
    model's size; checks the declared size before decoding anything."""
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
    if len(array.data) > 4 * expected + 4096:  # the .npy header is about 128 bytes
        raise WireError(f"packed model: expected at most {4 * expected + 4096} bytes, got "
                        f"{len(array.data)}")
    try:
        flat = array.numpy()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's fault
        raise WireError(f"packed model cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if flat.dtype != np.float32 or flat.shape != (expected,):
        raise WireError(f"packed model: expected {expected} float32 values, the data holds "
                        f"{flat.dtype} {flat.shape}")
    pieces: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        target = np.asarray(layout[name])
        pieces[name] = flat[offset:offset + target.size].reshape(target.shape)
        offset += target.size
    return {name: pieces[name] for name in layout}  # the receiver's own order
