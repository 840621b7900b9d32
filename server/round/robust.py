"""Robust aggregation of flattened updates, from Karimireddy, He & Jaggi, "Learning from
History for Byzantine Robust Optimization" (ICML 2021: centered clipping); Allouah et al.,
"Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity" (AISTATS 2023:
nearest neighbor mixing, NNM); and Yin et al., "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates" (ICML 2018: coordinate-wise trimmed mean, CWTM).

Pure numpy on a matrix of flattened updates, ``updates`` of shape ``(n, d)`` (one row per
subscriber; ``flatten`` builds it from ``dict[str, np.ndarray]`` updates and ``unflatten``
cuts a row back). Everything is computed in float64 and returned as float64;
``unflatten`` casts back to the model's dtypes. ``num_byzantine`` is ``f``, the number of
updates the rule must tolerate being arbitrary.

Checked once against ByzFL 0.0.11 (``byzfl.aggregators`` loaded from its wheel, not a
dependency) on 200 random draws (2 <= n <= 14, 0 <= 2f < n, 1 <= d <= 39, f rows made
outliers): ``coordinate_trimmed_mean`` vs ``TrMean``, max abs diff 1.8e-15 (summation
order); ``nearest_neighbor_mixing`` vs ``NNM``, 0.0; ``centered_clipping`` vs
``CenteredClipping`` (random center, tau, 1-5 iterations), 0.0; ``nnm_trimmed_mean`` vs
``NNM`` then ``TrMean``, 1.3e-15.
"""

from __future__ import annotations

import math

import numpy as np

# One implementation of the update <-> vector mapping; it lives in the client because
# client/ never imports server/ and the colluders need it too.
from client.model_poisoning import flatten, unflatten

__all__ = ["centered_clipping", "coordinate_trimmed_mean", "flatten", "nearest_neighbor_mixing",
           "nnm_trimmed_mean", "unflatten"]


# --------------------------------------------------------------------------
# Centered clipping (Karimireddy, He & Jaggi 2021, eq. CC)
# --------------------------------------------------------------------------


def centered_clipping(
    updates: np.ndarray, *, center: np.ndarray, tau: float, iterations: int = 1
) -> np.ndarray:
    """``v <- v + mean_i (x_i - v) * min(1, tau / ||x_i - v||)``, ``iterations`` times from
    ``v = center`` (the previous aggregate or server momentum): each update pulls the
    estimate at most ``tau`` away, so ``f`` outliers move it by at most ``f * tau / n``
    per iteration.

    Raises ValueError for a malformed matrix (non-finite updates are validation's to
    reject, before aggregation), a ``center`` of another length, a ``tau``
    that is NaN or negative (``inf`` is allowed: the plain mean) or negative
    ``iterations``."""
    matrix = _updates_matrix(updates)
    estimate = np.asarray(center, dtype=np.float64)
    if estimate.shape != (matrix.shape[1],):
        raise ValueError(f"expected center of shape ({matrix.shape[1]},), got {estimate.shape}")
    if not np.all(np.isfinite(estimate)):
        raise ValueError("expected a finite center, got NaN or infinity")
    if math.isnan(tau) or tau < 0:
        raise ValueError(f"expected tau >= 0, got {tau}")
    if iterations < 0:
        raise ValueError(f"expected iterations >= 0, got {iterations}")
    for _ in range(iterations):
        differences = matrix - estimate
        norms = np.linalg.norm(differences, axis=1)
        # A difference of norm 0 is zero whatever its factor: skip the division (0/0).
        ratios = np.divide(tau, norms, out=np.full_like(norms, np.inf), where=norms > 0)
        factors = np.minimum(1.0, ratios)
        estimate = estimate + (differences * factors[:, None]).mean(axis=0)
    return estimate


# --------------------------------------------------------------------------
# Nearest neighbor mixing and trimmed mean (Allouah et al. 2023; Yin et al. 2018)
# --------------------------------------------------------------------------


def nearest_neighbor_mixing(updates: np.ndarray, *, num_byzantine: int) -> np.ndarray:
    """Replace each update by the mean of its ``n - f`` nearest updates in L2, itself
    included (distance 0): a pre-aggregation that shrinks the honest spread so that a
    rule built for identical data keeps its guarantee under heterogeneity. Ties go to
    the lower index. Returns an ``(n, d)`` matrix.

    Raises ValueError for a malformed matrix or unless ``0 <= f < n``."""
    matrix = _updates_matrix(updates)
    count = matrix.shape[0]
    _check_byzantine(
        num_byzantine, need=f"0 <= num_byzantine < n = {count}", ok=num_byzantine < count
    )
    neighbours = count - num_byzantine
    mixed = np.empty_like(matrix)
    for index, row in enumerate(matrix):
        distances = np.linalg.norm(matrix - row, axis=1)
        nearest = np.argsort(distances, kind="stable")[:neighbours]
        mixed[index] = matrix[nearest].mean(axis=0)
    return mixed


def coordinate_trimmed_mean(updates: np.ndarray, *, num_byzantine: int) -> np.ndarray:
    """Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the
    ``n - 2f`` left: any ``f`` outliers are trimmed or sit between honest values.

    Raises ValueError for a malformed matrix or unless ``0 <= 2f < n``."""
    matrix = _updates_matrix(updates)
    count = matrix.shape[0]
    _check_byzantine(
        num_byzantine, need=f"0 <= 2 * num_byzantine < n = {count}", ok=count > 2 * num_byzantine
    )
    ordered = np.sort(matrix, axis=0)
    return ordered[num_byzantine : count - num_byzantine].mean(axis=0)


def nnm_trimmed_mean(updates: np.ndarray, *, num_byzantine: int) -> np.ndarray:
    """``coordinate_trimmed_mean(nearest_neighbor_mixing(x))``, the NNM recipe applied to
    CWTM (Allouah et al. 2023, Section 4).

    Raises ValueError as ``coordinate_trimmed_mean``."""
    matrix = _updates_matrix(updates)
    count = matrix.shape[0]
    _check_byzantine(
        num_byzantine, need=f"0 <= 2 * num_byzantine < n = {count}", ok=count > 2 * num_byzantine
    )
    mixed = nearest_neighbor_mixing(matrix, num_byzantine=num_byzantine)
    return coordinate_trimmed_mean(mixed, num_byzantine=num_byzantine)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _updates_matrix(updates: np.ndarray) -> np.ndarray:
    matrix = np.asarray(updates, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1:
        raise ValueError(
            f"expected updates as an (n, d) matrix with n >= 1, got shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("expected finite updates, got NaN or infinity")
    return matrix


def _check_byzantine(num_byzantine: int, *, need: str, ok: bool) -> None:
    if num_byzantine < 0 or not ok:
        raise ValueError(f"expected {need}, got num_byzantine = {num_byzantine}")
