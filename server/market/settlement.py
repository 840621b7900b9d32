"""Settlement: who is paid what, as a pure function of numbers the ledger holds.

Everything here is integer or exact rational arithmetic (:class:`fractions.Fraction`);
no floats, no I/O, no clock. Amounts are integers in minor units; losses are integers
in micro-units (the Scientist's published scores). The rules (``docs/market.md``):

- L0 is the validation loss of the initial model, L_t after round t, T the last round.
  Round t's improvement ``d_t = L_{t-1} - L_t`` (may be negative) is credited to the
  authors of the applied updates by their Shapley values in the round's game, so the
  shares add up to ``d_t`` exactly. The offer's :class:`PayoutRule` names the game:
  ``mean`` (rule v1, offers without a ``payout`` field): a coalition C is worth
  ``L_{t-1} - L(theta + mean of C)``; ``fixed-k`` (rule ``round-game/v2``): C is worth
  ``L_{t-1} - L(theta + (1/k) sum of C)``, k the number applied, so an update of zero
  is worth exactly 0 (``server.market.attribution``). Exact Shapley from every
  coalition's loss, or, beyond ``exact_max`` updates, the mean marginal gain over
  orderings drawn from the ledger.
- Rule v2 adds two gates. ``loss_rise``: in a round whose loss rose (d_t < 0) nobody
  gains credit (negative shares still count). ``vote_gate``: an author whose final
  vote author-score (the last selection entry's ``author_scores_micro``) is not > 0 is
  credited nothing.
- The reward pool is ``floor(R * clamp((L0 - L_T) / (L0 - L*), 0, 1))``: R times the
  fraction of convergence achieved, rounded down, L* the offer's ``target_loss_micro``
  (0 when absent, the original rule). It is split among the subscribers whose net
  credit is positive, in proportion to that credit; a net negative credit pays nothing.
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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations
from math import factorial

__all__ = [
    "FORFEIT_MISMATCH",
    "FORFEIT_NO_REVEAL",
    "FORFEIT_SCORE",
    "PayoutRule",
    "RoundOutcome",
    "Settlement",
    "SettlementError",
    "Terms",
    "credits",
    "largest_remainder",
    "round_credits",
    "round_shares",
    "sampled_shapley",
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


GAMES = ("mean", "fixed-k")
RULE_V2 = "round-game/v2"


@dataclass(frozen=True)
class PayoutRule:
    """How round credit is computed (the offer's ``payout`` field and
    ``target_loss_micro``; :meth:`legacy` for offers without them)."""

    game: str = "fixed-k"
    exact_max: int = 12
    permutations: int = 32
    loss_rise: bool = True  # a round whose loss rose credits nobody positively
    vote_gate: bool = True  # credit only authors whose final vote author-score is > 0
    high_water: bool = True  # credit only progress below the best loss reached so far
    target_loss_micro: int = 0
    # loss_rise gates only a rise larger than the score tolerance (the offer's): a rise
    # within it could be the Scientist's rounding, not the round's doing
    tolerance_micro: int = 0

    @classmethod
    def legacy(cls, *, target_loss_micro: int = 0) -> PayoutRule:
        return cls(game="mean", exact_max=16, permutations=0, loss_rise=False,
                   vote_gate=False, high_water=False, target_loss_micro=target_loss_micro)

    def check(self) -> None:
        if self.game not in GAMES:
            raise SettlementError(f"payout: expected game in {list(GAMES)}, got {self.game!r}")
        for name, low, high in (("exact_max", 1, 16), ("permutations", 0, 256),
                                ("target_loss_micro", 0, 10**12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SettlementError(f"payout: expected {name} as an integer in "
                                      f"{low}..{high}, got {value!r}")
        if self.game == "fixed-k" and self.exact_max > 12:
            raise SettlementError(f"payout: expected exact_max <= 12 (2^k coalition losses a "
                                  f"round), got {self.exact_max}")
        if self.game == "fixed-k" and self.permutations < 2:
            raise SettlementError(f"payout: expected permutations >= 2 for the sampled "
                                  f"Shapley value, got {self.permutations}")

    def to_terms(self) -> dict[str, int | str]:
        """The offer's ``payout`` field (integers and strings only)."""
        return {"rule": RULE_V2, "game": self.game, "exact_max": self.exact_max,
                "permutations": self.permutations, "loss_rise": int(self.loss_rise),
                "vote_gate": int(self.vote_gate), "high_water": int(self.high_water)}

    @classmethod
    def from_offer(cls, offer: Mapping[str, object]) -> PayoutRule:
        """The rule an offer states; :class:`SettlementError` names what is wrong."""
        target = offer.get("target_loss_micro", 0)
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise SettlementError(f"offer: expected target_loss_micro as an integer >= 0, "
                                  f"got {target!r}")
        tolerance = offer.get("score_tolerance_micro", 0)
        tolerance = tolerance if isinstance(tolerance, int) and not isinstance(
            tolerance, bool) and tolerance >= 0 else 0
        if "payout" not in offer:
            rule = cls.legacy(target_loss_micro=target)
            rule.check()
            return rule
        terms = offer["payout"]
        if not isinstance(terms, Mapping) or terms.get("rule") != RULE_V2:
            raise SettlementError(f"offer: expected payout terms of rule {RULE_V2!r}, "
                                  f"got {terms!r}")
        unknown = sorted(set(terms) - PAYOUT_TERMS)
        if unknown:
            raise SettlementError(f"payout: unknown terms {unknown}; expected "
                                  f"{sorted(PAYOUT_TERMS)}")
        if terms.get("game") != "fixed-k":
            raise SettlementError(f"payout: expected game 'fixed-k' under {RULE_V2}, got "
                                  f"{terms.get('game')!r}")
        flags = {}
        for name in ("loss_rise", "vote_gate", "high_water"):
            value = terms.get(name, 0) if name == "high_water" else terms.get(name)
            if value not in (0, 1) or isinstance(value, bool):
                raise SettlementError(f"payout: expected {name} 0 or 1, got {value!r}")
            flags[name] = bool(value)
        rule = cls(game="fixed-k", exact_max=terms.get("exact_max"),  # type: ignore[arg-type]
                   permutations=terms.get("permutations"),  # type: ignore[arg-type]
                   target_loss_micro=target, tolerance_micro=tolerance, **flags)
        rule.check()
        return rule


PAYOUT_TERMS = frozenset({"rule", "game", "exact_max", "permutations", "loss_rise",
                          "vote_gate", "high_water"})


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
    # Beyond exact_max updates: the orderings drawn from the ledger (indices into
    # ``selected``) and, for each, the loss after each of its first k-1 prefixes.
    permutations: tuple[tuple[int, ...], ...] = ()
    permutation_losses_micro: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Settlement:
    forfeited: bool
    reason: str  # "" or one of FORFEIT_REASONS
    reward_payouts: dict[str, int]
    fee_payouts: dict[str, int]
    scientist_refund: int
    credits: dict[str, Fraction]  # net credit, as a fraction of L0
    fraction: Fraction  # total fraction of convergence, clamped to [0, 1]
    round_credits: dict[int, dict[str, Fraction]] = field(default_factory=dict, compare=False)

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


def sampled_shapley(players: Sequence[str], previous_micro: int, full_micro: int,
                    permutations: Sequence[Sequence[int]],
                    losses_micro: Sequence[Sequence[int]]
                    ) -> tuple[dict[str, Fraction], dict[str, float]]:
    """The permutation estimate of each player's Shapley value in the round game
    (exact rational mean of its marginal gains) and its standard error (sample standard
    deviation / sqrt(orderings)). The estimates add up to previous - full exactly."""
    k = len(players)
    if not permutations:
        raise SettlementError("expected at least one ordering for the sampled Shapley value")
    if len(losses_micro) != len(permutations):
        raise SettlementError(f"expected {len(permutations)} lists of prefix losses, "
                               f"got {len(losses_micro)}")
    gains: dict[int, list[int]] = {i: [] for i in range(k)}
    for order, losses in zip(permutations, losses_micro, strict=True):
        if sorted(order) != list(range(k)) or len(losses) != k - 1:
            raise SettlementError(f"expected an ordering of {k} updates and {k - 1} prefix "
                                   f"losses, got {len(order)} and {len(losses)}")
        prev = previous_micro
        for position, i in enumerate(order):
            loss = losses[position] if position < k - 1 else full_micro
            gains[i].append(prev - loss)
            prev = loss
    m = len(permutations)
    phi: dict[str, Fraction] = {}
    errors: dict[str, float] = {}
    for i, player in enumerate(players):
        values = gains[i]
        mean = Fraction(sum(values), m)
        phi[player] = phi.get(player, Fraction(0)) + mean
        spread = (math.sqrt(sum((v - float(mean)) ** 2 for v in values) / (m - 1) / m)
                  if m > 1 else math.inf)
        errors[player] = spread
    return phi, errors



def round_shares(outcome: RoundOutcome, previous_micro: int, rule: PayoutRule
                 ) -> dict[str, Fraction]:
    """Each applied update's Shapley value in round ``outcome`` (micro loss units; they
    add up to ``previous_micro - outcome.loss_micro``)."""
    selected = outcome.selected
    if not selected:
        return {}
    if len(selected) == 1:
        return {selected[0]: Fraction(previous_micro - outcome.loss_micro)}
    if len(selected) > rule.exact_max:
        if len(outcome.permutations) != rule.permutations:
            raise SettlementError(
                f"round {outcome.round}: expected {rule.permutations} orderings for "
                f"{len(selected)} updates, got {len(outcome.permutations)}")
        try:
            shares, _ = sampled_shapley(selected, previous_micro, outcome.loss_micro,
                                        outcome.permutations, outcome.permutation_losses_micro)
        except SettlementError as exc:
            raise SettlementError(f"round {outcome.round}: {exc}") from exc
        return shares
    full = (1 << len(selected)) - 1
    losses = dict(outcome.coalitions_micro)
    if losses.get(full, outcome.loss_micro) != outcome.loss_micro:
        raise SettlementError(
            f"round {outcome.round}: expected the full coalition's loss to equal "
            f"the round's score {outcome.loss_micro}, got {losses[full]}")
    losses[full] = outcome.loss_micro
    return shapley(selected, {m: previous_micro - loss for m, loss in losses.items()})


def round_credits(initial_loss_micro: int, rounds: Sequence[RoundOutcome],
                  rule: PayoutRule | None = None, eligible: Iterable[str] | None = None
                  ) -> dict[int, dict[str, Fraction]]:
    """Per round, each author's credit in micro loss units after the rule's gates:
    ``loss_rise`` keeps only the negative shares of a round whose loss rose;
    ``vote_gate`` credits only the authors in ``eligible`` (final vote author-score
    > 0; None: everyone); ``high_water`` scales a round's positive shares by the part
    of its fall that goes below the best loss reached before it."""
    rule = rule or PayoutRule.legacy()
    if initial_loss_micro <= 0:
        raise SettlementError(f"expected an initial loss > 0 micro-units, got {initial_loss_micro}")
    allowed = None if eligible is None or not rule.vote_gate else set(eligible)
    out: dict[int, dict[str, Fraction]] = {}
    previous = best = initial_loss_micro
    for outcome in sorted(rounds, key=lambda r: r.round):
        shares = round_shares(outcome, previous, rule)
        if rule.loss_rise and outcome.loss_micro > previous + rule.tolerance_micro:
            shares = {a: min(v, Fraction(0)) for a, v in shares.items()}
        gain = previous - outcome.loss_micro
        if rule.high_water and gain > 0:
            # Only the part of the fall below the best loss so far is new progress:
            # recovering what an earlier round lost is not paid again.
            factor = Fraction(max(0, min(best - outcome.loss_micro, gain)), gain)
            shares = {a: (v * factor if v > 0 else v) for a, v in shares.items()}
        if allowed is not None:
            shares = {a: (v if a in allowed else Fraction(0)) for a, v in shares.items()}
        out[outcome.round] = dict(sorted(shares.items()))
        previous, best = outcome.loss_micro, min(best, outcome.loss_micro)
    return out


def credits(initial_loss_micro: int, rounds: Sequence[RoundOutcome],
            rule: PayoutRule | None = None, eligible: Iterable[str] | None = None
            ) -> dict[str, Fraction]:
    """Each author's net credit as a fraction of L0 (see the module docstring)."""
    out: dict[str, Fraction] = {}
    for shares in round_credits(initial_loss_micro, rounds, rule, eligible).values():
        for author, share in shares.items():
            out[author] = out.get(author, Fraction(0)) + share / initial_loss_micro
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
    rule: PayoutRule | None = None,
    eligible: Iterable[str] | None = None,
) -> Settlement:
    """The settlement of a task (module docstring). ``rounds`` carry the published
    scores, or, when ``forfeit`` is :data:`FORFEIT_SCORE`, the replayed ones (the
    contribution the replay computed). With :data:`FORFEIT_MISMATCH` or
    :data:`FORFEIT_NO_REVEAL` no loss can be trusted: shares are equal."""
    terms.check()
    rule = rule or PayoutRule.legacy()
    rule.check()
    numbers = [r.round for r in rounds]
    if len(set(numbers)) != len(numbers):
        raise SettlementError(f"expected each round once, got rounds {sorted(numbers)}")
    if forfeit and forfeit not in FORFEIT_REASONS:
        raise SettlementError(f"expected forfeit in {list(FORFEIT_REASONS)} or '', got {forfeit!r}")
    scored_updates = sum(len(r.scored) for r in rounds)
    fee_pool = min(terms.update_fee * scored_updates, terms.fee_escrow)
    contributors = _contributors(rounds)
    net: dict[str, Fraction] = {}
    per_round: dict[int, dict[str, Fraction]] = {}
    fraction = Fraction(0)
    if forfeit in ("", FORFEIT_SCORE) and rounds:
        per_round = round_credits(initial_loss_micro, rounds, rule, eligible)
        for shares in per_round.values():
            for author, share in shares.items():
                net[author] = net.get(author, Fraction(0)) + share / initial_loss_micro
        net = dict(sorted(net.items()))
        last = max(rounds, key=lambda r: r.round).loss_micro
        span = initial_loss_micro - rule.target_loss_micro
        # A target the initial model already reaches (refused when the task opens, but a
        # hostile ledger can carry one) counts as converged: the Scientist's own target
        # pays all of R, and never blocks a settlement or a forfeiture.
        fraction = (min(max(Fraction(initial_loss_micro - last, span), Fraction(0)),
                        Fraction(1)) if span > 0 else Fraction(1))
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
                      fee_payouts=fees, scientist_refund=refund, credits=net, fraction=fraction,
                      round_credits=per_round)
