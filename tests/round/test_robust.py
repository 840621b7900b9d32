"""Robust aggregators (server/round/robust.py): known answers worked by hand, the
properties the papers prove, a per-coordinate reference for the trimmed mean, every
error, and the model-poisoning attacks they are meant to withstand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client.model_poisoning import craft
from server.round.robust import (
    centered_clipping,
    coordinate_trimmed_mean,
    flatten,
    nearest_neighbor_mixing,
    nnm_trimmed_mean,
    unflatten,
)

FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def matrices(min_rows: int = 1, max_rows: int = 8) -> st.SearchStrategy[np.ndarray]:
    shapes = st.tuples(st.integers(min_rows, max_rows), st.integers(1, 5))
    return hnp.arrays(np.float64, shapes, elements=FINITE)


# --------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------


def test_trimmed_mean_drops_f_per_side_per_coordinate() -> None:
    updates = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -100.0]])
    # column 0 sorted 1 2 3 100 -> mean(2, 3); column 1 sorted -100 10 20 30 -> mean(10, 20)
    np.testing.assert_array_equal(coordinate_trimmed_mean(updates, num_byzantine=1), [2.5, 15.0])
    np.testing.assert_array_equal(
        coordinate_trimmed_mean(updates, num_byzantine=0), updates.mean(axis=0)
    )


def test_nearest_neighbor_mixing_averages_the_n_minus_f_closest() -> None:
    updates = np.array([[0.0], [1.0], [10.0]])
    # f = 1: each row averages itself and its nearest other row
    np.testing.assert_array_equal(
        nearest_neighbor_mixing(updates, num_byzantine=1), [[0.5], [0.5], [5.5]]
    )
    assert nnm_trimmed_mean(updates, num_byzantine=1).tolist() == [0.5]
    # plain CWTM of the same rows keeps the middle one, 1.0: mixing first pulled it to 0.5
    assert coordinate_trimmed_mean(updates, num_byzantine=1).tolist() == [1.0]


def test_centered_clipping_one_and_two_iterations() -> None:
    updates = np.array([[3.0, 4.0], [0.0, 1.0]])
    # from 0 with tau = 1: (3, 4) has norm 5 -> clipped to (0.6, 0.8); (0, 1) is kept
    once = centered_clipping(updates, center=np.zeros(2), tau=1.0)
    np.testing.assert_allclose(once, [0.3, 0.9], rtol=0, atol=1e-15)
    # second step from (0.3, 0.9): (2.7, 3.1) clipped to unit length, (-0.3, 0.1) kept
    step = np.array([2.7, 3.1]) / np.hypot(2.7, 3.1) + np.array([-0.3, 0.1])
    twice = centered_clipping(updates, center=np.zeros(2), tau=1.0, iterations=2)
    np.testing.assert_allclose(twice, once + step / 2, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@given(hnp.arrays(np.float64, st.integers(1, 6), elements=FINITE), st.integers(1, 9))
def test_trimmed_mean_of_identical_rows_is_that_row(row: np.ndarray, count: int) -> None:
    updates = np.tile(row, (count, 1))
    np.testing.assert_allclose(
        coordinate_trimmed_mean(updates, num_byzantine=(count - 1) // 2), row, rtol=1e-12
    )


@given(matrices(), st.data())
def test_trimmed_mean_stays_within_the_honest_range_despite_f_outliers(
    honest: np.ndarray, data: st.DataObject
) -> None:
    num_byzantine = data.draw(st.integers(0, honest.shape[0] - 1))
    outliers = data.draw(
        hnp.arrays(np.float64, (num_byzantine, honest.shape[1]), elements=st.floats(-1e12, 1e12))
    )
    updates = np.concatenate([honest, outliers])
    updates = updates[data.draw(st.permutations(range(updates.shape[0])))]
    aggregate = coordinate_trimmed_mean(updates, num_byzantine=num_byzantine)
    slack = 1e-9 * (1 + np.abs(honest).max())
    assert np.all(aggregate >= honest.min(axis=0) - slack)
    assert np.all(aggregate <= honest.max(axis=0) + slack)


@given(matrices(), st.data())
def test_trimmed_mean_matches_a_per_coordinate_reference(
    updates: np.ndarray, data: st.DataObject
) -> None:
    num_byzantine = data.draw(st.integers(0, (updates.shape[0] - 1) // 2))
    count = updates.shape[0]
    reference = [
        sum(sorted(column)[num_byzantine : count - num_byzantine]) / (count - 2 * num_byzantine)
        for column in updates.T.tolist()
    ]
    np.testing.assert_allclose(
        coordinate_trimmed_mean(updates, num_byzantine=num_byzantine), reference,
        rtol=1e-12, atol=1e-9,
    )


@given(matrices())
def test_mixing_with_no_byzantine_is_the_mean_everywhere(updates: np.ndarray) -> None:
    mixed = nearest_neighbor_mixing(updates, num_byzantine=0)
    np.testing.assert_allclose(
        mixed, np.tile(updates.mean(axis=0), (updates.shape[0], 1)), rtol=1e-12, atol=1e-9
    )


@given(matrices(), st.data())
def test_mixed_rows_stay_inside_the_coordinate_range(
    updates: np.ndarray, data: st.DataObject
) -> None:
    num_byzantine = data.draw(st.integers(0, updates.shape[0] - 1))
    mixed = nearest_neighbor_mixing(updates, num_byzantine=num_byzantine)
    assert mixed.shape == updates.shape
    assert np.all(mixed >= updates.min(axis=0) - 1e-9)
    assert np.all(mixed <= updates.max(axis=0) + 1e-9)


@given(matrices())
def test_clipping_with_unbounded_tau_is_the_mean_after_one_iteration(
    updates: np.ndarray,
) -> None:
    center = np.zeros(updates.shape[1])
    mean = updates.mean(axis=0)
    for tau in (np.inf, 1e12):
        np.testing.assert_allclose(
            centered_clipping(updates, center=center, tau=tau), mean, rtol=1e-12, atol=1e-9
        )


@given(matrices(), st.integers(0, 5))
def test_clipping_with_tau_zero_stays_at_the_center(updates: np.ndarray, iterations: int) -> None:
    center = np.linspace(-1.0, 1.0, updates.shape[1])
    aggregate = centered_clipping(updates, center=center, tau=0.0, iterations=iterations)
    np.testing.assert_array_equal(aggregate, center)


@given(matrices(), st.floats(0.0, 100.0))
def test_clipping_moves_at_most_tau_per_iteration(updates: np.ndarray, tau: float) -> None:
    center = np.zeros(updates.shape[1])
    moved = np.linalg.norm(centered_clipping(updates, center=center, tau=tau))
    assert moved <= tau * (1 + 1e-12) + 1e-12


@settings(max_examples=25)
@given(st.integers(0, 2**32 - 1))
def test_clipping_bounds_what_f_outliers_can_do(seed: int) -> None:
    # n = 10, f = 3 huge outliers: from the honest mean, one step moves at most
    # (honest spread + f * tau) / n, however far the outliers are
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=(7, 4))
    outliers = rng.normal(size=(3, 4)) * 1e9
    center = honest.mean(axis=0)
    aggregate = centered_clipping(np.concatenate([honest, outliers]), center=center, tau=1.0)
    spread = np.linalg.norm(honest - center, axis=1).sum()
    assert np.linalg.norm(aggregate - center) <= (spread + 3 * 1.0) / 10 + 1e-12


# --------------------------------------------------------------------------
# Against the attacks they are meant to withstand
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["alie", "ipm", "min-max", "min-sum"])
def test_nnm_trimmed_mean_stays_near_the_honest_mean_under_model_poisoning(kind: str) -> None:
    # 12 subscribers, 3 colluders submitting one crafted vector from their honest updates
    rng = np.random.default_rng(7)
    true_gradient = np.ones(20)
    honest = true_gradient + rng.normal(scale=0.5, size=(12, 20))
    malicious = craft(kind, honest[:3], num_clients=12, num_byzantine=3)
    updates = np.concatenate([np.tile(malicious, (3, 1)), honest[3:]])
    aggregate = nnm_trimmed_mean(updates, num_byzantine=3)
    honest_mean = honest[3:].mean(axis=0)
    assert np.linalg.norm(aggregate - honest_mean) < 0.5 * np.linalg.norm(honest_mean)
    assert aggregate @ true_gradient > 0


# --------------------------------------------------------------------------
# flatten / unflatten
# --------------------------------------------------------------------------


def test_flatten_follows_the_key_order_and_unflatten_inverts_it() -> None:
    first = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7.0], np.float32)}
    second = {"b": np.array([-1.0], np.float32), "w": np.ones((2, 3), np.float32)}
    matrix = flatten([first, second], ["w", "b"])
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, [[0, 1, 2, 3, 4, 5, 7], [1, 1, 1, 1, 1, 1, -1]])
    back = unflatten(matrix[0], first)
    assert list(back) == ["w", "b"]
    for key in first:
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], first[key])


def test_flatten_and_unflatten_reject_mismatches() -> None:
    like = {"w": np.zeros((2, 2)), "b": np.zeros(1)}
    with pytest.raises(ValueError, match="at least one update and one key, got 0 and 2"):
        flatten([], ["w", "b"])
    with pytest.raises(ValueError, match=r"update 1 to have shapes .* got .*'b': None"):
        flatten([like, {"w": np.zeros((2, 2))}], ["w", "b"])
    with pytest.raises(ValueError, match=r"update 1 to have shapes .*\(2, 2\).* got .*\(4,\)"):
        flatten([like, {"w": np.zeros(4), "b": np.zeros(1)}], ["w", "b"])
    with pytest.raises(ValueError, match=r"vector of 5 values for keys \['w', 'b'\], got 4"):
        unflatten(np.zeros(4), like)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_trimmed_mean_needs_more_than_2f_updates() -> None:
    with pytest.raises(ValueError, match=r"0 <= 2 \* num_byzantine < n = 4, got num_byzantine = 2"):
        coordinate_trimmed_mean(np.zeros((4, 2)), num_byzantine=2)
    with pytest.raises(ValueError, match="got num_byzantine = -1"):
        coordinate_trimmed_mean(np.zeros((4, 2)), num_byzantine=-1)
    with pytest.raises(ValueError, match=r"n = 2, got num_byzantine = 1"):
        nnm_trimmed_mean(np.zeros((2, 2)), num_byzantine=1)


def test_mixing_needs_fewer_byzantine_than_updates() -> None:
    with pytest.raises(ValueError, match="0 <= num_byzantine < n = 3, got num_byzantine = 3"):
        nearest_neighbor_mixing(np.zeros((3, 2)), num_byzantine=3)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (np.zeros(3), r"\(n, d\) matrix with n >= 1, got shape \(3,\)"),
        (np.zeros((0, 3)), r"got shape \(0, 3\)"),
        (np.array([[0.0, np.nan]]), "finite updates, got NaN or infinity"),
        (np.array([[np.inf, 0.0]]), "finite updates, got NaN or infinity"),
    ],
)
def test_malformed_updates_are_rejected(updates: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coordinate_trimmed_mean(updates, num_byzantine=0)
    with pytest.raises(ValueError, match=message):
        centered_clipping(updates, center=np.zeros(2), tau=1.0)


def test_clipping_rejects_bad_knobs() -> None:
    updates = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"center of shape \(2,\), got \(3,\)"):
        centered_clipping(updates, center=np.zeros(3), tau=1.0)
    with pytest.raises(ValueError, match="finite center"):
        centered_clipping(updates, center=np.array([np.nan, 0.0]), tau=1.0)
    with pytest.raises(ValueError, match="tau >= 0, got -1.0"):
        centered_clipping(updates, center=np.zeros(2), tau=-1.0)
    with pytest.raises(ValueError, match="tau >= 0, got nan"):
        centered_clipping(updates, center=np.zeros(2), tau=float("nan"))
    with pytest.raises(ValueError, match="iterations >= 0, got -1"):
        centered_clipping(updates, center=np.zeros(2), tau=1.0, iterations=-1)
