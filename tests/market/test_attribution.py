"""The payout rule round-game/v2 (``server.market.attribution`` and the settlement's
gates): the fixed-k game pays nothing for dilution, the orderings are reproducible from
their specification, the sampled Shapley value is the exact one when every ordering is
drawn, the Taylor closed form is exact for the Taylor game, and the gates and the target
loss do what docs/market.md says."""

from __future__ import annotations

import hashlib
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from client.task import Dataset, digits_split, functional_float64, get_weights, make_model
from server.market.attribution import (
    draw_permutations,
    fixed_k_coalition_losses,
    permutation_seed,
    prefix_losses,
    taylor_shapley,
)
from server.market.scientist import coalition_losses, loss_micro
from server.market.settlement import (
    PayoutRule,
    RoundOutcome,
    SettlementError,
    Terms,
    round_credits,
    sampled_shapley,
    settle,
    shapley,
)
from server.round.selection import apply_updates

ARCH = {"family": "poly-mlp", "input_dim": 64, "hidden_units": 8, "activation": "square",
        "num_classes": 10}


@pytest.fixture(scope="module")
def setting() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], Dataset]:
    split = digits_split()
    data = Dataset(x=split.test.x[:200], y=split.test.y[:200])
    base = get_weights(make_model(hidden_units=8, activation="square", seed=1))
    rng = np.random.default_rng(7)
    deltas = [{k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in base.items()} for _ in range(4)]
    return base, deltas, data


def _full_game(base, deltas, data) -> tuple[int, dict[int, int]]:  # type: ignore[no-untyped-def]
    losses = fixed_k_coalition_losses(base, deltas, data, architecture=ARCH)
    full = (1 << len(deltas)) - 1
    losses[full] = loss_micro(apply_updates(base, deltas), data, architecture=ARCH)
    return loss_micro(base, data, architecture=ARCH), losses


# ---------------------------------------------------------------------- the game
def test_an_exactly_zero_update_is_worth_exactly_nothing(setting) -> None:  # type: ignore[no-untyped-def]
    base, deltas, data = setting
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    players = ["a", "b", "c", "zero"]
    previous, losses = _full_game(base, [*deltas[:3], zero], data)
    values = shapley(players, {m: previous - v for m, v in losses.items()})
    assert values["zero"] == 0
    assert sum(values.values()) == previous - losses[15]
    # Over "the mean of the coalition" (rule v1) the same zero update is paid: it
    # shrinks the mean's step, which is what the fixed coefficient removes.
    mean_losses = coalition_losses(base, [*deltas[:3], zero], data, architecture=ARCH)
    legacy = shapley(players, {m: previous - v for m, v in mean_losses.items()})
    assert legacy["zero"] != 0


def test_coalition_weights_are_base_plus_sum_over_k(setting) -> None:  # type: ignore[no-untyped-def]
    """Differential: each coalition's loss is the loss of the float32 model
    base + (1/k) sum of its deltas, computed the slow, obvious way."""
    base, deltas, data = setting
    losses = fixed_k_coalition_losses(base, deltas, data, architecture=ARCH)
    assert sorted(losses) == list(range(1, 15))
    for mask in (1, 6, 11, 14):
        members = [deltas[i] for i in range(4) if mask >> i & 1]
        weights = {k: (base[k].astype(np.float64)
                       + sum(d[k].astype(np.float64) for d in members) / 4).astype(np.float32)
                   for k in base}
        assert abs(losses[mask] - loss_micro(weights, data, architecture=ARCH)) <= 1


def test_more_than_exact_max_updates_need_orderings(setting) -> None:  # type: ignore[no-untyped-def]
    base, deltas, data = setting
    from server.market.attribution import AttributionError
    with pytest.raises(AttributionError, match="at most 12"):
        fixed_k_coalition_losses(base, deltas * 4, data, architecture=ARCH)


# ------------------------------------------------------------------ orderings
def reference_permutations(seed: bytes, k: int, count: int) -> list[list[int]]:
    """docs/market.md's specification, written out independently."""
    words: list[int] = []
    counter = 0

    def word() -> int:
        nonlocal counter
        if not words:
            block = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            words.extend(int.from_bytes(block[i:i + 8], "big") for i in range(0, 32, 8))
            counter += 1
        return words.pop(0)

    out = []
    for _ in range(count):
        order = list(range(k))
        for i in range(k - 1, 0, -1):
            n = i + 1
            while True:
                value = word()
                if value < 2**64 - 2**64 % n:
                    break
            j = value % n
            order[i], order[j] = order[j], order[i]
        out.append(order)
    return out


@given(st.binary(min_size=32, max_size=32), st.integers(1, 40), st.integers(1, 5),
       st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_orderings_follow_the_specification(root: bytes, k: int, count: int, rnd: int) -> None:
    seed = permutation_seed(root, rnd)
    assert seed == hashlib.sha256(b"poi/shapley-permutations/v1" + root
                                  + rnd.to_bytes(8, "big")).digest()
    drawn = draw_permutations(seed, k, count)
    assert drawn == reference_permutations(seed, k, count)
    assert all(sorted(o) == list(range(k)) for o in drawn)


def test_orderings_are_uniform() -> None:
    """All 24 orderings of 4 appear about equally often (chi-square, 23 degrees of
    freedom, p = 0.001 critical value 49.7)."""
    drawn = draw_permutations(b"\x01" * 32, 4, 24_000)
    counts: dict[tuple[int, ...], int] = {}
    for order in drawn:
        counts[tuple(order)] = counts.get(tuple(order), 0) + 1
    assert len(counts) == 24
    chi2 = sum((c - 1000) ** 2 / 1000 for c in counts.values())
    assert chi2 < 49.7


def test_a_different_root_or_round_draws_other_orderings() -> None:
    a = draw_permutations(permutation_seed(b"\x00" * 32, 3), 20, 2)
    assert a != draw_permutations(permutation_seed(b"\x00" * 31 + b"\x01", 3), 20, 2)
    assert a != draw_permutations(permutation_seed(b"\x00" * 32, 4), 20, 2)
    with pytest.raises(ValueError, match="32-byte"):
        permutation_seed(b"short", 1)


# ---------------------------------------------------------------- sampled Shapley
@st.composite
def games(draw: st.DrawFn) -> tuple[int, dict[int, int]]:
    n = draw(st.integers(2, 5))
    values = draw(st.lists(st.integers(-10**6, 10**6), min_size=2**n - 1, max_size=2**n - 1))
    return n, {m + 1: v for m, v in enumerate(values)}


@given(games(), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_sampled_shapley_over_every_ordering_is_exact(game: tuple[int, dict[int, int]],
                                                      previous: int) -> None:
    n, utility = game
    players = [f"p{i}" for i in range(n)]
    full = (1 << n) - 1
    orders = [list(p) for p in itertools.permutations(range(n))]
    prefixes = []
    for order in orders:
        mask, row = 0, []
        for i in order[:-1]:
            mask |= 1 << i
            row.append(previous - utility[mask])
        prefixes.append(row)
    phi, errors = sampled_shapley(players, previous, previous - utility[full], orders, prefixes)
    assert phi == shapley(players, utility)
    assert sum(phi.values()) == utility[full]
    assert all(e >= 0 for e in errors.values())


def test_sampled_shapley_rejects_bad_shapes() -> None:
    with pytest.raises(SettlementError, match="at least one ordering"):
        sampled_shapley(["a", "b"], 10, 5, [], [])
    with pytest.raises(SettlementError, match="prefix losses"):
        sampled_shapley(["a", "b", "c"], 10, 5, [[0, 1, 2]], [[9]])
    with pytest.raises(SettlementError, match="ordering of 3"):
        sampled_shapley(["a", "b", "c"], 10, 5, [[0, 1, 1]], [[9, 8]])


def test_prefix_losses_match_the_coalitions(setting) -> None:  # type: ignore[no-untyped-def]
    base, deltas, data = setting
    orders = draw_permutations(b"\x02" * 32, 4, 3)
    rows = prefix_losses(base, deltas, data, architecture=ARCH, permutations=orders)
    coalitions = fixed_k_coalition_losses(base, deltas, data, architecture=ARCH)
    for order, row in zip(orders, rows, strict=True):
        mask = 0
        for position, i in enumerate(order[:-1]):
            mask |= 1 << i
            assert abs(row[position] - coalitions[mask]) <= 1


# ------------------------------------------------------------------------ Taylor
def test_taylor_closed_form_is_the_shapley_value_of_the_taylor_game(setting) -> None:  # type: ignore[no-untyped-def]
    """Build the second-order Taylor game from the full Hessian (autograd, float64) and
    enumerate its exact Shapley values: the closed form agrees to 1e-12."""
    base, deltas, data = setting
    phi = taylor_shapley(base, deltas, data, architecture=ARCH)
    model = functional_float64(make_model(hidden_units=8, activation="square", seed=0))
    keys = list(base)
    shapes = [base[k].shape for k in keys]
    sizes = [int(np.prod(s)) for s in shapes]
    flat0 = torch.as_tensor(np.concatenate([base[k].astype(np.float64).ravel() for k in keys]))
    x, y = torch.as_tensor(data.x, dtype=torch.float64), torch.as_tensor(data.y)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for key, shape, size in zip(keys, shapes, sizes, strict=True):
            params[key] = flat[offset:offset + size].reshape(shape)
            offset += size
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    g = torch.autograd.functional.jacobian(loss, flat0).numpy()
    h = torch.autograd.functional.hessian(loss, flat0).numpy()
    d = np.stack([np.concatenate([dd[k].astype(np.float64).ravel() for k in keys])
                  for dd in deltas])
    a = 1.0 / len(deltas)

    def taylor_utility(mask: int) -> float:
        s = sum((d[i] for i in range(len(deltas)) if mask >> i & 1), np.zeros(d.shape[1]))
        return float(-(a * g @ s + 0.5 * a * a * s @ h @ s))

    n = len(deltas)
    exact = [0.0] * n
    for i in range(n):
        for mask in range(1 << n):
            if mask >> i & 1:
                continue
            size = bin(mask).count("1")
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            exact[i] += weight * (taylor_utility(mask | 1 << i) - taylor_utility(mask))
    assert np.allclose(phi, exact, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------- gates, target
def _round(rnd: int, selected: tuple[str, ...], loss: int, coalitions: dict[int, int]
           ) -> RoundOutcome:
    return RoundOutcome(round=rnd, selected=selected, loss_micro=loss,
                        coalitions_micro=coalitions, scored=selected)


ROUNDS = [
    # round 1: a helps (900 -> 800), b hurts
    _round(1, ("a", "b"), 850, {1: 800, 2: 950}),
    # round 2: the loss rises 850 -> 900; a's share is positive, c's negative
    _round(2, ("a", "c"), 900, {1: 840, 2: 910}),
]
TERMS = Terms(reward=1_000, deposit=1_000, update_fee=0, max_updates=4)


def test_loss_rise_gate_keeps_only_the_penalties_of_a_round_that_raised_the_loss() -> None:
    plain = round_credits(1000, ROUNDS, PayoutRule(loss_rise=False, vote_gate=False))
    gated = round_credits(1000, ROUNDS, PayoutRule(loss_rise=True, vote_gate=False))
    assert plain[2]["a"] > 0 and plain[2]["c"] < 0
    assert gated[2] == {"a": Fraction(0), "c": plain[2]["c"]}
    assert gated[1] == plain[1]  # a round that lowered the loss is untouched


def test_vote_gate_credits_only_authors_the_vote_trusts_at_the_end() -> None:
    rule = PayoutRule(loss_rise=False, vote_gate=True)
    s = settle(TERMS, 1000, ROUNDS, rule=rule, eligible=["b", "c"])
    assert "a" not in s.reward_payouts and s.credits["a"] == 0
    s_all = settle(TERMS, 1000, ROUNDS, rule=rule, eligible=None)  # another vote: no gate
    assert s_all.reward_payouts.get("a", 0) > 0


def test_target_loss_sets_the_paid_fraction() -> None:
    rounds = [_round(1, ("a",), 600, {})]
    original = settle(TERMS, 1000, rounds, rule=PayoutRule())
    assert original.fraction == Fraction(400, 1000)
    stated = settle(TERMS, 1000, rounds, rule=PayoutRule(target_loss_micro=500))
    assert stated.fraction == Fraction(400, 500)
    assert sum(stated.reward_payouts.values()) == 800
    beyond = settle(TERMS, 1000, rounds, rule=PayoutRule(target_loss_micro=700))
    assert beyond.fraction == 1  # clamped
    # A target at or above L0 (refused when the task opens; a hostile ledger can carry
    # one) counts as converged: it never blocks a settlement or a forfeiture.
    reached = settle(TERMS, 1000, rounds, rule=PayoutRule(target_loss_micro=1000))
    assert reached.fraction == 1 and sum(reached.reward_payouts.values()) == 1_000
    forfeit = settle(TERMS, 1000, rounds, rule=PayoutRule(target_loss_micro=5000),
                     forfeit="score-mismatch")
    assert forfeit.forfeited and sum(forfeit.reward_payouts.values()) == 2_000


def test_a_rise_within_the_score_tolerance_is_not_gated() -> None:
    rounds = [_round(1, ("a", "b"), 1005, {1: 990, 2: 1010})]  # rose by 5, tolerance 10
    gated = round_credits(1000, rounds, PayoutRule(vote_gate=False, tolerance_micro=10))
    assert gated[1]["a"] > 0
    strict = round_credits(1000, rounds, PayoutRule(vote_gate=False, tolerance_micro=0))
    assert strict[1]["a"] == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"rule": "round-game/v9"}, "rule 'round-game/v2'"),
    ({"game": "median"}, "game 'fixed-k'"),
    ({"game": "mean"}, "game 'fixed-k'"),  # v2 terms cannot lift the cap of 16 for v1
    ({"seed": 7}, "unknown terms"),
    ({"exact_max": 13}, "exact_max <= 12"),
    ({"exact_max": 0}, "exact_max as an integer"),
    ({"permutations": 1}, "permutations >= 2"),
    ({"permutations": 257}, r"permutations as an integer in 0\.\.256"),  # 4,096 x 256 models at most
    ({"permutations": True}, "permutations as an integer"),
    ({"vote_gate": 2}, "vote_gate 0 or 1"),
])
def test_bad_payout_terms_are_refused_by_name(change: dict, message: str) -> None:
    terms = {**PayoutRule().to_terms(), **change}
    with pytest.raises(SettlementError, match=message):
        PayoutRule.from_offer({"payout": terms})


@pytest.mark.parametrize("target", [-1, 1.5, True, "0"])
def test_a_bad_target_loss_is_refused(target: object) -> None:
    with pytest.raises(SettlementError, match="target_loss_micro"):
        PayoutRule.from_offer({"target_loss_micro": target})


def test_a_null_payout_is_not_rule_v1() -> None:
    with pytest.raises(SettlementError, match="expected payout terms"):
        PayoutRule.from_offer({"payout": None})


def test_an_offer_without_payout_terms_settles_by_rule_v1() -> None:
    assert PayoutRule.from_offer({}) == PayoutRule.legacy()
    assert PayoutRule.from_offer({"payout": PayoutRule().to_terms()}) == PayoutRule()


def test_high_water_pays_only_progress_below_the_best_loss() -> None:
    """900 -> 1100 (b's round: a rise) -> 850 (a recovers 200 of it, then 50 of new
    progress): a's credit for the recovery round is 50/250 of its share."""
    rounds = [_round(1, ("b",), 1100, {}), _round(2, ("a",), 850, {})]
    plain = round_credits(900, rounds, PayoutRule(loss_rise=False, vote_gate=False,
                                                  high_water=False))
    water = round_credits(900, rounds, PayoutRule(loss_rise=False, vote_gate=False,
                                                  high_water=True))
    assert plain[2] == {"a": 250} and water[2] == {"a": 50}
    assert water[1] == plain[1] == {"b": -200}  # the setback still counts against b
    # a round that only sets a new best is untouched
    fresh = [_round(1, ("a",), 800, {})]
    assert round_credits(900, fresh, PayoutRule(high_water=True, vote_gate=False))[1] == {
        "a": 100}
