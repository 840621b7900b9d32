"""The marginal vote: Proof-of-Intelligence's tally, anchored on the Scientist's numbers
(``../shared/POI_MECHANISM.md``; Hedge: Freund and Schapire 1997; Spearman's rho).

Pure functions on plain data (no Flower, no torch): the state (voter log-weights and
author scores) is a function of the ledger alone, so ``poi audit`` recomputes every
weight, score and accepted set by calling :func:`tally_round` on the same entries.

One round, with the base model theta and the valid candidates c (update digests):

1. **Trusted set** T: candidates whose author's cumulative score is >= 0 (everyone in
   round 1; every candidate when fewer than ``min_trusted`` qualify).
2. **Ballots** u[v][c] (computed by the voters, :func:`marginal_models`): how much
   including c in the mean of T lowers the voter's loss, leave-one-out for members,
   add-one for the others.
3. **The Scientist's numbers** g[c]: the same quantity on its committed validation set.
4. **Reputation**: rho_v = Spearman(u[v, .], g[.]) over the candidates v scored;
   log w_v += rate * rho_v; weights are exp(log w_v - max log w) (rate 4 by default: at
   rate 1 a 45% bloc kept a third of the weight after round 1, enough to tilt every
   median).
5. **Score**: the reputation-weighted lower median of u[., c] over voters other than c's
   author.
6. **Author score**: A[author] += clip((score_c - median score) / median |.|, -clip,
   clip); in the first ``validation_first_rounds`` rounds the step uses g[c] instead (no
   reputation exists yet, so a bloc holds its full share of the weight).
7. **Accept** c iff A[author(c)] > 0 and g[c] > 0 (at most ``max_accepted``, best scores
   first); the model moves by the mean of the accepted updates.

Numbers enter in integer micro-units (as signed on the ledger) and are converted with
one division, so a replay on another machine computes the same floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from client.config import RunConfig
from client.marginal import marginal_models, mean_update

__all__ = ["marginal_models", "mean_update"]  # re-exported: the voter's side

MICRO = 1_000_000


class TallyError(ValueError):
    """Inputs that break the tally's preconditions (our bug or a hostile ledger)."""


@dataclass(frozen=True)
class MarginalConfig:
    """Knobs of the marginal vote (run config: ``reputation-rate``, ``author-score-clip``,
    ``min-trusted``, ``max-accepted``, ``reputation-floor``)."""

    reputation_rate: float = 4.0
    author_score_clip: float = 1.0
    min_trusted: int = 3
    max_accepted: int = 12
    reputation_floor: float = 0.0  # weights never fall below floor * the largest
    center_author_scores: bool = True  # steps measured from the round's median score
    validation_first_rounds: int = 1  # author steps from the Scientist's numbers alone
    votes_per_candidate: int = 0  # committee size (0: every voter scores every candidate)
    # Weight cut at each end before averaging a candidate's ballots: 0.5 (the default)
    # is the weighted lower median; less is a weighted trimmed mean.
    tally_trim: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reputation_rate) and self.reputation_rate >= 0):
            raise TallyError(f"reputation-rate: expected a number >= 0, got {self.reputation_rate}")
        if not (math.isfinite(self.author_score_clip) and self.author_score_clip > 0):
            raise TallyError(
                f"author-score-clip: expected a number > 0, got {self.author_score_clip}")
        if self.min_trusted < 1:
            raise TallyError(f"min-trusted: expected >= 1, got {self.min_trusted}")
        if self.max_accepted < 1:
            raise TallyError(f"max-accepted: expected >= 1, got {self.max_accepted}")
        if not 0.0 <= self.reputation_floor <= 1.0:
            raise TallyError(
                f"reputation-floor: expected 0 <= floor <= 1, got {self.reputation_floor}")
        if not 0.0 < self.tally_trim <= 0.5:
            raise TallyError(f"tally-trim: expected 0 < trim <= 0.5, got {self.tally_trim}")
        if self.validation_first_rounds < 0:
            raise TallyError("validation-first-rounds: expected >= 0, got "
                             f"{self.validation_first_rounds}")

    def to_terms(self) -> dict[str, object]:
        """The offer's ``vote`` object: the rule's constants as integers (canonical JSON
        carries no floats), so an auditor runs the tally with exactly these."""
        return {"rule": "marginal",
                "reputation_rate_micro": round(self.reputation_rate * MICRO),
                "author_score_clip_micro": round(self.author_score_clip * MICRO),
                "min_trusted": self.min_trusted, "max_accepted": self.max_accepted,
                "reputation_floor_micro": round(self.reputation_floor * MICRO),
                "center_author_scores": int(self.center_author_scores),
                "validation_first_rounds": self.validation_first_rounds,
                "votes_per_candidate": self.votes_per_candidate,
                "tally_trim_micro": round(self.tally_trim * MICRO)}

    @classmethod
    def from_terms(cls, terms: Mapping[str, object]) -> MarginalConfig:
        """Parse an offer's ``vote`` object; raises :class:`TallyError` naming the field."""
        values: dict[str, int] = {}
        for name in ("reputation_rate_micro", "author_score_clip_micro", "min_trusted",
                     "max_accepted", "reputation_floor_micro", "center_author_scores",
                     "validation_first_rounds", "votes_per_candidate"):
            value = terms.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
                raise TallyError(f"vote.{name}: expected an integer in 0..10^12, got {value!r}")
            values[name] = value
        trim = terms.get("tally_trim_micro", MICRO // 2)  # offers before the knob: median
        if isinstance(trim, bool) or not isinstance(trim, int) or not 0 < trim <= MICRO // 2:
            raise TallyError(f"vote.tally_trim_micro: expected an integer in 1..{MICRO // 2}, "
                             f"got {trim!r}")
        return cls(reputation_rate=values["reputation_rate_micro"] / MICRO,
                   author_score_clip=values["author_score_clip_micro"] / MICRO,
                   min_trusted=values["min_trusted"], max_accepted=values["max_accepted"],
                   reputation_floor=values["reputation_floor_micro"] / MICRO,
                   center_author_scores=bool(values["center_author_scores"]),
                   validation_first_rounds=values["validation_first_rounds"],
                   votes_per_candidate=values["votes_per_candidate"],
                   tally_trim=trim / MICRO)


@dataclass(frozen=True)
class VoteState:
    """What carries from round to round: voter log-weights and author scores (by ledger
    identity). Immutable: :func:`tally_round` returns a new one."""

    log_weights: Mapping[str, float] = field(default_factory=dict)
    author_scores: Mapping[str, float] = field(default_factory=dict)
    rounds: int = 0  # rounds tallied so far


@dataclass(frozen=True)
class RoundTally:
    """One round's outcome: the new state and everything the report and ledger show."""

    state: VoteState
    agreement: dict[str, float]  # voter -> Spearman rho with the Scientist this round
    weights: dict[str, float]  # voter -> normalised weight used in this round's tally
    scores: dict[str, float]  # candidate -> weighted lower median of its ballots
    accepted: list[str]  # candidate ids, best score first


def marginal_config_of(config: RunConfig) -> MarginalConfig:
    """The run config's marginal-vote knobs, rounded through the offer's integer terms,
    so the strategy and an auditor reading the offer use bit-identical constants."""
    knobs = MarginalConfig(
        reputation_rate=config.reputation_rate, author_score_clip=config.author_score_clip,
        min_trusted=config.min_trusted, max_accepted=config.max_accepted,
        reputation_floor=config.reputation_floor,
        center_author_scores=config.center_author_scores,
        validation_first_rounds=config.validation_first_rounds,
        votes_per_candidate=config.votes_per_candidate, tally_trim=config.tally_trim)
    return MarginalConfig.from_terms(knobs.to_terms())


# ----------------------------------------------------------------------- trusted set
def trusted_set(authors: Mapping[str, str], author_scores: Mapping[str, float], *,
                min_trusted: int) -> list[str]:
    """Candidates whose author's cumulative score is >= 0 (an author never seen has
    score 0); every candidate when fewer than ``min_trusted`` qualify. Sorted ids."""
    trusted = sorted(c for c, a in authors.items() if author_scores.get(a, 0.0) >= 0.0)
    if len(trusted) < min_trusted:
        return sorted(authors)
    return trusted


# ---------------------------------------------------------------------- statistics
def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their mean rank."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    i = 0
    while i < len(array):
        j = i
        while j + 1 < len(array) and array[order[j + 1]] == array[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks); 0 when either side is
    constant or has fewer than two values: no evidence either way."""
    if len(a) != len(b):
        raise TallyError(f"spearman: expected equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return 0.0
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float(np.dot(ra, ra)) * float(np.dot(rb, rb)))
    if denominator == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(np.dot(ra, rb)) / denominator))


def weighted_lower_median(values: Sequence[tuple[float, float, str]]) -> float:
    """The lower weighted median of ``(value, weight, tiebreak)``: the smallest value whose
    cumulative weight reaches half the total. Zero-weight entries count for nothing; if
    every weight is zero, the plain lower median."""
    if not values:
        raise TallyError("weighted median of no values")
    ordered = sorted(values, key=lambda t: (t[0], t[2]))
    total = sum(w for _, w, _ in ordered)
    if total <= 0.0:
        return ordered[(len(ordered) - 1) // 2][0]
    running = 0.0
    for value, weight, _ in ordered:
        running += weight
        if running >= total / 2.0:
            return value
    return ordered[-1][0]


def weighted_trimmed_mean(values: Sequence[tuple[float, float, str]], trim: float) -> float:
    """The weighted mean of ``(value, weight, tiebreak)`` after cutting ``trim`` of the
    total weight from each end (an entry straddling a cut counts for the part inside).
    ``trim`` = 0.5 is :func:`weighted_lower_median`; with every weight zero, the plain
    values count 1 each."""
    if not values:
        raise TallyError("weighted trimmed mean of no values")
    if trim >= 0.5:
        return weighted_lower_median(values)
    ordered = sorted(values, key=lambda t: (t[0], t[2]))
    if sum(w for _, w, _ in ordered) <= 0.0:
        ordered = [(v, 1.0, t) for v, _, t in ordered]
    total = sum(w for _, w, _ in ordered)
    low, high = trim * total, (1.0 - trim) * total
    kept = weight_sum = 0.0
    start = 0.0
    for value, weight, _ in ordered:
        end = start + weight
        inside = max(0.0, min(end, high) - max(start, low))
        kept += inside * value
        weight_sum += inside
        start = end
    if weight_sum <= 0.0:  # all weight at one point
        return weighted_lower_median(values)
    return kept / weight_sum


# ------------------------------------------------------------------------- the tally
def update_reputation(log_weights: Mapping[str, float],
                      ballots: Mapping[str, Mapping[str, float]],
                      validation: Mapping[str, float], *, rate: float
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """Hedge on rank agreement: for every voter, rho = Spearman(its ballot, the
    Scientist's numbers) over the candidates it scored that the Scientist also scored;
    ``log w += rate * rho``. Returns (new log-weights, rho per voter)."""
    out = dict(log_weights)
    agreement: dict[str, float] = {}
    for voter in sorted(ballots):
        common = sorted(c for c in ballots[voter] if c in validation)
        rho = spearman([ballots[voter][c] for c in common], [validation[c] for c in common])
        agreement[voter] = rho
        out[voter] = out.get(voter, 0.0) + rate * rho
    return out, agreement


def normalised_weights(log_weights: Mapping[str, float], voters: Sequence[str], *,
                       floor: float = 0.0) -> dict[str, float]:
    """exp(log w - max log w) over ``voters`` (a new voter has log weight 0), at least
    ``floor``."""
    if not voters:
        return {}
    logs = {v: log_weights.get(v, 0.0) for v in voters}
    top = max(logs.values())
    return {v: max(floor, math.exp(value - top)) for v, value in sorted(logs.items())}


def candidate_scores(ballots: Mapping[str, Mapping[str, float]], authors: Mapping[str, str],
                     weights: Mapping[str, float], *, trim: float = 0.5) -> dict[str, float]:
    """score_c = the weighted lower median (``trim`` 0.5) or weighted trimmed mean of
    c's ballots, its author's own excluded. Candidates nobody else scored get no score."""
    per_candidate: dict[str, list[tuple[float, float, str]]] = {}
    for voter in sorted(ballots):
        for candidate, value in ballots[voter].items():
            if candidate not in authors or authors[candidate] == voter:
                continue
            per_candidate.setdefault(candidate, []).append(
                (float(value), weights.get(voter, 0.0), voter))
    return {c: weighted_trimmed_mean(v, trim) for c, v in sorted(per_candidate.items())}


def update_author_scores(author_scores: Mapping[str, float], scores: Mapping[str, float],
                         authors: Mapping[str, str], *, clip: float, center: bool = False
                         ) -> dict[str, float]:
    """A[author] += clip(score_c / median_c' |score_c'|, -clip, clip). When that median
    is 0 (most scores exactly zero), each nonzero score counts as its sign. With
    ``center``, scores are first measured from the round's median score: a level shared
    by every candidate (an overshooting trusted mean makes every leave-one-out positive,
    an undershooting one every add-one) then moves no author."""
    out = dict(author_scores)
    if not scores:
        return out
    if center:
        middle = float(np.median(np.asarray([scores[c] for c in sorted(scores)])))
        scores = {c: s - middle for c, s in scores.items()}
    scale = float(np.median(np.abs(np.asarray([scores[c] for c in sorted(scores)]))))
    for candidate in sorted(scores):
        score = scores[candidate]
        step = (math.copysign(1.0, score) if score != 0.0 else 0.0) if scale == 0.0 \
            else score / scale
        author = authors[candidate]
        out[author] = out.get(author, 0.0) + max(-clip, min(clip, step))
    return out


def accept(scores: Mapping[str, float], authors: Mapping[str, str],
           author_scores: Mapping[str, float], validation: Mapping[str, float], *,
           max_accepted: int) -> list[str]:
    """Candidates whose author's score is > 0 and whose validation marginal is > 0, best
    vote score first (ties by id), at most ``max_accepted``."""
    eligible = [c for c in scores
                if author_scores.get(authors[c], 0.0) > 0.0 and validation.get(c, 0.0) > 0.0]
    eligible.sort(key=lambda c: (-scores[c], c))
    return eligible[:max_accepted]


def tally_round(state: VoteState, *, authors: Mapping[str, str],
                ballots: Mapping[str, Mapping[str, int]],
                validation_micro: Mapping[str, int], config: MarginalConfig) -> RoundTally:
    """One round of the marginal vote from ledger data: ``authors`` candidate -> author
    identity, ``ballots`` voter identity -> candidate -> marginal (micro-units),
    ``validation_micro`` the Scientist's marginal per candidate (micro-units)."""
    for voter, ballot in ballots.items():
        unknown = sorted(set(ballot) - set(authors))
        if unknown:
            raise TallyError(f"ballot of {voter[:16]}: candidates {unknown[:3]} are not "
                             "this round's")
    as_float = {v: {c: int(x) / MICRO for c, x in b.items()} for v, b in ballots.items()}
    validation = {c: int(x) / MICRO for c, x in validation_micro.items()}
    log_weights, agreement = update_reputation(
        state.log_weights, as_float, validation, rate=config.reputation_rate)
    weights = normalised_weights(log_weights, sorted(as_float), floor=config.reputation_floor)
    scores = candidate_scores(as_float, authors, weights, trim=config.tally_trim)
    # The first rounds' author scores come from the Scientist's numbers alone: before any
    # reputation exists, a colluding bloc holds its full share of the voting weight.
    steps = scores
    if state.rounds < config.validation_first_rounds:
        steps = {c: validation.get(c, 0.0) for c in scores}
    author_scores = update_author_scores(state.author_scores, steps, authors,
                                         clip=config.author_score_clip,
                                         center=config.center_author_scores)
    accepted = accept(scores, authors, author_scores, validation,
                      max_accepted=config.max_accepted)
    return RoundTally(state=VoteState(log_weights=log_weights, author_scores=author_scores,
                                      rounds=state.rounds + 1),
                      agreement=agreement, weights=weights, scores=scores, accepted=accepted)
