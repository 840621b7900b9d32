"""The "single" layout's circuit in :mod:`crypto.he`: one replicated sample per ciphertext,
the first layer as one plaintext mask and log2(4096 / B) rotate-and-sums, the square, the
second layer as a mask and log2(B) rotate-and-sums before the last rescale, and an output
plaintext that holds the output bias at slots B k and fresh noise everywhere else (B = the
model's block, 32 up to 32 hidden units: 7 and 5 rotations; slot maps in the package
docstring). Plain functions of the model's folded weights; :class:`EncryptedModel` caches
the masks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import _JUNK_NOISE, ModelShape
from crypto.he.seal import _SealState
from crypto.he.server import ServerContext


def single_masks(st: _SealState, shape: ModelShape, w1: np.ndarray, b1: np.ndarray,
                 w2: np.ndarray) -> tuple[Any, Any]:
    """The two plaintext masks, B = ``shape.block`` (32 for up to 32 hidden units): slot
    B i + j = W1[j, i] (the bias as column F) at level 0, and slot B k + j = W2[k, j] at
    level 2. Precondition: the layout supports ``shape``."""
    hidden_units, block = w1.shape[0], shape.block
    slots = st.params.slots
    block1 = np.zeros((block, shape.features + 1))
    block1[:hidden_units] = np.concatenate([w1, b1[:, None]], axis=1)
    mask1 = np.zeros(slots)
    mask1[:block1.size] = block1.T.reshape(-1)  # slot B i + j = W1[j, i]
    block2 = np.zeros((shape.classes, block))
    block2[:, :hidden_units] = w2
    mask2 = np.zeros(slots)
    mask2[:block2.size] = block2.reshape(-1)  # slot B k + j = W2[k, j]
    return st.encode(mask1, 0, st.w1_scale), st.encode(mask2, 2, st.w2_scale)


def evaluate_single(ctx: ServerContext, shape: ModelShape, ct: Any,
                    masks: tuple[Any, Any] | None, b2: np.ndarray) -> list[Any]:
    """The reply's one ciphertext for the request ciphertext ``ct`` (evaluated in place);
    ``masks`` from :func:`single_masks`, or None when every logit is a constant."""
    st = ctx._state
    ev = st.evaluator
    out_bias = np.zeros(st.params.slots)
    noise = np.frombuffer(os.urandom(8 * out_bias.size), dtype=np.uint64)
    out_bias[:] = (noise / 2.0**64 * 2.0 - 1.0) * _JUNK_NOISE
    out_bias[0:shape.classes * shape.block:shape.block] = b2
    first_layer, second_layer = shape.single_steps()
    if masks is None:  # every logit is a constant
        result = ctx._zero(3, st.output_scale)
    else:
        mask1, mask2 = masks
        rotated = _seal.Ciphertext()
        ev.multiply_plain_inplace(ct, mask1)
        ev.rescale_to_next_inplace(ct)
        for step in first_layer:
            ev.rotate_vector(ct, step, ctx._galois, rotated)
            ev.add_inplace(ct, rotated)
        ev.square_inplace(ct)
        ev.relinearize_inplace(ct, ctx._relin)
        ev.rescale_to_next_inplace(ct)
        ev.multiply_plain_inplace(ct, mask2)
        for step in second_layer:  # before the rescale: it divides the rotation noise too
            ev.rotate_vector(ct, step, ctx._galois, rotated)
            ev.add_inplace(ct, rotated)
        ev.rescale_to_next_inplace(ct)
        result = ct
    ev.add_plain_inplace(result, st.encode(out_bias, 3, result.scale))
    return [result]
