"""The colluders' channel (client/collusion.py): one training per attacker partition and
round, the same crafted update for every colluder, a bounded cache, and the accountant
history a colluder keeps when another trained its round."""

from __future__ import annotations

import numpy as np
import pytest

from client.collusion import CollusionChannel, HonestUpdate, craft_update, extend_history
from client.model_poisoning import MODEL_POISONING

SHAPES = {"fc1.weight": (3, 4), "fc1.bias": (3,)}


def _update(pid: int) -> HonestUpdate:
    rng = np.random.default_rng(pid)
    delta = {k: rng.normal(0.0, 1.0, shape).astype(np.float32) for k, shape in SHAPES.items()}
    return HonestUpdate(delta, train_loss=1.0 + pid, noise_multiplier=1.0, sample_rate=0.25,
                        steps=4)


class Counting:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pid: int) -> HonestUpdate:
        self.calls.append(pid)
        return _update(pid)


@pytest.mark.parametrize("kind", sorted(MODEL_POISONING))
def test_every_colluder_gets_the_same_crafted_update_from_one_training_each(kind: str) -> None:
    channel, train = CollusionChannel(), Counting()
    key = ("run", "knobs", 3, "base")
    pools = [channel.pool(key, kind=kind, partition_ids=(5, 2, 7), train_partition=train,
                          num_clients=10, num_byzantine=3) for _ in range(3)]
    assert train.calls == [2, 5, 7]
    for pool in pools[1:]:
        assert pool.crafted.keys() == pools[0].crafted.keys()
        assert all(np.array_equal(pool.crafted[k], pools[0].crafted[k]) for k in SHAPES)
    assert {k: v.shape for k, v in pools[0].crafted.items()} == SHAPES
    assert all(v.dtype == np.float32 for v in pools[0].crafted.values())
    assert pools[0].honest[5].train_loss == 6.0
    # a new round (or base model) trains again
    channel.pool(("run", "knobs", 4, "base"), kind=kind, partition_ids=(5, 2, 7),
                 train_partition=train, num_clients=10, num_byzantine=3)
    assert train.calls == [2, 5, 7, 2, 5, 7]


def test_alie_differs_from_the_honest_mean() -> None:
    honest = {pid: _update(pid) for pid in (0, 1, 2)}
    crafted = craft_update("alie", honest, num_clients=10, num_byzantine=3)
    mean = {k: np.mean([u.delta[k] for u in honest.values()], axis=0) for k in SHAPES}
    assert not any(np.allclose(crafted[k], mean[k]) for k in SHAPES)
    # ALIE sits mean - z * std with z > 0: below the mean wherever the updates spread
    assert all(np.all(crafted[k] <= mean[k] + 1e-6) for k in SHAPES)


def test_the_cache_keeps_only_the_newest_entries() -> None:
    channel, train = CollusionChannel(max_entries=2), Counting()
    for server_round in (1, 2, 3):
        channel.pool(("run", "k", server_round, "b"), kind="ipm", partition_ids=(0,),
                     train_partition=train, num_clients=4, num_byzantine=1)
    assert len(channel) == 2
    channel.pool(("run", "k", 1, "b"), kind="ipm", partition_ids=(0,), train_partition=train,
                 num_clients=4, num_byzantine=1)
    assert train.calls == [0, 0, 0, 0]  # round 1 was dropped and is trained again


def test_a_failed_training_caches_nothing() -> None:
    channel = CollusionChannel()

    def broken(pid: int) -> HonestUpdate:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        channel.pool(("r", "k", 1, "b"), kind="alie", partition_ids=(0, 1),
                     train_partition=broken, num_clients=4, num_byzantine=2)
    assert len(channel) == 0


def test_channel_errors() -> None:
    with pytest.raises(ValueError, match="expected max_entries >= 1, got 0"):
        CollusionChannel(max_entries=0)
    with pytest.raises(ValueError, match="expected at least one colluding partition"):
        CollusionChannel().pool(("r", "k", 1, "b"), kind="alie", partition_ids=(),
                                train_partition=Counting(), num_clients=4, num_byzantine=0)
    with pytest.raises(ValueError, match="expected an attack in"):
        craft_update("gauss", {0: _update(0)}, num_clients=4, num_byzantine=1)


def test_extend_history_merges_as_opacus_does() -> None:
    assert extend_history([], noise_multiplier=1.0, sample_rate=0.1, steps=30) == [(1.0, 0.1, 30)]
    assert extend_history([(1.0, 0.1, 30)], noise_multiplier=1.0, sample_rate=0.1,
                          steps=30) == [(1.0, 0.1, 60)]
    assert extend_history([(1.0, 0.1, 30)], noise_multiplier=0.8, sample_rate=0.1,
                          steps=30) == [(1.0, 0.1, 30), (0.8, 0.1, 30)]
