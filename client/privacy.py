"""The Opacus boundary: the only module that imports ``opacus``.

DP-SGD (Abadi et al., 2016, arXiv:1607.00133) with Poisson sampling, per-sample clipping
and Gaussian noise. Epsilon is *cumulative*: the accountant's history (one
``(noise_multiplier, sample_rate, steps)`` triple per distinct setting) is handed in and
out as plain data, the ClientApp keeps it in Flower's ``Context.state``, and every
round's epsilon is computed over the whole history. Flower's own Opacus example builds a
fresh ``PrivacyEngine`` each round and so reports a per-round epsilon; we do not.

``secure_mode=True`` needs ``torchcsprng``, which does not install for torch 2.13: the
noise comes from torch's default generator (documented in docs/privacy.md).

Opacus is imported inside the functions that use it, not at module import: ``import
opacus`` costs about 1.4 s of CPU (it pulls in ``torch.distributed.tensor``, SciPy and
SymPy), and a deployed ClientApp is a fresh interpreter per message, so a vote or
witness message, which needs no accountant, should not pay for it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.task import Dataset

HistoryEntry = tuple[float, float, int]


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would take the cumulative epsilon past the subscriber's cap."""


@dataclass(frozen=True)
class PrivateTrainResult:
    train_loss: float
    history: tuple[HistoryEntry, ...]
    sample_epsilon: float
    steps: int


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Opacus' Poisson loader keeps the plain loader's length: ``ceil(n / batch)`` steps."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' ``DPDataLoader.from_data_loader`` samples with rate ``1 / len(loader)``."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian step at Opacus' default orders (Mironov et al.
    2019). Composition is additive, so ``steps`` steps cost ``steps`` times this; caching
    it turns the 0.1 s Opacus spends per query into microseconds."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    return np.asarray(rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    ), dtype=np.float64)


def epsilon_of(history: Sequence[HistoryEntry], *, target_delta: float, accountant: str) -> float:
    """Cumulative sample-level epsilon of a history at ``target_delta`` (0 for no steps).

    ``rdp`` composes cached per-step RDP curves (the same arithmetic as Opacus'
    ``RDPAccountant``); ``prv`` asks Opacus' PRV accountant (tighter, about 0.3 s a call).
    """
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        total = sum(steps * _rdp_per_step(q, nm) for nm, q, steps in history)
        epsilon, _ = rdp_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=target_delta
        )
        return float(epsilon)
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]  # type: ignore[misc]
    return float(acc.get_epsilon(delta=target_delta))


def calibrate_noise_multiplier(
    *, target_epsilon: float, target_delta: float, num_examples: int, batch_size: int,
    epochs_per_round: int, planned_rounds: int, accountant: str, ballot_noise: float = 0.0,
) -> float:
    """The training noise multiplier that spends exactly ``target_epsilon`` over all
    planned rounds (calibrated once, up front, not per round). With ``ballot_noise`` > 0
    the budget also pays one private ballot a round (a sample-rate-1 Gaussian step of
    that multiplier, :func:`client.marginal.private_ballot`), so training and ballots
    together end at the target. Raises :class:`ValueError` when the ballots alone would
    spend it."""
    q = sample_rate(num_examples, batch_size)
    steps = planned_rounds * epochs_per_round * steps_per_epoch(num_examples, batch_size)
    if ballot_noise <= 0:
        from opacus.accountants.utils import get_noise_multiplier

        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q,
            steps=steps, accountant=accountant,
        ))
    ballots = (ballot_noise, 1.0, planned_rounds)
    alone = epsilon_of([ballots], target_delta=target_delta, accountant=accountant)
    if alone >= target_epsilon:
        raise ValueError(
            f"target-epsilon {target_epsilon:g}: the {planned_rounds} ballots alone spend "
            f"{alone:.3f} at vote-noise-multiplier {ballot_noise:g}; expected a larger "
            "vote-noise-multiplier or target")

    def spent(noise: float) -> float:
        return epsilon_of([(noise, q, steps), ballots], target_delta=target_delta,
                          accountant=accountant)

    low, high = 0.01, 1.0
    while spent(high) > target_epsilon:  # epsilon falls as the noise grows
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"target-epsilon {target_epsilon:g}: no training noise reaches it")
    for _ in range(60):  # bisection to a relative 1e-6 of the noise
        middle = (low + high) / 2
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
        if high - low <= 1e-6 * high:
            break
    return high


def projected_epsilon(
    history: Sequence[HistoryEntry], *, noise_multiplier: float, num_examples: int,
    batch_size: int, epochs: int, target_delta: float, accountant: str,
) -> float:
    """Epsilon the history would reach after one more round with these knobs."""
    q = sample_rate(num_examples, batch_size)
    steps = epochs * steps_per_epoch(num_examples, batch_size)
    return epsilon_of(
        [*history, (noise_multiplier, q, steps)], target_delta=target_delta, accountant=accountant
    )


def train_private(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    target_delta: float,
    accountant: str,
    history: Sequence[HistoryEntry] = (),
    max_epsilon: float | None = None,
    seed: int | None = None,
) -> PrivateTrainResult:
    """Train ``model`` in place with DP-SGD; return the new cumulative accountant state.

    Raises :class:`PrivacyBudgetExceeded` *before* touching the data when this round
    would push epsilon above ``max_epsilon``.
    """
    if max_epsilon is not None:
        projected = projected_epsilon(
            history, noise_multiplier=noise_multiplier, num_examples=len(data),
            batch_size=batch_size, epochs=epochs, target_delta=target_delta,
            accountant=accountant,
        )
        if projected > max_epsilon:
            spent = epsilon_of(history, target_delta=target_delta, accountant=accountant)
            raise PrivacyBudgetExceeded(
                f"max-epsilon {max_epsilon:g} would be exceeded: spent {spent:.4f}, "
                f"this round would reach {projected:.4f} (delta {target_delta:g})"
            )

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    loader = DataLoader(
        TensorDataset(torch.as_tensor(data.x), torch.as_tensor(data.y)),
        batch_size=batch_size, generator=generator,
    )
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [tuple(h) for h in history]  # type: ignore[misc]
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, noise_generator=generator,
    )
    private_model.train()
    losses: list[float] = []
    steps = 0
    try:
        for _ in range(epochs):
            epoch_losses = []
            for xb, yb in private_loader:
                private_optimizer.zero_grad()
                # An empty Poisson batch is still a step: Opacus adds the noise and the
                # accountant counts it (a sum over no examples has a zero gradient).
                loss = F.cross_entropy(private_model(xb), yb, reduction="sum") / max(1, len(yb))
                loss.backward()
                private_optimizer.step()
                steps += 1
                if len(yb):
                    epoch_losses.append(float(loss.detach()))
            losses = epoch_losses or losses
    finally:
        private_model.remove_hooks()  # type: ignore[operator]
    history_out = tuple(
        (float(nm), float(q), int(n)) for nm, q, n in engine.accountant.history
    )
    epsilon = epsilon_of(history_out, target_delta=target_delta, accountant=accountant)
    return PrivateTrainResult(
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        history=history_out,
        sample_epsilon=epsilon,
        steps=steps,
    )
