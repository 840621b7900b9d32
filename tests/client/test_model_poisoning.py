"""Model-poisoning attacks (client/model_poisoning.py): known answers worked by hand, the
papers' constants, the min-max / min-sum constraints against their closed forms, the
degenerate cases and every error."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import client.model_poisoning as model_poisoning
from client.model_poisoning import (
    MODEL_POISONING,
    a_little_is_enough,
    alie_z,
    craft,
    flatten,
    inner_product_manipulation,
    min_max,
    min_sum,
    unflatten,
)

TOLERANCE = 1e-5


def random_honest(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count, dimension = int(rng.integers(2, 9)), int(rng.integers(1, 12))
    return rng.normal(loc=rng.normal(size=dimension), scale=rng.uniform(0.1, 3.0),
                      size=(count, dimension))


def direction(honest: np.ndarray, perturbation: str) -> np.ndarray:
    """The paper's perturbation vectors, written out again."""
    mean = honest.mean(axis=0)
    return {
        "unit": -mean / np.linalg.norm(mean),
        "std": -honest.std(axis=0, ddof=1),
        "sign": -np.sign(mean),
    }[perturbation]


def gamma_of(malicious: np.ndarray, honest: np.ndarray, perturbation: str) -> float:
    offset = malicious - honest.mean(axis=0)
    step = direction(honest, perturbation)
    np.testing.assert_allclose(offset, offset @ step / (step @ step) * step, atol=1e-9)
    return float(np.linalg.norm(offset) / np.linalg.norm(step))


# --------------------------------------------------------------------------
# A little is enough
# --------------------------------------------------------------------------


def test_alie_z_for_fifty_workers_and_twenty_four_byzantine() -> None:
    # s = floor(50/2 + 1) - 24 = 2 supporters; z = Phi^-1(48/50) = 1.7507
    z = alie_z(num_clients=50, num_byzantine=24)
    assert z == NormalDist().inv_cdf(0.96)
    assert z == pytest.approx(1.75069, abs=1e-5)


@pytest.mark.parametrize(
    ("num_clients", "num_byzantine", "expected"),
    [
        (10, 0, 0.0),  # (10 - 6) / 10 = 0.4 <= 1/2: clamped to 0
        (10, 1, 0.0),  # exactly 1/2
        (10, 2, NormalDist().inv_cdf(0.6)),  # s = 4
        (10, 5, NormalDist().inv_cdf(0.9)),  # s = 1
        (10, 9, NormalDist().inv_cdf(0.9)),  # s = -3, clamped to 1 supporter
        (1, 0, 0.0),
        (1, 1, 0.0),
        (2, 1, 0.0),
    ],
)
def test_alie_z_is_clamped_where_the_formula_has_no_answer(
    num_clients: int, num_byzantine: int, expected: float
) -> None:
    assert alie_z(num_clients=num_clients, num_byzantine=num_byzantine) == expected


@given(st.integers(1, 500), st.data())
def test_alie_z_is_finite_and_grows_with_the_byzantine(count: int, data: st.DataObject) -> None:
    fewer = data.draw(st.integers(0, count))
    more = data.draw(st.integers(fewer, count))
    low = alie_z(num_clients=count, num_byzantine=fewer)
    high = alie_z(num_clients=count, num_byzantine=more)
    assert 0.0 <= low <= high < math.inf


def test_alie_shifts_the_mean_by_z_sample_standard_deviations() -> None:
    honest = np.array([[0.0, 2.0], [2.0, 2.0]])
    # mean (1, 2), sample std (sqrt 2, 0)
    np.testing.assert_allclose(
        a_little_is_enough(honest, num_clients=10, num_byzantine=2, z=1.0),
        [1.0 - math.sqrt(2.0), 2.0], rtol=0, atol=1e-15,
    )
    z = alie_z(num_clients=10, num_byzantine=2)
    np.testing.assert_allclose(
        a_little_is_enough(honest, num_clients=10, num_byzantine=2),
        [1.0 - z * math.sqrt(2.0), 2.0], rtol=0, atol=1e-15,
    )


# --------------------------------------------------------------------------
# Inner product manipulation
# --------------------------------------------------------------------------


def test_ipm_known_answer() -> None:
    honest = np.array([[1.0, 2.0], [3.0, -4.0]])
    np.testing.assert_array_equal(inner_product_manipulation(honest), [-0.2, 0.1])


@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 6)),
               elements=st.floats(-1e6, 1e6)),
    st.floats(0.0, 10.0),
)
def test_ipm_is_minus_epsilon_times_the_mean(honest: np.ndarray, epsilon: float) -> None:
    np.testing.assert_array_equal(
        inner_product_manipulation(honest, epsilon=epsilon), -epsilon * honest.mean(axis=0)
    )


# --------------------------------------------------------------------------
# Min-max and min-sum
# --------------------------------------------------------------------------


def test_min_max_and_min_sum_known_answers() -> None:
    honest = np.array([[1.0, 3.0], [3.0, 1.0]])
    # mean (2, 2), sign perturbation -(1, 1).
    # min-sum: 4 + 4 gamma^2 <= 8 -> gamma = 1; min-max: 2 + 2 gamma^2 <= 8 -> sqrt 3
    sums = min_sum(honest, perturbation="sign")
    np.testing.assert_allclose(sums, [1.0, 1.0], atol=2 * TOLERANCE)
    maxes = min_max(honest, perturbation="sign")
    np.testing.assert_allclose(maxes, [2 - math.sqrt(3), 2 - math.sqrt(3)], atol=2 * TOLERANCE)
    # unit perturbation on a line: both stop at the far end's mirror, (0, 0)
    line = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(min_sum(line, perturbation="unit"), [0.0, 0.0], atol=2 * TOLERANCE)
    np.testing.assert_allclose(min_max(line, perturbation="unit"), [0.0, 0.0], atol=2 * TOLERANCE)


def largest_min_max_gamma(honest: np.ndarray, step: np.ndarray) -> float:
    """Closed form: every ||mean + gamma p - x_i||^2 is a quadratic in gamma; the
    largest feasible gamma is the smallest of their larger roots at the bound."""
    mean = honest.mean(axis=0)
    bound = max(float(np.sum((honest - row) ** 2, axis=1).max()) for row in honest)
    a = float(step @ step)
    roots = []
    for row in honest:
        b, c = float(step @ (mean - row)), float((mean - row) @ (mean - row))
        roots.append((-b + math.sqrt(b * b - a * (c - bound))) / a)
    return min(roots)


def largest_min_sum_gamma(honest: np.ndarray, step: np.ndarray) -> float:
    """Closed form: sum_i ||mean + gamma p - x_i||^2 = S0 + n gamma^2 ||p||^2 and the
    bound is S0 + n max_i ||x_i - mean||^2."""
    mean = honest.mean(axis=0)
    return float(np.linalg.norm(honest - mean, axis=1).max() / np.linalg.norm(step))


@settings(max_examples=60)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["unit", "std", "sign"]))
def test_min_max_gamma_is_feasible_and_maximal(seed: int, perturbation: str) -> None:
    honest = random_honest(seed)
    step = direction(honest, perturbation)
    malicious = min_max(honest, perturbation=perturbation)
    gamma = gamma_of(malicious, honest, perturbation)
    largest = min(largest_min_max_gamma(honest, step), 20.0)  # the search tops out at 2 * 10
    assert largest - 2 * TOLERANCE - 1e-9 <= gamma <= largest + 1e-9

    bound = max(float(np.sum((honest - row) ** 2, axis=1).max()) for row in honest)
    farthest = float(np.sum((honest - malicious) ** 2, axis=1).max())
    assert farthest <= bound
    if largest < 20.0:
        doubled = honest.mean(axis=0) + 2 * gamma * step
        assert float(np.sum((honest - doubled) ** 2, axis=1).max()) > bound


@settings(max_examples=60)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["unit", "std", "sign"]))
def test_min_sum_gamma_is_feasible_and_maximal(seed: int, perturbation: str) -> None:
    honest = random_honest(seed)
    step = direction(honest, perturbation)
    malicious = min_sum(honest, perturbation=perturbation)
    gamma = gamma_of(malicious, honest, perturbation)
    largest = min(largest_min_sum_gamma(honest, step), 20.0)
    assert largest - 2 * TOLERANCE - 1e-9 <= gamma <= largest + 1e-9

    bound = max(float(np.sum((honest - row) ** 2)) for row in honest)
    assert float(np.sum((honest - malicious) ** 2)) <= bound
    if largest < 20.0:
        doubled = honest.mean(axis=0) + 2 * gamma * step
        assert float(np.sum((honest - doubled) ** 2)) > bound


def test_search_tolerance_and_ceiling() -> None:
    honest = np.array([[1.0, 3.0], [3.0, 1.0]])
    coarse = min_sum(honest, perturbation="sign", tolerance=0.1)
    gamma = 2.0 - coarse[0]
    assert 1.0 - 0.2 <= gamma <= 1.0
    # gamma_init far below the answer: the search can reach at most 2 * gamma_init
    capped = min_sum(honest, perturbation="sign", gamma_init=0.25)
    assert 0.5 - 2 * TOLERANCE <= 2.0 - capped[0] <= 0.5


# --------------------------------------------------------------------------
# Degenerate inputs, dispatch, layering
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODEL_POISONING))
def test_a_single_honest_update_does_not_crash(kind: str) -> None:
    honest = np.array([[1.0, -2.0, 0.5]])
    malicious = craft(kind, honest, num_clients=10, num_byzantine=1)
    assert malicious.shape == (3,)
    expected = -0.1 * honest[0] if kind == "ipm" else honest[0]
    np.testing.assert_allclose(malicious, expected, atol=2 * TOLERANCE)


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
def test_identical_or_zero_updates_leave_the_mean(perturbation: str) -> None:
    for honest in (np.zeros((4, 3)), np.tile([1.0, 2.0, 3.0], (4, 1))):
        for attack in (min_max, min_sum):
            malicious = attack(honest, perturbation=perturbation)
            assert np.all(np.isfinite(malicious))
            np.testing.assert_allclose(malicious, honest[0], atol=2 * TOLERANCE)


def test_craft_dispatches_with_the_papers_defaults() -> None:
    assert {"alie", "ipm", "min-max", "min-sum"} == MODEL_POISONING
    honest = random_honest(3)
    expected = {
        "alie": a_little_is_enough(honest, num_clients=20, num_byzantine=5),
        "ipm": inner_product_manipulation(honest, epsilon=0.1),
        "min-max": min_max(honest, perturbation="std", gamma_init=10.0, tolerance=1e-5),
        "min-sum": min_sum(honest, perturbation="std", gamma_init=10.0, tolerance=1e-5),
    }
    for kind, vector in expected.items():
        np.testing.assert_array_equal(
            craft(kind, honest, num_clients=20, num_byzantine=5), vector
        )


def test_flatten_and_unflatten_round_trip() -> None:
    like = {"w": np.arange(4, dtype=np.float32).reshape(2, 2), "b": np.array([9.0], np.float32)}
    matrix = flatten([like, like], list(like))
    np.testing.assert_array_equal(matrix, [[0, 1, 2, 3, 9], [0, 1, 2, 3, 9]])
    back = unflatten(craft("ipm", matrix, num_clients=4, num_byzantine=2), like)
    assert {key: value.dtype for key, value in back.items()} == {"w": np.float32, "b": np.float32}
    np.testing.assert_allclose(back["w"], -0.1 * like["w"])
    with pytest.raises(ValueError, match="missing|shapes"):
        flatten([like, {"w": like["w"]}], ["w", "b"])
    with pytest.raises(ValueError, match=r"vector of 5 values for keys \['w', 'b'\], got 3"):
        unflatten(np.zeros(3), like)


def test_client_side_never_imports_the_server() -> None:
    tree = ast.parse(Path(model_poisoning.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "server" for name in imported)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("honest", "message"),
    [
        (np.zeros(3), r"\(n, d\) matrix with n >= 1, got shape \(3,\)"),
        (np.zeros((0, 3)), r"got shape \(0, 3\)"),
        (np.array([[np.nan, 1.0]]), "finite honest updates, got NaN or infinity"),
    ],
)
@pytest.mark.parametrize("kind", sorted(MODEL_POISONING))
def test_malformed_honest_updates_are_rejected(kind: str, honest: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        craft(kind, honest, num_clients=10, num_byzantine=2)


def test_bad_knobs_are_rejected() -> None:
    honest = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"an attack in \['alie', 'ipm', 'min-max', 'min-sum'\], got 'lie'"):
        craft("lie", honest, num_clients=10, num_byzantine=2)
    with pytest.raises(ValueError, match="num_clients >= 1, got 0"):
        alie_z(num_clients=0, num_byzantine=0)
    with pytest.raises(ValueError, match="0 <= num_byzantine <= num_clients = 10, got 11"):
        a_little_is_enough(honest, num_clients=10, num_byzantine=11)
    with pytest.raises(ValueError, match="0 <= num_byzantine <= num_clients = 10, got -1"):
        a_little_is_enough(honest, num_clients=10, num_byzantine=-1)
    with pytest.raises(ValueError, match="finite z, got inf"):
        a_little_is_enough(honest, num_clients=10, num_byzantine=2, z=math.inf)
    with pytest.raises(ValueError, match="finite epsilon >= 0, got -0.1"):
        inner_product_manipulation(honest, epsilon=-0.1)
    with pytest.raises(ValueError, match=r"perturbation in \['sign', 'std', 'unit'\], got 'l2'"):
        min_max(honest, perturbation="l2")
    with pytest.raises(ValueError, match="finite gamma_init > 0, got 0.0"):
        min_sum(honest, gamma_init=0.0)
    with pytest.raises(ValueError, match="finite tolerance > 0, got -1.0"):
        min_max(honest, tolerance=-1.0)
