"""The "batch" layout's circuit in :mod:`crypto.he`: column packing (ciphertext i holds
feature i of every sample), each hidden unit a sum of ciphertext x scalar products and each
logit a sum of ciphertext x plaintext products, each rescaled once (the deferred rescale),
biases added as plaintexts at the exact scale, no rotations.

The request's ``n`` is what the buyer pays for, so only slots [0, n) may carry a
prediction: the second-layer weights are plaintext vectors holding W2[k, j] in slots
[0, n) and 0 elsewhere (:func:`batch_masks`; the same multiply as a scalar, no extra
level), so slot s >= n of every logit ciphertext holds the output bias alone, whatever
the buyer put in its input slots. Without them a request declaring n = 1 would return
4,096 predictions. Plain functions of the model's folded weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.seal import _SealState
from crypto.he.server import ServerContext


def batch_masks(st: _SealState, w2: np.ndarray, n: int) -> dict[tuple[int, int], Any]:
    """The second layer's plaintexts for a request of ``n`` samples: (k, j) -> W2[k, j] in
    slots [0, n), 0 in slots [n, 4096), at level 2 and the exact scale ``w2_scale``; only
    for nonzero weights. Precondition: 1 <= n <= slots."""
    slots = st.params.slots
    assert 1 <= n <= slots, "n was checked by EncryptedModel.predict"
    mask = np.zeros(slots)
    mask[:n] = 1.0
    return {(k, j): st.encode(mask * float(w2[k, j]), 2, st.w2_scale)
            for k in range(w2.shape[0]) for j in range(w2.shape[1]) if w2[k, j] != 0.0}


def evaluate_batch(ctx: ServerContext, cts: list[Any], *, w1: np.ndarray, b1: np.ndarray,
                   w2_masks: dict[tuple[int, int], Any], b2: np.ndarray) -> list[Any]:
    """The reply's logit ciphertexts (one a class) for the request's ciphertexts ``cts``
    (one a feature);
    ``w2_masks`` from :func:`batch_masks` for the request's ``n``.
    Precondition: hidden units whose incoming weights are all zero were folded into ``b2``
    (as :class:`EncryptedModel` does), so every live unit has a nonzero weight."""
    st = ctx._state
    ev, enc = st.evaluator, st.encoder
    plain, product = _seal.Plaintext(), _seal.Ciphertext()
    level0 = st.levels[0]
    live = sorted({j for _, j in w2_masks})
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
    for k in range(len(b2)):
        acc = None
        for j in live:
            weight = w2_masks.get((k, j))
            if weight is None:
                continue
            if acc is None:
                acc = _seal.Ciphertext()
                ev.multiply_plain(hidden[j], weight, acc)
            else:
                ev.multiply_plain(hidden[j], weight, product)
                ev.add_inplace(acc, product)
        if acc is None:
            acc = ctx._zero(3, st.output_scale)
        else:
            ev.rescale_to_next_inplace(acc)
        ev.add_plain_inplace(acc, st.encode(float(b2[k]), 3, acc.scale))
        outputs.append(acc)
    return outputs
