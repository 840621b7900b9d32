"""The marginal vote's pure functions (server/round/marginal.py, client/marginal.py):
known answers, references (scipy, a loop of single-model evaluations), properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr, trim_mean

from client.marginal import BallotError, marginal_ballot, marginal_models, mean_update
from client.task import Dataset, evaluate, make_model, set_weights
from server.round.marginal import (
    MICRO,
    MarginalConfig,
    TallyError,
    VoteState,
    accept,
    candidate_scores,
    normalised_weights,
    spearman,
    tally_round,
    trusted_set,
    update_author_scores,
    update_reputation,
    weighted_lower_median,
    weighted_trimmed_mean,
)

finite = st.floats(min_value=-5, max_value=5, allow_nan=False, allow_infinity=False)


# ------------------------------------------------------------------- statistics
def test_spearman_known_answers() -> None:
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # a constant ballot says nothing
    assert spearman([5.0], [1.0]) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=12))
def test_spearman_matches_scipy(pairs: list[tuple[float, float]]) -> None:
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    expected = spearmanr(a, b).statistic
    if not math.isfinite(expected):  # scipy: nan for a constant side; ours: 0
        assert spearman(a, b) == 0.0
    else:
        assert spearman(a, b) == pytest.approx(expected, abs=1e-12)


def test_weighted_lower_median_known_answers() -> None:
    assert weighted_lower_median([(1.0, 1.0, "a"), (2.0, 1.0, "b"), (3.0, 1.0, "c")]) == 2.0
    assert weighted_lower_median([(1.0, 1.0, "a"), (2.0, 1.0, "b")]) == 1.0  # lower
    # one heavy voter decides
    assert weighted_lower_median([(1.0, 0.1, "a"), (2.0, 0.1, "b"), (9.0, 5.0, "c")]) == 9.0
    # weightless voters count for nothing
    assert weighted_lower_median([(-7.0, 0.0, "a"), (2.0, 1.0, "b")]) == 2.0
    with pytest.raises(TallyError, match="no values"):
        weighted_lower_median([])


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=15))
def test_equal_weights_give_the_plain_lower_median(values: list[float]) -> None:
    got = weighted_lower_median([(v, 1.0, str(i)) for i, v in enumerate(values)])
    assert got == sorted(values)[(len(values) - 1) // 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=3, max_size=9), st.lists(finite, min_size=1, max_size=4))
def test_liars_with_less_than_half_the_weight_stay_inside_the_honest_range(
        honest: list[float], liars: list[float]) -> None:
    liar_weight = 0.99 * len(honest) / max(1, len(liars)) / 1.0
    items = [(v, 1.0, f"h{i}") for i, v in enumerate(honest)]
    items += [(v, liar_weight * 0.49 / len(honest) * len(honest), f"l{i}")
              for i, v in enumerate(liars)]
    got = weighted_lower_median(items)
    assert min(honest) <= got <= max(honest)


# ------------------------------------------------------------------- reputation
def test_a_voter_opposing_the_scientist_loses_weight_every_round() -> None:
    rng = np.random.default_rng(0)
    logs: dict[str, float] = {}
    history = []
    for _ in range(6):
        truth = {f"c{i}": float(v) for i, v in enumerate(rng.normal(size=6))}
        ballots = {"honest": dict(truth), "liar": {c: -v for c, v in truth.items()}}
        logs, agreement = update_reputation(logs, ballots, truth, rate=1.0)
        assert agreement == {"honest": pytest.approx(1.0), "liar": pytest.approx(-1.0)}
        weights = normalised_weights(logs, ["honest", "liar"])
        history.append(weights["liar"])
        assert weights["honest"] == 1.0
    assert all(b < a for a, b in zip(history, history[1:], strict=False))
    assert history[-1] == pytest.approx(math.exp(-12.0))


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=3, max_size=8, unique=True), st.floats(0.1, 3.0))
def test_reputation_moves_at_most_rate_per_round(truth: list[float], rate: float) -> None:
    g = {f"c{i}": v for i, v in enumerate(truth)}
    ballot = {c: -v for c, v in g.items()}
    logs, _ = update_reputation({"v": 0.0}, {"v": ballot}, g, rate=rate)
    assert -rate - 1e-12 <= logs["v"] <= rate + 1e-12


def test_reputation_floor() -> None:
    weights = normalised_weights({"a": 0.0, "b": -50.0}, ["a", "b"], floor=0.05)
    assert weights == {"a": 1.0, "b": 0.05}


# ---------------------------------------------------------- trust, scores, accept
def test_trusted_set_is_non_negative_authors_or_everyone() -> None:
    authors = {"c1": "a", "c2": "b", "c3": "c", "c4": "d"}
    assert trusted_set(authors, {}, min_trusted=3) == ["c1", "c2", "c3", "c4"]
    scores = {"a": 1.0, "b": 0.0, "c": -0.5, "d": 2.0}
    assert trusted_set(authors, scores, min_trusted=3) == ["c1", "c2", "c4"]
    assert trusted_set(authors, scores, min_trusted=4) == ["c1", "c2", "c3", "c4"]


def test_scores_exclude_the_authors_own_ballot() -> None:
    authors = {"c1": "a", "c2": "b"}
    ballots = {"a": {"c1": 100.0, "c2": -1.0}, "b": {"c1": -1.0, "c2": 100.0},
               "c": {"c1": 0.5, "c2": 0.25}}
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert candidate_scores(ballots, authors, weights) == {"c1": -1.0, "c2": -1.0}


def test_author_scores_are_clipped_and_scaled_by_the_median() -> None:
    authors = {"c1": "a", "c2": "b", "c3": "c"}
    out = update_author_scores({"a": 0.5}, {"c1": 1.0, "c2": -2.0, "c3": 100.0}, authors,
                               clip=1.0)
    assert out == {"a": 1.0, "b": -1.0, "c": 1.0}  # median |score| = 2: steps .5, -1, 1
    zero = update_author_scores({}, {"c1": 0.0, "c2": 0.0, "c3": 3.0}, authors, clip=1.0)
    assert zero == {"a": 0.0, "b": 0.0, "c": 1.0}


def test_acceptance_needs_both_a_positive_author_score_and_validation_marginal() -> None:
    authors = {"c1": "a", "c2": "b", "c3": "c", "c4": "d"}
    scores = {"c1": 0.3, "c2": 0.2, "c3": 0.9, "c4": 0.1}
    author_scores = {"a": 1.0, "b": 1.0, "c": -0.1, "d": 2.0}
    validation = {"c1": 0.01, "c2": -0.01, "c3": 0.5, "c4": 0.02}
    assert accept(scores, authors, author_scores, validation, max_accepted=5) == ["c1", "c4"]
    assert accept(scores, authors, author_scores, validation, max_accepted=1) == ["c1"]


def test_tally_round_refuses_ballots_on_unknown_candidates() -> None:
    with pytest.raises(TallyError, match="not this round's"):
        tally_round(VoteState(), authors={"c1": "a"}, ballots={"b": {"zz": 1}},
                    validation_micro={"c1": 1}, config=MarginalConfig())


def test_a_colluding_bloc_loses_its_weight_and_its_updates() -> None:
    """45% colluders vote their own up and honest ones down; the Scientist's numbers say
    the opposite. After one round their weight is e^-2 of the honest voters' and none of
    their candidates is accepted."""
    rng = np.random.default_rng(3)
    honest = [f"h{i}" for i in range(6)]
    bloc = [f"x{i}" for i in range(5)]
    authors = {f"c-{a}": a for a in honest + bloc}
    truth = {c: (abs(rng.normal()) * MICRO // 10 if a in honest else -MICRO // 10)
             for c, a in authors.items()}
    ballots = {}
    for voter in honest:
        ballots[voter] = {c: int(v + rng.normal() * MICRO // 100) for c, v in truth.items()}
    for voter in bloc:
        ballots[voter] = {c: (MICRO if a in bloc else -MICRO) for c, a in authors.items()}
    state = VoteState()
    for _ in range(3):
        out = tally_round(state, authors=authors, ballots=ballots, validation_micro=truth,
                          config=MarginalConfig(max_accepted=16))
        state = out.state
        assert not {authors[c] for c in out.accepted} & set(bloc)
    assert max(out.weights[v] for v in bloc) < 0.01 * min(out.weights[v] for v in honest)
    assert len(out.accepted) >= len(honest) // 2  # the better honest half at least


def test_marginal_config_round_trips_through_the_offer_terms() -> None:
    config = MarginalConfig(reputation_rate=0.7, author_score_clip=2.0, min_trusted=4,
                            max_accepted=9, reputation_floor=0.01)
    assert MarginalConfig.from_terms(config.to_terms()) == config
    with pytest.raises(TallyError, match="reputation_rate_micro"):
        MarginalConfig.from_terms({**config.to_terms(), "reputation_rate_micro": 0.5})
    with pytest.raises(TallyError, match="min-trusted"):
        MarginalConfig(min_trusted=0)


def test_tally_trim_travels_in_the_offer_and_old_offers_mean_the_median() -> None:
    config = MarginalConfig(tally_trim=0.2)
    assert MarginalConfig.from_terms(config.to_terms()) == config
    old = {k: v for k, v in config.to_terms().items() if k != "tally_trim_micro"}
    assert MarginalConfig.from_terms(old).tally_trim == 0.5
    for bad in (0, 500_001, True, 0.2):
        with pytest.raises(TallyError, match="tally_trim_micro"):
            MarginalConfig.from_terms({**config.to_terms(), "tally_trim_micro": bad})
    with pytest.raises(TallyError, match="tally-trim"):
        MarginalConfig(tally_trim=0.0)


@given(st.lists(st.tuples(finite, st.floats(0, 3), st.text(max_size=2)), min_size=1,
                max_size=12))
def test_a_trim_of_one_half_is_the_weighted_lower_median(
    values: list[tuple[float, float, str]],
) -> None:
    assert weighted_trimmed_mean(values, 0.5) == weighted_lower_median(values)


@given(st.lists(finite, min_size=1, max_size=15), st.integers(0, 7))
def test_equal_weights_give_scipys_trimmed_mean(values: list[float], cut: int) -> None:
    """Differential check against scipy.stats.trim_mean where the cut falls between
    values (k of n cut at each end)."""
    n = len(values)
    if 2 * cut >= n:
        return
    got = weighted_trimmed_mean([(v, 1.0, str(i)) for i, v in enumerate(values)], cut / n)
    assert got == pytest.approx(trim_mean(values, cut / n), abs=1e-9)


def test_a_light_bloc_at_the_extremes_is_cut_off() -> None:
    """A bloc holding less than the trimmed weight at one end moves the score only by
    which honest weight it displaces, never by what it reports; the honest values are
    averaged, not just their middle one."""
    honest = [(0.010, 1.0, "h1"), (0.012, 1.0, "h2"), (0.020, 1.0, "h3"), (0.030, 1.0, "h4")]
    for side in (-1.0, 1.0):
        got = {weighted_trimmed_mean(honest + [(side * size, 0.2, f"b{i}") for i in range(4)],
                                     0.2)
               for size in (1e3, 1e6, 1e12)}  # 0.8 of 4.8 in all: less than the 0.96 cut
        assert len(got) == 1 and 0.010 <= got.pop() <= 0.030
    assert weighted_trimmed_mean(honest, 0.25) == pytest.approx(0.016)  # h2 and h3
    assert weighted_trimmed_mean([(1.0, 0.0, "a"), (3.0, 0.0, "b")], 0.25) == 2.0


def test_candidate_scores_use_the_configured_trim() -> None:
    authors = {"c": "author"}
    ballots = {"v1": {"c": 0.0}, "v2": {"c": 1.0}, "v3": {"c": 5.0}, "author": {"c": 99.0}}
    weights = {"v1": 1.0, "v2": 1.0, "v3": 1.0, "author": 1.0}
    assert candidate_scores(ballots, authors, weights)["c"] == 1.0  # the median
    assert candidate_scores(ballots, authors, weights, trim=0.1)["c"] == pytest.approx(
        (0.7 * 0.0 + 1.0 + 0.7 * 5.0) / 2.4)


# --------------------------------------------------------------- the ballots
def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    model = make_model(hidden_units=4, activation="square", seed=0)
    return {k: (rng.normal(size=v.shape) * 0.1).astype(np.float32)
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny() -> tuple[Dataset, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(1)
    data = Dataset(rng.random((40, 64), dtype=np.float32), rng.integers(0, 10, 40))
    return data, _weights(0), [_weights(s) for s in range(1, 6)]


def _loss(base: dict[str, np.ndarray], delta: dict[str, np.ndarray], data: Dataset) -> float:
    model = make_model(hidden_units=4, activation="square", seed=0).double()
    with torch.no_grad():
        set_weights(model, {k: base[k].astype(np.float64) + delta[k] for k in base})
    return evaluate(model, data)[0]


def test_ballots_match_a_loop_of_single_evaluations(tiny) -> None:  # type: ignore[no-untyped-def]
    data, base, deltas = tiny
    members = [True, True, True, False, False]
    trusted = mean_update(deltas[:3])
    got = marginal_ballot(make_model(hidden_units=4, activation="square", seed=0), base,
                          trusted, 3, deltas, members, data)
    for value, (without, with_) in zip(got, marginal_models(trusted, 3, deltas, members),
                                       strict=True):
        assert value == pytest.approx(_loss(base, without, data) - _loss(base, with_, data),
                                      abs=1e-9)


def test_a_candidate_equal_to_the_trusted_mean_has_zero_marginal(tiny) -> None:  # type: ignore[no-untyped-def]
    data, base, deltas = tiny
    trusted = mean_update(deltas[:3])
    as_update = {k: v.copy() for k, v in trusted.items()}
    for member in (True, False):
        (without, with_), = marginal_models(trusted, 3, [as_update], [member])
        for k in trusted:
            np.testing.assert_allclose(without[k], with_[k], atol=1e-15)


def test_ballot_errors(tiny) -> None:  # type: ignore[no-untyped-def]
    _, _, deltas = tiny
    with pytest.raises(BallotError, match="at least one update"):
        marginal_models(deltas[0], 0, deltas, [True] * 5)
    with pytest.raises(BallotError, match="one membership flag per candidate"):
        marginal_models(deltas[0], 2, deltas, [True])
