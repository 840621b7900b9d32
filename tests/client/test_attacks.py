from __future__ import annotations

import numpy as np
import pytest

from client.attacks import (
    COLLUSION_MARGIN,
    attack_update,
    collude_losses,
    poison_data,
    trains,
)
from client.task import Dataset

DELTA = {"w": np.array([0.5, -1.0], dtype=np.float32)}
DATA = Dataset(np.ones((4, 64), dtype=np.float32), np.array([0, 1, 2, 9]))


def test_label_flip_maps_y_to_nine_minus_y() -> None:
    flipped = poison_data(frozenset({"label-flip"}), DATA, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(flipped.y, [9, 8, 7, 0])
    np.testing.assert_array_equal(flipped.x, DATA.x)


def test_fake_data_replaces_inputs_and_labels() -> None:
    fake = poison_data(frozenset({"fake-data"}), DATA, rng=np.random.default_rng(0))
    assert fake.x.shape == DATA.x.shape and not np.array_equal(fake.x, DATA.x)
    assert fake.x.min() >= 0 and fake.x.max() < 1
    assert poison_data(frozenset({"sign-flip"}), DATA, rng=np.random.default_rng(0)) is DATA


def test_sign_flip_scales_and_negates() -> None:
    out = attack_update(frozenset({"sign-flip"}), DELTA, rng=np.random.default_rng(0),
                        scale=5.0, noise_std=0.1, previous=None)
    np.testing.assert_array_equal(out["w"], [-2.5, 5.0])


def test_noise_ignores_the_honest_update() -> None:
    out = attack_update(frozenset({"noise"}), DELTA, rng=np.random.default_rng(0),
                        scale=5.0, noise_std=0.1, previous=None)
    assert out["w"].dtype == np.float32 and not np.allclose(out["w"], DELTA["w"])
    assert not trains(frozenset({"noise"})) and trains(frozenset({"label-flip", "collude"}))


def test_free_rider_sends_zero_then_replays() -> None:
    first = attack_update(frozenset({"free-rider"}), DELTA, rng=np.random.default_rng(0),
                          scale=1, noise_std=0, previous=None)
    np.testing.assert_array_equal(first["w"], [0.0, 0.0])
    stale = {"w": np.array([3.0, 3.0], dtype=np.float32)}
    again = attack_update(frozenset({"free-rider"}), DELTA, rng=np.random.default_rng(0),
                          scale=1, noise_std=0, previous=stale)
    np.testing.assert_array_equal(again["w"], stale["w"])


def test_colluders_praise_attackers_and_smear_honest_candidates() -> None:
    out = collude_losses(2.0, [1.9, 2.1, 1.5], [True, False, False])
    assert out == [2.0 - COLLUSION_MARGIN, 2.0 + COLLUSION_MARGIN, 2.0 + COLLUSION_MARGIN]
    with pytest.raises(ValueError, match=r"expected one author flag per candidate \(3\), got 1"):
        collude_losses(2.0, [1.0, 1.0, 1.0], [True])
