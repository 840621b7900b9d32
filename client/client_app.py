"""The subscriber's ClientApp: DP training (``train``) and candidate scoring (``query.vote``).

Only wiring lives here: the work is done by ``client.task`` (model, data, batched
losses), ``client.privacy`` (Opacus) and ``client.attacks`` (simulated adversaries).
Node config (per SuperNode): ``partition-id`` and ``num-partitions`` in simulation, or
``data-path`` (an ``.npz`` / ``.csv`` of the subscriber's own data) in deployment;
optionally ``max-epsilon``, the privacy budget this subscriber refuses to exceed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol as P
from client.attacks import (
    active_attacks,
    attack_update,
    collude_losses,
    collude_marginals,
    model_poisoning_kind,
    poison_data,
    trains,
)
from client.collusion import CHANNEL, ChannelKey, HonestUpdate, extend_history
from client.config import ConfigError, RunConfig
from client.marginal import (
    BallotError,
    marginal_ballot,
    marginal_contributions,
    private_ballot,
    trusted_digest,
)
from client.privacy import (
    HistoryEntry,
    PrivacyBudgetExceeded,
    calibrate_noise_multiplier,
    epsilon_of,
    projected_epsilon,
    sample_rate,
    train_private,
)
from client.schema import Schema
from client.task import (
    DataError,
    Dataset,
    candidate_losses,
    get_weights,
    load_data_file,
    load_partition,
    make_model,
    set_weights,
)
from client.wire import WireError, is_packed, pack, unpack
from client.witness import (
    LedgerRefusal,
    SeenTree,
    check_checkpoint,
    check_settlement,
    cosign,
    load_or_create_key,
    notes_dir,
    store_note,
    to_micro,
    unb64,
)
from crypto.digests import tensors_digest
from ledger.checkpoint import Checkpoint
from ledger.entries import make_key_entry, sign_entry
from ledger.errors import LedgerError

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
torch.set_num_threads(1)

app = ClientApp()

STATE_PRIVACY = "privacy"
STATE_PREVIOUS_GLOBAL = "previous-global"
STATE_LEDGER = "ledger"
STATE_BALLOT = "private-ballot"  # the round of the last private ballot


@dataclass(frozen=True)
class Subscriber:
    """Who this node is and what it holds, parsed once from the Flower context.

    ``data`` is the subscriber's real data and ``attacks`` what it is configured to do;
    what it does in a given round is ``attacks_for_round`` / ``data_for_round`` (an
    adaptive attacker is honest before ``attack-start-round``)."""

    config: RunConfig
    partition_id: int
    data: Dataset
    attacks: frozenset[str]
    max_epsilon: float | None
    simulated: bool
    key_path: str
    num_partitions: int = 0

    @classmethod
    def from_context(cls, context: Context) -> Subscriber:
        config = RunConfig.from_mapping(dict(context.run_config))
        node = dict(context.node_config)
        max_epsilon = node.get("max-epsilon")
        if max_epsilon is not None:
            max_epsilon = float(max_epsilon)  # type: ignore[arg-type]
            if not (math.isfinite(max_epsilon) and max_epsilon > 0):
                raise ConfigError(f"max-epsilon: expected a number > 0, got {max_epsilon}")
        data_path = node.get("data-path")
        partition_id = int(node.get("partition-id", -1))  # type: ignore[arg-type]
        if data_path:
            data = load_data_file(str(data_path), schema=config.schema,
                                  raw_max=config.raw_max)
            simulated = False
        else:
            if partition_id < 0:
                raise DataError(
                    "node config: expected 'data-path' (deployment) or 'partition-id' "
                    f"(simulation), got keys {sorted(node)}"
                )
            num_partitions = int(node.get("num-partitions", config.num_subscribers))  # type: ignore[arg-type]
            if not config.uses_dataset_schema:
                raise DataError(
                    f"node config: a task of {config.schema.features} features is not "
                    f"{config.dataset}'s, so subscribers bring their own data: expected "
                    f"'data-path', got keys {sorted(node)}")
            data = load_partition(
                partition_id, num_partitions, partitioner=config.partitioner,
                dirichlet_alpha=config.dirichlet_alpha, seed=config.seed,
                dataset=config.dataset, size=config.dataset_size,
            )
            simulated = True
        explicit_key = node.get("ledger-key")
        if explicit_key:
            # A named key must exist and load: creating a fresh one here would silently
            # give the subscriber a new identity on the ledger.
            key_file = Path(str(explicit_key)).expanduser()
            if not key_file.is_file():
                raise ConfigError(f"ledger-key: no such file {str(key_file)!r}")
            try:
                load_or_create_key(str(key_file))
            except (ValueError, TypeError, OSError, LedgerError) as exc:
                raise ConfigError(f"ledger-key {key_file.name}: cannot read it ({exc})") from exc
        key_path = str(explicit_key or _default_key_path(config, context, partition_id))
        attacks = config.attack_kinds if config.is_attacker(partition_id) else frozenset()
        num_partitions = (int(node.get("num-partitions", config.num_subscribers))  # type: ignore[arg-type]
                          if simulated else 0)
        return cls(config, partition_id, data, attacks, max_epsilon, simulated, key_path,
                   num_partitions)


def attacks_for_round(subscriber: Subscriber, server_round: int) -> frozenset[str]:
    """What the subscriber does in ``server_round``: nothing dishonest before
    ``attack-start-round``, its configured attacks from then on (``active_attacks``)."""
    return active_attacks(subscriber.attacks, server_round, subscriber.config.attack_start_round)


def data_for_round(subscriber: Subscriber, server_round: int) -> Dataset:
    """The data the subscriber trains and votes with in ``server_round``: its real data,
    or, while a data attack is active, the poisoned copy (the same every round)."""
    return _poisoned(subscriber.config, subscriber.data, subscriber.partition_id,
                     attacks_for_round(subscriber, server_round))


def _poisoned(cfg: RunConfig, data: Dataset, partition_id: int, attacks: frozenset[str]
              ) -> Dataset:
    if not attacks:
        return data
    return poison_data(attacks, data, rng=np.random.default_rng(
        _seed(cfg.seed, "poison", partition_id)),
        flip_source=cfg.flip_source, flip_target=cfg.flip_target, classes=cfg.schema.classes)


def _default_key_path(config: RunConfig, context: Context, partition_id: int) -> Path:
    """Simulation keeps one key per partition under the run directory (the ServerApp
    resolves ``out-dir`` the same way); a deployed node without ``ledger-key`` keeps its
    key under ``~/.poi/keys``."""
    if partition_id >= 0:
        base = (Path(config.out_dir).expanduser() if config.out_dir
                else Path.home() / ".poi" / "runs" / f"run-{context.run_id}")
        return base / "keys" / f"partition-{partition_id}.pem"
    return Path.home() / ".poi" / "keys" / f"node-{context.node_id}.pem"


@dataclass(frozen=True)
class LedgerDuty:
    """What the message asked of this subscriber's ledger identity this time."""

    signer: object  # ledger.keys.Signer
    cosigned: str
    task_id: str
    next_seq: int


def _ledger_prelude(msg: Message, context: Context, subscriber: Subscriber) -> LedgerDuty | None:
    """Verify the operator's checkpoint before any work (raises LedgerRefusal), remember
    the new tree, and cosign it. None when the server runs without a ledger."""
    config = _config(msg)
    if P.LEDGER_CHECKPOINT not in config:
        if STATE_LEDGER in context.state:
            raise LedgerRefusal("ledger: expected a checkpoint from the pinned log, got none")
        return None
    seen = None
    if STATE_LEDGER in context.state:
        stored = context.state[STATE_LEDGER]
        assert isinstance(stored, ConfigRecord)
        seen = SeenTree(str(stored["log-key"]), int(stored["size"]),  # type: ignore[arg-type]
                        bytes(stored["root"]))  # type: ignore[arg-type]
    try:
        proof = [unb64(str(h)) for h in config.get(P.LEDGER_PROOF, [])]  # type: ignore[union-attr]
        alt = [unb64(str(h)) for h in config.get(P.LEDGER_ALT_PROOF, [])]  # type: ignore[union-attr]
        proof_from = int(_num(config.get(P.LEDGER_PROOF_FROM, 0)))
        alt_from = int(_num(config.get(P.LEDGER_ALT_PROOF_FROM, -1)))
        task_id = str(config[P.TASK_ID])
    except (ValueError, TypeError, KeyError) as exc:
        raise LedgerRefusal(f"ledger: malformed ledger fields ({exc})") from exc
    note = str(config[P.LEDGER_CHECKPOINT])
    log_key = str(config[P.LEDGER_LOG_KEY])
    checkpoint = check_checkpoint(note, log_key=log_key, proof=proof, proof_from=proof_from,
                                  seen=seen, origin=f"poi/task/{task_id}",
                                  alternatives=[(alt_from, alt)])
    context.state[STATE_LEDGER] = ConfigRecord({"log-key": log_key, "size": checkpoint.size,
                                                "root": checkpoint.root_hash})
    signer = load_or_create_key(subscriber.key_path)
    cosigned = cosign(note, signer)
    store_note(notes_dir(subscriber.key_path), cosigned, task_id=task_id)
    return LedgerDuty(signer=signer, cosigned=cosigned, task_id=task_id,
                      next_seq=int(config.get(P.LEDGER_NEXT_SEQ, -1)))  # type: ignore[arg-type]


def _ledger_record(duty: LedgerDuty, entries: list[bytes]) -> ConfigRecord:
    signer = duty.signer
    return ConfigRecord({P.LEDGER_ENTRIES: entries, P.LEDGER_COSIGNED: duty.cosigned,
                         P.LEDGER_WITNESS_KEY: signer.public_key_bytes})  # type: ignore[attr-defined]


def _first_seq(duty: LedgerDuty, entries: list[bytes]) -> int:
    """The seq of this subscriber's next entry; a key entry (seq 0) goes first when the
    log has none from it yet."""
    if duty.next_seq < 0:
        entries.append(make_key_entry(duty.signer))  # type: ignore[attr-defined]
        return 1
    return duty.next_seq


def _seed(*parts: object) -> int:
    material = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:4], "big")


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _load_history(context: Context) -> list[HistoryEntry]:
    if STATE_PRIVACY not in context.state:
        return []
    record = context.state[STATE_PRIVACY]
    assert isinstance(record, ConfigRecord)
    noise = list(record.get("noise", []))  # type: ignore[arg-type]
    rates = list(record.get("rates", []))  # type: ignore[arg-type]
    steps = list(record.get("steps", []))  # type: ignore[arg-type]
    return [(_num(n), _num(q), int(_num(s))) for n, q, s in zip(noise, rates, steps, strict=True)]


def _save_history(context: Context, history: Sequence[HistoryEntry],
                  noise: float | None = None) -> None:
    """Store the accountant history, with the training noise ``noise`` (a training
    round) or the stored one kept as it was (``None``: a private ballot)."""
    record = context.state.get(STATE_PRIVACY, None)
    fields: dict[str, Any] = {"noise": [h[0] for h in history], "rates": [h[1] for h in history],
                              "steps": [h[2] for h in history]}
    if noise is not None:
        fields["calibrated-noise"] = noise
    elif isinstance(record, ConfigRecord) and "calibrated-noise" in record:
        fields["calibrated-noise"] = record["calibrated-noise"]
    context.state[STATE_PRIVACY] = ConfigRecord(fields)


def _calibrated_noise(context: Context, subscriber: Subscriber, config: ConfigRecord) -> float:
    """The round's noise multiplier: the server's, or, with ``target-epsilon`` > 0, one
    calibrated once for the planned rounds and then kept in ``Context.state``."""
    target_epsilon = float(config.get(P.TARGET_EPSILON, 0.0))  # type: ignore[arg-type]
    if target_epsilon <= 0:
        return float(config[P.NOISE_MULTIPLIER])  # type: ignore[arg-type]
    if STATE_PRIVACY in context.state:
        stored = context.state[STATE_PRIVACY]
        assert isinstance(stored, ConfigRecord)
        if "calibrated-noise" in stored:
            return float(stored["calibrated-noise"])  # type: ignore[arg-type]
    return _round_noise(subscriber.config, config, len(subscriber.data))


def _round_noise(cfg: RunConfig, config: ConfigRecord, num_examples: int) -> float:
    """The noise multiplier a subscriber with ``num_examples`` examples trains with, as
    it would calibrate it (``_calibrated_noise``) in its first round."""
    target_epsilon = float(config.get(P.TARGET_EPSILON, 0.0))  # type: ignore[arg-type]
    if target_epsilon <= 0:
        return float(config[P.NOISE_MULTIPLIER])  # type: ignore[arg-type]
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=float(config[P.TARGET_DELTA]),  # type: ignore[arg-type]
        num_examples=num_examples, batch_size=cfg.batch_size,
        epochs_per_round=cfg.local_epochs,
        planned_rounds=int(config[P.PLANNED_ROUNDS]),  # type: ignore[arg-type]
        accountant=cfg.accountant, ballot_noise=cfg.vote_noise_multiplier,
    )


_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def _array_to_numpy(array: Any) -> np.ndarray:
    """Decode one Flower ``Array``: a read-only view of its ``.npy`` bytes when the header
    is the plain version-1 header ``np.save`` writes for the dtype and shape the Array
    declares (byte-for-byte), else Flower's own decoder. ``np.load`` parses every header
    with ``ast.literal_eval``: with 84 arrays per ballot request that was half of a
    vote's time. Whatever decodes, the caller checks digests before signing anything."""
    data = bytes(array.data)
    try:
        dtype = np.dtype(str(array.dtype))
        shape = tuple(int(s) for s in array.shape)
        if array.stype == "numpy.ndarray" and data[:8] == _NPY_MAGIC and dtype.hasobject is False:
            header_len = int.from_bytes(data[8:10], "little")
            header = data[10:10 + header_len]
            expected = repr({"descr": dtype.str, "fortran_order": False, "shape": shape})
            count = int(np.prod(shape, dtype=np.int64))
            if header.rstrip(b" \n").decode("latin1") == expected[:-1] + ", }" and \
                    len(data) == 10 + header_len + count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count,
                                     offset=10 + header_len).reshape(shape)
    except (TypeError, ValueError):
        pass
    return array.numpy()  # type: ignore[no-any-return]


def _arrays_to_numpy(record: object, cfg: RunConfig | None = None) -> dict[str, np.ndarray]:
    """A model or update from a request: packed (``client.wire``, laid out as this
    subscriber's own task model, ``cfg``) or one Array per tensor."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected an ArrayRecord, got {type(record).__name__}")
    if is_packed(record):
        if cfg is None:
            raise WireError("a packed model where none was expected")
        return unpack(record, _model_layout(cfg.hidden_units, cfg.activation, cfg.schema))
    return {name: _array_to_numpy(array) for name, array in record.items()}


def _request_model(msg: Message, cfg: RunConfig, request: str) -> dict[str, np.ndarray]:
    """The model a train or vote request carries; :class:`WireError` naming the request
    when it is missing or does not fit the task model."""
    try:
        return _arrays_to_numpy(msg.content[P.ARRAYS], cfg)
    except (KeyError, TypeError, WireError) as exc:
        raise WireError(f"{request} request: the model does not fit the task model: "
                        f"{exc}") from exc


@functools.lru_cache(maxsize=8)
def _model_layout(hidden_units: int, activation: str, schema: Schema
                  ) -> dict[str, np.ndarray]:
    """The task model's tensor names and shapes (the values are not used)."""
    return get_weights(make_model(hidden_units=hidden_units, activation=activation, seed=0,
                                  schema=schema))


def _num(value: object) -> float:
    """A config value that must be a number (Flower's record values are loosely typed)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _config(msg: Message) -> ConfigRecord:
    record = msg.content[P.CONFIG]
    if not isinstance(record, ConfigRecord):
        raise TypeError(f"expected a ConfigRecord, got {type(record).__name__}")
    return record


# -------------------------------------------------------------------------- train
@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model under DP and reply with the update, the example count and
    the cumulative sample-level epsilon."""
    try:
        subscriber = Subscriber.from_context(context)
    except (DataError, ConfigError) as exc:
        return _error(msg, P.ERROR_DATA, str(exc))
    try:
        duty = _ledger_prelude(msg, context, subscriber)
    except LedgerRefusal as exc:
        return _error(msg, P.ERROR_LEDGER, str(exc))
    config = _config(msg)
    cfg = subscriber.config
    try:
        global_weights = _request_model(msg, cfg, "train")
    except WireError as exc:
        return _error(msg, P.ERROR_REQUEST, str(exc))
    packed = is_packed(msg.content.array_records[P.ARRAYS])
    server_round = int(_num(config[P.SERVER_ROUND]))
    if duty is not None and tensors_digest(global_weights) != str(config.get(P.BASE_DIGEST)):
        return _error(msg, P.ERROR_REQUEST,
                      f"base-digest {config.get(P.BASE_DIGEST)!r} is not the digest of the "
                      "model received: refusing to sign it")
    model = make_model(hidden_units=cfg.hidden_units, activation=cfg.activation, seed=cfg.seed,
                       schema=cfg.schema)
    try:
        set_weights(model, global_weights)
    except (RuntimeError, KeyError) as exc:
        return _error(msg, P.ERROR_REQUEST, f"global model does not fit the task model: {exc}")

    history = _load_history(context)
    try:
        noise = _calibrated_noise(context, subscriber, config)
    except ValueError as exc:  # the ballots alone would spend target-epsilon
        return _error(msg, P.ERROR_BUDGET, str(exc))
    target_delta = _num(config[P.TARGET_DELTA])
    attacks = attacks_for_round(subscriber, server_round)
    data = data_for_round(subscriber, server_round)
    poisoning = model_poisoning_kind(attacks)
    train_loss = float("nan")
    if poisoning is not None:
        # --- model poisoning: the pooled honest updates of every colluder ---------------
        try:
            _check_budget(subscriber, history, noise=noise, num_examples=len(data),
                          target_delta=target_delta)
        except PrivacyBudgetExceeded as exc:
            return _error(msg, P.ERROR_BUDGET, str(exc))
        pool = CHANNEL.pool(
            _channel_key(context, cfg, config, server_round, global_weights), kind=poisoning,
            partition_ids=cfg.attacker_ids,
            train_partition=lambda pid: train_partition(
                cfg, config, global_weights, server_round, pid,
                num_partitions=subscriber.num_partitions),
            num_clients=cfg.num_subscribers, num_byzantine=len(cfg.attacker_ids))
        own = pool.honest[subscriber.partition_id]
        history = extend_history(history, noise_multiplier=own.noise_multiplier,
                                 sample_rate=own.sample_rate, steps=own.steps)
        train_loss = own.train_loss
        epsilon = epsilon_of(history, target_delta=target_delta, accountant=cfg.accountant)
        delta = {k: np.asarray(v, dtype=np.float32) for k, v in pool.crafted.items()}
    elif trains(attacks):
        try:
            result = train_private(
                model, data, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, noise_multiplier=noise,
                max_grad_norm=_num(config[P.MAX_GRAD_NORM]), target_delta=target_delta,
                accountant=cfg.accountant, history=history,
                max_epsilon=subscriber.max_epsilon,
                seed=_seed(cfg.seed, "train", server_round, subscriber.partition_id)
                if subscriber.simulated else None,
            )
        except PrivacyBudgetExceeded as exc:
            return _error(msg, P.ERROR_BUDGET, str(exc))
        history = list(result.history)
        train_loss = result.train_loss
        epsilon = result.sample_epsilon
    else:
        epsilon = epsilon_of(history, target_delta=target_delta, accountant=cfg.accountant)
    _save_history(context, tuple(history), noise)

    if poisoning is None:
        trained = get_weights(model)
        delta = {k: (trained[k] - global_weights[k]).astype(np.float32) for k in global_weights}
    if subscriber.attacks:
        # Remembered every round, so a free rider that starts late has a stale update.
        previous = _stale_update(context, global_weights)
        if attacks:
            delta = attack_update(
                attacks, delta,
                rng=np.random.default_rng(_seed(cfg.seed, "attack", server_round,
                                                subscriber.partition_id)),
                scale=cfg.attack_scale, noise_std=cfg.attack_noise_std, previous=previous,
            )

    if config.get(P.UPDATE_KIND, "delta") == "weights":
        payload = {k: (global_weights[k] + delta[k]).astype(np.float32) for k in delta}
    else:
        payload = delta
    metrics = MetricRecord({
        P.NUM_EXAMPLES: len(data),
        P.TRAIN_LOSS: 0.0 if math.isnan(train_loss) else train_loss,
        P.SAMPLE_EPSILON: float(epsilon),
        P.PARTITION_ID: subscriber.partition_id,
    })
    content = RecordDict({
        # packed as the request was (client.wire); Flower's own strategies send and
        # average one Array per tensor
        P.ARRAYS: (pack(payload) if packed
                   else ArrayRecord({k: _to_array(v) for k, v in payload.items()})),
        P.METRICS: metrics,
    })
    if duty is not None:
        entries: list[bytes] = []
        seq = _first_seq(duty, entries)
        entries.append(sign_entry(duty.signer, "candidate", seq=seq, fields={  # type: ignore[attr-defined]
            "task_id": duty.task_id, "round": server_round,
            "update_digest": tensors_digest(payload),
            "base_digest": str(config.get(P.BASE_DIGEST, "")),
        }))
        content[P.LEDGER] = _ledger_record(duty, entries)
    return Message(content=content, reply_to=msg)


def train_partition(cfg: RunConfig, config: ConfigRecord, global_weights: dict[str, np.ndarray],
                    server_round: int, partition_id: int, *, num_partitions: int
                    ) -> HonestUpdate:
    """What attacker partition ``partition_id`` trains this round, exactly as its own
    ``train`` would (its data for the round, its noise, its per-round seed): the pooled
    update of model-poisoning colluders (``client.collusion``)."""
    data = load_partition(partition_id, num_partitions, partitioner=cfg.partitioner,
                          dirichlet_alpha=cfg.dirichlet_alpha, seed=cfg.seed,
                          dataset=cfg.dataset, size=cfg.dataset_size)
    data = _poisoned(cfg, data, partition_id,
                     active_attacks(cfg.attack_kinds, server_round, cfg.attack_start_round))
    noise = _round_noise(cfg, config, len(data))
    model = make_model(hidden_units=cfg.hidden_units, activation=cfg.activation, seed=cfg.seed,
                       schema=cfg.schema)
    set_weights(model, global_weights)
    result = train_private(
        model, data, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, noise_multiplier=noise,
        max_grad_norm=_num(config[P.MAX_GRAD_NORM]), target_delta=_num(config[P.TARGET_DELTA]),
        accountant=cfg.accountant, seed=_seed(cfg.seed, "train", server_round, partition_id),
    )
    trained = get_weights(model)
    return HonestUpdate(
        delta={k: (trained[k] - global_weights[k]).astype(np.float32) for k in global_weights},
        train_loss=result.train_loss, noise_multiplier=noise,
        sample_rate=sample_rate(len(data), cfg.batch_size), steps=result.steps)


def _channel_key(context: Context, cfg: RunConfig, config: ConfigRecord, server_round: int,
                 global_weights: dict[str, np.ndarray]) -> ChannelKey:
    """Whose pool this is: the run (out-dir, else run id), everything the training
    depends on (run config and the round's DP knobs), the round and the base model."""
    scope = cfg.out_dir or f"run-{context.run_id}"
    dp_knobs = [str(config.get(k)) for k in (P.NOISE_MULTIPLIER, P.TARGET_EPSILON,
                                             P.MAX_GRAD_NORM, P.TARGET_DELTA, P.PLANNED_ROUNDS)]
    knobs = hashlib.sha256(repr((sorted(cfg.to_mapping().items()), dp_knobs)).encode())
    return (scope, knobs.hexdigest(), server_round, tensors_digest(global_weights))


def _check_budget(subscriber: Subscriber, history: list[HistoryEntry], *, noise: float,
                  num_examples: int, target_delta: float) -> None:
    """Raise PrivacyBudgetExceeded, as ``train_private`` would, before a colluder's
    round (trained through the channel) takes its epsilon past ``max-epsilon``."""
    if subscriber.max_epsilon is None:
        return
    cfg = subscriber.config
    projected = projected_epsilon(
        history, noise_multiplier=noise, num_examples=num_examples,
        batch_size=cfg.batch_size, epochs=cfg.local_epochs, target_delta=target_delta,
        accountant=cfg.accountant)
    if projected > subscriber.max_epsilon:
        spent = epsilon_of(history, target_delta=target_delta, accountant=cfg.accountant)
        raise PrivacyBudgetExceeded(
            f"max-epsilon {subscriber.max_epsilon:g} would be exceeded: spent {spent:.4f}, "
            f"this round would reach {projected:.4f} (delta {target_delta:g})")


def _stale_update(context: Context, global_weights: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray] | None:
    """What a free rider passes off as its work: the last change of the global model
    (``global_t - global_{t-1}``), or nothing in its first round. Remembers this round's
    global model in ``Context.state``."""
    stale = None
    if STATE_PREVIOUS_GLOBAL in context.state:
        record = context.state[STATE_PREVIOUS_GLOBAL]
        assert isinstance(record, ArrayRecord)
        previous = _arrays_to_numpy(record)
        stale = {k: (global_weights[k] - previous[k]).astype(np.float32) for k in global_weights}
    context.state[STATE_PREVIOUS_GLOBAL] = ArrayRecord(
        {k: _to_array(v) for k, v in global_weights.items()})
    return stale


def _to_array(value: np.ndarray):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))


# ------------------------------------------------------------------------ witness
@app.query("witness")
def witness(msg: Message, context: Context) -> Message:
    """The final checkpoint, after the settlement: check it extends the last tree this
    subscriber saw, that the settlement is in it (its payout line is kept beside the
    notes), cosign it and keep the note. Nothing else is signed."""
    try:
        subscriber = Subscriber.from_context(context)
    except (DataError, ConfigError) as exc:
        return _error(msg, P.ERROR_DATA, str(exc))
    config = _config(msg)
    try:
        duty = _ledger_prelude(msg, context, subscriber)
        if duty is None:
            raise LedgerRefusal("ledger: expected a checkpoint to witness, got none")
        checkpoint = Checkpoint.from_body(duty.cosigned[: duty.cosigned.rfind("\n\n") + 1])
        payout = check_settlement(
            bytes(config[P.LEDGER_SETTLEMENT]),  # type: ignore[arg-type]
            index=int(_num(config[P.LEDGER_SETTLEMENT_INDEX])),
            proof=[unb64(str(h)) for h in config[P.LEDGER_SETTLEMENT_PROOF]],  # type: ignore[union-attr]
            checkpoint=checkpoint, task_id=duty.task_id,
            author=duty.signer.key_id,  # type: ignore[attr-defined]
            bulk=(bytes(config[P.LEDGER_SETTLEMENT_BULK])  # type: ignore[arg-type]
                  if P.LEDGER_SETTLEMENT_BULK in config else None))
    except LedgerRefusal as exc:
        return _error(msg, P.ERROR_LEDGER, str(exc))
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        return _error(msg, P.ERROR_LEDGER, f"ledger: malformed witness request ({exc!r})"[:500])
    (notes_dir(subscriber.key_path) / f"{duty.task_id}.payout").write_text(f"{payout}\n")
    return Message(RecordDict({P.LEDGER: _ledger_record(duty, [])}), reply_to=msg)


# --------------------------------------------------------------------------- vote
@app.query("vote")
def vote(msg: Message, context: Context) -> Message:
    """Score the assigned candidates: the loss of the current model and of current +
    each candidate update on this subscriber's data, in one batched pass."""
    try:
        subscriber = Subscriber.from_context(context)
    except (DataError, ConfigError) as exc:
        return _error(msg, P.ERROR_DATA, str(exc))
    try:
        duty = _ledger_prelude(msg, context, subscriber)
    except LedgerRefusal as exc:
        return _error(msg, P.ERROR_LEDGER, str(exc))
    config = _config(msg)
    candidate_ids = [str(c) for c in config.get(P.CANDIDATE_IDS, [])]  # type: ignore[union-attr]
    authors = [str(a) for a in config.get(P.CANDIDATE_AUTHORS, [])]  # type: ignore[union-attr]
    cfg = subscriber.config
    try:
        base = _request_model(msg, cfg, "vote")
    except WireError as exc:
        return _error(msg, P.ERROR_REQUEST, str(exc))
    try:
        deltas = [_arrays_to_numpy(msg.content[P.CANDIDATE_PREFIX + c], cfg)
                  for c in candidate_ids]
    except (KeyError, TypeError) as exc:
        return _error(msg, P.ERROR_REQUEST, f"vote request lacks the update of candidate {exc}")
    except WireError as exc:
        return _error(msg, P.ERROR_REQUEST, f"vote request: a candidate does not fit the task "
                      f"model: {exc}")
    if duty is not None:
        for candidate, delta in zip(candidate_ids, deltas, strict=True):
            if tensors_digest(delta) != candidate:
                return _error(msg, P.ERROR_REQUEST,
                              f"candidate {candidate[:16]}: the update sent is not the one "
                              "with that digest: refusing to vote on it")
    cfg = subscriber.config
    model = make_model(hidden_units=cfg.hidden_units, activation=cfg.activation, seed=cfg.seed,
                       schema=cfg.schema)
    private = cfg.vote_noise_multiplier > 0
    if private and str(config.get(P.VOTE_RULE, "single")) != "marginal":
        # Only the marginal ballot has a private form: a request for the old rule's raw
        # losses would switch the noise off from the server's side.
        return _error(msg, P.ERROR_REQUEST, "this subscriber votes under differential "
                      "privacy (vote-noise-multiplier > 0): expected vote-rule marginal, got "
                      f"{config.get(P.VOTE_RULE, 'single')!r}")
    if str(config.get(P.VOTE_RULE, "single")) == "marginal":
        return _marginal_vote(msg, context, config, subscriber, duty, model, base,
                              candidate_ids, authors, deltas)
    try:
        step = _num(config.get(P.VOTE_STEP, 1.0))
        scaled = deltas if step == 1.0 else [{k: v * np.float32(step) for k, v in d.items()}
                                             for d in deltas]
        server_round = int(_num(config.get(P.SERVER_ROUND, 0)))
        base_loss, losses = candidate_losses(model, base, scaled,
                                             data_for_round(subscriber, server_round))
    except (RuntimeError, KeyError) as exc:
        return _error(msg, P.ERROR_REQUEST, f"candidates do not fit the task model: {exc}")
    reported = [float(v) for v in losses]
    if "collude" in attacks_for_round(subscriber, server_round):
        attacker_ids = {str(a) for a in cfg.attacker_ids}
        reported = collude_losses(base_loss, reported, [a in attacker_ids for a in authors])
        reported = [max(0.0, v) for v in reported]
    content = RecordDict({
        P.METRICS: MetricRecord({P.BASE_LOSS: float(base_loss), P.LOSSES: reported}),
        P.CONFIG: ConfigRecord({P.CANDIDATE_IDS: candidate_ids}),
    })
    if duty is not None:
        entries: list[bytes] = []
        seq = _first_seq(duty, entries)
        for offset, (candidate, loss) in enumerate(zip(candidate_ids, reported, strict=True)):
            entries.append(sign_entry(duty.signer, "vote", seq=seq + offset, fields={  # type: ignore[attr-defined]
                "task_id": duty.task_id, "round": int(_num(config[P.SERVER_ROUND])),
                "candidate": candidate, "base_loss_micro": to_micro(base_loss),
                "candidate_loss_micro": to_micro(loss),
            }))
        content[P.LEDGER] = _ledger_record(duty, entries)
    return Message(content=content, reply_to=msg)


def _marginal_vote(msg: Message, context: Context, config: ConfigRecord,
                   subscriber: Subscriber, duty: LedgerDuty | None, model: torch.nn.Module,
                   base: dict[str, np.ndarray], candidate_ids: list[str], authors: list[str],
                   deltas: list[dict[str, np.ndarray]]) -> Message:
    """A marginal ballot (``client.marginal``): for each assigned candidate, how much
    including it in the trusted set's mean lowers the loss on this subscriber's data.
    Signs one ``ballot`` entry naming the digest of the trusted mean it was sent."""
    try:
        trusted_mean = _arrays_to_numpy(msg.content[P.TRUSTED_MEAN], subscriber.config)
        trusted_size = int(_num(config[P.TRUSTED_SIZE]))
        trusted_ids = [str(c) for c in config.get(P.TRUSTED_IDS, [])]  # type: ignore[union-attr]
    except (KeyError, TypeError, ValueError) as exc:
        return _error(msg, P.ERROR_REQUEST, f"marginal vote request: malformed trusted set ({exc})")
    if len(trusted_ids) != trusted_size or len(set(trusted_ids)) != trusted_size:
        return _error(msg, P.ERROR_REQUEST, f"marginal vote request: trusted-size {trusted_size}, "
                      f"but {len(set(trusted_ids))} distinct trusted ids")
    trusted_set = set(trusted_ids)
    flags = [c in trusted_set for c in candidate_ids]
    aggregate_digest = tensors_digest(trusted_mean)
    base_digest = tensors_digest(base)
    if duty is not None and aggregate_digest != str(config.get(P.AGGREGATE_DIGEST, "")):
        return _error(msg, P.ERROR_REQUEST, "aggregate-digest is not the digest of the trusted "
                      "mean received: refusing to sign a ballot on it")
    if duty is not None and base_digest != str(config.get(P.BASE_DIGEST, "")):
        return _error(msg, P.ERROR_REQUEST, "base-digest is not the digest of the model "
                      "received: refusing to sign a ballot on it")
    cfg = subscriber.config
    try:
        server_round = int(_num(config[P.SERVER_ROUND]))
        data = data_for_round(subscriber, server_round)
        if cfg.vote_noise_multiplier > 0:
            if not all(np.all(np.isfinite(v)) for tensors in (base, trusted_mean, *deltas)
                       for v in tensors.values()):
                return _error(msg, P.ERROR_REQUEST, "a private ballot needs finite models: "
                              "the base, trusted mean or a candidate holds NaN or inf")
            last = context.state.get(STATE_BALLOT, None)
            if isinstance(last, ConfigRecord) and int(_num(last["round"])) >= server_round:
                return _error(msg, P.ERROR_REQUEST, (
                    f"one private ballot a round: already voted in round {last['round']}, "
                    f"asked again for round {server_round}"))
            history = extend_history(_load_history(context),
                                     noise_multiplier=cfg.vote_noise_multiplier,
                                     sample_rate=1.0, steps=1)
            epsilon = epsilon_of(history, target_delta=cfg.target_delta,
                                 accountant=cfg.accountant)
            if subscriber.max_epsilon is not None and epsilon > subscriber.max_epsilon:
                spent = epsilon_of(_load_history(context), target_delta=cfg.target_delta,
                                   accountant=cfg.accountant)
                return _error(msg, P.ERROR_BUDGET, (
                    f"max-epsilon {subscriber.max_epsilon:g} would be exceeded: spent "
                    f"{spent:.4f}, this ballot would reach {epsilon:.4f} "
                    f"(delta {cfg.target_delta:g})"))
            contributions = marginal_contributions(model, base, trusted_mean, trusted_size,
                                                   deltas, flags, data)
            seed = (_seed(cfg.seed, "vote", server_round, subscriber.partition_id)
                    if subscriber.simulated else secrets.randbits(128))
            marginals = private_ballot(contributions, clip=cfg.vote_clip,
                                       noise_multiplier=cfg.vote_noise_multiplier,
                                       rng=np.random.default_rng(seed))
            _save_history(context, history)  # spent whether or not the reply arrives
            context.state[STATE_BALLOT] = ConfigRecord({"round": server_round})
        else:
            marginals = marginal_ballot(model, base, trusted_mean, trusted_size, deltas,
                                        flags, data)
    except (BallotError, RuntimeError, KeyError, ValueError) as exc:
        return _error(msg, P.ERROR_REQUEST, f"candidates do not fit the task model: {exc}")
    if "collude" in attacks_for_round(subscriber, server_round):
        attacker_ids = {str(a) for a in cfg.attacker_ids}
        marginals = collude_marginals(marginals, [a in attacker_ids for a in authors])
    metrics: dict[str, Any] = {P.MARGINALS: [float(m) for m in marginals]}
    if cfg.vote_noise_multiplier > 0:  # the cumulative epsilon, this ballot included
        metrics[P.SAMPLE_EPSILON] = float(epsilon)
    content = RecordDict({
        P.METRICS: MetricRecord(metrics),
        P.CONFIG: ConfigRecord({P.CANDIDATE_IDS: candidate_ids,
                                P.AGGREGATE_DIGEST: aggregate_digest}),
    })
    if duty is not None:
        entries: list[bytes] = []
        seq = _first_seq(duty, entries)
        entries.append(sign_entry(duty.signer, "ballot", seq=seq, fields={  # type: ignore[arg-type]
            "task_id": duty.task_id, "round": int(_num(config[P.SERVER_ROUND])),
            "base_digest": base_digest, "trusted_digest": trusted_digest(trusted_ids),
            "aggregate_digest": aggregate_digest, "trusted_size": trusted_size,
            "marginals_micro": {c: to_micro(m)
                                for c, m in zip(candidate_ids, marginals, strict=True)},
        }))
        content[P.LEDGER] = _ledger_record(duty, entries)
    return Message(content=content, reply_to=msg)
