from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crypto.digests import canonical_tensor_bytes, tensors_digest


def test_known_answer() -> None:
    tensors = {"b": np.array([1.0], dtype=np.float32), "a": np.zeros((1, 2), dtype=np.float32)}
    expected = (
        b"\x00\x00\x00\x01a" + b"\x00\x00\x00\x03<f4" + b"\x00\x00\x00\x02"
        + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + b"\x00" * 8
        + b"\x00\x00\x00\x01b" + b"\x00\x00\x00\x03<f4" + b"\x00\x00\x00\x01"
        + (1).to_bytes(8, "big") + b"\x00\x00\x80\x3f"
    )
    assert canonical_tensor_bytes(tensors) == expected
    assert tensors_digest(tensors) == hashlib.sha256(expected).hexdigest()


def test_byte_order_and_layout_do_not_change_the_digest() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    big = a.astype(">f4")
    fortran = np.asfortranarray(a)
    assert tensors_digest({"w": a}) == tensors_digest({"w": big}) == tensors_digest({"w": fortran})


def test_shape_dtype_and_name_are_bound() -> None:
    a = np.arange(6, dtype=np.float32)
    base = tensors_digest({"w": a})
    assert tensors_digest({"w": a.reshape(2, 3)}) != base
    assert tensors_digest({"w": a.astype(np.float64)}) != base
    assert tensors_digest({"v": a}) != base


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=5),
                  elements=st.floats(-1e3, 1e3, width=32)),
       st.integers(min_value=0, max_value=10_000))
def test_any_changed_element_changes_the_digest(array: np.ndarray, position: int) -> None:
    mutated = array.copy().reshape(-1)
    index = position % mutated.size
    mutated[index] = np.float32(mutated[index] + 1.0) if mutated[index] < 1e3 else np.float32(0.5)
    assert tensors_digest({"w": array}) != tensors_digest({"w": mutated.reshape(array.shape)})
