"""Who of a round's applied updates lowered the validation loss, and by how much
(payout rule ``round-game/v2``, docs/market.md).

The round's game fixes the coefficient after acceptance: with k updates applied to
theta (the model before the round),

    U(S) = L(theta) - L(theta + (1/k) * sum_{i in S} delta_i)

so an update of exactly zero adds nothing to any coalition (marginal value 0), whereas
over "the mean of the coalition" it shrinks a noisy mean and is paid for it. The full
coalition is the round's model, so the Shapley values add up to the round's
improvement L_{t-1} - L_t exactly.

- k <= ``exact_max`` (12 by default): the loss of every non-empty coalition
  (:func:`fixed_k_coalition_losses`, 4,095 models at k = 12, batched) and exact Shapley
  (:func:`server.market.settlement.shapley`).
- k > ``exact_max``: ``permutations`` orderings drawn from the ledger root after the
  round's ``model`` entry (:func:`permutation_seed`, :func:`draw_permutations`: SHA-256
  in counter mode, rejection sampling, Fisher-Yates: any language reproduces them bit
  for bit), the loss after each prefix (:func:`prefix_losses`) and the sampled Shapley
  value with its standard error (:func:`server.market.settlement.sampled_shapley`).
- :func:`taylor_shapley`: the closed-form Shapley of the second-order Taylor game,
  ``phi_i = -a delta_i . (g + (a/2) H sum_j delta_j)`` with a = 1/k, g and H the
  validation gradient and Hessian at theta (one gradient and one Hessian-vector
  product, whatever k). Exact for the Taylor game; a cross-check shown beside the
  credit, never what is paid.

Losses are the validation loss of float32 weights computed in float64 on the CPU, in
micro-units, as the Scientist publishes every score.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from client.task import (
    POLY_MLP_PARAMETERS,
    Dataset,
    PolyMLP,
    candidate_losses,
    functional_float64,
    model_of,
    poly_mlp_losses,
)
from client.witness import to_micro

__all__ = [
    "BATCH",
    "EXACT_MAX",
    "PERMUTATIONS",
    "draw_permutations",
    "fixed_k_coalition_losses",
    "permutation_seed",
    "prefix_losses",
    "taylor_shapley",
]

EXACT_MAX = 12  # exact Shapley up to this many applied updates (4,095 coalitions)
PERMUTATIONS = 32  # sampled orderings beyond EXACT_MAX
BATCH = 512  # coalition models per vectorised pass
PERMUTATION_DOMAIN = b"poi/shapley-permutations/v1"


class AttributionError(ValueError):
    """Updates or numbers that no attribution can use (named in the message)."""


# ------------------------------------------------------------------------- models
def _flat(deltas: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str]) -> np.ndarray:
    try:
        return np.stack([np.concatenate([np.asarray(d[k], dtype=np.float64).ravel()
                                         for k in keys]) for d in deltas])
    except (KeyError, ValueError) as exc:
        raise AttributionError(f"updates do not fit the model: {exc}") from exc


def _losses_of_sums(base: Mapping[str, np.ndarray], chunks: Iterator[np.ndarray], k: int,
                    data: Dataset, architecture: Mapping[str, Any]) -> list[int]:
    """Loss (micro) of ``base + row / k`` for every row of every chunk (flat float64,
    at most BATCH rows each), the weights cast to float32 exactly as
    :func:`server.round.selection.apply_updates` does."""
    keys = list(base)
    shapes = [np.asarray(base[key]).shape for key in keys]
    sizes = [int(np.prod(s)) for s in shapes]
    base64_ = {key: np.asarray(base[key]).astype(np.float64) for key in keys}
    flat_base = np.concatenate([base64_[key].ravel() for key in keys])
    model = model_of(architecture)
    # The digits MLP: stack the chunk's weights straight into the batched forward pass
    # (the same function candidate_losses uses for it), no per-model dictionaries.
    fast = isinstance(model, PolyMLP) and set(keys) == set(POLY_MLP_PARAMETERS)
    reference = functional_float64(model)
    x = torch.as_tensor(data.x, dtype=torch.float64)
    y = torch.as_tensor(data.y)
    out: list[int] = []
    for chunk in chunks:
        weights = (flat_base[None, :] + chunk / k).astype(np.float32).astype(np.float64)
        if fast:
            stacked, offset = {}, 0
            for key, shape, size in zip(keys, shapes, sizes, strict=True):
                stacked[key] = torch.from_numpy(
                    np.ascontiguousarray(weights[:, offset:offset + size]).reshape(
                        len(chunk), *shape))
                offset += size
            with torch.no_grad():
                losses = poly_mlp_losses(reference, stacked, x, y).numpy()
            out.extend(to_micro(float(v)) for v in losses)
            continue
        shifted = weights - flat_base[None, :]
        deltas = []
        for row in shifted:
            parts, offset = {}, 0
            for key, shape, size in zip(keys, shapes, sizes, strict=True):
                parts[key] = row[offset:offset + size].reshape(shape)
                offset += size
            deltas.append(parts)
        try:
            _, losses = candidate_losses(model, base64_, deltas, data)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise AttributionError(f"updates do not fit the offer's architecture: {exc}") from exc
        out.extend(to_micro(float(v)) for v in losses)
    return out


def fixed_k_coalition_losses(base: Mapping[str, np.ndarray],
                             deltas: Sequence[Mapping[str, np.ndarray]], data: Dataset, *,
                             architecture: Mapping[str, Any],
                             masks: Sequence[int] | None = None) -> dict[int, int]:
    """Loss (micro) of ``base + (1/k) * sum of the coalition's deltas`` for every mask
    (bit i = ``deltas[i]``; all non-empty coalitions but the full one by default: the
    full coalition is the round's model and its loss is the round's score). Sums run in
    index order in float64 (no BLAS), so every machine gets the same weights."""
    k = len(deltas)
    if k == 0:
        return {}
    full = (1 << k) - 1
    if masks is None:
        if k > EXACT_MAX:
            raise AttributionError(f"expected at most {EXACT_MAX} updates for every "
                                   f"coalition, got {k}")
        masks = list(range(1, full))
    flat = _flat(deltas, list(base))

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, len(masks), BATCH):
            part = masks[start:start + BATCH]
            sums = np.zeros((len(part), flat.shape[1]))
            for row, mask in enumerate(part):
                for i in range(k):
                    if mask >> i & 1:
                        sums[row] += flat[i]
            yield sums

    losses = _losses_of_sums(base, chunks(), k, data, architecture)
    return dict(zip(masks, losses, strict=True))


# ------------------------------------------------------------------- permutations
def permutation_seed(root: bytes, server_round: int) -> bytes:
    """The seed of a round's orderings: SHA-256(domain || ledger root after the round's
    ``model`` entry || round as 8 bytes big-endian)."""
    if len(root) != 32:
        raise AttributionError(f"expected a 32-byte ledger root, got {len(root)} bytes")
    return hashlib.sha256(PERMUTATION_DOMAIN + root + server_round.to_bytes(8, "big")).digest()


class _Stream:
    """Uniform integers from SHA-256(seed || counter) blocks (8 bytes each, big-endian),
    rejection-sampled so every value is equally likely."""

    def __init__(self, seed: bytes) -> None:
        self.seed, self.counter, self.buffer = seed, 0, b""

    def _u64(self) -> int:
        if len(self.buffer) < 8:
            self.buffer += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        value, self.buffer = int.from_bytes(self.buffer[:8], "big"), self.buffer[8:]
        return value

    def below(self, n: int) -> int:
        limit = (1 << 64) - (1 << 64) % n
        while True:
            value = self._u64()
            if value < limit:
                return value % n


def draw_permutations(seed: bytes, k: int, count: int) -> list[list[int]]:
    """``count`` orderings of range(k): Fisher-Yates (i from k-1 down to 1, j uniform in
    [0, i]) over one stream."""
    stream = _Stream(seed)
    out = []
    for _ in range(count):
        order = list(range(k))
        for i in range(k - 1, 0, -1):
            j = stream.below(i + 1)
            order[i], order[j] = order[j], order[i]
        out.append(order)
    return out


def prefix_losses(base: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]],
                  data: Dataset, *, architecture: Mapping[str, Any],
                  permutations: Sequence[Sequence[int]]) -> list[list[int]]:
    """For every ordering, the loss (micro) after each of its first k-1 prefixes (the
    full prefix is the round's model)."""
    k = len(deltas)
    flat = _flat(deltas, list(base))

    def chunks() -> Iterator[np.ndarray]:
        rows: list[np.ndarray] = []
        for order in permutations:
            running = np.zeros(flat.shape[1])
            for i in order[:-1]:
                running = running + flat[i]
                rows.append(running)
                if len(rows) == BATCH:
                    yield np.stack(rows)
                    rows = []
        if rows:
            yield np.stack(rows)

    losses = _losses_of_sums(base, chunks(), k, data, architecture)
    return [losses[p * (k - 1):(p + 1) * (k - 1)] for p in range(len(permutations))]


# ------------------------------------------------------------------------ Taylor
def taylor_shapley(base: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]],
                   data: Dataset, *, architecture: Mapping[str, Any]) -> list[float]:
    """Closed-form Shapley of the second-order Taylor expansion of the round game, in
    loss units (nats): ``phi_i = -a delta_i . (g + (a/2) H s)``, a = 1/k, s the sum of
    the deltas; g and H s by autograd in float64 (one gradient, one Hessian-vector
    product)."""
    k = len(deltas)
    if k == 0:
        return []
    model = functional_float64(model_of(architecture))
    keys = list(base)
    theta = {key: torch.as_tensor(np.asarray(base[key]), dtype=torch.float64).clone()
             .requires_grad_(True) for key in keys}
    x = torch.as_tensor(data.x, dtype=torch.float64)
    y = torch.as_tensor(data.y)
    try:
        delta_t = [{key: torch.as_tensor(np.asarray(d[key]), dtype=torch.float64)
                    for key in keys} for d in deltas]
        loss = F.cross_entropy(functional_call(model, theta, (x,)), y)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise AttributionError(f"updates do not fit the offer's architecture: {exc}") from exc
    grads = torch.autograd.grad(loss, [theta[key] for key in keys], create_graph=True)
    total = {key: sum(d[key] for d in delta_t) for key in keys}
    directional = sum((g * total[key]).sum() for g, key in zip(grads, keys, strict=True))
    hvp = torch.autograd.grad(directional, [theta[key] for key in keys])
    a = 1.0 / k
    direction = {key: (g.detach() + (a / 2.0) * h) for g, h, key in
                 zip(grads, hvp, keys, strict=True)}
    return [float(-a * sum((d[key] * direction[key]).sum() for key in keys)) for d in delta_t]
