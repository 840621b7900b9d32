"""The trained model on the server's side of :mod:`crypto.he`: :class:`EncryptedModel`
checks and folds the weights once (``poly2`` into a square, constant hidden units into the
output bias), and :meth:`EncryptedModel.predict` checks a request (size, count, ``n``,
fresh top-level ciphertexts at scale 2^38) before handing it to the layout's circuit in
:mod:`crypto.he.single` or :mod:`crypto.he.batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.batch import batch_masks, evaluate_batch
from crypto.he.params import (
    _REP_MAGIC,
    _REQ_MAGIC,
    ACTIVATIONS,
    HEError,
    ModelShape,
    _check_n,
    _ct_count,
    _raw_ct_bytes,
    max_request_bytes,
)
from crypto.he.seal import _SEAL_ERRORS, _load, _save, _SealState
from crypto.he.server import ServerContext
from crypto.he.single import evaluate_single, single_masks
from crypto.he.wire import _pack_cts, _unpack_cts

BATCH_MASK_CACHE = 2  # batch sizes whose second-layer masks stay encoded


class EncryptedModel:
    """The trained model, ready to evaluate on ciphertexts of either layout."""

    def __init__(self, weights: Mapping[str, np.ndarray], activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise HEError(f"activation: expected one of {list(ACTIVATIONS)}, "
                          f"got {activation!r}")
        w1, b1, w2, b2 = (_weight(weights, k) for k in
                          ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        hidden, features = w1.shape if w1.ndim == 2 else (-1, -1)
        classes = b2.shape[0] if b2.ndim == 1 else -1
        expected = {"fc1.weight": (hidden, features), "fc1.bias": (hidden,),
                    "fc2.weight": (classes, hidden), "fc2.bias": (classes,)}
        for (name, shape), array in zip(expected.items(), (w1, b1, w2, b2), strict=True):
            if min(hidden, features, classes) < 1 or array.shape != shape:
                raise HEError(f"weights {name}: expected shape {shape} (H, F, C >= 1), "
                              f"got {array.shape}")
        self.shape = ModelShape(int(features), int(classes), int(hidden)).check()
        self.activation = activation
        self.hidden_units = hidden
        if activation == "poly2":  # x/2 + x^2/8 = (x + 2)^2 / 8 - 1/2
            b1 = b1 + 2.0
            b2 = b2 - 0.5 * w2.sum(axis=1)
            w2 = w2 / 8.0
        dead = ~np.any(w1 != 0.0, axis=1)  # constant units: fold into the output bias
        b2 = b2 + w2[:, dead] @ (b1[dead] ** 2)
        w2 = np.where(dead[None, :], 0.0, w2)
        self._w1, self._b1, self._w2, self._b2 = w1, b1, w2, b2
        self._plain: dict[Any, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # SEAL plaintexts do not pickle
        return {**self.__dict__, "_plain": {}}

    def predict(self, ctx: ServerContext, ciphertext: bytes, n: int) -> bytes:
        """Evaluate the model on a request from :meth:`BuyerContext.encrypt`; returns the
        serialized encrypted logits (see the package docstring for both formats)."""
        if not isinstance(ctx, ServerContext):
            raise HEError(f"ctx: expected a ServerContext, got {type(ctx).__name__}")
        layout = ctx.layout
        n = _check_n(layout, n)
        if not isinstance(ciphertext, bytes | bytearray | memoryview):
            raise HEError(f"ciphertext: expected bytes, got {type(ciphertext).__name__}")
        limit = max_request_bytes(layout, self.shape)
        if len(ciphertext) > limit:
            raise HEError(f"request: expected at most {limit} bytes, got {len(ciphertext)}")
        self.shape.check_layout(layout)
        st = ctx._state
        count, _ = _ct_count(layout, self.shape)
        data_primes = len(ctx.params.coeff_mod_bit_sizes) - 1
        blobs = _unpack_cts(bytes(ciphertext), _REQ_MAGIC, layout, n, count, "request",
                            _raw_ct_bytes(ctx.params, data_primes))
        cts = [_checked_input(st, blob, index) for index, blob in enumerate(blobs)]
        try:
            outputs = (self._single(ctx, cts[0]) if layout == "single"
                       else self._batch(ctx, cts, n))
        except _SEAL_ERRORS as exc:
            raise HEError(f"request: expected ciphertexts SEAL can evaluate, got an error "
                          f"({exc})") from None
        return _pack_cts(_REP_MAGIC, layout, n, [_save(ct) for ct in outputs])

    def _single_plain(self, st: _SealState) -> tuple[Any, Any]:
        if "single" not in self._plain:
            self._plain["single"] = single_masks(st, self.shape, self._w1, self._b1,
                                                 self._w2)
        return self._plain["single"]

    def _single(self, ctx: ServerContext, ct: Any) -> list[Any]:
        masks = self._single_plain(ctx._state) if np.any(self._w2) else None
        return evaluate_single(ctx, self.shape, ct, masks, self._b2)

    def _batch_plain(self, st: _SealState, n: int) -> dict[tuple[int, int], Any]:
        # A buyer pays for n predictions, so the second layer keeps only slots [0, n)
        # (crypto.he.batch). Encoding the masks costs about 1.3 ms per weight (0.4 s for
        # H = 32) and 40 MiB for H = 32: the last BATCH_MASK_CACHE sizes are kept.
        key = ("batch", n)
        masks = self._plain.pop(key, None)
        if masks is None:
            masks = batch_masks(st, self._w2, n)
            stale = [k for k in self._plain if k[0] == "batch"]
            for old in stale[:max(0, len(stale) - BATCH_MASK_CACHE + 1)]:
                del self._plain[old]
        self._plain[key] = masks  # most recently used last
        return masks

    def _batch(self, ctx: ServerContext, cts: list[Any], n: int) -> list[Any]:
        return evaluate_batch(ctx, cts, w1=self._w1, b1=self._b1,
                              w2_masks=self._batch_plain(ctx._state, n), b2=self._b2)


def _weight(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in weights:
        raise HEError(f"weights: expected a {name!r} entry, got {sorted(weights)}")
    array = np.asarray(weights[name], dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise HEError(f"weights {name}: expected finite values, got NaN or infinity")
    return array


def _checked_input(st: _SealState, blob: bytes, index: int) -> Any:
    what = f"request: ciphertext {index}"
    ct = _load(_seal.Ciphertext(), st, blob, what)
    if ct.parms_id() != st.levels[0] or ct.size() != 2 or not ct.is_ntt_form():
        raise HEError(f"{what}: expected a fresh ciphertext (2 polynomials, top level, NTT "
                      f"form), got size {ct.size()}"
                      + ("" if ct.parms_id() == st.levels[0] else " at a lower level"))
    if ct.is_transparent():
        raise HEError(f"{what}: expected an encryption, got a transparent ciphertext")
    expected = 2.0**st.params.scale_bits
    if ct.scale != expected:
        raise HEError(f"{what}: expected scale 2^{st.params.scale_bits}, got {ct.scale!r}")
    return ct
