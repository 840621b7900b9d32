"""Settlement (``server.market.settlement``): hand-derived golden settlements, largest-remainder
and Shapley against independent references, and money-conservation properties over
random markets, with and without forfeiture."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.market.settlement import (
    FORFEIT_MISMATCH,
    FORFEIT_NO_REVEAL,
    FORFEIT_SCORE,
    RoundOutcome,
    Settlement,
    SettlementError,
    Terms,
    credits,
    largest_remainder,
    settle,
    shapley,
)

FORFEITS = ("", FORFEIT_SCORE, FORFEIT_MISMATCH, FORFEIT_NO_REVEAL)
# "B" < "a" < "b" in byte order; "é" (0xc3 0xa9) sorts after every ASCII key
AUTHORS = ("a", "b", "c", "d", "B", "é")


# ------------------------------------------------------------------ golden settlements
TERMS_1 = Terms(reward=1000, deposit=1000, update_fee=10, max_updates=6)
ROUNDS_1 = [
    RoundOutcome(round=1, selected=("a",), loss_micro=1_500_000, scored=("b", "a")),
    RoundOutcome(round=2, selected=("b",), loss_micro=1_600_000, scored=("b", "c")),
    RoundOutcome(round=3, selected=("a",), loss_micro=1_000_000, scored=("a",)),
]


def test_golden_top1_settlement() -> None:
    # L0 = 2_000_000; d_1 = 2.0e6 - 1.5e6 = +500_000 (a); d_2 = 1.5e6 - 1.6e6 = -100_000 (b);
    # d_3 = 1.6e6 - 1.0e6 = +600_000 (a).
    # credits: a = (500_000 + 600_000) / 2e6 = 11/20; b = -100_000 / 2e6 = -1/20; c none.
    # fraction = (2e6 - 1e6) / 2e6 = 1/2; pool = floor(1000 * 1/2) = 500, all to a (b < 0).
    # fee pool = 10 * (2 + 2 + 1 scored) = 50 <= fee escrow 10 * 6 = 60; all to a.
    # escrow = 1000 + 1000 + 60 = 2060; refund = 2060 - 500 - 50 = 1510.
    s = settle(TERMS_1, 2_000_000, ROUNDS_1)
    assert s == Settlement(
        forfeited=False, reason="", reward_payouts={"a": 500}, fee_payouts={"a": 50},
        scientist_refund=1510, credits={"a": Fraction(11, 20), "b": Fraction(-1, 20)},
        fraction=Fraction(1, 2))
    assert list(s.credits) == ["a", "b"]
    assert s.payouts == {"a": 550}
    assert s.paid == 550
    assert TERMS_1.fee_escrow == 60 and TERMS_1.escrow == 2060


def test_golden_fee_pool_is_capped_at_the_fee_escrow() -> None:
    # as above but round 3 also scores c and d: 7 scored updates * 10 = 70 > escrow 60,
    # so the fee pool is 60, all to a; refund = 2060 - 500 - 60 = 1500.
    rounds = [*ROUNDS_1[:2], RoundOutcome(round=3, selected=("a",), loss_micro=1_000_000,
                                          scored=("a", "c", "d"))]
    s = settle(TERMS_1, 2_000_000, rounds)
    assert (s.reward_payouts, s.fee_payouts, s.scientist_refund) == ({"a": 500}, {"a": 60}, 1500)


def test_golden_forfeiture_without_replay_splits_equally_among_scored_authors() -> None:
    # no reveal: no loss is trusted, credits {} and fraction 0. Contributors (scored
    # authors) a, b, c. Pot R + deposit = 2000: 2000/3 = 666.67 each, floors 666 * 3 = 1998,
    # the 2 left go to the equal remainders in key order: a, b -> 667, 667, 666.
    # Fee pool 50: 50/3 = 16.67, floors 48, 2 left -> a, b: 17, 17, 16.
    # refund = 2060 - 2000 - 50 = 10 = fee escrow 60 - fee pool 50.
    for reason in (FORFEIT_NO_REVEAL, FORFEIT_MISMATCH):
        s = settle(TERMS_1, 2_000_000, ROUNDS_1, forfeit=reason)
        assert s == Settlement(
            forfeited=True, reason=reason, reward_payouts={"a": 667, "b": 667, "c": 666},
            fee_payouts={"a": 17, "b": 17, "c": 16}, scientist_refund=10, credits={},
            fraction=Fraction(0))


def test_golden_forfeiture_with_replay_pays_by_positive_credit() -> None:
    # score mismatch: the rounds carry the replayed losses; credits as in the top-1 golden
    # (a 11/20, b -1/20), so a alone takes the pot 2000 and the fee pool 50; refund 10.
    s = settle(TERMS_1, 2_000_000, ROUNDS_1, forfeit=FORFEIT_SCORE)
    assert s == Settlement(
        forfeited=True, reason=FORFEIT_SCORE, reward_payouts={"a": 2000},
        fee_payouts={"a": 50}, scientist_refund=10,
        credits={"a": Fraction(11, 20), "b": Fraction(-1, 20)}, fraction=Fraction(1, 2))


TERMS_2 = Terms(reward=1000, deposit=1000, update_fee=7, max_updates=10)
ROUNDS_2 = [
    # selected (b, a): mask 1 = b alone, mask 2 = a alone, mask 3 = both
    RoundOutcome(round=1, selected=("b", "a"), loss_micro=700_000,
                 coalitions_micro={1: 900_000, 2: 750_000, 3: 700_000}, scored=("a", "b", "d")),
    # selected (c, a): mask 1 = c alone, mask 2 = a alone
    RoundOutcome(round=2, selected=("c", "a"), loss_micro=600_000,
                 coalitions_micro={1: 707_000, 2: 620_000, 3: 600_000}, scored=("c", "a")),
]


def test_golden_top2_settlement_with_shapley_shares() -> None:
    # L0 = 1_000_000. Two players: phi_i = v(i)/2 + (v(N) - v(j))/2.
    # Round 1 (previous 1e6): v(b) = 100_000, v(a) = 250_000, v(N) = 300_000
    #   phi_b = 50_000 + (300_000 - 250_000)/2 = 75_000
    #   phi_a = 125_000 + (300_000 - 100_000)/2 = 225_000        (sum 300_000 = d_1)
    # Round 2 (previous 700_000): v(c) = -7_000, v(a) = 80_000, v(N) = 100_000
    #   phi_c = -3_500 + (100_000 - 80_000)/2 = 6_500
    #   phi_a = 40_000 + (100_000 + 7_000)/2 = 93_500             (sum 100_000 = d_2)
    # credits: a = 318_500/1e6 = 637/2000, b = 75_000/1e6 = 3/40, c = 6_500/1e6 = 13/2000.
    # fraction = (1e6 - 600_000)/1e6 = 2/5; pool = floor(1000 * 2/5) = 400.
    # reward quotas (weights sum 400_000): a 318.5, b 75, c 6.5 -> floors 318+75+6 = 399;
    #   1 left, a and c tie at .5 -> the smaller key a: {a 319, b 75, c 6}.
    # fee pool = 7 * 5 scored = 35 (<= 70). Quotas by reward (sum 400): a 35*319/400 = 27.9125,
    #   b 35*75/400 = 6.5625, c 35*6/400 = 0.525 -> floors 27+6+0 = 33, 2 left -> a, b:
    #   {a 28, b 7}; c's 0 is dropped; d (scored, never selected) gets nothing.
    # escrow = 1000 + 1000 + 70 = 2070; refund = 2070 - 400 - 35 = 1635.
    s = settle(TERMS_2, 1_000_000, ROUNDS_2)
    assert s == Settlement(
        forfeited=False, reason="", reward_payouts={"a": 319, "b": 75, "c": 6},
        fee_payouts={"a": 28, "b": 7}, scientist_refund=1635,
        credits={"a": Fraction(637, 2000), "b": Fraction(3, 40), "c": Fraction(13, 2000)},
        fraction=Fraction(2, 5))
    assert s.payouts == {"a": 347, "b": 82, "c": 6}


def test_the_full_coalition_defaults_to_the_round_score() -> None:
    # omitting mask 3 means "the round's loss": same settlement as the golden one
    rounds = [RoundOutcome(r.round, r.selected, r.loss_micro,
                           {m: v for m, v in r.coalitions_micro.items() if m != 3}, r.scored)
              for r in ROUNDS_2]
    assert settle(TERMS_2, 1_000_000, rounds) == settle(TERMS_2, 1_000_000, ROUNDS_2)


def test_golden_no_improvement_returns_everything_to_the_scientist() -> None:
    # the final loss is above L0: fraction clamps to 0, pool 0, nobody earns a reward, so
    # the fee pool returns too: refund = escrow.
    rounds = [RoundOutcome(round=1, selected=("a",), loss_micro=900, scored=("a",)),
              RoundOutcome(round=2, selected=("b",), loss_micro=1_200, scored=("b",))]
    s = settle(TERMS_1, 1_000, rounds)
    assert s.fraction == 0 and s.reward_payouts == {} and s.fee_payouts == {}
    assert s.credits == {"a": Fraction(1, 10), "b": Fraction(-3, 10)}
    assert s.scientist_refund == TERMS_1.escrow


def test_fraction_clamps_at_one() -> None:
    # a loss below zero cannot happen, but a loss of 0 is total convergence: fraction 1
    rounds = [RoundOutcome(round=1, selected=("a",), loss_micro=0, scored=("a",))]
    s = settle(TERMS_1, 5, rounds)
    assert s.fraction == 1 and s.reward_payouts == {"a": 1000} and s.fee_payouts == {"a": 10}
    rounds = [RoundOutcome(round=1, selected=("a",), loss_micro=-5, scored=("a",))]
    assert settle(TERMS_1, 5, rounds).fraction == 1


# ------------------------------------------------------------------- largest remainder
def test_largest_remainder_known_answers() -> None:
    # 10 / 3 = 3.33 each: floors 9, the 1 left goes to the smallest key
    assert largest_remainder(10, {"c": 1, "b": 1, "a": 1}) == {"a": 4, "b": 3, "c": 3}
    # byte order, not case-insensitive order: "B" (0x42) < "a" (0x61)
    assert largest_remainder(10, {"a": 1, "B": 1, "c": 1}) == {"B": 4, "a": 3, "c": 3}
    # 7 * 1/3 = 2.33, 7 * 2/3 = 4.67: floors 6, the 1 left to the larger remainder (y)
    assert largest_remainder(7, {"x": Fraction(1, 3), "y": Fraction(2, 3)}) == {"x": 2, "y": 5}
    # 10 by 1:2:7 is exact
    assert largest_remainder(10, {"p": 1, "q": 2, "r": 7}) == {"p": 1, "q": 2, "r": 7}
    # 5 by 1:1:1:1:1:1 -> 0.83 each, 5 units to the 5 smallest keys; zero shares dropped
    assert largest_remainder(5, dict.fromkeys("fedcba", 1)) == dict.fromkeys("abcde", 1)
    # 100 by 1:1:1 -> 34, 33, 33; a zero weight gets nothing and is dropped
    assert largest_remainder(100, {"b": 1, "a": 0, "c": 1, "d": 1}) == {"b": 34, "c": 33, "d": 33}
    # z: 9 * 1/10 = 0.9, a: 9 * 9/10 = 8.1 -> floors 0 + 8, the 1 left to z's larger .9
    assert largest_remainder(9, {"z": Fraction(1, 10), "a": Fraction(9, 10)}) == {"a": 8, "z": 1}


def test_largest_remainder_edge_cases() -> None:
    assert largest_remainder(10, {"a": 0, "b": 0}) == {}
    assert largest_remainder(10, {}) == {}
    assert largest_remainder(0, {"a": 1}) == {}
    with pytest.raises(SettlementError):
        largest_remainder(-1, {"a": 1})
    with pytest.raises(SettlementError):
        largest_remainder(10, {"a": 1, "b": -1})


def reference_largest_remainder(total: int, weights: dict[str, Fraction]) -> dict[str, int]:
    """Hamilton's method written from scratch: integer quotas scaled to a common
    denominator, then one unit at a time to the best remaining (remainder, key) pair."""
    keys = [k for k, w in weights.items() if w > 0]
    if not keys or total == 0:
        return {}
    denominator = math.lcm(*(Fraction(weights[k]).denominator for k in keys))
    ints = {k: int(Fraction(weights[k]) * denominator) for k in keys}  # integer weights
    weight_sum = sum(ints.values())
    out = {k: (total * ints[k]) // weight_sum for k in keys}
    remainder = {k: (total * ints[k]) % weight_sum for k in keys}  # in units of 1/weight_sum
    pending = sorted(keys, key=lambda k: k.encode("utf-8"))  # byte order
    for _ in range(total - sum(out.values())):
        best = max(pending, key=lambda k: remainder[k])  # max() keeps the first of equals
        out[best] += 1
        pending.remove(best)
    return {k: v for k, v in out.items() if v}


weights_strategy = st.dictionaries(
    st.sampled_from(AUTHORS + ("ab", "", "aa", "A")),
    st.one_of(st.integers(0, 20), st.fractions(min_value=0, max_value=20, max_denominator=12)),
    max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 500), weights_strategy)
def test_largest_remainder_properties(total: int, weights: dict[str, Fraction]) -> None:
    out = largest_remainder(total, weights)
    assert out == reference_largest_remainder(total, weights)
    assert all(v > 0 for v in out.values())
    assert set(out) <= {k for k, w in weights.items() if w > 0}
    weight_sum = sum((Fraction(w) for w in weights.values()), Fraction(0))
    if weight_sum == 0:
        assert out == {}
        return
    assert sum(out.values()) == total
    quota = {k: Fraction(total) * Fraction(w) / weight_sum for k, w in weights.items()}
    for k, q in quota.items():
        assert out.get(k, 0) in (math.floor(q), math.ceil(q))
    # Hamilton's order: whoever got the extra unit has a larger remainder than whoever
    # did not (or an equal one and a smaller key in byte order)
    up = [k for k in quota if out.get(k, 0) > quota[k]]
    down = [k for k in quota if out.get(k, 0) < quota[k]]
    for u in up:
        for d in down:
            ru, rd = quota[u] - math.floor(quota[u]), quota[d] - math.floor(quota[d])
            assert ru > rd or (ru == rd and u.encode() < d.encode())


# ----------------------------------------------------------------------------- Shapley
def permutation_shapley(n: int, value: dict[int, int]) -> list[Fraction]:
    """Average marginal contribution over all n! orderings."""
    v = {0: 0, **value}
    total = [Fraction(0)] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        mask = 0
        for i in order:
            total[i] += v[mask | (1 << i)] - v[mask]
            mask |= 1 << i
    return [t / len(orders) for t in total]


@st.composite
def games(draw: st.DrawFn, max_n: int = 5) -> tuple[int, dict[int, int]]:
    n = draw(st.integers(1, max_n))
    values = draw(st.lists(st.integers(-1000, 1000), min_size=(1 << n) - 1,
                           max_size=(1 << n) - 1))
    return n, {m: values[m - 1] for m in range(1, 1 << n)}


def players(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def test_shapley_known_answers() -> None:
    # glove game: p0 holds a left glove, p1 and p2 right gloves; a pair is worth 6.
    # orderings (6): p0 is pivotal unless it comes first (4 of 6) -> 6 * 4/6 = 4;
    # p1 is pivotal only in (p0, p1, p2) -> 6 * 1/6 = 1; p2 likewise 1.
    glove = {1: 0, 2: 0, 4: 0, 3: 6, 5: 6, 6: 0, 7: 6}
    assert shapley(["p0", "p1", "p2"], glove) == {"p0": 4, "p1": 1, "p2": 1}
    # two players, v(a) = 10, v(b) = 4, v(ab) = 20: phi_a = 10/2 + (20-4)/2 = 13, phi_b = 7
    assert shapley(["a", "b"], {1: 10, 2: 4, 3: 20}) == {"a": 13, "b": 7}
    # one player takes the whole value; a player listed twice adds up (v(N) = 20)
    assert shapley(["a"], {1: -5}) == {"a": -5}
    assert shapley(["a", "a"], {1: 10, 2: 4, 3: 20}) == {"a": 20}
    # exact thirds: v = 1 only for the grand coalition of 3 -> 1/3 each
    unanimity = {m: 0 for m in range(1, 7)} | {7: 1}
    assert shapley(["x", "y", "z"], unanimity) == dict.fromkeys("xyz", Fraction(1, 3))


def test_shapley_rejects_missing_coalitions_and_too_many_players() -> None:
    with pytest.raises(SettlementError, match="missing"):
        shapley(["a", "b"], {1: 1, 3: 2})
    with pytest.raises(SettlementError, match="missing"):
        shapley(["a", "b", "c"], {m: 1 for m in range(1, 8) if m != 5})
    with pytest.raises(SettlementError, match="16"):
        shapley([f"p{i}" for i in range(17)], {})


@settings(max_examples=120, deadline=None)
@given(games())
def test_shapley_matches_the_permutation_average(game: tuple[int, dict[int, int]]) -> None:
    n, value = game
    phi = shapley(players(n), value)
    assert [phi[p] for p in players(n)] == permutation_shapley(n, value)
    assert sum(phi.values()) == value[(1 << n) - 1]  # efficiency


@settings(max_examples=80, deadline=None)
@given(games(), st.data())
def test_shapley_symmetry_and_null_player(game: tuple[int, dict[int, int]],
                                          data: st.DataObject) -> None:
    n, value = game
    v = {0: 0, **value}
    k = data.draw(st.integers(0, n - 1))
    # null player: k's presence never changes the worth -> phi_k = 0
    null_game = {m: v[m & ~(1 << k)] for m in range(1, 1 << n)}
    phi = shapley(players(n), null_game)
    assert phi[f"p{k}"] == 0
    assert sum(phi.values()) == null_game[(1 << n) - 1]
    if n < 2:
        return
    i, j = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2,
                                     unique=True)))

    def swap(m: int) -> int:
        bi, bj = (m >> i) & 1, (m >> j) & 1
        return (m & ~((1 << i) | (1 << j))) | (bi << j) | (bj << i)

    symmetric = {m: v[m] + v[swap(m)] for m in range(1, 1 << n)}
    phi = shapley(players(n), symmetric)
    assert phi[f"p{i}"] == phi[f"p{j}"]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5).flatmap(
    lambda n: st.tuples(st.just(n), *(st.lists(st.integers(-1000, 1000), min_size=(1 << n) - 1,
                                               max_size=(1 << n) - 1) for _ in range(2)))))
def test_shapley_additivity(game: tuple[int, list[int], list[int]]) -> None:
    n, a, b = game
    va = {m: a[m - 1] for m in range(1, 1 << n)}
    vb = {m: b[m - 1] for m in range(1, 1 << n)}
    phi_a, phi_b = shapley(players(n), va), shapley(players(n), vb)
    phi_sum = shapley(players(n), {m: va[m] + vb[m] for m in va})
    assert phi_sum == {p: phi_a[p] + phi_b[p] for p in players(n)}


# -------------------------------------------------------------------- random markets
@st.composite
def markets(draw: st.DrawFn) -> tuple[Terms, int, list[RoundOutcome]]:
    terms = Terms(reward=draw(st.integers(0, 10**6)), deposit=draw(st.integers(0, 10**6)),
                  update_fee=draw(st.integers(0, 1000)), max_updates=draw(st.integers(0, 12)))
    l0 = draw(st.integers(1, 3_000_000))
    round_ids = sorted(draw(st.lists(st.integers(0, 60), max_size=5, unique=True)))
    losses = st.integers(0, 4_000_000)  # a round may make the model worse than L0
    rounds, previous = [], l0
    for rid in round_ids:
        selected = tuple(draw(st.lists(st.sampled_from(AUTHORS), max_size=3, unique=True)))
        loss = draw(losses) if selected else previous  # nothing applied: model unchanged
        coalitions: dict[int, int] = {}
        if len(selected) > 1:
            full = (1 << len(selected)) - 1
            coalitions = {m: draw(losses) for m in range(1, full)} | {full: loss}
        extra = draw(st.lists(st.sampled_from(AUTHORS), max_size=3, unique=True))
        scored = tuple(draw(st.permutations(sorted(set(selected) | set(extra)))))
        rounds.append(RoundOutcome(round=rid, selected=selected, loss_micro=loss,
                                   coalitions_micro=coalitions, scored=scored))
        previous = loss
    return terms, l0, rounds


def assert_money_is_conserved(terms: Terms, s: Settlement) -> None:
    amounts = [*s.reward_payouts.values(), *s.fee_payouts.values(), s.scientist_refund]
    assert all(isinstance(a, int) and a >= 0 for a in amounts)
    assert sum(s.reward_payouts.values()) + sum(s.fee_payouts.values()) + s.scientist_refund \
        == terms.escrow
    assert s.paid + s.scientist_refund == terms.escrow
    assert all(v > 0 for v in s.payouts.values())
    assert 0 <= s.fraction <= 1


@settings(max_examples=300, deadline=None)
@given(markets(), st.sampled_from(FORFEITS), st.randoms(use_true_random=False))
def test_settlement_properties(market: tuple[Terms, int, list[RoundOutcome]], forfeit: str,
                               rng: random.Random) -> None:
    terms, l0, rounds = market
    s = settle(terms, l0, rounds, forfeit=forfeit)
    assert s.forfeited == bool(forfeit) and s.reason == forfeit
    assert_money_is_conserved(terms, s)

    scored_count = sum(len(r.scored) for r in rounds)
    fee_pool = min(terms.update_fee * scored_count, terms.fee_escrow)
    contributors = {a for r in rounds for a in r.scored}
    assert sum(s.fee_payouts.values()) <= fee_pool
    assert set(s.payouts) <= contributors  # selected authors are among the scored

    # settlement ignores the order of the rounds and of the authors within `scored`
    shuffled = [RoundOutcome(r.round, r.selected, r.loss_micro, r.coalitions_micro,
                             tuple(rng.sample(r.scored, len(r.scored)))) for r in rounds]
    rng.shuffle(shuffled)
    assert settle(terms, l0, shuffled, forfeit=forfeit) == s

    replayable = forfeit in ("", FORFEIT_SCORE)
    last = rounds[-1].loss_micro if rounds else l0
    expected_fraction = min(max(Fraction(l0 - last, l0), Fraction(0)), Fraction(1))
    if replayable:
        assert s.credits == credits(l0, rounds)
        # Shapley efficiency per round telescopes: net credits add up to (L0 - L_T) / L0
        assert sum(s.credits.values(), Fraction(0)) == Fraction(l0 - last, l0)
        assert s.fraction == (expected_fraction if rounds else 0)
    else:
        assert s.credits == {} and s.fraction == 0
    positive = {k: c for k, c in s.credits.items() if c > 0}

    if not forfeit:
        pool = terms.reward * s.fraction.numerator // s.fraction.denominator
        assert pool <= terms.reward
        assert sum(s.reward_payouts.values()) == (pool if positive else 0)
        for who, c in s.credits.items():
            if c <= 0:
                assert who not in s.reward_payouts and who not in s.fee_payouts
        credit_sum = sum(positive.values(), Fraction(0))
        for who, c in positive.items():
            quota = pool * c / credit_sum
            assert s.reward_payouts.get(who, 0) in (math.floor(quota), math.ceil(quota))
        assert set(s.fee_payouts) <= set(s.reward_payouts)
        assert sum(s.fee_payouts.values()) == (fee_pool if s.reward_payouts else 0)
        assert s.scientist_refund == terms.escrow - sum(s.reward_payouts.values()) \
            - sum(s.fee_payouts.values())
        return

    # forfeiture: R + deposit and the fee pool go to the subscribers whenever anyone can
    # receive them; the Scientist gets back only the fee escrow not used by the fee pool
    if contributors or positive:
        assert sum(s.reward_payouts.values()) == terms.reward + terms.deposit
        assert sum(s.fee_payouts.values()) == fee_pool
        assert s.scientist_refund == terms.fee_escrow - fee_pool
    else:
        assert s.payouts == {} and s.scientist_refund == terms.escrow
    if positive:
        assert set(s.payouts) <= set(positive)
    else:  # equal shares among the scored authors: they differ by at most one unit
        for part in (s.reward_payouts, s.fee_payouts):
            shares = [part.get(a, 0) for a in contributors]
            assert not shares or max(shares) - min(shares) <= 1


@settings(max_examples=100, deadline=None)
@given(markets())
def test_forfeiture_never_pays_the_scientist_more_than_an_honest_settlement(
        market: tuple[Terms, int, list[RoundOutcome]]) -> None:
    # whatever the losses, forfeiting with contributors refunds at most the fee escrow
    # share, which is never more than the honest refund
    terms, l0, rounds = market
    honest = settle(terms, l0, rounds)
    for reason in (FORFEIT_SCORE, FORFEIT_MISMATCH, FORFEIT_NO_REVEAL):
        assert settle(terms, l0, rounds, forfeit=reason).scientist_refund \
            <= honest.scientist_refund


# ------------------------------------------------------------------------- mutations
@pytest.mark.parametrize("field", ["reward", "deposit", "update_fee", "max_updates"])
@pytest.mark.parametrize("bad", [-1, True, 1.0, "5", None])
def test_bad_terms_are_rejected(field: str, bad: object) -> None:
    good = {"reward": 10, "deposit": 10, "update_fee": 1, "max_updates": 2}
    terms = Terms(**(good | {field: bad}))  # type: ignore[arg-type]
    with pytest.raises(SettlementError, match=field):
        settle(terms, 2_000_000, ROUNDS_1)
    settle(Terms(**good), 2_000_000, ROUNDS_1)  # the unmutated terms settle


@pytest.mark.parametrize("reason", ["forfeit", "Score-Mismatch", "no_reveal", " ", "x"])
def test_unknown_forfeit_reason_is_rejected(reason: str) -> None:
    with pytest.raises(SettlementError, match="forfeit"):
        settle(TERMS_1, 2_000_000, ROUNDS_1, forfeit=reason)


@pytest.mark.parametrize("forfeit", ["", FORFEIT_SCORE])
def test_a_missing_coalition_is_rejected(forfeit: str) -> None:
    for missing in (1, 2):
        bad = RoundOutcome(round=1, selected=("b", "a"), loss_micro=700_000,
                           coalitions_micro={m: v for m, v in ROUNDS_2[0].coalitions_micro.items()
                                             if m != missing}, scored=("a", "b"))
        with pytest.raises(SettlementError, match="missing"):
            settle(TERMS_2, 1_000_000, [bad, ROUNDS_2[1]], forfeit=forfeit)
    # top-3 with mask 0b101 missing
    three = RoundOutcome(round=3, selected=("a", "b", "c"), loss_micro=500_000,
                         coalitions_micro={m: 550_000 for m in range(1, 7) if m != 5}
                         | {7: 500_000},
                         scored=("a", "b", "c"))
    with pytest.raises(SettlementError, match="missing"):
        settle(TERMS_2, 1_000_000, [*ROUNDS_2, three], forfeit=forfeit)


@pytest.mark.parametrize("forfeit", ["", FORFEIT_SCORE])
def test_a_full_coalition_that_is_not_the_round_score_is_rejected(forfeit: str) -> None:
    for delta in (1, -1):
        bad = RoundOutcome(round=1, selected=("b", "a"), loss_micro=700_000,
                           coalitions_micro={1: 900_000, 2: 750_000, 3: 700_000 + delta},
                           scored=("a", "b"))
        with pytest.raises(SettlementError, match="full coalition"):
            settle(TERMS_2, 1_000_000, [bad, ROUNDS_2[1]], forfeit=forfeit)


def test_untrusted_losses_do_not_block_a_forfeiture() -> None:
    # with a mismatched or missing reveal no loss is used, so even malformed loss data
    # still settles: equal shares among the scored authors (a, b, c, d)
    bad = RoundOutcome(round=1, selected=("b", "a"), loss_micro=700_000,
                       coalitions_micro={3: 1}, scored=("a", "b", "d"))
    for reason in (FORFEIT_MISMATCH, FORFEIT_NO_REVEAL):
        s = settle(TERMS_2, 1_000_000, [bad, ROUNDS_2[1]], forfeit=reason)
        # pot 2000 / 4 = 500 each; fee pool 7 * 5 = 35: 8.75 each, floors 32, 3 left -> a, b, c
        assert s.reward_payouts == dict.fromkeys("abcd", 500)
        assert s.fee_payouts == {"a": 9, "b": 9, "c": 9, "d": 8}
        assert s.scientist_refund == 70 - 35


@pytest.mark.parametrize("l0", [0, -1, -2_000_000])
@pytest.mark.parametrize("forfeit", ["", FORFEIT_SCORE])
def test_a_non_positive_initial_loss_is_rejected(l0: int, forfeit: str) -> None:
    with pytest.raises(SettlementError, match="initial loss"):
        settle(TERMS_1, l0, ROUNDS_1, forfeit=forfeit)
    with pytest.raises(SettlementError, match="initial loss"):
        credits(l0, ROUNDS_1)
