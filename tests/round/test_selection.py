from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.round.selection import (
    CandidateScore,
    SelectionError,
    apply_updates,
    assign_committees,
    ballots,
    committee_seed,
    median,
    select,
    tally,
    trimmed_mean,
    voter_ranks,
)

VOTERS = [str(i) for i in range(10)]
AUTHORS = {f"c{i}": str(i) for i in range(10)}


def test_committees_exclude_the_author_and_have_the_requested_size() -> None:
    committees = assign_committees(AUTHORS, VOTERS, votes_per_candidate=3, seed=b"s")
    assert set(committees) == set(AUTHORS)
    for candidate, members in committees.items():
        assert len(members) == 3
        assert AUTHORS[candidate] not in members
        assert len(set(members)) == 3


def test_committees_are_a_pure_function_of_the_seed() -> None:
    a = assign_committees(AUTHORS, VOTERS, votes_per_candidate=3, seed=b"root-1")
    b = assign_committees(dict(reversed(list(AUTHORS.items()))), list(reversed(VOTERS)),
                          votes_per_candidate=3, seed=b"root-1")
    c = assign_committees(AUTHORS, VOTERS, votes_per_candidate=3, seed=b"root-2")
    assert a == b
    assert a != c


def test_least_loaded_assignment_balances_voter_load() -> None:
    committees = assign_committees(AUTHORS, VOTERS, votes_per_candidate=3, seed=b"x")
    load = {v: len(c) for v, c in ballots(committees).items()}
    assert sum(load.values()) == 30
    assert max(load.values()) - min(load.values()) <= 1


def test_zero_means_everyone_but_the_author() -> None:
    committees = assign_committees(AUTHORS, VOTERS, votes_per_candidate=0, seed=b"x")
    for candidate, members in committees.items():
        assert set(members) == set(VOTERS) - {AUTHORS[candidate]}


@given(st.integers(2, 12), st.integers(1, 12), st.integers(0, 11), st.binary(max_size=8))
def test_committee_properties(num_voters: int, num_candidates: int, k: int, seed: bytes) -> None:
    voters = [f"v{i}" for i in range(num_voters)]
    authors = {f"c{i}": voters[i % num_voters] for i in range(num_candidates)}
    committees = assign_committees(authors, voters, votes_per_candidate=k, seed=seed)
    for candidate, members in committees.items():
        assert authors[candidate] not in members
        expected = num_voters - 1 if k == 0 or k >= num_voters - 1 else k
        assert len(members) == len(set(members)) == expected
    if 0 < k < num_voters - 1:
        load = {v: 0 for v in voters}
        for members in committees.values():
            for v in members:
                load[v] += 1
        assert max(load.values()) - min(load.values()) <= 2


def test_committee_seed_depends_on_round_and_candidates() -> None:
    a = committee_seed(task_seed=0, server_round=1, candidate_ids=["a", "b"])
    assert a == committee_seed(task_seed=0, server_round=1, candidate_ids=["b", "a"])
    assert a != committee_seed(task_seed=0, server_round=2, candidate_ids=["a", "b"])
    assert a != committee_seed(task_seed=1, server_round=1, candidate_ids=["a", "b"])


def test_tally_known_answers() -> None:
    improvements = {"a": {"1": 0.3, "2": 0.1, "3": 0.2}, "b": {"1": -0.1, "2": 0.5, "3": -0.2,
                                                               "4": 0.0}}
    med = tally(improvements, method="median")
    assert med["a"].score == pytest.approx(0.2)
    assert med["b"].score == pytest.approx(-0.05)
    trimmed = tally({"a": {str(i): float(v) for i, v in enumerate([0, 1, 2, 3, 100])}},
                    method="trimmed-mean", trim_fraction=0.2)
    assert trimmed["a"].score == pytest.approx(2.0)
    assert trimmed["a"].improvement == pytest.approx(2.0)


def test_rank_median_known_answer() -> None:
    improvements = {"a": {"1": 0.9, "2": 0.1}, "b": {"1": 0.5, "2": 0.2}, "c": {"1": 0.1}}
    ranks = voter_ranks(improvements)
    assert ranks["a"] == {"1": 1.0, "2": 0.0}
    assert ranks["b"] == {"1": 0.5, "2": 1.0}
    assert ranks["c"] == {"1": 0.0}
    scores = tally(improvements, method="rank-median")
    assert scores["b"].score == pytest.approx(0.75)
    assert scores["a"].score == pytest.approx(0.5)


def test_unknown_method_and_empty_inputs_are_refused() -> None:
    with pytest.raises(SelectionError, match="vote-aggregation: expected one of"):
        tally({"a": {"1": 0.1}}, method="mean")
    with pytest.raises(SelectionError, match="median of no values"):
        median([])
    with pytest.raises(SelectionError, match="trim_fraction"):
        trimmed_mean([1.0], 0.5)
    with pytest.raises(SelectionError, match="top-k: expected >= 1, got 0"):
        select({}, top_k=0)


def _score(cid: str, score: float, improvement: float | None = None) -> CandidateScore:
    return CandidateScore(cid, score, score if improvement is None else improvement, 3)


def test_select_orders_by_score_then_digest() -> None:
    scores = {c.candidate_id: c for c in [_score("bb", 0.5), _score("aa", 0.5), _score("cc", 0.9),
                                          _score("dd", -0.1)]}
    assert select(scores, top_k=1) == ["cc"]
    assert select(scores, top_k=3) == ["cc", "aa", "bb"]
    assert select(scores, top_k=4, require_improvement=True) == ["cc", "aa", "bb"]
    assert select(scores, top_k=10) == ["cc", "aa", "bb", "dd"]


def test_apply_updates_adds_the_mean_delta() -> None:
    weights = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    deltas = [{"w": np.array([1.0, 0.0], dtype=np.float32)},
              {"w": np.array([3.0, -2.0], dtype=np.float32)}]
    out = apply_updates(weights, deltas)
    np.testing.assert_array_equal(out["w"], np.array([3.0, 1.0], dtype=np.float32))
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(apply_updates(weights, [])["w"], weights["w"])


finite = st.floats(-10, 10, allow_nan=False)


@settings(max_examples=300)
@given(st.lists(finite, min_size=1, max_size=15), st.lists(st.floats(-1e6, 1e6), max_size=14))
def test_median_cannot_be_pushed_outside_honest_range_by_a_minority(
    honest: list[float], lies: list[float]
) -> None:
    """While fewer than half of a candidate's voters lie, the median stays within the
    honest voters' range, whatever the liars say."""
    assume(len(lies) < len(honest))
    value = median(honest + lies)
    assert min(honest) - 1e-12 <= value <= max(honest) + 1e-12


@settings(max_examples=200)
@given(st.lists(st.floats(0.001, 10), min_size=1, max_size=9),
       st.lists(st.floats(-10, 0), min_size=1, max_size=9), st.data())
def test_minority_liars_cannot_lift_a_worse_candidate_past_a_better_one(
    good_honest: list[float], bad_honest: list[float], data: st.DataObject
) -> None:
    """If every honest voter of ``good`` reports more improvement than every honest voter
    of ``bad``, liars who are a minority of each committee cannot reverse the selection,
    under the median and under the rank median."""
    lies_good = data.draw(st.lists(st.floats(-1e6, 1e6), max_size=len(good_honest) - 1))
    lies_bad = data.draw(st.lists(st.floats(-1e6, 1e6), max_size=len(bad_honest) - 1))
    improvements = {
        "good": {**{f"g{i}": v for i, v in enumerate(good_honest)},
                 **{f"lg{i}": v for i, v in enumerate(lies_good)}},
        "bad": {**{f"b{i}": v for i, v in enumerate(bad_honest)},
                **{f"lb{i}": v for i, v in enumerate(lies_bad)}},
    }
    assert select(tally(improvements, method="median"), top_k=1) == ["good"]


def test_a_majority_of_liars_can_win_which_is_why_committees_are_random() -> None:
    improvements = {"good": {"1": 0.5, "2": -9.0, "3": -9.0},
                    "bad": {"4": -0.5, "5": 9.0, "6": 9.0}}
    assert select(tally(improvements), top_k=1) == ["bad"]


def test_ballots_inverts_committees() -> None:
    committees = {"a": ("1", "2"), "b": ("2",)}
    assert ballots(committees) == {"1": ("a",), "2": ("a", "b")}
    pairs = {(c, v) for c, vs in committees.items() for v in vs}
    assert pairs == {(c, v) for v, cs in ballots(committees).items() for c in cs}
    assert list(itertools.chain.from_iterable(ballots({}).values())) == []
