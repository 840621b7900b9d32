"""Simulated adversaries: what a dishonest subscriber does instead of honest work.

Chosen per partition by the run config (``attack`` and ``attackers``); each is a pure
function of plain data so it can be tested without Flower. Several attacks combine with
``+`` (``label-flip+collude``: poisoned updates *and* lying votes).

- ``label-flip``: trains honestly on labels mapped ``y -> 9 - y``.
- ``sign-flip``: sends ``-attack_scale`` times its honest update.
- ``noise``: sends Gaussian noise (``attack_noise_std`` per weight) without training.
- ``fake-data``: the "fake subscriber": trains on uniformly random inputs and labels.
- ``free-rider``: never trains; sends a zero update first, then passes off the last
  change of the global model (``global_t - global_{t-1}``) as its own (a stale update).
- ``collude``: as a voter, reports that attackers' candidates help a lot and honest
  candidates hurt, to push the colluders' updates into the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from client.task import NUM_CLASSES, Dataset

Weights = Mapping[str, np.ndarray]

DATA_ATTACKS = frozenset({"label-flip", "fake-data"})
UPDATE_ATTACKS = frozenset({"sign-flip", "noise", "free-rider"})
COLLUSION_MARGIN = 1.0


def poison_data(kinds: frozenset[str], data: Dataset, *, rng: np.random.Generator) -> Dataset:
    """The data an attacker trains on instead of its real data."""
    if "fake-data" in kinds:
        x = rng.random(data.x.shape, dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, size=data.y.shape, dtype=np.int64)
        return Dataset(x, y)
    if "label-flip" in kinds:
        return Dataset(data.x, (NUM_CLASSES - 1 - data.y).astype(np.int64))
    return data


def trains(kinds: frozenset[str]) -> bool:
    """Whether this attacker runs local training at all."""
    return not ({"noise", "free-rider"} & kinds)


def attack_update(
    kinds: frozenset[str],
    delta: Weights,
    *,
    rng: np.random.Generator,
    scale: float,
    noise_std: float,
    previous: Weights | None,
) -> dict[str, np.ndarray]:
    """Turn an honest update (or a zero one, for attackers that do not train) into the
    attacker's update. ``previous`` is the stale update a free rider replays (None in its
    first round)."""
    if "free-rider" in kinds:
        if previous is None:
            return {k: np.zeros_like(v) for k, v in delta.items()}
        return {k: np.array(v, copy=True) for k, v in previous.items()}
    if "noise" in kinds:
        return {
            k: rng.normal(0.0, noise_std, size=np.shape(v)).astype(np.float32)
            for k, v in delta.items()
        }
    if "sign-flip" in kinds:
        return {k: (-scale * np.asarray(v)).astype(np.float32) for k, v in delta.items()}
    return {k: np.array(v, copy=True) for k, v in delta.items()}


def collude_losses(
    base_loss: float, losses: Sequence[float], attacker_authored: Sequence[bool]
) -> list[float]:
    """Lying votes: attackers' candidates look much better than the current model,
    honest ones much worse."""
    if len(losses) != len(attacker_authored):
        raise ValueError(
            f"expected one author flag per candidate ({len(losses)}), "
            f"got {len(attacker_authored)}"
        )
    return [
        base_loss - COLLUSION_MARGIN if bad else base_loss + COLLUSION_MARGIN
        for bad in attacker_authored
    ]


def collude_marginals(marginals: Sequence[float], attacker_authored: Sequence[bool]
                      ) -> list[float]:
    """Lying marginal ballots: including an attacker's candidate helps a lot, including
    an honest one hurts a lot."""
    if len(marginals) != len(attacker_authored):
        raise ValueError(
            f"expected one author flag per candidate ({len(marginals)}), "
            f"got {len(attacker_authored)}"
        )
    return [COLLUSION_MARGIN if bad else -COLLUSION_MARGIN for bad in attacker_authored]
