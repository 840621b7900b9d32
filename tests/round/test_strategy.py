"""ProofOfIntelligence end to end over an in-process Grid: real ClientApp handlers, no Ray.
Malformed replies and votes are injected and must be rejected with a reason while the
round goes on."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client import protocol as P
from client.client_app import train, vote
from client.config import RunConfig
from client.task import make_model
from client.wire import PACKED
from server.round.strategy import PoIConfig, ProofOfIntelligence, arrays_to_numpy, numpy_to_arrays
from server.server_app import make_central_evaluate, train_config_for
from tests.conftest import InProcessGrid, make_contexts, reply_tensors

HANDLERS = {"train": train, P.VOTE_MESSAGE_TYPE: vote}


def _run(run: dict[str, Any], rounds: int, tamper=None, poi: PoIConfig | None = None):  # type: ignore[no-untyped-def]
    config = RunConfig.from_mapping(run)
    grid = InProcessGrid(make_contexts(run, config.num_subscribers), HANDLERS, tamper)
    strategy = ProofOfIntelligence(config=poi or PoIConfig(vote_rule="single", seed=config.seed),
                                   min_available_nodes=config.num_subscribers)
    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=rounds, train_config=train_config_for(config),
                            evaluate_fn=make_central_evaluate(config))
    return strategy, result, grid


def test_label_flipper_is_never_selected_and_accuracy_rises() -> None:
    run = {"num-subscribers": 5, "partitioner": "iid", "attack": "label-flip",
           "attackers": "2", "seed": 1}
    strategy, result, grid = _run(run, rounds=3)
    for record in strategy.history:
        assert record.selected and "2" not in record.selected
        flipped = next(c for c in record.candidates if c.author == "2")
        assert flipped.score is not None
        assert flipped.score < max(c.score for c in record.candidates if c.author != "2")
        for candidate in record.candidates:
            assert candidate.node_id not in candidate.voters  # never votes for itself
            assert len(candidate.voters) == 4
    accuracy = [r.metrics["accuracy"] for r in strategy.history]
    assert accuracy[-1] > result.evaluate_metrics_serverapp[0]["accuracy"]
    vote_types = {m.metadata.message_type for m in grid.sent}
    assert vote_types == {"train", P.VOTE_MESSAGE_TYPE}


def test_top_k_applies_the_mean_of_the_best_k() -> None:
    run = {"num-subscribers": 4, "partitioner": "iid", "seed": 2}
    captured: list[dict[str, np.ndarray]] = []

    def keep(node: int, reply: Message) -> Message:
        if not reply.has_error() and P.ARRAYS in reply.content:
            captured.append(reply_tensors(reply.content[P.ARRAYS]))
        return reply

    strategy, result, _ = _run(run, rounds=1, tamper=keep, poi=PoIConfig(vote_rule="single", top_k=2, seed=2))
    record = strategy.history[0]
    assert len(record.selected) == 2
    chosen = [c for c in record.candidates if c.selected]
    from crypto.digests import tensors_digest

    by_digest = {tensors_digest(d): d for d in captured}
    initial = arrays_to_numpy(ArrayRecord(make_model(hidden_units=32, activation="square",
                                                     seed=2).state_dict()))
    expected = {k: initial[k] + np.mean([by_digest[c.candidate_id][k] for c in chosen], axis=0)
                for k in initial}
    final = arrays_to_numpy(result.arrays)
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], atol=1e-6)


def _garbage_reply(kind: str, reply: Message) -> Message:
    if kind == "error":
        return Message(Error(code=7, reason="disk on fire"), reply_to=_origin(reply))
    content = reply.content
    if kind.startswith("packed-"):  # PoI's own wire form (client.wire), malformed
        flat = content[P.ARRAYS][PACKED].numpy()
        bad = {"packed-short": flat[:-1], "packed-float64": flat.astype(np.float64),
               "packed-2d": flat.reshape(1, -1)}[kind]
        record = ArrayRecord({PACKED: Array(bad)})
        if kind == "packed-short":
            record = ArrayRecord({PACKED: Array(bad), "extra": Array(flat[:1])})
        return Message(RecordDict({P.ARRAYS: record, P.METRICS: content[P.METRICS]}),
                       reply_to=_origin(reply))
    arrays = reply_tensors(content[P.ARRAYS])  # then sent back one Array per tensor
    name = next(iter(arrays))
    if kind == "nan":
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = np.nan
    elif kind == "shape":
        arrays[name] = np.zeros((3, 3), dtype=np.float32)
    elif kind == "dtype":
        arrays[name] = arrays[name].astype(np.float64)
    elif kind == "missing":
        arrays.pop(name)
    elif kind == "huge":
        arrays[name] = arrays[name] * 1e6
    elif kind == "no-metrics":
        return Message(RecordDict({P.ARRAYS: numpy_to_arrays(arrays)}), reply_to=_origin(reply))
    return Message(RecordDict({P.ARRAYS: numpy_to_arrays(arrays), P.METRICS: content[P.METRICS]}),
                   reply_to=_origin(reply))


_ORIGINS: dict[int, Message] = {}


class OriginGrid(InProcessGrid):
    """Remembers each node's last request so a tampered reply can answer it."""

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for m in messages:
            _ORIGINS[m.metadata.dst_node_id] = m
        return super().push_messages(messages)


def _origin(reply: Message) -> Message:
    return _ORIGINS[reply.metadata.src_node_id]


def test_malformed_replies_are_rejected_with_reasons_and_the_round_goes_on() -> None:
    kinds = ["error", "nan", "shape", "dtype", "missing", "huge", "no-metrics",
             "packed-short", "packed-float64", "packed-2d"]
    run = {"num-subscribers": len(kinds) + 2, "partitioner": "iid", "seed": 3}
    node_kind = {1000 + i: kind for i, kind in enumerate(kinds)}

    config = RunConfig.from_mapping(run)

    def tamper(node: int, reply: Message) -> Message:
        if reply.metadata.message_type == "train" and node in node_kind:
            return _garbage_reply(node_kind[node], reply)
        if reply.metadata.message_type == P.VOTE_MESSAGE_TYPE and node == 1000:
            metrics = reply.content[P.METRICS]
            return Message(RecordDict({P.METRICS: MetricRecord({P.BASE_LOSS: metrics[P.BASE_LOSS],
                                                                 P.LOSSES: [float("nan")]}),
                                       P.CONFIG: ConfigRecord({P.CANDIDATE_IDS: ["x"]})}),
                           reply_to=_origin(reply))
        return reply

    grid = OriginGrid(make_contexts(run, config.num_subscribers), HANDLERS, tamper)
    strategy = ProofOfIntelligence(config=PoIConfig(vote_rule="single", max_update_norm=50.0, seed=3),
                                   min_available_nodes=config.num_subscribers)
    model = make_model(hidden_units=32, activation="square", seed=3)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1,
                   train_config=train_config_for(config),
                   evaluate_fn=make_central_evaluate(config))
    record = strategy.history[0]
    reasons = {r["node_id"]: r["reason"] for r in record.rejected}
    assert set(reasons) == {str(n) for n in node_kind}
    assert "disk on fire" in reasons["1000"]
    assert "NaN or infinite" in reasons["1001"]
    assert "expected shape" in reasons["1002"]
    assert "expected dtype float32, got float64" in reasons["1003"]
    assert "missing" in reasons["1004"]
    assert "exceeds the bound max-update-norm" in reasons["1005"]
    assert "expected a MetricRecord 'metrics'" in reasons["1006"]
    assert "fc1.weight" in reasons["1007"]  # packed with an extra key: per-tensor names
    assert "packed model: expected one float32 vector of 2410 values" in reasons["1008"]
    assert "got dtype float64 shape (2410,)" in reasons["1008"]
    assert "got dtype float32 shape (1, 2410)" in reasons["1009"]
    assert {c.author for c in record.candidates} == {"10", "11"}
    assert record.selected
    bad_votes = [v for v in record.rejected_votes if v["voter"] == "1000"]
    assert bad_votes and "expected candidates" in bad_votes[0]["reason"]


def test_a_free_rider_is_rejected_zero_first_then_as_a_repeat() -> None:
    run = {"num-subscribers": 4, "partitioner": "iid", "attack": "free-rider",
           "attackers": "1", "seed": 4}
    strategy, _, _ = _run(run, rounds=3)
    first, second, third = strategy.history
    assert [r["reason"] for r in first.rejected if r["author"] == "1"] == [
        "update is all zeros: nothing was learned"]
    # later it passes off the last applied update (top-k 1: exactly the winner's update)
    for record in (second, third):
        reasons = [r["reason"] for r in record.rejected if r["author"] == "1"]
        assert len(reasons) == 1 and "repeats an update already submitted" in reasons[0]
    assert all("1" not in r.selected for r in (first, second, third))
    assert all(len(r.candidates) == 3 for r in (first, second, third))


def _rewrite_metrics(reply: Message, **changes: Any) -> Message:
    content = reply.content
    metrics = dict(content[P.METRICS])
    metrics.update(changes)
    return Message(RecordDict({P.ARRAYS: content[P.ARRAYS], P.METRICS: MetricRecord(metrics)}),
                   reply_to=_origin(reply))


def test_hostile_replies_never_crash_the_round() -> None:
    """Payloads a malicious subscriber can send: list-valued epsilon, a spoofed author
    label, a zip bomb-ish garbage array, a header declaring a huge shape, a huge loss."""
    import io

    from flwr.app import Array

    run = {"num-subscribers": 7, "partitioner": "iid", "seed": 7}
    config = RunConfig.from_mapping(run)

    def npy_header_only(shape: tuple[int, ...]) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
        return buffer.getvalue()

    def tamper(node: int, reply: Message) -> Message:
        kind = reply.metadata.message_type
        if kind == "train" and node == 1000:
            return _rewrite_metrics(reply, **{P.SAMPLE_EPSILON: [1.0, 2.0]})
        if kind == "train" and node == 1001:
            return _rewrite_metrics(reply, **{P.PARTITION_ID: 2})  # claims node 1002's label
        if kind == "train" and node in (1003, 1004):
            arrays = ArrayRecord()
            for name, array in reply.content[P.ARRAYS].items():
                data = (b"PK\x03\x04garbage" if node == 1003 else npy_header_only((2**41,)))
                arrays[name] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                                     data=data)
            return Message(RecordDict({P.ARRAYS: arrays, P.METRICS: reply.content[P.METRICS]}),
                           reply_to=_origin(reply))
        if kind == P.VOTE_MESSAGE_TYPE and node == 1005:
            metrics = dict(reply.content[P.METRICS])
            metrics[P.BASE_LOSS] = 1e303
            return Message(RecordDict({P.METRICS: MetricRecord(metrics),
                                       P.CONFIG: reply.content[P.CONFIG]}),
                           reply_to=_origin(reply))
        return reply

    grid = OriginGrid(make_contexts(run, 7), HANDLERS, tamper)
    strategy = ProofOfIntelligence(config=PoIConfig(vote_rule="single", seed=7), min_available_nodes=7)
    model = make_model(hidden_units=32, activation="square", seed=7)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=1,
                   train_config=train_config_for(config), evaluate_fn=make_central_evaluate(config))
    record = strategy.history[0]
    reasons = {r["node_id"]: r["reason"] for r in record.rejected}
    assert "sample-epsilon: expected a finite number >= 0, got [1.0, 2.0]" in reasons["1000"]
    assert "not an .npy array" in reasons["1003"]
    assert "declares 8796093022208 bytes, expected at most" in reasons["1004"]
    # 1001 claimed "2" first (replies are processed in node order), so the real 2 is refused
    assert "author: 2 is already another node's label" in reasons["1002"]
    assert len({c.author for c in record.candidates}) == len(record.candidates)
    bad_vote = [v["reason"] for v in record.rejected_votes if v["voter"] == "1005"]
    assert bad_vote and "expected losses <=" in bad_vote[0]
    assert record.selected


def test_with_top_k_a_free_rider_replaying_the_mean_change_is_rejected_too() -> None:
    # top-k 2: the global change is the mean of two updates, which nobody submitted; it is
    # still the model's own change, not the free rider's work
    run = {"num-subscribers": 5, "partitioner": "iid", "attack": "free-rider",
           "attackers": "1", "seed": 4}
    strategy, _, _ = _run(run, rounds=3, poi=PoIConfig(vote_rule="single", top_k=2, seed=4))
    for record in strategy.history[1:]:
        reasons = [r["reason"] for r in record.rejected if r["author"] == "1"]
        assert len(reasons) == 1 and "the global model's last change" in reasons[0]
        assert "1" not in record.selected
