"""Proof-of-Intelligence selection: committees, robust vote tallies, and the update to apply.

Pure functions on plain data (no Flower, no torch), so anyone holding the ledger can
recompute every step. Candidates and voters are identified by strings (candidate: the
hex digest of its update; voter: the subscriber's id).

Robustness argument for the default ``median`` tally: a candidate's score is the median
of its voters' loss improvements. While strictly fewer than half of a candidate's voters
lie, the median lies between the smallest and largest honest improvement, whatever the
liars report (a property test checks this).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

AGGREGATIONS = ("median", "trimmed-mean", "rank-median")


class SelectionError(ValueError):
    """Inputs that no selection can be made from (e.g. a top-k of zero)."""


# --------------------------------------------------------------------- committees
def _rank_key(seed: bytes, label: bytes, item: str) -> bytes:
    return hashlib.sha256(seed + b"\x00" + label + b"\x00" + item.encode("utf-8")).digest()


def assign_committees(
    authors: Mapping[str, str],
    voters: Sequence[str],
    *,
    votes_per_candidate: int,
    seed: bytes,
) -> dict[str, tuple[str, ...]]:
    """Voters for every candidate, never its author, a pure function of ``seed``.

    ``authors`` maps candidate id -> author id. ``votes_per_candidate == 0`` (or more than
    there are eligible voters) assigns every voter except the author. Otherwise candidates
    are taken in a seed-determined order and each gets the least-loaded eligible voters
    (ties broken by a seed-and-candidate-keyed hash), so every voter scores about the same
    number of candidates: vote traffic stays linear in the federation size.
    """
    if votes_per_candidate < 0:
        raise SelectionError(f"votes_per_candidate: expected >= 0, got {votes_per_candidate}")
    unique_voters = sorted(set(voters))
    candidates = sorted(authors, key=lambda c: _rank_key(seed, b"candidate", c))
    load = dict.fromkeys(unique_voters, 0)
    committees: dict[str, tuple[str, ...]] = {}
    for candidate in candidates:
        eligible = [v for v in unique_voters if v != authors[candidate]]
        if votes_per_candidate == 0 or votes_per_candidate >= len(eligible):
            committees[candidate] = tuple(eligible)
            continue
        # Least-loaded first; among equals a seed-and-candidate-keyed order.
        eligible.sort(key=lambda v: (load[v], _rank_key(seed, candidate.encode(), v)))
        chosen = eligible[:votes_per_candidate]
        for voter in chosen:
            load[voter] += 1
        committees[candidate] = tuple(sorted(chosen))
    return committees


def ballots(committees: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Invert committees: voter -> the candidates it must score (sorted)."""
    per_voter: dict[str, list[str]] = {}
    for candidate, voters in committees.items():
        for voter in voters:
            per_voter.setdefault(voter, []).append(candidate)
    return {v: tuple(sorted(c)) for v, c in sorted(per_voter.items())}


# -------------------------------------------------------------------------- tally
@dataclass(frozen=True)
class CandidateScore:
    """``score`` orders candidates (higher is better); ``improvement`` is the median loss
    improvement (current loss - candidate loss) over the voters, whatever the method."""

    candidate_id: str
    score: float
    improvement: float
    num_votes: int


def median(values: Sequence[float]) -> float:
    if not values:
        raise SelectionError("median of no values")
    return float(np.median(np.asarray(values, dtype=np.float64)))


def trimmed_mean(values: Sequence[float], trim_fraction: float) -> float:
    """Mean after dropping ``floor(trim_fraction * n)`` values from each end."""
    if not values:
        raise SelectionError("trimmed mean of no values")
    if not 0.0 <= trim_fraction < 0.5:
        raise SelectionError(f"trim_fraction: expected 0 <= f < 0.5, got {trim_fraction}")
    ordered = sorted(values)
    cut = int(math.floor(trim_fraction * len(ordered)))
    kept = ordered[cut:len(ordered) - cut]
    return float(np.mean(kept))


def voter_ranks(improvements: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """For each voter, its candidates' normalised ranks: 1.0 best, 0.0 worst (0.5 when it
    scored one candidate). Ties share the mean rank. Input: candidate -> voter -> value."""
    per_voter: dict[str, dict[str, float]] = {}
    for candidate, votes in improvements.items():
        for voter, value in votes.items():
            per_voter.setdefault(voter, {})[candidate] = value
    ranks: dict[str, dict[str, float]] = {c: {} for c in improvements}
    for voter, values in per_voter.items():
        n = len(values)
        if n == 1:
            (only,) = values
            ranks[only][voter] = 0.5
            continue
        ordered = sorted(values.values())
        for candidate, value in values.items():
            low = ordered.index(value)
            high = len(ordered) - 1 - ordered[::-1].index(value)
            ranks[candidate][voter] = ((low + high) / 2.0) / (n - 1)
    return ranks


def tally(
    improvements: Mapping[str, Mapping[str, float]],
    *,
    method: str = "median",
    trim_fraction: float = 0.2,
) -> dict[str, CandidateScore]:
    """Score every candidate with at least one vote.

    ``improvements``: candidate id -> voter id -> (voter's loss under the current model
    minus its loss under the candidate). Candidates with no votes get no score.
    """
    if method not in AGGREGATIONS:
        raise SelectionError(f"vote-aggregation: expected one of {AGGREGATIONS}, got {method!r}")
    ranks = voter_ranks(improvements) if method == "rank-median" else {}
    scores: dict[str, CandidateScore] = {}
    for candidate, votes in sorted(improvements.items()):
        values = [votes[v] for v in sorted(votes)]
        if not values:
            continue
        if method == "median":
            score = median(values)
        elif method == "trimmed-mean":
            score = trimmed_mean(values, trim_fraction)
        else:
            score = median([ranks[candidate][v] for v in sorted(votes)])
        scores[candidate] = CandidateScore(
            candidate_id=candidate, score=score, improvement=median(values),
            num_votes=len(values),
        )
    return scores


# ---------------------------------------------------------------------- selection
def select(
    scores: Mapping[str, CandidateScore], *, top_k: int, require_improvement: bool = False
) -> list[str]:
    """The ``top_k`` best candidates, best first; ties break by candidate id (the digest),
    so selection is deterministic. With ``require_improvement`` a candidate whose median
    improvement is not positive is never applied (an empty list keeps the model)."""
    if top_k < 1:
        raise SelectionError(f"top-k: expected >= 1, got {top_k}")
    eligible = [
        s for s in scores.values()
        if math.isfinite(s.score) and (not require_improvement or s.improvement > 0.0)
    ]
    eligible.sort(key=lambda s: (-s.score, s.candidate_id))
    return [s.candidate_id for s in eligible[:top_k]]


def apply_updates(
    weights: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``weights`` plus the unweighted mean of ``deltas`` (unweighted: an attacker could
    claim any example count). No deltas returns a copy of ``weights``."""
    if not deltas:
        return {k: np.array(v, copy=True) for k, v in weights.items()}
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        stacked = np.stack([np.asarray(d[name], dtype=np.float64) for d in deltas])
        out[name] = (np.asarray(value, dtype=np.float64) + stacked.mean(axis=0)).astype(
            np.asarray(value).dtype
        )
    return out


def committee_seed(*, task_seed: int, server_round: int, candidate_ids: Sequence[str]) -> bytes:
    """Seed for the committee draw before a ledger exists: a digest of the task seed, the
    round and the candidate set (the ledger version uses the ledger root instead)."""
    material = f"poi/committee/v1|{task_seed}|{server_round}|" + ",".join(sorted(candidate_ids))
    return hashlib.sha256(material.encode("utf-8")).digest()
