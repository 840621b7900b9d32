"""The "single" layout's circuit in :mod:`crypto.he`: one replicated sample per ciphertext,
the first layer as one plaintext mask and 7 rotate-and-sums, the square, the second layer
as a mask and 5 rotate-and-sums before the last rescale, and an output plaintext that holds
the output bias at slots 32 k and fresh noise everywhere else (slot maps in the package
docstring). Plain functions of the model's folded weights; :class:`EncryptedModel` caches
the masks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import _BLOCK, _JUNK_NOISE, _L1_STEPS, _L2_STEPS, NUM_CLASSES, NUM_FEATURES
from crypto.he.seal import _SealState
from crypto.he.server import ServerContext


def single_masks(st: _SealState, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray
                 ) -> tuple[Any, Any]:
    """The two plaintext masks: slot 32 i + j = W1[j, i] (the bias as column 64) at level
    0, and slot 32 k + j = W2[k, j] at level 2. Precondition: at most 32 hidden units."""
    hidden_units = w1.shape[0]
    slots = st.params.slots
    block1 = np.zeros((_BLOCK, NUM_FEATURES + 1))
    block1[:hidden_units] = np.concatenate([w1, b1[:, None]], axis=1)
    mask1 = np.zeros(slots)
    mask1[:block1.size] = block1.T.reshape(-1)  # slot 32 i + j = W1[j, i]
    block2 = np.zeros((NUM_CLASSES, _BLOCK))
    block2[:, :hidden_units] = w2
    mask2 = np.zeros(slots)
    mask2[:block2.size] = block2.reshape(-1)  # slot 32 k + j = W2[k, j]
    return st.encode(mask1, 0, st.w1_scale), st.encode(mask2, 2, st.w2_scale)


def evaluate_single(ctx: ServerContext, ct: Any, masks: tuple[Any, Any] | None,
                    b2: np.ndarray) -> list[Any]:
    """The reply's one ciphertext for the request ciphertext ``ct`` (evaluated in place);
    ``masks`` from :func:`single_masks`, or None when every logit is a constant."""
    st = ctx._state
    ev = st.evaluator
    out_bias = np.zeros(st.params.slots)
    noise = np.frombuffer(os.urandom(8 * out_bias.size), dtype=np.uint64)
    out_bias[:] = (noise / 2.0**64 * 2.0 - 1.0) * _JUNK_NOISE
    out_bias[0:NUM_CLASSES * _BLOCK:_BLOCK] = b2
    if masks is None:  # every logit is a constant
        result = ctx._zero(3, st.output_scale)
    else:
        mask1, mask2 = masks
        rotated = _seal.Ciphertext()
        ev.multiply_plain_inplace(ct, mask1)
        ev.rescale_to_next_inplace(ct)
        for step in _L1_STEPS:
            ev.rotate_vector(ct, step, ctx._galois, rotated)
            ev.add_inplace(ct, rotated)
        ev.square_inplace(ct)
        ev.relinearize_inplace(ct, ctx._relin)
        ev.rescale_to_next_inplace(ct)
        ev.multiply_plain_inplace(ct, mask2)
        for step in _L2_STEPS:  # before the rescale: it divides the rotation noise too
            ev.rotate_vector(ct, step, ctx._galois, rotated)
            ev.add_inplace(ct, rotated)
        ev.rescale_to_next_inplace(ct)
        result = ct
    ev.add_plain_inplace(result, st.encode(out_bias, 3, result.scale))
    return [result]
