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
- ``targeted-flip``: a backdoor-style flip: trains with the examples of one class
  (``flip_source``) relabelled as another (``flip_target``), leaving every other label
  alone, so overall accuracy barely moves while that class is misread
  (:func:`targeted_flip_metrics` is how a report sees it).
- ``alie``, ``ipm``, ``min-max``, ``min-sum``: model poisoning by colluders that pool
  their honest updates (``client.model_poisoning``, ``client.collusion``).

Adaptive attackers (``attack_start_round`` > 1) are completely honest before that
round: :func:`active_attacks` is the one switch that training and voting both read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from client.model_poisoning import MODEL_POISONING
from client.task import NUM_CLASSES, Dataset

Weights = Mapping[str, np.ndarray]

DATA_ATTACKS = frozenset({"label-flip", "fake-data", "targeted-flip"})
UPDATE_ATTACKS = frozenset({"sign-flip", "noise", "free-rider"}) | MODEL_POISONING
COLLUSION_MARGIN = 1.0
NO_ATTACKS: frozenset[str] = frozenset()


def active_attacks(kinds: frozenset[str], server_round: int, start_round: int) -> frozenset[str]:
    """The attacks an attacker carries out in ``server_round``: none before
    ``start_round`` (it trains, sends and votes honestly, to earn trust first), all of
    ``kinds`` from then on.

    Raises ValueError for a round or start round below 1."""
    if server_round < 1 or start_round < 1:
        raise ValueError(
            f"expected server_round >= 1 and start_round >= 1, got {server_round} and "
            f"{start_round}"
        )
    return kinds if server_round >= start_round else NO_ATTACKS


def poison_data(
    kinds: frozenset[str],
    data: Dataset,
    *,
    rng: np.random.Generator,
    flip_source: int = 1,
    flip_target: int = 7,
    classes: int = NUM_CLASSES,
) -> Dataset:
    """The data an attacker trains on instead of its real data (``data`` itself when
    ``kinds`` has no data attack). ``targeted-flip`` relabels only the examples of
    class ``flip_source`` as ``flip_target``."""
    if "fake-data" in kinds:
        x = rng.random(data.x.shape, dtype=np.float32)
        y = rng.integers(0, classes, size=data.y.shape, dtype=np.int64)
        return Dataset(x, y)
    if "label-flip" in kinds:
        return Dataset(data.x, (classes - 1 - data.y).astype(np.int64))
    if "targeted-flip" in kinds:
        y = np.where(data.y == flip_source, flip_target, data.y).astype(np.int64)
        return Dataset(data.x, y)
    return data


def targeted_flip_metrics(
    predicted: np.ndarray, labels: np.ndarray, *, flip_source: int, flip_target: int
) -> tuple[float, float]:
    """``(source_accuracy, attack_success_rate)`` on a test set: the accuracy on the
    examples of class ``flip_source``, and the fraction of them predicted as
    ``flip_target`` (the targeted flip's goal).

    Raises ValueError for shapes that differ or a test set without the source class."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(
            f"expected one prediction per label, got shapes {predicted.shape} and {labels.shape}"
        )
    source = labels == flip_source
    if not source.any():
        raise ValueError(f"expected test examples of the source class {flip_source}, got none")
    return (float(np.mean(predicted[source] == flip_source)),
            float(np.mean(predicted[source] == flip_target)))


def model_poisoning_kind(kinds: frozenset[str]) -> str | None:
    """The model-poisoning attack among ``kinds`` (the config allows at most one)."""
    chosen = sorted(kinds & MODEL_POISONING)
    assert len(chosen) <= 1, f"config allowed several model-poisoning attacks: {chosen}"
    return chosen[0] if chosen else None


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
