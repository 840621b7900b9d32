"""The "batch" layout's circuit in :mod:`crypto.he`: column packing (ciphertext i holds
feature i of every sample), each hidden unit and each logit a sum of ciphertext x scalar
products rescaled once (the deferred rescale), biases added as plaintexts at the exact
scale, no rotations. A plain function of the model's folded weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import NUM_CLASSES
from crypto.he.server import ServerContext


def evaluate_batch(ctx: ServerContext, cts: list[Any], *, w1: np.ndarray, b1: np.ndarray,
                   w2: np.ndarray, b2: np.ndarray) -> list[Any]:
    """The reply's ten logit ciphertexts for the 64 request ciphertexts ``cts``.
    Precondition: hidden units whose incoming weights are all zero were folded into ``b2``
    (as :class:`EncryptedModel` does), so every live unit has a nonzero weight."""
    st = ctx._state
    ev, enc = st.evaluator, st.encoder
    plain, product = _seal.Plaintext(), _seal.Ciphertext()
    level0, level2 = st.levels[0], st.levels[2]
    live = [j for j in range(w2.shape[1]) if np.any(w2[:, j])]
    hidden: dict[int, Any] = {}
    for j in live:
        acc = None
        for i in np.flatnonzero(w1[j]):
            enc.encode(float(w1[j, i]), level0, st.w1_scale, plain)
            if acc is None:
                acc = _seal.Ciphertext()
                ev.multiply_plain(cts[i], plain, acc)
            else:
                ev.multiply_plain(cts[i], plain, product)
                ev.add_inplace(acc, product)
        assert acc is not None  # dead units were folded away in EncryptedModel.__init__
        ev.rescale_to_next_inplace(acc)
        if b1[j] != 0.0:
            ev.add_plain_inplace(acc, st.encode(float(b1[j]), 1, acc.scale))
        ev.square_inplace(acc)
        ev.relinearize_inplace(acc, ctx._relin)
        ev.rescale_to_next_inplace(acc)
        hidden[j] = acc
    outputs = []
    for k in range(NUM_CLASSES):
        acc = None
        for j in live:
            weight = float(w2[k, j])
            if weight == 0.0:
                continue
            enc.encode(weight, level2, st.w2_scale, plain)
            if acc is None:
                acc = _seal.Ciphertext()
                ev.multiply_plain(hidden[j], plain, acc)
            else:
                ev.multiply_plain(hidden[j], plain, product)
                ev.add_inplace(acc, product)
        if acc is None:
            acc = ctx._zero(3, st.output_scale)
        else:
            ev.rescale_to_next_inplace(acc)
        ev.add_plain_inplace(acc, st.encode(float(b2[k]), 3, acc.scale))
        outputs.append(acc)
    return outputs
