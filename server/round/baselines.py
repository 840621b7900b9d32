"""Flower's own robust-aggregation strategies, and two from the literature, as baselines
run in the same harness: centered clipping (Karimireddy, He & Jaggi, "Learning from
History for Byzantine Robust Optimization", ICML 2021) and NNM + coordinate-wise trimmed
mean (Allouah et al., "Fixing by Mixing", AISTATS 2023).

Each built-in (``FedAvg``, ``Krum``, ``MultiKrum``, ``FedMedian``, ``FedTrimmedAvg``,
``Bulyan``) is used unchanged; the two others are thin ``FedAvg`` subclasses that call
the pure functions of :mod:`server.round.robust` on the updates, as Flower's
``MultiKrum`` calls ``select_multikrum``. A thin recording mixin notes who replied, the
rejections (error replies) and the per-phase wall time, so the report has the same
shape as a Proof-of-Intelligence run. Subscribers send full weights to all of these
(``update-kind = weights``), as Flower's strategies expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
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
from server.round.robust import centered_clipping, flatten, nnm_trimmed_mean, unflatten
from server.round.strategy import (
    CandidateRecord,
    RoundRecord,
    arrays_to_numpy,
    author_of,
    numpy_to_arrays,
)


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


# --------------------------------------------------------------------------
# Robust rules on updates (pure functions in server.round.robust)
# --------------------------------------------------------------------------


class UpdateAggregator(FedAvg):
    """``FedAvg`` with its weighted mean replaced by an unweighted rule on the updates.

    Subscribers send full weights (``update-kind = weights``); the update of each is its
    weights minus the global model this round started from, which ``configure_train``
    keeps. Unweighted on purpose: an attacker can claim any example count. Metrics are
    aggregated as ``FedAvg`` does. Subclasses implement :meth:`aggregate_updates`.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.global_arrays: ArrayRecord | None = None

    def aggregate_updates(self, updates: np.ndarray) -> np.ndarray:
        """The aggregate of an ``(n, d)`` float64 matrix of flattened updates, ``(d,)``."""
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The global model plus :meth:`aggregate_updates` of the valid replies' updates.

        Raises ValueError (from :func:`server.round.robust.flatten`) when a reply's
        arrays do not have the global model's names and shapes."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        assert self.global_arrays is not None, "configure_train keeps the global model first"
        contents = [msg.content for msg in valid_replies]
        record_key = next(iter(contents[0].array_records))
        current = arrays_to_numpy(self.global_arrays)
        keys = list(current)
        weights = flatten([arrays_to_numpy(c.array_records[record_key]) for c in contents], keys)
        base = flatten([current], keys)[0]
        aggregate = self.aggregate_updates(weights - base)
        arrays = numpy_to_arrays(unflatten(base + aggregate, current))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


class CenteredClipping(UpdateAggregator):
    """Centered clipping (Karimireddy, He & Jaggi 2021), without momentum: the center is
    the previous round's aggregate update (zero in round 1), and each update pulls the
    aggregate at most ``tau`` away from it per iteration (``iterations`` of them)."""

    def __init__(self, *, tau: float, iterations: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.tau = tau
        self.iterations = iterations
        self.center: np.ndarray | None = None

    def aggregate_updates(self, updates: np.ndarray) -> np.ndarray:
        center = self.center
        if center is None or center.shape != (updates.shape[1],):
            center = np.zeros(updates.shape[1])
        self.center = centered_clipping(
            updates, center=center, tau=self.tau, iterations=self.iterations
        )
        return self.center


class NNMTrimmedMean(UpdateAggregator):
    """Nearest neighbor mixing, then coordinate-wise trimmed mean (Allouah et al. 2023),
    tolerating ``num_malicious_nodes`` = f arbitrary updates. It needs ``n > 2f``: with
    fewer valid replies f is capped for the round and a warning logged."""

    def __init__(self, *, num_malicious_nodes: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_malicious_nodes = num_malicious_nodes

    def aggregate_updates(self, updates: np.ndarray) -> np.ndarray:
        count = updates.shape[0]
        f = min(self.num_malicious_nodes, (count - 1) // 2)
        if f < self.num_malicious_nodes:
            log(WARNING, "NNM + trimmed mean needs n > 2f: num-malicious %s capped at %s "
                "for %s valid replies", self.num_malicious_nodes, f, count)
        return nnm_trimmed_mean(updates, num_byzantine=f)


def build_baseline(config: RunConfig, *, num_nodes: int) -> FedAvg:
    """The named Flower strategy, sized for ``num_nodes`` subscribers.

    ``num-malicious`` (default: the number of attackers) feeds Krum, MultiKrum, Bulyan
    and NNM + trimmed mean. Bulyan needs ``n >= 4f + 3`` and NNM + trimmed mean
    ``n > 2f``: f is capped there and a warning logged. MultiKrum keeps ``n - f``
    updates; FedTrimmedAvg trims ``trim-fraction`` per side; centered clipping takes
    ``clipping-tau`` and ``clipping-iterations``.

    Raises ValueError for a strategy name that is not a baseline.
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
    elif name == "centered-clipping":
        cls, extra = CenteredClipping, {"tau": config.clipping_tau,
                                        "iterations": config.clipping_iterations}
    elif name == "nnm-trimmed-mean":
        cap = max(0, (num_nodes - 1) // 2)
        if f > cap:
            log(WARNING, "NNM + trimmed mean needs n > 2f: num-malicious %s capped at %s "
                "for n=%s", f, cap, num_nodes)
        cls, extra = NNMTrimmedMean, {"num_malicious_nodes": min(f, cap)}
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
