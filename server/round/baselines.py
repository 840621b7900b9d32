"""Flower's own robust-aggregation strategies as baselines, run in the same harness.

Each built-in (``FedAvg``, ``Krum``, ``MultiKrum``, ``FedMedian``, ``FedTrimmedAvg``,
``Bulyan``) is used unchanged; a thin recording mixin notes who replied, the
rejections (error replies) and the per-phase wall time, so the report has the same
shape as a Proof-of-Intelligence run. Subscribers send full weights to these
(``update-kind = weights``), as Flower's strategies expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from client import protocol as P
from client.config import RunConfig
from server.round.strategy import CandidateRecord, RoundRecord, author_of


class RecordingMixin:
    """Collects a :class:`RoundRecord` per round around a built-in strategy."""

    current: RoundRecord | None = None
    _train_started: float = 0.0

    def configure_train(  # type: ignore[override]
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = RoundRecord(server_round=server_round)
        self._train_started = time.perf_counter()
        config[P.UPDATE_KIND] = "weights"
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(  # type: ignore[override]
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record = self.current or RoundRecord(server_round=server_round)
        record.phase_seconds["train"] = time.perf_counter() - self._train_started
        for msg in replies:
            author = author_of(msg)
            if msg.has_error():
                record.rejected.append({"author": author,
                                        "node_id": str(msg.metadata.src_node_id),
                                        "reason": f"subscriber error: {msg.error.reason}"})
                continue
            metrics = msg.content[P.METRICS]
            epsilon = float(metrics.get(P.SAMPLE_EPSILON, 0.0))  # type: ignore[arg-type]
            record.epsilon[author] = epsilon
            record.candidates.append(CandidateRecord(
                candidate_id="", author=author, node_id=str(msg.metadata.src_node_id),
                num_examples=int(metrics.get(P.NUM_EXAMPLES, 0)),  # type: ignore[arg-type]
                update_norm=0.0, sample_epsilon=epsilon,
            ))
        started = time.perf_counter()
        out = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        record.phase_seconds["aggregate"] = time.perf_counter() - started
        self.current = record
        return out


def build_baseline(config: RunConfig, *, num_nodes: int) -> FedAvg:
    """The named Flower strategy, sized for ``num_nodes`` subscribers.

    ``num-malicious`` (default: the number of attackers) feeds Krum, MultiKrum and
    Bulyan. Bulyan needs ``n >= 4f + 3``: f is capped there and a warning logged.
    MultiKrum keeps ``n - f`` updates; FedTrimmedAvg trims ``trim-fraction`` per side.
    """
    f = config.num_malicious if config.num_malicious >= 0 else len(config.attacker_ids)
    common: dict[str, object] = {
        "fraction_train": 1.0, "fraction_evaluate": 0.0,
        "min_train_nodes": num_nodes, "min_available_nodes": num_nodes,
    }
    name = config.strategy
    cls: type[FedAvg]
    extra: dict[str, float | int]
    if name == "fedavg":
        cls, extra = FedAvg, {}
    elif name == "krum":
        cls, extra = Krum, {"num_malicious_nodes": f}
    elif name == "multikrum":
        cls, extra = MultiKrum, {"num_malicious_nodes": f,
                                 "num_nodes_to_select": max(1, num_nodes - f)}
    elif name == "fedmedian":
        cls, extra = FedMedian, {}
    elif name == "fedtrimmedavg":
        cls, extra = FedTrimmedAvg, {"beta": config.trim_fraction}
    elif name == "bulyan":
        cap = max(0, (num_nodes - 3) // 4)
        if f > cap:
            log(WARNING, "Bulyan needs n >= 4f + 3: num-malicious %s capped at %s for n=%s",
                f, cap, num_nodes)
        cls, extra = Bulyan, {"num_malicious_nodes": min(f, cap)}
    else:
        raise ValueError(f"strategy: expected a Flower baseline, got {name!r}")
    recorded = type(f"Recorded{cls.__name__}", (RecordingMixin, cls), {})
    return recorded(**common, **extra)  # type: ignore[no-any-return]


def recording_evaluate_fn(
    strategy: FedAvg,
    evaluate: Callable[[int, ArrayRecord], MetricRecord],
    on_round: Callable[[RoundRecord], None],
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Wrap central evaluation so that each finished round's record reaches ``on_round``."""

    def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        metrics = evaluate(server_round, arrays)
        if server_round > 0:
            record = getattr(strategy, "current", None) or RoundRecord(server_round=server_round)
            record.metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
            record.phase_seconds["evaluate"] = time.perf_counter() - started
            on_round(record)
        return metrics

    return wrapped
