from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from client.privacy import (
    PrivacyBudgetExceeded,
    calibrate_noise_multiplier,
    epsilon_of,
    projected_epsilon,
    sample_rate,
    steps_per_epoch,
    train_private,
)
from client.task import get_weights, load_partition, make_model

DATA = dict(partitioner="iid", dirichlet_alpha=0.5, seed=0)


def _opacus_rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("history", [
    [(1.0, 0.2, 10)],
    [(1.0, 0.2, 10), (0.8, 0.25, 30)],
    [(0.5, 0.01, 1000), (2.0, 1.0, 3)],
])
def test_cached_rdp_matches_opacus_rdp_accountant(history: list[tuple[float, float, int]]) -> None:
    assert epsilon_of(history, target_delta=1e-5, accountant="rdp") == pytest.approx(
        _opacus_rdp_epsilon(history, 1e-5), rel=1e-12)


def test_epsilon_is_cumulative_over_rounds() -> None:
    """Three rounds restored from the history must cost what one accountant that saw
    all steps reports, and more than any single round (the per-round Flower example bug)."""
    data = load_partition(0, 4, **DATA)
    model = make_model(hidden_units=8, activation="square", seed=0)
    history: tuple = ()
    epsilons = []
    for round_ in range(3):
        result = train_private(model, data, epochs=1, batch_size=32, learning_rate=0.1,
                               noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5,
                               accountant="rdp", history=history, seed=round_)
        history = result.history
        epsilons.append(result.sample_epsilon)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    q = sample_rate(len(data), 32)
    total_steps = 3 * steps_per_epoch(len(data), 32)
    assert sum(h[2] for h in history) == total_steps
    assert epsilons[2] == pytest.approx(_opacus_rdp_epsilon([(1.0, q, total_steps)], 1e-5))
    assert epsilons[2] > 1.3 * _opacus_rdp_epsilon([(1.0, q, total_steps // 3)], 1e-5)


def test_calibrated_noise_spends_the_target_over_the_planned_rounds() -> None:
    n, batch, epochs, rounds = 80, 16, 2, 10
    noise = calibrate_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, num_examples=n,
                                       batch_size=batch, epochs_per_round=epochs,
                                       planned_rounds=rounds, accountant="rdp")
    q = sample_rate(n, batch)
    per_round = epochs * steps_per_epoch(n, batch)
    history = [(noise, q, per_round * rounds)]
    spent = epsilon_of(history, target_delta=1e-5, accountant="rdp")
    assert 2.9 <= spent <= 3.0
    assert epsilon_of([(noise, q, per_round)], target_delta=1e-5, accountant="rdp") < 3.0 / 2


def test_budget_refusal_happens_before_training() -> None:
    data = load_partition(1, 4, **DATA)
    model = make_model(hidden_units=8, activation="square", seed=0)
    before = get_weights(model)
    history = ((1.0, sample_rate(len(data), 32), 100),)
    spent = epsilon_of(history, target_delta=1e-5, accountant="rdp")
    with pytest.raises(PrivacyBudgetExceeded, match=r"max-epsilon .* would be exceeded: spent"):
        train_private(model, data, epochs=1, batch_size=32, learning_rate=0.1,
                      noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5,
                      accountant="rdp", history=history, max_epsilon=spent + 1e-6)
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    nxt = projected_epsilon(history, noise_multiplier=1.0, num_examples=len(data),
                            batch_size=32, epochs=1, target_delta=1e-5, accountant="rdp")
    ok = train_private(model, data, epochs=1, batch_size=32, learning_rate=0.1,
                       noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5,
                       accountant="rdp", history=history, max_epsilon=nxt + 1e-9, seed=1)
    assert ok.sample_epsilon == pytest.approx(nxt)


def test_noise_has_the_dp_sgd_scale_and_clipping_bounds_the_step() -> None:
    data = load_partition(2, 4, **DATA)
    clip, noise, lr = 0.01, 5.0, 1.0

    def update(noise_multiplier: float, seed: int) -> np.ndarray:
        model = make_model(hidden_units=8, activation="square", seed=0)
        before = get_weights(model)
        train_private(model, data, epochs=1, batch_size=len(data), learning_rate=lr,
                      noise_multiplier=noise_multiplier, max_grad_norm=clip,
                      target_delta=1e-5, accountant="rdp", seed=seed)
        after = get_weights(model)
        return np.concatenate([(after[k] - before[k]).ravel() for k in before])

    # one full-batch step: the mean of clipped per-sample gradients has norm <= clip
    assert 0 < np.linalg.norm(update(0.0, 1)) <= clip * 1.0001
    # two noisy runs differ by noise of std sqrt(2) * lr * noise * clip / expected batch
    diff = update(noise, 1) - update(noise, 2)
    expected_std = np.sqrt(2) * lr * noise * clip / len(data)
    assert 0.7 < diff.std() / expected_std < 1.4


def test_tiny_batches_with_empty_poisson_draws_still_train_and_count() -> None:
    from client.task import Dataset

    data = load_partition(3, 4, **DATA)
    small = Dataset(data.x[:20], data.y[:20])
    model = make_model(hidden_units=8, activation="square", seed=0)
    result = train_private(model, small, epochs=2, batch_size=1, learning_rate=0.1,
                           noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5,
                           accountant="rdp", seed=3)
    assert result.steps == 2 * 20
    assert sum(h[2] for h in result.history) == 40
