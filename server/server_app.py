"""The ServerApp: parse the run config once, build the strategy, run it, write the report.

Works the same under ``flwr run .`` (simulation or a deployed SuperLink) and under
``poi simulate``. Outputs go to ``out-dir`` (an absolute path; by default
``~/.poi/runs/run-<run id>``) because Flower runs apps from ``$FLWR_HOME/apps/...``.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from client import protocol as P
from client.attacks import targeted_flip_metrics
from client.config import MAX_SUBSCRIBERS, RunConfig
from client.task import (
    Dataset,
    dataset_split,
    evaluate,
    functional_float64,
    load_data_file,
    make_model,
    set_weights,
)
from crypto.digests import canonical_tensor_bytes, tensors_digest
from server import progress
from server.market.audit import audit_run, write_audit
from server.market.plot import plot_market
from server.market.session import Closing, MarketSession
from server.round.baselines import build_baseline, recording_evaluate_fn
from server.round.exchange import PollingGrid
from server.round.ledger_writer import RoundLedger
from server.round.marginal import marginal_config_of
from server.round.report import build_report, write_json
from server.round.strategy import PoIConfig, ProofOfIntelligence, RoundRecord, arrays_to_numpy

NODE_WAIT_SECONDS = 300.0

app = ServerApp()


def resolve_out_dir(config: RunConfig, run_id: int) -> Path:
    if config.out_dir:
        return Path(config.out_dir).expanduser().resolve()
    return Path.home() / ".poi" / "runs" / f"run-{run_id}"


def wait_for_nodes(grid: Grid, wanted: int, *, timeout: float = NODE_WAIT_SECONDS) -> int:
    """Flower's ``sample_nodes`` waits forever for ``min_available_nodes``: wait here with a
    deadline instead, and fail with a message that says how many came."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= wanted:
            return count
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"expected {wanted} subscribers (num-subscribers), "
                f"only {count} connected within {timeout:.0f} s"
            )
        time.sleep(0.5)


def make_central_evaluate(config: RunConfig,  # type: ignore[no-untyped-def]
                          data: tuple[Dataset, Dataset] | None = None):
    """Accuracy and loss on the held-out test set, and the loss on the Scientist's
    validation set (float64, so a replay reproduces it); and, in every run, what a
    targeted flip (``flip-source`` -> ``flip-target``) would show: the accuracy on the
    source class and the fraction of it predicted as the target. ``data``: the task's
    (test, validation) when the caller has read them already (:func:`task_data`)."""
    test, validation = data or task_data(config)
    has_source = bool(np.any(test.y == config.flip_source))
    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed, schema=config.schema)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, arrays_to_numpy(arrays))
        loss, accuracy = evaluate(model, test)
        validation_loss, _ = evaluate(model, validation)
        # -1: not measured (a task's own test set without the flip's source class)
        source_accuracy, attack_success_rate = targeted_flip_metrics(
            _predict(model, test.x), test.y, flip_source=config.flip_source,
            flip_target=config.flip_target) if has_source else (-1.0, -1.0)
        return MetricRecord({"accuracy": accuracy, "loss": loss,
                             "validation-loss": validation_loss,
                             "source-accuracy": source_accuracy,
                             "attack-success-rate": attack_success_rate})

    return central_evaluate


def task_data(config: RunConfig) -> tuple[Dataset, Dataset]:
    """(held-out test set, the Scientist's validation set) of a task. The validation set
    is ``validation-path`` when given (checked against the schema), else the built-in
    dataset's. A task whose schema is not the dataset's has no built-in test set: its
    reported test metrics are those of the validation file."""
    validation = (load_data_file(config.validation_path, schema=config.schema,
                                 raw_max=config.raw_max)
                  if config.validation_path else None)
    if config.uses_dataset_schema:
        split = dataset_split(config.dataset, config.dataset_size)
        return split.test, validation or split.validation
    assert validation is not None, "RunConfig.validate asks for validation-path"
    return validation, validation


def _predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted classes, in float64 as ``evaluate`` computes its accuracy."""
    with torch.no_grad():
        logits = functional_float64(model)(torch.as_tensor(x, dtype=torch.float64))
    return logits.argmax(dim=1).numpy()


def train_config_for(config: RunConfig) -> ConfigRecord:
    return ConfigRecord({
        P.NOISE_MULTIPLIER: config.noise_multiplier,
        P.TARGET_EPSILON: config.target_epsilon,
        P.MAX_GRAD_NORM: config.max_grad_norm,
        P.TARGET_DELTA: config.target_delta,
        P.PLANNED_ROUNDS: config.num_server_rounds,
    })


def run_task(grid: Grid, config: RunConfig, out_dir: Path) -> dict[str, object]:
    """Run every round of ``config`` over ``grid``; write and return the report."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "poi: strategy %s, writing to %s", config.strategy, out_dir)
    num_nodes = wait_for_nodes(grid, config.num_subscribers)
    if num_nodes > MAX_SUBSCRIBERS:  # every connected node is sent a round's work
        raise RuntimeError(
            f"expected at most {MAX_SUBSCRIBERS} subscribers, {num_nodes} SuperNodes "
            "connected")
    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed, schema=config.schema)
    initial = ArrayRecord(model.state_dict())
    data = task_data(config)  # read once: the evaluation's and the Scientist's
    central_evaluate = make_central_evaluate(config, data)
    initial_metrics = {k: float(v) for k, v in central_evaluate(0, initial).items()}  # type: ignore[arg-type]
    rounds: list[RoundRecord] = []

    def on_round(record: RoundRecord) -> None:
        rounds.append(record)
        report = build_report(config, rounds, initial_metrics=initial_metrics,
                              wall_seconds=time.perf_counter() - started)
        write_json(out_dir / "report.json", report)
        progress.emit({"kind": "round", "round": record.server_round,
                       "rounds": config.num_server_rounds, "report": report})

    ledger = None
    market = None
    strategy: FedAvg
    if config.strategy == "poi":
        initial_weights = arrays_to_numpy(initial)
        ledger = RoundLedger.create(
            out_dir, config=config.to_mapping(),
            initial_model=canonical_tensor_bytes(initial_weights))
        _, validation = data
        market = MarketSession.open(
            ledger, out_dir=out_dir, config=config, validation=validation,
            initial_weights=initial_weights, model_digest=tensors_digest(initial_weights))
        strategy = ProofOfIntelligence(
            config=PoIConfig(
                top_k=config.top_k, votes_per_candidate=config.votes_per_candidate,
                vote_aggregation=config.vote_aggregation, trim_fraction=config.trim_fraction,
                require_improvement=config.require_improvement, vote_step=config.vote_step,
                max_update_norm=config.max_update_norm, seed=config.seed,
                vote_rule=config.vote_rule,
                marginal=marginal_config_of(config),
            ),
            min_available_nodes=num_nodes,
            round_listener=on_round,
            ledger=ledger,
            market=market,
        )
        evaluate_fn = central_evaluate
    else:
        strategy = build_baseline(config, num_nodes=num_nodes)
        evaluate_fn = recording_evaluate_fn(strategy, central_evaluate, on_round)
    closing: Closing | None = None
    try:
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=config.num_server_rounds,
            train_config=train_config_for(config), evaluate_fn=evaluate_fn,
        )
        if market is not None and isinstance(strategy, ProofOfIntelligence):
            closing = market.close(reason=strategy.stop_reason, grid=grid)
    finally:
        if ledger is not None:
            ledger.close()
    report = build_report(config, rounds, initial_metrics=initial_metrics,
                          wall_seconds=time.perf_counter() - started)
    if ledger is not None and isinstance(strategy, ProofOfIntelligence):
        report["ledger"] = {
            "path": str(out_dir / "ledger.db"), "task_id": ledger.task_id,
            "size": ledger.size, "root": ledger.root_hex, "cosignatures": ledger.cosignatures,
        }
        report["stopped"] = strategy.stop_reason
        key_ids = {strategy.labels.get(node, ""): key
                   for node, key in ledger.node_author.items()}
        if market is not None and closing is not None:
            _add_market(report, out_dir, market, closing, key_ids)
    write_json(out_dir / "report.json", report)
    return report


def _add_market(report: dict[str, object], out_dir: Path, market: MarketSession,
                closing: Closing, key_ids: dict[str, str]) -> None:
    """Settle the report: the market summary, each subscriber's key id and payout, the
    independent audit (``audit.json``) and the plot (``market.png``)."""
    payouts = closing.settlement.payouts
    for sub in report["subscribers"]:  # type: ignore[attr-defined]
        key = key_ids.get(str(sub["partition_id"]))
        sub["key_id"] = key
        sub["payout"] = payouts.get(key, 0) if key else 0
    audit = audit_run(out_dir)
    write_audit(out_dir, audit)
    report["market"] = {**market.summary(closing), "audit_ok": audit.ok,
                        "audit_mismatches": audit.mismatches}
    try:
        plot_market(report, out_dir / "market.png")
    except Exception as exc:  # noqa: BLE001 - a plot must never lose a settled run
        log(WARNING, "poi: could not draw market.png: %s", exc)


def _fast_reply_pulls() -> None:
    """Retry a reply's arrays after 0.05 s, not 1 s, in this process: a deployed
    ServerApp sees a reply as soon as its SuperNode registered it, often before the
    arrays are pushed (server.deploy.waits). Only on a flwr release that was checked."""
    from server.deploy.waits import fast_object_pulls, unchecked_reason

    reason = unchecked_reason()
    if reason is not None:
        log(WARNING, "poi: object pulls keep Flower's 1 s backoff: %s", reason)
        return
    try:
        fast_object_pulls()
    except (ImportError, KeyError) as exc:
        log(WARNING, "poi: object pulls keep Flower's 1 s backoff: %s", exc)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(dict(context.run_config))
    _fast_reply_pulls()
    # Flower's own strategies (the baselines) call grid.send_and_receive: give them the
    # same fast reply loop as ours, so deployed PoI and FedAvg are compared fairly.
    run_task(PollingGrid(grid), config, resolve_out_dir(config, context.run_id))
