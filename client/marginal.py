"""Marginal ballots (``../shared/POI_MECHANISM.md``): what a voter computes on its own
data, and what the Scientist (on its validation set) and the auditor (after the reveal)
compute the same way.

A ballot says, for every candidate c, how much including c in the mean of the trusted
set T lowers the loss: ``loss(theta + without_c) - loss(theta + with_c)``, leaving c
out of T's mean when it is a member, adding it otherwise. The noise of single DP updates
largely cancels inside the mean, so this question is sharper than "is c alone good?".
All K + 1 distinct models are evaluated in one batched pass
(:func:`client.task.candidate_losses`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from client.task import Dataset, candidate_example_losses, candidate_losses

MAX_MARGINAL = 100.0  # nats: ballots and the Scientist's numbers are clamped to +-this


def clamp_marginal(value: float) -> float:
    """Clamp to +-MAX_MARGINAL: one crafted update within the norm bound can move a mean
    cross-entropy by hundreds of nats, and an unbounded number would let it push honest
    ballots out of range or the Scientist's entry out of the ledger's bounds."""
    if value != value:  # NaN: min/max would turn it into +MAX_MARGINAL
        raise BallotError("expected a finite marginal, got NaN")
    return max(-MAX_MARGINAL, min(MAX_MARGINAL, value))


def trusted_digest(trusted_ids: Sequence[str]) -> str:
    """SHA-256 (hex) of the sorted trusted candidate ids, one per line: what a ballot and
    the Scientist's entry sign, so the trusted set they were computed for is on record."""
    return hashlib.sha256("\n".join(sorted(trusted_ids)).encode("utf-8")).hexdigest()


class BallotError(ValueError):
    """A ballot request that cannot be computed (no trusted update, mismatched lists)."""


def marginal_models(trusted_mean: Mapping[str, np.ndarray], trusted_size: int,
                    deltas: Sequence[Mapping[str, np.ndarray]], members: Sequence[bool]
                    ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """For each candidate, the (without, with) aggregate deltas whose loss difference is
    its marginal ballot: ``loss(base + without) - loss(base + with)``.

    A member of T (``members[i]``) is left out of T's mean; any other candidate is added
    to it. ``trusted_mean`` is the mean of T's ``trusted_size`` updates (float64)."""
    if trusted_size < 1:
        raise BallotError(f"trusted set: expected at least one update, got {trusted_size}")
    if len(deltas) != len(members):
        raise BallotError(f"expected one membership flag per candidate ({len(deltas)}), "
                         f"got {len(members)}")
    n = float(trusted_size)
    mean = {k: np.asarray(v, dtype=np.float64) for k, v in trusted_mean.items()}
    out = []
    for delta, member in zip(deltas, members, strict=True):
        d = {k: np.asarray(delta[k], dtype=np.float64) for k in mean}
        if member:
            without = ({k: np.zeros_like(v) for k, v in mean.items()} if trusted_size == 1
                       else {k: (n * mean[k] - d[k]) / (n - 1.0) for k in mean})
            out.append((without, mean))
        else:
            out.append((mean, {k: (n * mean[k] + d[k]) / (n + 1.0) for k in mean}))
    return out


def mean_update(deltas: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The float64 mean of ``deltas`` (the trusted aggregate the voters receive)."""
    if not deltas:
        raise BallotError("mean of no updates")
    return {k: np.mean(np.stack([np.asarray(d[k], dtype=np.float64) for d in deltas]), axis=0)
            for k in deltas[0]}




def _variants(trusted_mean: Mapping[str, np.ndarray], trusted_size: int,
              deltas: Sequence[Mapping[str, np.ndarray]], members: Sequence[bool]
              ) -> list[dict[str, np.ndarray]]:
    """Per candidate, the aggregate that differs from T's mean by it: T without it (a
    member) or T with it (any other)."""
    pairs = marginal_models(trusted_mean, trusted_size, deltas, members)
    return [without if member else with_ for (without, with_), member
            in zip(pairs, members, strict=True)]


def marginal_ballot(model: nn.Module, base: Mapping[str, np.ndarray],
                    trusted_mean: Mapping[str, np.ndarray], trusted_size: int,
                    deltas: Sequence[Mapping[str, np.ndarray]], members: Sequence[bool],
                    data: Dataset) -> list[float]:
    """The marginal of every candidate on ``data`` (positive: including it helps).

    One batched pass over ``1 + len(deltas)`` models: T's mean, and for each candidate
    the mean with it left out (member) or added (non-member)."""
    variants = _variants(trusted_mean, trusted_size, deltas, members)
    _, losses = candidate_losses(model, base, [dict(trusted_mean), *variants], data)
    mean_loss = float(losses[0])
    # member: loss(without c) - loss(T); non-member: loss(T) - loss(with c)
    return [clamp_marginal(float(variant) - mean_loss if member else mean_loss - float(variant))
            for variant, member in zip(losses[1:], members, strict=True)]


def marginal_contributions(model: nn.Module, base: Mapping[str, np.ndarray],
                           trusted_mean: Mapping[str, np.ndarray], trusted_size: int,
                           deltas: Sequence[Mapping[str, np.ndarray]], members: Sequence[bool],
                           data: Dataset) -> np.ndarray:
    """Each example's part of every candidate's marginal, shape (n, K): row i holds
    ``l_i(without c) - l_i(with c)`` for every candidate c, so the column means are the
    unclamped :func:`marginal_ballot`. What a private ballot clips, row by row."""
    variants = _variants(trusted_mean, trusted_size, deltas, members)
    losses = candidate_example_losses(model, base, [dict(trusted_mean), *variants], data)
    flags = np.asarray(members, dtype=bool)[:, None]
    return np.where(flags, losses[1:] - losses[0], losses[0] - losses[1:]).T


def private_ballot(contributions: np.ndarray, *, clip: float, noise_multiplier: float,
                   rng: np.random.Generator) -> list[float]:
    """The Gaussian mechanism on a ballot: every example's row of ``contributions`` (n, K)
    clipped to L2 norm ``clip``, summed, plus N(0, (noise_multiplier * clip)^2) on each
    of the K numbers, divided by n, clamped.

    Adding or removing one example moves the clipped sum by at most ``clip`` in L2: the
    sensitivity the noise is scaled to. ``n`` is treated as public (as Opacus divides by
    the expected batch size); one ballot is one full-batch step of the subsampled
    Gaussian mechanism at sample rate 1, and composes with training in the accountant
    (:func:`client.privacy.epsilon_of`)."""
    if not (np.isfinite(clip) and clip > 0):
        raise BallotError(f"vote-clip: expected a number > 0, got {clip}")
    rows = np.asarray(contributions, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise BallotError(f"expected contributions of shape (n >= 1, K), got {rows.shape}")
    if not np.all(np.isfinite(rows)):  # a NaN norm would skip the clip of its whole row
        raise BallotError("expected finite per-example losses, got NaN or inf")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    scale = np.divide(clip, norms, out=np.ones_like(norms), where=norms > clip)
    total = (rows * scale).sum(axis=0)
    total = total + rng.normal(0.0, noise_multiplier * clip, size=total.shape)
    return [clamp_marginal(float(v) / rows.shape[0]) for v in total]

