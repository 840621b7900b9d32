"""Issue 11, part 2: the adaptive attacker (honest before ``attack-start-round``), the
targeted label flip and its metrics, and the config that refuses what cannot run;
through the pure functions and through the real ``train`` handler."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import client.client_app as client_app
from client import protocol as P
from client.attacks import active_attacks, poison_data, targeted_flip_metrics
from client.collusion import CollusionChannel, HonestUpdate, craft_update
from client.config import ConfigError, RunConfig
from client.task import Dataset, get_weights, make_model
from server.round.strategy import arrays_to_numpy, numpy_to_arrays
from tests.conftest import make_contexts

RUN = {"num-subscribers": 4, "partitioner": "iid", "hidden-units": 8, "local-epochs": 1}
DATA = Dataset(np.zeros((6, 64), dtype=np.float32), np.array([0, 1, 1, 7, 9, 1]))


# ---------------------------------------------------------------- active_attacks
@pytest.mark.parametrize(("server_round", "start_round", "active"), [
    (1, 1, True), (1, 2, False), (2, 3, False), (3, 3, True), (9, 3, True),
])
def test_attacks_switch_on_at_the_start_round(server_round: int, start_round: int,
                                              active: bool) -> None:
    kinds = frozenset({"alie", "collude"})
    expected = kinds if active else frozenset()
    assert active_attacks(kinds, server_round, start_round) == expected


def test_active_attacks_refuses_rounds_below_one() -> None:
    with pytest.raises(ValueError, match="expected server_round >= 1 and start_round >= 1"):
        active_attacks(frozenset({"noise"}), 0, 1)
    with pytest.raises(ValueError, match="got 1 and 0"):
        active_attacks(frozenset({"noise"}), 1, 0)


# ----------------------------------------------------------------- targeted flip
def test_targeted_flip_changes_only_the_source_labels() -> None:
    flipped = poison_data(frozenset({"targeted-flip"}), DATA, rng=np.random.default_rng(0),
                          flip_source=1, flip_target=7)
    np.testing.assert_array_equal(flipped.y, [0, 7, 7, 7, 9, 7])
    np.testing.assert_array_equal(flipped.x, DATA.x)
    np.testing.assert_array_equal(DATA.y, [0, 1, 1, 7, 9, 1])  # the real data is untouched
    other = poison_data(frozenset({"targeted-flip"}), DATA, rng=np.random.default_rng(0),
                        flip_source=9, flip_target=0)
    np.testing.assert_array_equal(other.y, [0, 1, 1, 7, 0, 1])


def test_targeted_flip_metrics_known_answer() -> None:
    labels = np.array([1, 1, 1, 1, 7, 3])
    predicted = np.array([1, 7, 7, 2, 7, 3])
    source_accuracy, success = targeted_flip_metrics(predicted, labels, flip_source=1,
                                                     flip_target=7)
    assert source_accuracy == 0.25 and success == 0.5
    with pytest.raises(ValueError, match="expected test examples of the source class 5"):
        targeted_flip_metrics(predicted, labels, flip_source=5, flip_target=7)
    with pytest.raises(ValueError, match="expected one prediction per label"):
        targeted_flip_metrics(predicted[:2], labels, flip_source=1, flip_target=7)


def test_central_evaluation_reports_the_targeted_flip_view() -> None:
    from server.server_app import make_central_evaluate

    config = RunConfig.from_mapping(RUN)
    model = make_model(hidden_units=8, activation="square", seed=0)
    metrics = make_central_evaluate(config)(1, numpy_to_arrays(get_weights(model)))
    assert 0.0 <= metrics["source-accuracy"] <= 1.0
    assert 0.0 <= metrics["attack-success-rate"] <= 1.0 - metrics["source-accuracy"]


def test_report_carries_source_accuracy_and_attack_success_rate() -> None:
    from server.round.report import build_report
    from server.round.strategy import RoundRecord

    record = RoundRecord(server_round=1)
    record.metrics = {"accuracy": 0.9, "loss": 0.3, "source-accuracy": 0.4,
                      "attack-success-rate": 0.55}
    report = build_report(RunConfig.from_mapping(RUN), [record],
                          initial_metrics={"accuracy": 0.1, "source-accuracy": 0.2,
                                           "attack-success-rate": 0.05}, wall_seconds=1.0)
    assert report["rounds"][0]["source_accuracy"] == 0.4
    assert report["rounds"][0]["attack_success_rate"] == 0.55
    assert report["final_source_accuracy"] == 0.4
    assert report["final_attack_success_rate"] == 0.55
    assert report["initial_attack_success_rate"] == 0.05
    assert (report["flip_source"], report["flip_target"]) == (1, 7)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(("raw", "match"), [
    ({"attack": "backdoor", "attackers": "0"}, r"attack: expected one of .*got 'backdoor'"),
    ({"attack": "targeted-flip", "attackers": "0", "flip-source": 3, "flip-target": 3},
     "flip-source and flip-target: expected two different classes, got 3 for both"),
    ({"flip-source": 10}, r"flip-source: expected a class in 0\.\.9, got 10"),
    ({"flip-target": -1}, r"flip-target: expected a class in 0\.\.9, got -1"),
    ({"attack-start-round": 0}, "attack-start-round: expected an integer >= 1, got 0"),
    ({"attack": "alie+ipm", "attackers": "0"},
     r"attack: expected at most one of .*got \['alie', 'ipm'\]"),
    ({"attack": "min-max+noise", "attackers": "0"},
     "min-max crafts from trained updates and cannot be combined"),
    ({"attack": "targeted-flip+label-flip", "attackers": "0"},
     "targeted-flip cannot be combined with another data attack"),
])
def test_bad_attack_knobs_are_refused(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({**RUN, **raw})


def test_new_attacks_combine_with_plus() -> None:
    config = RunConfig.from_mapping({**RUN, "attack": "alie+collude+targeted-flip",
                                     "attackers": "0,1", "attack-start-round": 3})
    assert config.attack_kinds == {"alie", "collude", "targeted-flip"}
    assert config.attack_start_round == 3


# ------------------------------------------------------ through the real handler
def _initial() -> dict[str, np.ndarray]:
    return get_weights(make_model(hidden_units=8, activation="square", seed=0))


def _train_msg(weights: dict[str, np.ndarray], server_round: int, node: int) -> Message:
    config = ConfigRecord({P.SERVER_ROUND: server_round, P.NOISE_MULTIPLIER: 1.0,
                           P.TARGET_EPSILON: 0.0, P.MAX_GRAD_NORM: 1.0, P.TARGET_DELTA: 1e-5,
                           P.PLANNED_ROUNDS: 5, P.UPDATE_KIND: "delta"})
    return Message(content=RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: config}),
                   dst_node_id=node, message_type="train")


def _train(run: dict[str, object], ctx: object, weights: dict[str, np.ndarray],
           server_round: int, node: int) -> tuple[dict[str, np.ndarray], float]:
    reply = client_app.train(_train_msg(weights, server_round, node), ctx)  # type: ignore[arg-type]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return (arrays_to_numpy(reply.content[P.ARRAYS]),
            float(reply.content[P.METRICS][P.SAMPLE_EPSILON]))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_adaptive_flipper_is_honest_before_its_start_round() -> None:
    weights = _initial()
    attacking = {**RUN, "attack": "targeted-flip+sign-flip", "attackers": "0",
                 "attack-start-round": 2}
    honest_ctx = make_contexts(RUN, 4)[1000]
    attacker_ctx = make_contexts(attacking, 4)[1000]
    for server_round in (1, 2):
        honest, honest_eps = _train(RUN, honest_ctx, weights, server_round, 1000)
        sent, sent_eps = _train(attacking, attacker_ctx, weights, server_round, 1000)
        assert sent_eps == honest_eps
        if server_round == 1:
            assert _same(sent, honest)
        else:
            assert not _same(sent, honest)
            # sign-flip of an update trained on relabelled data, not of the honest one
            assert not all(np.allclose(sent[k], -5.0 * honest[k], atol=1e-6) for k in honest)


def test_adaptive_colluders_pool_from_round_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALIE from round 2: round 1 is honest; in round 2 both colluders send the same
    crafted update, each attacker partition is trained once, and each colluder's epsilon
    is what its own training would have spent."""
    channel = CollusionChannel()
    monkeypatch.setattr(client_app, "CHANNEL", channel)
    trained: list[int] = []
    real = client_app.train_partition

    def counting(*args: object, **kwargs: object) -> object:
        trained.append(int(args[4]))  # type: ignore[call-overload]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_app, "train_partition", counting)
    weights = _initial()
    attacking = {**RUN, "attack": "alie", "attackers": "0,1", "attack-start-round": 2}
    honest_ctxs, attacker_ctxs = make_contexts(RUN, 4), make_contexts(attacking, 4)
    round_one = {node: _train(attacking, attacker_ctxs[node], weights, 1, node)
                 for node in (1000, 1001)}
    for node in (1000, 1001):
        assert _same(round_one[node][0], _train(RUN, honest_ctxs[node], weights, 1, node)[0])
    assert trained == [] and len(channel) == 0

    crafted = {node: _train(attacking, attacker_ctxs[node], weights, 2, node)
               for node in (1000, 1001)}
    assert trained == [0, 1]
    assert _same(crafted[1000][0], crafted[1001][0])
    honest_two = {node: _train(RUN, honest_ctxs[node], weights, 2, node) for node in (1000, 1001)}
    # the pool holds exactly what each partition's own honest training sends
    pooled = {pid: HonestUpdate(honest_two[1000 + pid][0], 0.0, 1.0, 0.1, 1) for pid in (0, 1)}
    assert _same(crafted[1000][0], craft_update("alie", pooled, num_clients=4, num_byzantine=2))
    mean = {k: (honest_two[1000][0][k] + honest_two[1001][0][k]) / 2 for k in weights}
    assert not all(np.allclose(crafted[1000][0][k], mean[k], atol=1e-6) for k in weights)
    for node in (1000, 1001):
        assert crafted[node][1] == pytest.approx(honest_two[node][1], rel=1e-12)
        assert list(attacker_ctxs[node].state["privacy"]["steps"]) == \
            list(honest_ctxs[node].state["privacy"]["steps"])
