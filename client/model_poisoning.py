"""Model-poisoning attacks of colluding subscribers, from Baruch et al., "A Little Is
Enough: Circumventing Defenses For Distributed Learning" (NeurIPS 2019); Xie et al.,
"Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation"
(UAI 2019, PMLR 115, 2020); and Shejwalkar & Houmansadr, "Manipulating the Byzantine:
Optimizing Model Poisoning Attacks and Defenses for Federated Learning" (NDSS 2021).

The colluders pool the honest updates they computed themselves (the papers' "partial
knowledge" / AGR-agnostic setting: they never see an honest subscriber's update), craft
one malicious vector from them, and every colluder submits that same vector. Every
function takes those pooled updates as a matrix of flattened updates, ``honest`` of
shape ``(n, d)`` (``flatten`` turns a list of ``dict[str, np.ndarray]`` into one), works
in float64 and returns a float64 vector of shape ``(d,)``.

Standard deviations are the sample ones (``ddof=1``, as ``torch.std`` in the authors'
code); with a single honest update (``n = 1``) the deviation is 0.

Checked once against ByzFL 0.0.11 (``byzfl.attacks`` loaded from its wheel, not a
dependency) on 200 random (n, d) draws: ``inner_product_manipulation(epsilon=e)`` vs
``InnerProductManipulation(tau=e)`` and ``a_little_is_enough(z=z)`` vs
``ALittleIsEnough(tau=-z)`` (ByzFL adds ``tau * std``, sample std), max abs diff 0.0
both. ByzFL has no min-max or min-sum; their tests check the constraints' closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

MODEL_POISONING = frozenset({"alie", "ipm", "min-max", "min-sum"})
PERTURBATIONS = frozenset({"unit", "std", "sign"})


def flatten(updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str]) -> np.ndarray:
    """Stack updates into an ``(n, d)`` float64 matrix, each row its arrays in ``keys``
    order, raveled and concatenated (``server.round.robust`` uses this one too).

    Raises ValueError for no updates, no keys, a missing key or unequal shapes."""
    if not updates or not keys:
        raise ValueError(
            f"expected at least one update and one key, got {len(updates)} and {len(keys)}"
        )
    shapes = {key: np.shape(updates[0][key]) if key in updates[0] else None for key in keys}
    for index, update in enumerate(updates):
        got = {key: np.shape(update[key]) if key in update else None for key in keys}
        if got != shapes or None in got.values():
            raise ValueError(f"expected update {index} to have shapes {shapes}, got {got}")
    return np.stack([
        np.concatenate([np.asarray(update[key], dtype=np.float64).ravel() for key in keys])
        for update in updates
    ])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut a flat vector back into ``like``'s arrays (its key order, shapes, dtypes): the
    inverse of ``flatten(..., keys=list(like))``.

    Raises ValueError when the sizes differ."""
    flat = np.asarray(vector).ravel()
    sizes = [int(np.size(value)) for value in like.values()]
    if flat.size != sum(sizes):
        raise ValueError(
            f"expected a vector of {sum(sizes)} values for keys {list(like)}, got {flat.size}"
        )
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return {
        key: piece.reshape(np.shape(value)).astype(np.asarray(value).dtype)
        for (key, value), piece in zip(like.items(), pieces, strict=True)
    }


# --------------------------------------------------------------------------
# A Little Is Enough (Baruch et al. 2019, Algorithm 1)
# --------------------------------------------------------------------------


def alie_z(*, num_clients: int, num_byzantine: int) -> float:
    """The paper's ``z_max``: with ``s = floor(n/2 + 1) - f`` honest "supporters"
    needed for a majority, ``z = Phi^{-1}((n - s) / n)``.

    Two clamps keep it finite and in the attack's direction, where the paper's formula
    has no answer: ``s`` is at least 1 (``f >= floor(n/2) + 1`` would give
    ``Phi^{-1}(1) = inf``; one supporter gives the largest finite ``z``), and ``z`` is at
    least 0 (``(n - s) / n <= 1/2``, few attackers, would move towards the honest side;
    the attack then submits the mean).

    Raises ValueError unless ``num_clients >= 1`` and ``0 <= num_byzantine <= num_clients``."""
    if num_clients < 1:
        raise ValueError(f"expected num_clients >= 1, got {num_clients}")
    if not 0 <= num_byzantine <= num_clients:
        raise ValueError(
            f"expected 0 <= num_byzantine <= num_clients = {num_clients}, got {num_byzantine}"
        )
    supporters = max(1, math.floor(num_clients / 2 + 1) - num_byzantine)
    quantile = (num_clients - supporters) / num_clients
    if quantile <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(quantile)


def a_little_is_enough(
    honest: np.ndarray, *, num_clients: int, num_byzantine: int, z: float | None = None
) -> np.ndarray:
    """``mean - z * std`` per coordinate (Baruch et al. 2019): a shift small enough to
    hide inside the honest spread, applied consistently by every colluder. ``z`` defaults
    to the paper's ``alie_z(num_clients, num_byzantine)``.

    Raises ValueError for a malformed ``honest``, bad counts or a non-finite ``z``."""
    matrix = _honest_matrix(honest)
    if z is None:
        z = alie_z(num_clients=num_clients, num_byzantine=num_byzantine)
    elif not math.isfinite(z):
        raise ValueError(f"expected a finite z, got {z}")
    return matrix.mean(axis=0) - z * _std(matrix)


# --------------------------------------------------------------------------
# Inner product manipulation (Xie et al. 2020)
# --------------------------------------------------------------------------


def inner_product_manipulation(honest: np.ndarray, *, epsilon: float = 0.1) -> np.ndarray:
    """``-epsilon * mean(honest)``: a small negative multiple of the honest mean, so that
    the inner product of the aggregate with the true gradient turns negative while the
    malicious vector stays short enough to pass norm- and distance-based defences.

    Raises ValueError for a malformed ``honest`` or a non-finite or negative ``epsilon``."""
    matrix = _honest_matrix(honest)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"expected a finite epsilon >= 0, got {epsilon}")
    return -epsilon * matrix.mean(axis=0)


# --------------------------------------------------------------------------
# Min-max and min-sum (Shejwalkar & Houmansadr 2021, Algorithm 1, AGR-agnostic)
# --------------------------------------------------------------------------


def min_max(
    honest: np.ndarray,
    *,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """``mean + gamma * p`` with the largest ``gamma`` found by Algorithm 1 such that the
    malicious vector is no farther from any honest update than the two farthest honest
    updates are from each other:
    ``max_i ||m - x_i|| <= max_{i,j} ||x_i - x_j||``.

    ``p`` is ``-mean/||mean||`` ("unit"), ``-std`` ("std") or ``-sign(mean)`` ("sign");
    a zero ``p`` (zero mean, one update) leaves the mean. The returned ``gamma`` is
    feasible and within ``2 * tolerance`` of the largest feasible one below
    ``2 * gamma_init``.

    Raises ValueError for a malformed ``honest``, an unknown ``perturbation`` or
    non-positive ``gamma_init`` / ``tolerance``."""
    matrix = _honest_matrix(honest)
    mean, direction = matrix.mean(axis=0), _perturbation(matrix, perturbation)
    bound = max(float(np.sum((matrix - row) ** 2, axis=1).max()) for row in matrix)

    def feasible(gamma: float) -> bool:
        malicious = mean + gamma * direction
        return float(np.sum((matrix - malicious) ** 2, axis=1).max()) <= bound

    gamma = _halving_search(feasible, gamma_init=gamma_init, tolerance=tolerance)
    return mean + gamma * direction


def min_sum(
    honest: np.ndarray,
    *,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """As ``min_max``, but the constraint bounds the sum of squared distances: the
    malicious vector's sum to all honest updates is at most the largest such sum of an
    honest update, ``sum_i ||m - x_i||^2 <= max_i sum_j ||x_i - x_j||^2``.

    Raises ValueError as ``min_max``."""
    matrix = _honest_matrix(honest)
    mean, direction = matrix.mean(axis=0), _perturbation(matrix, perturbation)
    bound = max(float(np.sum((matrix - row) ** 2)) for row in matrix)

    def feasible(gamma: float) -> bool:
        malicious = mean + gamma * direction
        return float(np.sum((matrix - malicious) ** 2)) <= bound

    gamma = _halving_search(feasible, gamma_init=gamma_init, tolerance=tolerance)
    return mean + gamma * direction


def craft(kind: str, honest: np.ndarray, *, num_clients: int, num_byzantine: int) -> np.ndarray:
    """The malicious vector every colluder submits, for ``kind`` in ``MODEL_POISONING``
    with each paper's default knobs.

    Raises ValueError for an unknown ``kind`` and as the attack it runs."""
    if kind == "alie":
        return a_little_is_enough(honest, num_clients=num_clients, num_byzantine=num_byzantine)
    if kind == "ipm":
        return inner_product_manipulation(honest)
    if kind == "min-max":
        return min_max(honest)
    if kind == "min-sum":
        return min_sum(honest)
    raise ValueError(f"expected an attack in {sorted(MODEL_POISONING)}, got {kind!r}")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _honest_matrix(honest: np.ndarray) -> np.ndarray:
    matrix = np.asarray(honest, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1:
        raise ValueError(
            f"expected honest updates as an (n, d) matrix with n >= 1, got shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("expected finite honest updates, got NaN or infinity")
    return matrix


def _std(matrix: np.ndarray) -> np.ndarray:
    if matrix.shape[0] < 2:
        return np.zeros(matrix.shape[1])
    return matrix.std(axis=0, ddof=1)


def _perturbation(matrix: np.ndarray, perturbation: str) -> np.ndarray:
    """The paper's ``nabla^p``, pointing away from the honest direction."""
    mean = matrix.mean(axis=0)
    if perturbation == "unit":
        norm = float(np.linalg.norm(mean))
        return -mean / norm if norm > 0 else np.zeros_like(mean)
    if perturbation == "std":
        return -_std(matrix)
    if perturbation == "sign":
        return -np.sign(mean)
    raise ValueError(f"expected a perturbation in {sorted(PERTURBATIONS)}, got {perturbation!r}")


def _halving_search(
    feasible: Callable[[float], bool], *, gamma_init: float, tolerance: float
) -> float:
    """Algorithm 1's search: try ``gamma``, step up by half the step on success and down
    on failure, halve the step, until the last success and the next try are within
    ``tolerance``. Returns the last feasible ``gamma`` (0 when none was)."""
    if not (math.isfinite(gamma_init) and gamma_init > 0):
        raise ValueError(f"expected a finite gamma_init > 0, got {gamma_init}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"expected a finite tolerance > 0, got {tolerance}")
    gamma, step, gamma_success = gamma_init, gamma_init, 0.0
    while abs(gamma_success - gamma) > tolerance:
        if feasible(gamma):
            gamma_success = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return gamma_success
