"""Validation of untrusted subscriber replies: candidate updates and votes.

Every check raises :class:`Rejected` with a reason that says what was expected and what
came; the strategy records the reason and the round goes on. Pure functions on numpy
arrays and plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from client.marginal import MAX_MARGINAL

# The largest loss the ledger can record exactly as integer micro-units (2**53 - 1).
MAX_LOSS = (2**53 - 1) / 1_000_000


class Rejected(ValueError):
    """A reply that must not be used; ``str(exc)`` is the recorded reason."""


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float,
) -> float:
    """Check an update against the global model's names, dtypes and shapes; return its L2
    norm. Rejects missing or extra tensors, wrong dtype or shape, NaN/inf, an all-zero
    update (nothing learned) and a norm above ``max_norm``."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise Rejected(
            f"tensor names: expected {sorted(reference)}, missing {missing}, extra {extra}"
        )
    squared = 0.0
    for name, ref in reference.items():
        value = update[name]
        if value.dtype != ref.dtype:
            raise Rejected(f"{name}: expected dtype {ref.dtype}, got {value.dtype}")
        if value.shape != ref.shape:
            raise Rejected(f"{name}: expected shape {ref.shape}, got {value.shape}")
        if not np.all(np.isfinite(value)):
            raise Rejected(f"{name}: contains NaN or infinite values")
        squared += float(np.sum(np.square(value, dtype=np.float64)))
    norm = math.sqrt(squared)
    if norm == 0.0:
        raise Rejected("update is all zeros: nothing was learned")
    if norm > max_norm:
        raise Rejected(f"update L2 norm {norm:.4g} exceeds the bound max-update-norm {max_norm:g}")
    return norm


@dataclass(frozen=True)
class Vote:
    """One voter's losses: the current model's and each assigned candidate's."""

    voter: str
    base_loss: float
    losses: Mapping[str, float]

    def improvements(self) -> dict[str, float]:
        return {c: self.base_loss - loss for c, loss in self.losses.items()}


def validate_vote(
    voter: str,
    *,
    assigned: Sequence[str],
    candidate_ids: Sequence[object] | None,
    base_loss: object,
    losses: Sequence[object] | None,
) -> Vote:
    """A vote must name exactly its assigned candidates, in order, with one finite,
    non-negative loss each, and a finite non-negative loss for the current model."""
    if candidate_ids is None or losses is None:
        raise Rejected("vote: expected 'candidate-ids' and 'losses' in the reply, got neither")
    if [str(c) for c in candidate_ids] != list(assigned):
        raise Rejected(
            f"vote: expected candidates {list(assigned)}, got {list(candidate_ids)}"
        )
    if len(losses) != len(assigned):
        raise Rejected(f"vote: expected {len(assigned)} losses, got {len(losses)}")
    values: list[float] = []
    for item in [base_loss, *losses]:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise Rejected(f"vote: expected numeric losses, got {item!r}")
        value = float(item)
        if not math.isfinite(value) or value < 0.0:
            raise Rejected(f"vote: expected finite losses >= 0, got {value}")
        if value > MAX_LOSS:
            raise Rejected(f"vote: expected losses <= {MAX_LOSS:.6g}, got {value:.6g}")
        values.append(value)
    return Vote(voter=voter, base_loss=values[0],
                losses=dict(zip(assigned, values[1:], strict=True)))




def validate_ballot(
    voter: str,
    *,
    assigned: Sequence[str],
    candidate_ids: Sequence[object] | None,
    marginals: Sequence[object] | None,
    aggregate_digest: object,
    expected_digest: str,
) -> dict[str, float]:
    """A marginal ballot must name exactly its assigned candidates, in order, carry the
    digest of the trusted mean it was sent, and one finite marginal per candidate with
    ``|marginal| <= MAX_MARGINAL``. Returns candidate -> marginal."""
    if candidate_ids is None or marginals is None:
        raise Rejected("ballot: expected 'candidate-ids' and 'marginals' in the reply, "
                       "got neither")
    if [str(c) for c in candidate_ids] != list(assigned):
        raise Rejected(f"ballot: expected candidates {list(assigned)}, got {list(candidate_ids)}")
    if aggregate_digest != expected_digest:
        raise Rejected(f"ballot: expected the trusted mean {expected_digest[:16]}, "
                       f"got {str(aggregate_digest)[:16]}")
    if len(marginals) != len(assigned):
        raise Rejected(f"ballot: expected {len(assigned)} marginals, got {len(marginals)}")
    out: dict[str, float] = {}
    for candidate, item in zip(assigned, marginals, strict=True):
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise Rejected(f"ballot: expected numeric marginals, got {item!r}")
        value = float(item)
        if not math.isfinite(value) or abs(value) > MAX_MARGINAL:
            raise Rejected(f"ballot: expected finite marginals with |m| <= {MAX_MARGINAL:g}, "
                           f"got {value}")
        out[candidate] = value
    return out
