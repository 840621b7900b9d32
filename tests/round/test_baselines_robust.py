"""The centered-clipping and NNM + trimmed-mean baselines (server/round/baselines.py)
against the pure rules they wrap (server/round/robust.py): a differential test on
synthetic Flower replies, the tau / n bound on one huge outlier, the f cap, and the
validation of their config keys."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from client import protocol as P
from client.config import ConfigError, RunConfig
from server.round.baselines import CenteredClipping, NNMTrimmedMean, build_baseline
from server.round.robust import centered_clipping, flatten, nnm_trimmed_mean
from server.round.strategy import arrays_to_numpy, numpy_to_arrays

SHAPES = {"fc1.weight": (4, 3), "fc1.bias": (4,), "fc2.weight": (2, 4)}
KEYS = list(SHAPES)


class _Grid:
    """Just enough of a Grid for ``configure_train``: the connected node ids."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> Iterable[int]:
        return [1000 + pid for pid in range(self.count)]


def _weights(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def _reply(pid: int, weights: dict[str, np.ndarray], num_examples: int = 50) -> Message:
    origin = Message(RecordDict(), dst_node_id=1000 + pid, message_type="train")
    metrics = MetricRecord({P.NUM_EXAMPLES: num_examples, P.SAMPLE_EPSILON: 0.5,
                            P.PARTITION_ID: pid})
    return Message(RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.METRICS: metrics}),
                   reply_to=origin)


def _error_reply(pid: int) -> Message:
    origin = Message(RecordDict(), dst_node_id=1000 + pid, message_type="train")
    return Message(Error(code=7, reason="out of budget"), reply_to=origin)


def _strategy(num_nodes: int, **run: object):  # type: ignore[no-untyped-def]
    config = RunConfig.from_mapping({"num-subscribers": num_nodes, **run})
    return build_baseline(config, num_nodes=num_nodes)


def _round(strategy, server_round: int, global_weights: dict[str, np.ndarray],  # type: ignore[no-untyped-def]
           replies: list[Message]) -> dict[str, np.ndarray]:
    messages = list(strategy.configure_train(server_round, numpy_to_arrays(global_weights),
                                             ConfigRecord(), _Grid(len(replies))))
    assert all(m.content["config"][P.UPDATE_KIND] == "weights" for m in messages)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert arrays is not None and metrics is not None
    return arrays_to_numpy(arrays)


def _deltas(weights: list[dict[str, np.ndarray]], base: dict[str, np.ndarray]) -> np.ndarray:
    return flatten(weights, KEYS) - flatten([base], KEYS)[0]


def _assert_weights(got: dict[str, np.ndarray], base: dict[str, np.ndarray],
                    aggregate: np.ndarray) -> None:
    flat = flatten([base], KEYS)[0] + aggregate
    assert list(got) == KEYS
    np.testing.assert_allclose(flatten([got], KEYS)[0], flat, rtol=0, atol=1e-6)
    assert all(got[k].dtype == np.float32 and got[k].shape == SHAPES[k] for k in KEYS)


# ------------------------------------------------------------- differential


def test_centered_clipping_equals_the_pure_rule_with_last_rounds_aggregate_as_center() -> None:
    rng = np.random.default_rng(0)
    strategy = _strategy(5, strategy="centered-clipping", **{"clipping-tau": 0.8,
                                                             "clipping-iterations": 3})
    assert isinstance(strategy, CenteredClipping)
    base = _weights(rng)
    center = np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))
    for server_round in (1, 2):
        # Unequal example counts: the rule must not weight by them.
        sent = [_weights(rng) for _ in range(5)]
        replies = [_reply(pid, w, num_examples=10 ** pid) for pid, w in enumerate(sent)]
        got = _round(strategy, server_round, base, replies)
        expected = centered_clipping(_deltas(sent, base), center=center, tau=0.8, iterations=3)
        _assert_weights(got, base, expected)
        center = expected
        base = got
    record = strategy.current
    assert [c.author for c in record.candidates] == ["0", "1", "2", "3", "4"]
    assert "aggregate" in record.phase_seconds and not record.rejected


def test_nnm_trimmed_mean_equals_the_pure_rule_with_f_from_the_attackers() -> None:
    rng = np.random.default_rng(1)
    strategy = _strategy(7, strategy="nnm-trimmed-mean", attack="sign-flip", attackers="1,4")
    assert isinstance(strategy, NNMTrimmedMean) and strategy.num_malicious_nodes == 2
    base = _weights(rng)
    sent = [_weights(rng) for _ in range(5)] + [_weights(rng, scale=50.0) for _ in range(2)]
    replies = [_reply(pid, w, num_examples=1 + 1000 * pid) for pid, w in enumerate(sent)]
    got = _round(strategy, 1, base, replies)
    _assert_weights(got, base, nnm_trimmed_mean(_deltas(sent, base), num_byzantine=2))


# ---------------------------------------------------------------- robustness


def test_one_huge_outlier_pulls_the_centered_clipping_aggregate_at_most_tau_over_n() -> None:
    rng = np.random.default_rng(2)
    tau, count = 0.5, 6
    strategy = _strategy(count, strategy="centered-clipping", **{"clipping-tau": tau})
    base = _weights(rng)
    honest = [{k: base[k] + 0.3 * rng.normal(size=s).astype(np.float32)
               for k, s in SHAPES.items()} for _ in range(count - 1)]
    outlier = {k: base[k] + np.float32(1e6) for k in KEYS}
    got = _round(strategy, 1, base, [_reply(pid, w) for pid, w in
                                      enumerate([*honest, outlier])])
    # Reference written out here, not robust.py: center 0 (round 1), one iteration.
    differences = _deltas(honest, base)
    norms = np.linalg.norm(differences, axis=1)
    clipped = differences * np.minimum(1.0, tau / norms)[:, None]
    without_outlier = clipped.sum(axis=0) / count
    pull = flatten([got], KEYS)[0] - flatten([base], KEYS)[0] - without_outlier
    assert np.linalg.norm(pull) <= tau / count + 1e-5
    assert np.linalg.norm(pull) == pytest.approx(tau / count, rel=1e-4)  # clipped to tau
    # The plain mean would have moved by the outlier's 1e6 per coordinate / n.
    assert np.all(np.abs(flatten([got], KEYS)[0]) < 1e3)


def test_nnm_trimmed_mean_caps_f_below_n_over_2_when_built_and_when_replies_fail() -> None:
    strategy = _strategy(5, strategy="nnm-trimmed-mean", attack="noise",
                         attackers="0,1,2,3")
    assert strategy.num_malicious_nodes == 2  # n > 2f
    rng = np.random.default_rng(3)
    base = _weights(rng)
    sent = [_weights(rng) for _ in range(3)]
    replies = [_reply(pid, w) for pid, w in enumerate(sent)] + [_error_reply(3), _error_reply(4)]
    got = _round(strategy, 1, base, replies)
    _assert_weights(got, base, nnm_trimmed_mean(_deltas(sent, base), num_byzantine=1))
    assert [r["author"] for r in strategy.current.rejected] == ["node-1003", "node-1004"]


# ------------------------------------------------------------------- config


def test_new_strategies_and_clipping_keys_parse() -> None:
    config = RunConfig.from_mapping({"strategy": "centered-clipping", "clipping-tau": "2.5",
                                     "clipping-iterations": 3})
    assert (config.clipping_tau, config.clipping_iterations) == (2.5, 3)
    assert RunConfig.from_mapping({"strategy": "nnm-trimmed-mean"}).strategy == "nnm-trimmed-mean"
    assert (RunConfig().clipping_tau, RunConfig().clipping_iterations) == (5.0, 1)


@pytest.mark.parametrize(("raw", "match"), [
    ({"clipping-tau": 0}, r"clipping-tau: expected a finite number > 0, got 0"),
    ({"clipping-tau": -1.0}, r"clipping-tau: expected a finite number > 0"),
    ({"clipping-tau": "inf"}, r"clipping-tau: expected a finite number > 0, got inf"),
    ({"clipping-tau": "wide"}, r"clipping-tau: expected a number, got 'wide'"),
    ({"clipping-iterations": 0}, r"clipping-iterations: expected an integer >= 1, got 0"),
    ({"clipping-iterations": 1.5}, r"clipping-iterations: expected an integer"),
    ({"strategy": "centered_clipping"}, r"strategy: expected one of .*'nnm-trimmed-mean'.*"
                                        r"got 'centered_clipping'"),
])
def test_bad_clipping_keys_are_refused(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(raw)
