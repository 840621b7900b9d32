"""Settlement: who is paid what, as a pure function of numbers the ledger holds.

Everything here is integer or exact rational arithmetic (:class:`fractions.Fraction`);
no floats, no I/O, no clock. Amounts are integers in minor units; losses are integers
in micro-units (the Scientist's published scores). The rules (``docs/market.md``):

- L0 is the validation loss of the initial model, L_t after round t, T the last round.
  Round t's improvement ``d_t = L_{t-1} - L_t`` (may be negative) is credited to the
  author of the selected update; with top-k > 1 it is split by the exact Shapley values
  of the selected updates, the utility of a coalition C being ``L_{t-1} - L(C)``
  (``L(C)`` the loss of the previous model plus the mean of C's updates), so the
  shares add up to ``d_t`` exactly.
- The reward pool is ``floor(R * clamp((L0 - L_T) / L0, 0, 1))``: R times the total
  fraction of convergence achieved, rounded down. It is split among the subscribers
  whose net credit is positive, in proportion to that credit; a net negative credit
  pays nothing.
- The fee pool is ``update_fee * (number of scored updates)``; it is split in
  proportion to the reward payouts (and returns to the Scientist when nobody earned a
  reward).
- Forfeiture (a reveal that does not match its commitments, a published score that
  the replay does not reproduce within the tolerance, or no reveal by the deadline):
  R, the deposit and the fee pool go to the subscribers, by replayed positive credit
  when a replay could be computed and someone has one, otherwise equally among the
  authors of valid signed (scored) updates.
- The Scientist gets back whatever of the escrow is not paid out.
- Every split uses largest-remainder rounding: each share is floored, and the units
  left go one each to the largest fractional remainders, ties broken by the smaller
  key id (byte order). Money is conserved exactly: payouts + refund = escrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations
from math import factorial

__all__ = [
    "FORFEIT_MISMATCH",
    "FORFEIT_NO_REVEAL",
    "FORFEIT_SCORE",
    "RoundOutcome",
    "Settlement",
    "SettlementError",
    "Terms",
    "credits",
    "largest_remainder",
    "settle",
    "shapley",
]

FORFEIT_MISMATCH = "reveal-mismatch"
FORFEIT_SCORE = "score-mismatch"
FORFEIT_NO_REVEAL = "no-reveal"
FORFEIT_REASONS = (FORFEIT_MISMATCH, FORFEIT_SCORE, FORFEIT_NO_REVEAL)


class SettlementError(ValueError):
    """Inputs a settlement cannot be computed from (named in the message)."""


@dataclass(frozen=True)
class Terms:
    """The money terms of a task, all integers in minor units (deposit = reward)."""

    reward: int
    deposit: int
    update_fee: int
    max_updates: int

    @property
    def fee_escrow(self) -> int:
        return self.update_fee * self.max_updates

    @property
    def escrow(self) -> int:
        """What the Scientist locks at task creation."""
        return self.reward + self.deposit + self.fee_escrow

    def check(self) -> None:
        for name in ("reward", "deposit", "update_fee", "max_updates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettlementError(f"terms: expected {name} as an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class RoundOutcome:
    """One round as settlement needs it.

    ``selected`` are the authors (key ids) of the applied updates in selection order;
    ``loss_micro`` the validation loss after the round; ``coalitions_micro`` maps a
    bitmask over ``selected`` (bit i = ``selected[i]``) to the loss of the previous
    model plus the mean of that coalition's updates, for every non-empty coalition
    (needed only when more than one update was selected); ``scored`` the authors of
    the round's valid, scored updates (for fees and equal forfeiture shares).
    """

    round: int
    selected: tuple[str, ...]
    loss_micro: int
    coalitions_micro: Mapping[int, int] = field(default_factory=dict)
    scored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settlement:
    forfeited: bool
    reason: str  # "" or one of FORFEIT_REASONS
    reward_payouts: dict[str, int]
    fee_payouts: dict[str, int]
    scientist_refund: int
    credits: dict[str, Fraction]  # net credit, as a fraction of L0
    fraction: Fraction  # total fraction of convergence, clamped to [0, 1]

    @property
    def payouts(self) -> dict[str, int]:
        """Reward plus fees per subscriber key id (zero entries dropped), sorted."""
        total: dict[str, int] = {}
        for part in (self.reward_payouts, self.fee_payouts):
            for who, amount in part.items():
                total[who] = total.get(who, 0) + amount
        return {k: v for k, v in sorted(total.items()) if v}

    @property
    def paid(self) -> int:
        return sum(self.reward_payouts.values()) + sum(self.fee_payouts.values())


# --------------------------------------------------------------------------- pieces
def largest_remainder(total: int, weights: Mapping[str, Fraction | int]) -> dict[str, int]:
    """Split ``total`` units in proportion to non-negative ``weights``.

    Floors every exact share, then hands the units left one each to the largest
    fractional remainders, ties to the smaller key (byte order). All-zero weights (or
    none) return ``{}``: the caller decides where such money goes.
    """
    if total < 0:
        raise SettlementError(f"expected a total >= 0 to split, got {total}")
    positive = {k: Fraction(w) for k, w in weights.items() if w > 0}
    if any(w < 0 for w in weights.values()):
        raise SettlementError("expected non-negative weights")
    weight_sum = sum(positive.values(), Fraction(0))
    if not positive or total == 0:
        return {}
    shares = {k: total * w / weight_sum for k, w in positive.items()}
    floors = {k: s.numerator // s.denominator for k, s in shares.items()}
    left = total - sum(floors.values())
    order = sorted(positive, key=lambda k: (-(shares[k] - floors[k]), k.encode("utf-8")))
    for key in order[:left]:
        floors[key] += 1
    return {k: v for k, v in sorted(floors.items()) if v}


def shapley(players: Sequence[str], value: Mapping[int, int | Fraction]) -> dict[str, Fraction]:
    """Exact Shapley values; ``value`` maps a bitmask over ``players`` to the coalition's
    utility (the empty coalition is worth 0). Repeated players (one author selected
    twice cannot happen, but be safe) add up."""
    n = len(players)
    if n > 16:
        raise SettlementError(f"expected at most 16 selected updates for exact Shapley, got {n}")
    full = (1 << n) - 1
    missing = [m for m in range(1, full + 1) if m not in value]
    if missing:
        raise SettlementError(
            f"expected a loss for every non-empty coalition of {n} updates, "
            f"missing bitmask(s) {missing[:5]}")
    v = {0: Fraction(0), **{m: Fraction(value[m]) for m in range(1, full + 1)}}
    out: dict[str, Fraction] = {}
    for i, player in enumerate(players):
        bit = 1 << i
        phi = Fraction(0)
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = Fraction(factorial(size) * factorial(n - size - 1), factorial(n))
            for subset in combinations(others, size):
                mask = sum(1 << j for j in subset)
                phi += weight * (v[mask | bit] - v[mask])
        out[player] = out.get(player, Fraction(0)) + phi
    return out


def credits(initial_loss_micro: int, rounds: Sequence[RoundOutcome]) -> dict[str, Fraction]:
    """Each author's net credit as a fraction of L0 (see the module docstring)."""
    if initial_loss_micro <= 0:
        raise SettlementError(f"expected an initial loss > 0 micro-units, got {initial_loss_micro}")
    out: dict[str, Fraction] = {}
    previous = initial_loss_micro
    for outcome in sorted(rounds, key=lambda r: r.round):
        if outcome.selected:
            if len(outcome.selected) == 1:
                shares = {outcome.selected[0]: Fraction(previous - outcome.loss_micro)}
            else:
                full = (1 << len(outcome.selected)) - 1
                losses = dict(outcome.coalitions_micro)
                if losses.get(full, outcome.loss_micro) != outcome.loss_micro:
                    raise SettlementError(
                        f"round {outcome.round}: expected the full coalition's loss to equal "
                        f"the round's score {outcome.loss_micro}, got {losses[full]}")
                losses[full] = outcome.loss_micro
                utility = {m: previous - loss for m, loss in losses.items()}
                shares = shapley(outcome.selected, utility)
            for author, share in shares.items():
                out[author] = out.get(author, Fraction(0)) + share / initial_loss_micro
        previous = outcome.loss_micro
    return dict(sorted(out.items()))


def _contributors(rounds: Iterable[RoundOutcome]) -> list[str]:
    return sorted({a for r in rounds for a in r.scored})


# ---------------------------------------------------------------------- settlement
def settle(
    terms: Terms,
    initial_loss_micro: int,
    rounds: Sequence[RoundOutcome],
    *,
    forfeit: str = "",
) -> Settlement:
    """The settlement of a task (module docstring). ``rounds`` carry the published
    scores, or, when ``forfeit`` is :data:`FORFEIT_SCORE`, the replayed ones (the
    contribution the replay computed). With :data:`FORFEIT_MISMATCH` or
    :data:`FORFEIT_NO_REVEAL` no loss can be trusted: shares are equal."""
    terms.check()
    numbers = [r.round for r in rounds]
    if len(set(numbers)) != len(numbers):
        raise SettlementError(f"expected each round once, got rounds {sorted(numbers)}")
    if forfeit and forfeit not in FORFEIT_REASONS:
        raise SettlementError(f"expected forfeit in {list(FORFEIT_REASONS)} or '', got {forfeit!r}")
    scored_updates = sum(len(r.scored) for r in rounds)
    fee_pool = min(terms.update_fee * scored_updates, terms.fee_escrow)
    contributors = _contributors(rounds)
    net: dict[str, Fraction] = {}
    fraction = Fraction(0)
    if forfeit in ("", FORFEIT_SCORE) and rounds:
        net = credits(initial_loss_micro, rounds)
        last = max(rounds, key=lambda r: r.round).loss_micro
        fraction = min(max(Fraction(initial_loss_micro - last, initial_loss_micro),
                           Fraction(0)), Fraction(1))
    positive = {k: c for k, c in net.items() if c > 0}

    if not forfeit:
        pool = (terms.reward * fraction.numerator) // fraction.denominator
        reward = largest_remainder(pool, positive)
        fees = largest_remainder(fee_pool, reward) if reward else {}
    else:
        pot = terms.reward + terms.deposit
        weights: Mapping[str, Fraction | int] = (
            positive if positive else {a: 1 for a in contributors})
        reward = largest_remainder(pot, weights)
        fees = largest_remainder(fee_pool, weights)
    refund = terms.escrow - sum(reward.values()) - sum(fees.values())
    if refund < 0:  # cannot happen: each pool is at most its part of the escrow
        raise SettlementError(f"settlement pays {-refund} more than the escrow")
    return Settlement(forfeited=bool(forfeit), reason=forfeit, reward_payouts=reward,
                      fee_payouts=fees, scientist_refund=refund, credits=net, fraction=fraction)
