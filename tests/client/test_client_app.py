"""The subscriber's handlers called directly with Flower Messages (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client import protocol as P
from client.client_app import train, vote
from client.config import RunConfig
from client.task import get_weights, make_model
from server.round.strategy import arrays_to_numpy, numpy_to_arrays
from tests.conftest import make_contexts

RUN = {"num-subscribers": 4, "partitioner": "iid", "hidden-units": 8, "local-epochs": 1}


def _initial() -> dict[str, np.ndarray]:
    config = RunConfig.from_mapping(RUN)
    return get_weights(make_model(hidden_units=config.hidden_units,
                                  activation=config.activation, seed=config.seed))


def _train_msg(weights: dict[str, np.ndarray], server_round: int, node: int = 1000,
               **extra: object) -> Message:
    config = ConfigRecord({P.SERVER_ROUND: server_round, P.NOISE_MULTIPLIER: 1.0,
                           P.TARGET_EPSILON: 0.0, P.MAX_GRAD_NORM: 1.0, P.TARGET_DELTA: 1e-5,
                           P.PLANNED_ROUNDS: 5, P.UPDATE_KIND: "delta", **extra})
    return Message(content=RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: config}),
                   dst_node_id=node, message_type="train")


def test_train_replies_with_a_delta_and_cumulative_epsilon() -> None:
    contexts = make_contexts(RUN, 4)
    ctx = contexts[1000]
    weights = _initial()
    epsilons = []
    for server_round in (1, 2, 3):
        reply = train(_train_msg(weights, server_round), ctx)
        assert not reply.has_error()
        metrics = reply.content[P.METRICS]
        assert metrics[P.PARTITION_ID] == 0
        assert metrics[P.NUM_EXAMPLES] > 0
        epsilons.append(metrics[P.SAMPLE_EPSILON])
        delta = arrays_to_numpy(reply.content[P.ARRAYS])
        assert set(delta) == set(weights)
        assert 0 < sum(float(np.abs(v).sum()) for v in delta.values()) < 100
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert sum(ctx.state["privacy"]["steps"]) > 0


def test_weights_mode_returns_base_plus_delta() -> None:
    ctx_a, ctx_b = make_contexts(RUN, 4)[1001], make_contexts(RUN, 4)[1001]
    weights = _initial()
    delta = arrays_to_numpy(train(_train_msg(weights, 1, node=1001), ctx_a).content[P.ARRAYS])
    full = arrays_to_numpy(train(_train_msg(weights, 1, node=1001, **{P.UPDATE_KIND: "weights"}),
                                 ctx_b).content[P.ARRAYS])
    for name in weights:
        np.testing.assert_allclose(full[name], weights[name] + delta[name], atol=1e-6)


def test_calibrated_noise_is_computed_once_and_kept() -> None:
    ctx = make_contexts(RUN, 4)[1000]
    weights = _initial()
    train(_train_msg(weights, 1, **{P.TARGET_EPSILON: 2.0}), ctx)
    noise = ctx.state["privacy"]["calibrated-noise"]
    reply = train(_train_msg(weights, 2, **{P.TARGET_EPSILON: 2.0}), ctx)
    assert ctx.state["privacy"]["calibrated-noise"] == noise
    assert noise > 0.5
    assert reply.content[P.METRICS][P.SAMPLE_EPSILON] < 2.0


def test_max_epsilon_refuses_with_a_clear_error_reply() -> None:
    ctx = make_contexts(RUN, 4, **{"max-epsilon": 4.0})[1000]
    weights = _initial()
    replies = [train(_train_msg(weights, r), ctx) for r in range(1, 8)]
    errors = [r for r in replies if r.has_error()]
    assert errors, "the budget should run out within 7 rounds"
    assert errors[0].error.code == P.ERROR_BUDGET
    assert "max-epsilon 4 would be exceeded" in errors[0].error.reason
    spent = [r.content[P.METRICS][P.SAMPLE_EPSILON] for r in replies if not r.has_error()]
    assert spent and max(spent) <= 4.0


def test_missing_data_file_gives_an_error_reply(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = make_contexts(RUN, 1, **{"data-path": str(tmp_path / "absent.npz")})[1000]
    reply = train(_train_msg(_initial(), 1), ctx)
    assert reply.has_error() and reply.error.code == P.ERROR_DATA
    assert "no such file" in reply.error.reason


def _vote_msg(weights: dict[str, np.ndarray], deltas: dict[str, dict[str, np.ndarray]],
              authors: list[str]) -> Message:
    content = RecordDict({
        P.ARRAYS: numpy_to_arrays(weights),
        P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1, P.CANDIDATE_IDS: list(deltas),
                                P.CANDIDATE_AUTHORS: authors}),
    })
    for cid, delta in deltas.items():
        content[P.CANDIDATE_PREFIX + cid] = numpy_to_arrays(delta)
    return Message(content=content, dst_node_id=1002, message_type=P.VOTE_MESSAGE_TYPE)


def test_vote_reports_one_loss_per_candidate_and_collusion_lies() -> None:
    weights = _initial()
    rng = np.random.default_rng(0)
    deltas = {c: {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in weights.items()}
              for c in ("c1", "c2")}
    honest = vote(_vote_msg(weights, deltas, ["0", "1"]), make_contexts(RUN, 4)[1002])
    metrics = honest.content[P.METRICS]
    assert list(honest.content[P.CONFIG][P.CANDIDATE_IDS]) == ["c1", "c2"]
    assert len(metrics[P.LOSSES]) == 2 and metrics[P.BASE_LOSS] > 0
    colluding = {**RUN, "attack": "collude", "attackers": "0,2"}
    lying = vote(_vote_msg(weights, deltas, ["0", "1"]), make_contexts(colluding, 4)[1002])
    base = lying.content[P.METRICS][P.BASE_LOSS]
    assert lying.content[P.METRICS][P.LOSSES][0] < base < lying.content[P.METRICS][P.LOSSES][1]


def test_vote_without_the_candidate_update_is_an_error_reply() -> None:
    weights = _initial()
    msg = _vote_msg(weights, {}, [])
    msg.content[P.CONFIG][P.CANDIDATE_IDS] = ["ghost"]
    reply = vote(msg, make_contexts(RUN, 4)[1002])
    assert reply.has_error() and "lacks the update of candidate" in reply.error.reason


@pytest.mark.parametrize("attack", ["sign-flip", "noise", "free-rider", "label-flip", "fake-data"])
def test_attackers_send_something_else(attack: str) -> None:
    weights = _initial()
    honest = arrays_to_numpy(train(_train_msg(weights, 1), make_contexts(RUN, 4)[1000])
                             .content[P.ARRAYS])
    bad_ctx = make_contexts({**RUN, "attack": attack, "attackers": "0"}, 4)[1000]
    bad = arrays_to_numpy(train(_train_msg(weights, 1), bad_ctx).content[P.ARRAYS])
    assert any(not np.allclose(bad[k], honest[k]) for k in honest)


def test_vote_step_scores_a_damped_update() -> None:
    """With vote-step s a voter reports the loss of base + s * update."""
    weights = _initial()
    rng = np.random.default_rng(1)
    delta = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in weights.items()}
    half = {k: v * np.float32(0.5) for k, v in delta.items()}
    damped_msg = _vote_msg(weights, {"c": delta}, ["0"])
    damped_msg.content[P.CONFIG][P.VOTE_STEP] = 0.5
    damped = vote(damped_msg, make_contexts(RUN, 4)[1002]).content[P.METRICS][P.LOSSES][0]
    direct = vote(_vote_msg(weights, {"c": half}, ["0"]),
                  make_contexts(RUN, 4)[1002]).content[P.METRICS][P.LOSSES][0]
    full = vote(_vote_msg(weights, {"c": delta}, ["0"]),
                make_contexts(RUN, 4)[1002]).content[P.METRICS][P.LOSSES][0]
    assert damped == pytest.approx(direct, rel=1e-9)
    assert damped != pytest.approx(full, rel=1e-6)


def test_a_named_ledger_key_must_exist_and_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from flwr.app import Context, RecordDict

    from client.client_app import Subscriber
    from client.config import ConfigError
    from client.task import digits_split

    data = tmp_path / "d.npz"
    split = digits_split()
    np.savez(data, x=split.pool.x[:20], y=split.pool.y[:20])
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    for key, match in [(tmp_path / "absent.pem", "ledger-key: no such file"),
                       (bad, "ledger-key bad.pem: cannot read it")]:
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                          node_config={"data-path": str(data), "ledger-key": str(key)})
        with pytest.raises(ConfigError, match=match):
            Subscriber.from_context(context)
    assert not (tmp_path / "absent.pem").exists()  # never created behind the user's back


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((64, 32)), np.array(3.0, np.float32),
    np.zeros((0, 4), np.float32), np.arange(10, dtype=np.int64),
    np.asfortranarray(np.ones((3, 2), np.float32)),  # not the plain header: Flower decodes
])
def test_fast_array_decoding_equals_flowers(array: np.ndarray) -> None:
    from flwr.app import Array

    from client.client_app import _array_to_numpy

    wrapped = Array(array)
    fast = _array_to_numpy(wrapped)
    reference = wrapped.numpy()
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    np.testing.assert_array_equal(fast, reference)


def test_metadata_that_lies_about_the_shape_is_not_trusted() -> None:
    from flwr.app import Array

    from client.client_app import _array_to_numpy

    wrapped = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    wrapped.shape = [3, 2]  # the metadata disagrees with the .npy header
    decoded = _array_to_numpy(wrapped)
    assert decoded.shape == (2, 3)  # what the bytes say, as Flower's own decoder
    np.testing.assert_array_equal(decoded, wrapped.numpy())
