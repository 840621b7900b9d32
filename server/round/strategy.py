"""The Proof-of-Intelligence strategy: a Flower ``FedAvg`` subclass whose round is
train -> validate -> vote -> tally -> apply -> central evaluation.

Flower's ``Strategy.start()`` has no hook between train and evaluate, so ``start()`` is
overridden and the vote is sent as ``query.vote`` messages; every message phase goes
through :func:`server.round.exchange.exchange` (push, then pull polling fast), not
``grid.send_and_receive`` (3 s between pulls on a deployed SuperLink). The algorithms
(committees, tallies, selection, validation) are the pure
functions in ``server.round.selection`` and ``server.round.validation``; this class only wires them
to Flower and records what happened in :class:`RoundRecord` objects for the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from client import protocol as P
from client.marginal import MAX_MARGINAL, trusted_digest
from client.wire import WireError, is_packed, pack, unpack
from client.witness import MICRO, to_micro
from crypto.digests import canonical_tensor_bytes, tensors_digest
from server.round import marginal, selection
from server.round.exchange import exchange
from server.round.ledger_writer import PendingEntries, RoundLedger
from server.round.marginal import MarginalConfig, RoundTally, VoteState

if TYPE_CHECKING:
    from server.market.session import MarketSession
from server.round.validation import (
    Rejected,
    Vote,
    validate_ballot,
    validate_update,
    validate_vote,
)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class PoIConfig:
    """The strategy's knobs (see the README's config reference)."""

    top_k: int = 1
    votes_per_candidate: int = 0
    vote_aggregation: str = "median"
    trim_fraction: float = 0.2
    require_improvement: bool = False
    vote_step: float = 1.0
    max_update_norm: float = 10.0
    seed: int = 0
    vote_rule: str = "marginal"  # "marginal" (needs the market's Scientist) or "single"
    marginal: MarginalConfig = field(default_factory=MarginalConfig)


@dataclass(frozen=True)
class RoundDigests:
    """What a marginal ballot and the Scientist's numbers are computed on: the base model,
    the trusted set (sorted ids) and the trusted mean; all signed, all replayed."""

    base: str
    trusted: str
    aggregate: str


@dataclass
class CandidateRecord:
    candidate_id: str
    author: str  # partition id (simulation) or node id, as a string
    node_id: str
    num_examples: int
    update_norm: float
    sample_epsilon: float
    voters: list[str] = field(default_factory=list)
    improvements: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    improvement: float | None = None
    selected: bool = False
    trusted: bool = False
    validation_marginal: float | None = None  # the Scientist's number (marginal vote)
    author_score: float | None = None  # its author's cumulative score after the round


@dataclass
class RoundRecord:
    """Everything the report says about one round."""

    server_round: int
    candidates: list[CandidateRecord] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    rejected_votes: list[dict[str, str]] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    voter_weights: dict[str, float] = field(default_factory=dict)  # voter label -> weight
    voter_agreement: dict[str, float] = field(default_factory=dict)  # voter label -> rho
    halted: str = ""  # why the round applied nothing and the task stopped


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _declared_nbytes(name: str, data: bytes) -> int:
    """The size an ``.npy`` payload's header declares, read without decoding the data (a
    few bytes of header can declare terabytes)."""
    import io

    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buffer)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(buffer)
    except Exception as exc:  # noqa: BLE001 - any header failure is the sender's fault
        raise Rejected(f"{name}: not an .npy array ({type(exc).__name__}: {exc})") from exc
    return int(np.prod(shape, dtype=np.float64)) * int(np.dtype(dtype).itemsize)


def author_of(msg: Message) -> str:
    """The author label of a reply: its partition id when it sent one, else the node id
    (node ids are uint64: kept as strings)."""
    if not msg.has_error() and P.METRICS in msg.content:
        metrics = msg.content[P.METRICS]
        if isinstance(metrics, MetricRecord) and P.PARTITION_ID in metrics:
            value = metrics[P.PARTITION_ID]
            if isinstance(value, int) and value >= 0:
                return str(value)
    return f"node-{msg.metadata.src_node_id}"


class ProofOfIntelligence(FedAvg):
    """Apply the candidate update(s) the subscribers' votes rank best, instead of averaging.

    ``round_listener`` is called with each finished :class:`RoundRecord` (the ServerApp
    writes the report and shows progress from it).
    """

    def __init__(
        self,
        *,
        config: PoIConfig,
        min_available_nodes: int = 2,
        round_listener: Callable[[RoundRecord], None] | None = None,
        ledger: RoundLedger | None = None,
        market: MarketSession | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_available_nodes,
            min_available_nodes=min_available_nodes,
        )
        self.config = config
        self.round_listener = round_listener
        self.ledger = ledger
        self.market = market
        self.stop_reason = "completed"
        self.history: list[RoundRecord] = []
        self._seen_digests: set[str] = set()
        self._admitted: set[str] = set()
        self._labels: dict[str, str] = {}  # node id -> author label, bound on first claim
        # This round's model: the packed layout and the size bound of a reply.
        self._reference: dict[str, np.ndarray] = {}
        self.vote_state = VoteState()
        if config.vote_rule == "marginal" and (ledger is None or market is None):
            raise ValueError("vote-rule marginal: expected a ledger and a market (the "
                             "Scientist publishes the validation marginals), got none")

    @property
    def labels(self) -> dict[str, str]:
        """Node id -> author label (partition id), as bound on first claim."""
        return dict(self._labels)

    def summary(self) -> None:
        log(INFO, "\t├──> Proof-of-Intelligence: %s", self.config)
        super().summary()

    # pylint: disable=too-many-arguments,too-many-locals
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        log(INFO, "Starting ProofOfIntelligence for %s rounds", num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        train_config[P.UPDATE_KIND] = "delta"
        result = Result()
        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            record = RoundRecord(server_round=server_round)
            weights = arrays_to_numpy(arrays)
            self._reference = weights
            base_digest = tensors_digest(weights)
            train_config[P.SERVER_ROUND] = server_round
            train_config[P.BASE_DIGEST] = base_digest

            # -----------------------------------------------------------------
            # --- TRAIN (subscribers) -----------------------------------------
            # -----------------------------------------------------------------
            t0 = time.perf_counter()
            wire = pack(weights)  # one Array per model on our messages (client.wire)
            replies = exchange(grid, self._train_messages(wire, train_config, grid),
                               timeout=timeout)
            record.phase_seconds["train"] = time.perf_counter() - t0

            # -----------------------------------------------------------------
            # --- VALIDATE (server) -------------------------------------------
            # -----------------------------------------------------------------
            t0 = time.perf_counter()
            candidates, deltas = self._validate_replies(replies, weights, record, base_digest)
            record.candidates = candidates
            record.phase_seconds["validate"] = time.perf_counter() - t0

            # -----------------------------------------------------------------
            # --- VOTE AND TALLY (subscribers, the Scientist, pure tally) -----
            # -----------------------------------------------------------------
            base_weights = weights
            if self.config.vote_rule == "marginal":
                chosen = self._marginal_round(grid, server_round, wire, weights, candidates,
                                              deltas, record, timeout)
            else:
                chosen = self._single_round(grid, server_round, wire, candidates, deltas,
                                            replies, record, timeout, train_config)

            # -----------------------------------------------------------------
            # --- APPLY (the mean of the accepted updates) --------------------
            # -----------------------------------------------------------------
            t0 = time.perf_counter()
            by_id = {c.candidate_id: c for c in candidates}
            for candidate in candidates:
                candidate.selected = candidate.candidate_id in chosen
            record.selected = [by_id[c].author for c in chosen]
            if chosen:
                weights = selection.apply_updates(weights, [deltas[c] for c in chosen])
                # The model's own last change is nobody's work: a subscriber sending it
                # next round (a free rider) is refused like any repeated update.
                self._seen_digests.add(tensors_digest(
                    {k: (weights[k] - base_weights[k]).astype(np.float32) for k in weights}))
                arrays = numpy_to_arrays(weights)
                result.arrays = arrays
            else:
                log(WARNING, "Round %s: no candidate accepted; kept the model", server_round)
            record.phase_seconds["select"] = time.perf_counter() - t0

            # -----------------------------------------------------------------
            # --- CENTRAL EVALUATION (server) ---------------------------------
            # -----------------------------------------------------------------
            t0 = time.perf_counter()
            if evaluate_fn:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
                    record.metrics = {k: float(v) for k, v in res.items()}  # type: ignore[arg-type]
            record.phase_seconds["evaluate"] = time.perf_counter() - t0
            if self.ledger is not None:
                t0 = time.perf_counter()
                self._record_outcome(server_round, weights, candidates, chosen, record)
                record.phase_seconds["ledger"] = time.perf_counter() - t0
            if self.market is not None:
                t0 = time.perf_counter()
                loss = self.market.publish_score(
                    server_round, weights, base=base_weights, deltas=[deltas[c] for c in chosen])
                record.metrics["published-validation-loss"] = loss / MICRO
                record.phase_seconds["score"] = time.perf_counter() - t0
            self.history.append(record)
            if self.round_listener:
                self.round_listener(record)
            if record.halted:
                self.stop_reason = record.halted
                log(WARNING, "Round %s: %s; stopping", server_round, record.halted)
                break
            if self.market is not None and self.market.should_stop:
                self.stop_reason = "patience"
                log(INFO, "Round %s: no validation gain for %s rounds (patience); stopping",
                    server_round, self.market.scientist.terms.patience)
                break
        result.arrays = arrays
        return result


    # ------------------------------------------------------------- the single vote
    def _single_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                      candidates: list[CandidateRecord],
                      deltas: dict[str, dict[str, np.ndarray]], replies: Sequence[Message],
                      record: RoundRecord, timeout: float, train_config: ConfigRecord
                      ) -> list[str]:
        """``vote-rule = single``: voters report the loss of each candidate applied
        alone; the robust tally picks the best ``top-k``."""
        t0 = time.perf_counter()
        # Voters: every subscriber that answered; with a ledger, those whose entries
        # the ledger admitted this round, so the committee is recomputable from it.
        voters = (sorted(self._admitted) if self.ledger is not None
                  else sorted(set(self._responders(replies))))
        if candidates and voters:
            self._vote(grid, server_round, arrays, candidates, deltas, voters, record,
                       timeout, train_config)
        record.phase_seconds["vote"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        improvements = {c.candidate_id: c.improvements for c in candidates if c.improvements}
        scores = selection.tally(
            improvements, method=self.config.vote_aggregation,
            trim_fraction=self.config.trim_fraction,
        )
        chosen = selection.select(
            scores, top_k=self.config.top_k,
            require_improvement=self.config.require_improvement,
        )
        for candidate in candidates:
            if candidate.candidate_id in scores:
                candidate.score = scores[candidate.candidate_id].score
                candidate.improvement = scores[candidate.candidate_id].improvement
        record.phase_seconds["tally"] = time.perf_counter() - t0
        return chosen

    # ----------------------------------------------------------- the marginal vote
    def _identity(self, node_id: str) -> str:
        """Who a node is on the ledger (its key id): reputations and author scores are
        kept by ledger identity, so ``poi audit`` recomputes them."""
        assert self.ledger is not None
        return self.ledger.node_author.get(node_id, f"node-{node_id}")

    def _marginal_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                        weights: dict[str, np.ndarray], candidates: list[CandidateRecord],
                        deltas: dict[str, dict[str, np.ndarray]], record: RoundRecord,
                        timeout: float) -> list[str]:
        """``vote-rule = marginal`` (``server.round.marginal``): trusted set, signed
        marginal ballots, the Scientist's validation marginals, then the tally."""
        assert self.ledger is not None and self.market is not None
        t0 = time.perf_counter()
        if not candidates:
            record.phase_seconds["vote"] = time.perf_counter() - t0
            return []
        authors = {c.candidate_id: self._identity(c.node_id) for c in candidates}
        trusted = marginal.trusted_set(authors, self.vote_state.author_scores,
                                       min_trusted=self.config.marginal.min_trusted)
        trusted_set = set(trusted)
        for c in candidates:
            c.trusted = c.candidate_id in trusted_set
        trusted_mean = marginal.mean_update([deltas[c] for c in trusted])
        digests = RoundDigests(base=tensors_digest(weights), trusted=trusted_digest(trusted),
                               aggregate=tensors_digest(trusted_mean))
        # Voters are this round's authors: a key whose update was refused (a free
        # rider's zero update, a repeat) has no standing in the round's vote, and
        # the audit refuses a ballot from a key that submitted no candidate.
        submitters = {c.node_id for c in candidates}
        voters = sorted(n for n in self._admitted if n in submitters)
        ballots = self._collect_ballots(grid, server_round, arrays, candidates, deltas,
                                        voters, trusted, trusted_mean, digests, record, timeout)
        record.phase_seconds["vote"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ids = [c.candidate_id for c in candidates]
        validation = self.market.publish_marginals(
            server_round, weights, trusted_mean=trusted_mean, trusted_size=len(trusted),
            base_digest=digests.base, trusted_digest=digests.trusted,
            aggregate_digest=digests.aggregate, candidate_ids=ids,
            deltas=[deltas[c] for c in ids], members=[c in trusted_set for c in ids])
        record.phase_seconds["scientist"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if validation is not None and (sorted(validation) != sorted(ids) or any(
                isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_MARGINAL * MICRO
                for v in validation.values())):
            validation = None  # numbers the audit could not use count as withheld
        if validation is None:
            record.halted = "the Scientist withheld the validation marginals"
            self._record_rejections(server_round, [{
                "reason": record.halted, "node_id": "scientist", "subject": "scientist"}])
            return []
        tally = marginal.tally_round(self.vote_state, authors=authors, ballots=ballots,
                                     validation_micro=validation, config=self.config.marginal)
        self.vote_state = tally.state
        self._last_tally = tally
        label = {self._identity(n): lbl for n, lbl in self._labels.items()}
        record.voter_weights = {label.get(v, v): w for v, w in tally.weights.items()}
        record.voter_agreement = {label.get(v, v): r for v, r in tally.agreement.items()}
        by_id = {c.candidate_id: c for c in candidates}
        for candidate_id, score in tally.scores.items():
            by_id[candidate_id].score = score
            by_id[candidate_id].improvement = score
        for c in candidates:
            c.validation_marginal = validation.get(c.candidate_id, 0) / MICRO
            c.author_score = tally.state.author_scores.get(authors[c.candidate_id], 0.0)
        record.phase_seconds["tally"] = time.perf_counter() - t0
        return list(tally.accepted)

    def _tally_fields(self, candidates: Sequence[CandidateRecord]) -> dict[str, object]:
        """What the operator's ``selection`` entry adds under the marginal vote, so
        ``poi audit`` can compare its own replay of the tally with it."""
        tally: RoundTally | None = getattr(self, "_last_tally", None)
        if self.config.vote_rule != "marginal":
            return {}
        fields: dict[str, object] = {
            "vote_rule": "marginal",
            "candidates": sorted(c.candidate_id for c in candidates),
        }
        if tally is None:  # no candidates, or the Scientist withheld its numbers
            return fields
        self._last_tally = None
        return {
            **fields,
            "trusted": sorted(c.candidate_id for c in candidates if c.trusted),
            "voter_weights_micro": {v: to_micro(w) for v, w in tally.weights.items()},
            "author_scores_micro": {a: to_micro(s)
                                    for a, s in sorted(tally.state.author_scores.items())},
        }

    def _collect_ballots(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                         candidates: list[CandidateRecord],
                         deltas: dict[str, dict[str, np.ndarray]], voters: list[str],
                         trusted: list[str], trusted_mean: dict[str, np.ndarray],
                         digests: RoundDigests, record: RoundRecord, timeout: float
                         ) -> dict[str, dict[str, int]]:
        """Send every voter its committee's candidates and the trusted mean; return the
        accepted ballots (voter identity -> candidate -> marginal, micro-units), each
        signed and on the ledger before the Scientist publishes anything."""
        assert self.ledger is not None
        by_id = {c.candidate_id: c for c in candidates}
        identity = {node: self._identity(node) for node in voters}
        node_of = {key: node for node, key in identity.items()}
        by_key = selection.assign_committees(
            {c.candidate_id: self._identity(c.node_id) for c in candidates},
            sorted(identity.values()), votes_per_candidate=self.config.votes_per_candidate,
            seed=self.ledger.root())
        committees = {c: tuple(sorted(node_of[k] for k in members))
                      for c, members in by_key.items()}
        for candidate_id, members in committees.items():
            by_id[candidate_id].voters = list(members)
        assigned = selection.ballots(committees)
        mean_record = pack(trusted_mean)
        encoded = {c: pack(deltas[c]) for c in by_id}  # once, not per voter
        messages = []
        for voter, ballot in assigned.items():
            vote_config = ConfigRecord({
                P.SERVER_ROUND: server_round, P.VOTE_RULE: "marginal",
                P.CANDIDATE_IDS: list(ballot),
                P.CANDIDATE_AUTHORS: [by_id[c].author for c in ballot],
                P.TRUSTED_SIZE: len(trusted), P.TRUSTED_IDS: list(trusted),
                P.AGGREGATE_DIGEST: digests.aggregate, P.BASE_DIGEST: digests.base,
            })
            vote_config = self.ledger.apply_to(vote_config, voter)
            content = RecordDict({P.ARRAYS: arrays, P.CONFIG: vote_config,
                                  P.TRUSTED_MEAN: mean_record})
            for candidate_id in ballot:
                content[P.CANDIDATE_PREFIX + candidate_id] = encoded[candidate_id]
            messages.append(Message(content=content, message_type=P.VOTE_MESSAGE_TYPE,
                                    dst_node_id=int(voter)))
        replies = exchange(grid, messages, timeout=timeout)
        answered: set[str] = set()
        pending: list[PendingEntries] = []
        accepted: dict[str, dict[str, float]] = {}
        authors_by_node = {str(c.node_id): c.author for c in by_id.values()}
        for msg in replies:
            voter = str(msg.metadata.src_node_id)
            answered.add(voter)
            if voter not in assigned:
                record.rejected_votes.append({"voter": voter, "reason": "vote from a non-member"})
                continue
            try:
                ballot = self._parse_ballot(msg, assigned[voter], digests.aggregate)
                pending.append(self.ledger.check_reply(
                    voter, msg.content.get(P.LEDGER), kind="ballot",
                    expected=[{"task_id": self.ledger.task_id, "round": server_round,
                               "base_digest": digests.base, "trusted_digest": digests.trusted,
                               "aggregate_digest": digests.aggregate,
                               "trusted_size": len(trusted),
                               "marginals_micro": {c: to_micro(v) for c, v in ballot.items()}}]))
            except Rejected as exc:
                record.rejected_votes.append({"voter": voter, "reason": str(exc)})
                continue
            accepted[voter] = ballot
            spent = msg.content[P.METRICS].get(P.SAMPLE_EPSILON)  # private ballots only
            author = authors_by_node.get(voter)
            if isinstance(spent, float) and math.isfinite(spent) and spent >= 0 and author:
                record.epsilon[author] = max(record.epsilon.get(author, 0.0), spent)
        for voter, reason in self.ledger.commit(pending).items():
            accepted.pop(voter, None)
            record.rejected_votes.append({"voter": voter, "reason": reason})
        for voter in sorted(set(assigned) - answered):
            record.rejected_votes.append({"voter": voter, "reason": "no vote before the timeout"})
        self._record_rejections(server_round, [
            {**r, "node_id": r["voter"], "subject": "vote"} for r in record.rejected_votes])
        for voter, ballot in accepted.items():
            for candidate_id, value in ballot.items():
                by_id[candidate_id].improvements[voter] = value
        return {identity[v]: {c: to_micro(x) for c, x in b.items()}
                for v, b in sorted(accepted.items())}

    @staticmethod
    def _parse_ballot(msg: Message, ballot: Sequence[str], aggregate_digest: str
                      ) -> dict[str, float]:
        if msg.has_error():
            raise Rejected(f"voter error: {msg.error.reason}")
        content = msg.content
        metrics = content.get(P.METRICS)
        config = content.get(P.CONFIG)
        if not isinstance(metrics, MetricRecord) or not isinstance(config, ConfigRecord):
            raise Rejected("ballot: expected a MetricRecord and a ConfigRecord, "
                           f"got {list(content)}")
        ids = config.get(P.CANDIDATE_IDS)
        marginals = metrics.get(P.MARGINALS)
        values = validate_ballot(
            "", assigned=ballot, candidate_ids=ids if isinstance(ids, list) else None,
            marginals=marginals if isinstance(marginals, list) else None,
            aggregate_digest=config.get(P.AGGREGATE_DIGEST), expected_digest=aggregate_digest)
        # Tally on the micro-unit values the ledger records, so a replay is exact.
        return {c: to_micro(v) / MICRO for c, v in values.items()}

    # ------------------------------------------------------------------ helpers
    def _train_messages(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> list[Message]:
        """One train message per subscriber: with a ledger, each carries the latest
        checkpoint and a consistency proof from the tree that subscriber last cosigned."""
        messages = []
        for node_id in sorted(grid.get_node_ids()):
            node_config = (self.ledger.apply_to(config, str(node_id)) if self.ledger
                           else ConfigRecord(dict(config)))
            messages.append(Message(
                content=RecordDict({P.ARRAYS: arrays, P.CONFIG: node_config}),
                message_type="train", dst_node_id=node_id,
            ))
        return messages

    def _record_outcome(self, server_round: int, weights: dict[str, np.ndarray],
                        candidates: list[CandidateRecord], chosen: list[str],
                        record: RoundRecord) -> None:
        """Operator entries closing the round: selection with every score and the new
        model's digest (its bytes as a blob). The Scientist's score follows (market)."""
        assert self.ledger is not None
        ledger = self.ledger
        model_digest = ledger.blobs.put(canonical_tensor_bytes(weights))
        entries: list[tuple[str, dict[str, object]]] = [
            ("selection", {
                "task_id": ledger.task_id, "round": server_round, "selected": list(chosen),
                "scores_micro": {c.candidate_id: to_micro(c.score)
                                 for c in candidates if c.score is not None},
                **self._tally_fields(candidates),
            }),
            ("model", {"task_id": ledger.task_id, "round": server_round,
                       "model_digest": model_digest}),
        ]
        ledger.append_operator(entries)

    def _record_rejections(self, server_round: int, rejected: list[dict[str, str]]) -> None:
        if self.ledger is None or not rejected:
            return
        self.ledger.append_operator([
            ("rejection", {"task_id": self.ledger.task_id, "round": server_round,
                           "reason": r["reason"], "node_id": r.get("node_id", r.get("voter", "")),
                           "subject": r.get("subject", "update")})
            for r in rejected
        ])

    @staticmethod
    def _responders(replies: Sequence[Message]) -> Iterable[str]:
        for msg in replies:
            yield str(msg.metadata.src_node_id)

    def _validate_replies(
        self, replies: Sequence[Message], weights: dict[str, np.ndarray], record: RoundRecord,
        base_digest: str,
    ) -> tuple[list[CandidateRecord], dict[str, dict[str, np.ndarray]]]:
        candidates: list[CandidateRecord] = []
        deltas: dict[str, dict[str, np.ndarray]] = {}
        pending: list[PendingEntries] = []
        named: dict[str, tuple[set[str], dict[str, np.ndarray]]] = {}  # digest -> nodes, bytes
        server_round = record.server_round

        def reject(author: str, node_id: str, reason: str) -> None:
            record.rejected.append({"author": author, "node_id": node_id, "reason": reason})

        for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node_id = str(msg.metadata.src_node_id)
            author = self._labels.get(node_id, author_of(msg))
            if msg.has_error():
                reject(author, node_id, f"subscriber error: {msg.error.reason}")
                continue
            try:
                author = self._bind_label(node_id, author_of(msg))
                update, metrics = self._parse_train_reply(msg)
                digest = tensors_digest(update)
                if self.ledger is not None:
                    pending.append(self.ledger.check_reply(
                        node_id, msg.content.get(P.LEDGER), kind="candidate",
                        expected=[{"task_id": self.ledger.task_id, "round": server_round,
                                   "update_digest": digest, "base_digest": base_digest}]))
                    # The candidate entry names the update even when the checks below
                    # refuse it: its bytes are kept so the audit can check the refusal.
                    named.setdefault(digest, (set(), update))[0].add(node_id)
                norm = validate_update(update, weights, max_norm=self.config.max_update_norm)
                if digest in self._seen_digests:
                    raise Rejected(f"update {digest[:16]} repeats an update already submitted "
                                   "or the global model's last change")
            except Rejected as exc:
                reject(author, node_id, str(exc))
                continue
            self._seen_digests.add(digest)
            epsilon = float(metrics[P.SAMPLE_EPSILON])  # type: ignore[arg-type]
            record.epsilon[author] = epsilon
            candidates.append(CandidateRecord(
                candidate_id=digest, author=author, node_id=node_id,
                num_examples=int(metrics[P.NUM_EXAMPLES]),  # type: ignore[arg-type]
                update_norm=norm, sample_epsilon=epsilon,
            ))
            deltas[digest] = update
        if self.ledger is not None:
            refused = self.ledger.commit(pending)
            self._admitted = {p.node_id for p in pending if p.node_id not in refused}
            for node_id, reason in refused.items():
                dropped = [c for c in candidates if c.node_id == node_id]
                for c in dropped:
                    candidates.remove(c)
                    deltas.pop(c.candidate_id, None)
                    reject(c.author, node_id, reason)
            # Any admitted node naming the digest keeps its bytes (a sybil sending the
            # same bytes with a bad signature must not drop another's selected update).
            for nodes, update in named.values():
                if nodes - set(refused):
                    self.ledger.blobs.put(canonical_tensor_bytes(update))
            self._record_rejections(server_round, record.rejected)
        return candidates, deltas

    def _bind_label(self, node_id: str, claimed: str) -> str:
        """A node keeps the author label it first claimed; a label held by another node
        or a changed claim is refused (no subscriber can pass as another)."""
        bound = self._labels.get(node_id)
        if bound is not None and bound != claimed:
            raise Rejected(f"author: node {node_id} is {bound}, now claims {claimed}")
        if bound is None:
            if claimed in self._labels.values():
                raise Rejected(f"author: {claimed} is already another node's label")
            self._labels[node_id] = claimed
        return claimed

    def _parse_train_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], MetricRecord]:
        content = msg.content
        if P.ARRAYS not in content or not isinstance(content[P.ARRAYS], ArrayRecord):
            raise Rejected(
                f"reply: expected an ArrayRecord '{P.ARRAYS}', got keys {list(content)}")
        if P.METRICS not in content or not isinstance(content[P.METRICS], MetricRecord):
            raise Rejected(
                f"reply: expected a MetricRecord '{P.METRICS}', got keys {list(content)}")
        metrics = content[P.METRICS]
        assert isinstance(metrics, MetricRecord)
        num_examples = metrics.get(P.NUM_EXAMPLES)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise Rejected(f"{P.NUM_EXAMPLES}: expected an integer >= 1, got {num_examples!r}")
        epsilon = metrics.get(P.SAMPLE_EPSILON)
        if (isinstance(epsilon, bool) or not isinstance(epsilon, int | float)
                or not math.isfinite(epsilon) or epsilon < 0):
            raise Rejected(f"{P.SAMPLE_EPSILON}: expected a finite number >= 0, got {epsilon!r}")
        return self._decode_update(content.array_records[P.ARRAYS]), metrics

    def _decode_update(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """Decode untrusted arrays: refuse payloads larger than the model could need before
        decoding (a tiny header can declare a huge shape), then any decoding failure."""
        reference_bytes = sum(int(w.nbytes) for w in self._reference.values())
        budget = 8 * reference_bytes + 1024 * max(1, len(record))
        size = sum(len(array.data) for array in record.values())
        if size > budget:
            raise Rejected(f"update arrays: expected at most {budget} bytes, got {size}")
        for name, array in record.items():
            declared = _declared_nbytes(name, bytes(array.data))
            if declared > budget:
                raise Rejected(f"{name}: declares {declared} bytes, expected at most {budget}")
        if is_packed(record):  # as our train request was (client.wire)
            try:
                return unpack(record, self._reference)
            except WireError as exc:
                raise Rejected(str(exc)) from exc
        try:
            update = arrays_to_numpy(record)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the sender's fault
            raise Rejected(f"update arrays cannot be decoded: {type(exc).__name__}: {exc}") from exc
        for name, value in update.items():
            if not isinstance(value, np.ndarray):
                raise Rejected(f"{name}: expected an array, got {type(value).__name__}")
        return update

    def _vote(
        self, grid: Grid, server_round: int, arrays: ArrayRecord,
        candidates: list[CandidateRecord], deltas: dict[str, dict[str, np.ndarray]],
        voters: list[str], record: RoundRecord, timeout: float,
        train_config: ConfigRecord,
    ) -> None:
        by_id = {c.candidate_id: c for c in candidates}
        authors_by_node = {c.candidate_id: c.node_id for c in candidates}
        # With a ledger the seed is its root at the start of the vote: anyone holding
        # the ledger recomputes the committees.
        seed = (self.ledger.root() if self.ledger is not None else selection.committee_seed(
            task_seed=self.config.seed, server_round=server_round, candidate_ids=list(by_id)))
        if self.ledger is not None:
            # Committees over ledger identities (key ids), mapped back to nodes.
            identity = {node: self.ledger.node_author[node] for node in voters}
            node_of = {key: node for node, key in identity.items()}
            by_key = selection.assign_committees(
                {c: identity.get(n, f"node-{n}") for c, n in authors_by_node.items()},
                sorted(identity.values()), votes_per_candidate=self.config.votes_per_candidate,
                seed=seed)
            committees = {c: tuple(sorted(node_of[k] for k in members))
                          for c, members in by_key.items()}
        else:
            committees = selection.assign_committees(
                authors_by_node, voters, votes_per_candidate=self.config.votes_per_candidate,
                seed=seed,
            )
        for candidate_id, members in committees.items():
            by_id[candidate_id].voters = list(members)
        assigned = selection.ballots(committees)
        encoded = {c: pack(deltas[c]) for c in by_id}  # once, not per voter
        messages = []
        for voter, ballot in assigned.items():
            vote_config = ConfigRecord({
                P.SERVER_ROUND: server_round,
                P.CANDIDATE_IDS: list(ballot),
                P.CANDIDATE_AUTHORS: [by_id[c].author for c in ballot],
                P.VOTE_STEP: self.config.vote_step,
            })
            if self.ledger is not None:
                vote_config = self.ledger.apply_to(vote_config, voter)
            content = RecordDict({P.ARRAYS: arrays, P.CONFIG: vote_config})
            for candidate_id in ballot:
                content[P.CANDIDATE_PREFIX + candidate_id] = encoded[candidate_id]
            messages.append(Message(content=content, message_type=P.VOTE_MESSAGE_TYPE,
                                    dst_node_id=int(voter)))
        replies = exchange(grid, messages, timeout=timeout)
        answered: set[str] = set()
        pending: list[PendingEntries] = []
        accepted: dict[str, Vote] = {}
        for msg in replies:
            voter = str(msg.metadata.src_node_id)
            answered.add(voter)
            if voter not in assigned:
                record.rejected_votes.append({"voter": voter, "reason": "vote from a non-member"})
                continue
            try:
                vote = self._parse_vote(msg, voter, assigned[voter])
                if self.ledger is not None:
                    pending.append(self.ledger.check_reply(
                        voter, msg.content.get(P.LEDGER), kind="vote",
                        expected=[{"task_id": self.ledger.task_id, "round": server_round,
                                   "candidate": c,
                                   "base_loss_micro": to_micro(vote.base_loss),
                                   "candidate_loss_micro": to_micro(vote.losses[c])}
                                  for c in assigned[voter]]))
            except Rejected as exc:
                record.rejected_votes.append({"voter": voter, "reason": str(exc)})
                continue
            accepted[voter] = vote
        if self.ledger is not None:
            for voter, reason in self.ledger.commit(pending).items():
                accepted.pop(voter, None)
                record.rejected_votes.append({"voter": voter, "reason": reason})
        for voter, vote in accepted.items():
            for candidate_id, value in vote.improvements().items():
                by_id[candidate_id].improvements[voter] = value
        for voter in sorted(set(assigned) - answered):
            record.rejected_votes.append({"voter": voter, "reason": "no vote before the timeout"})
        self._record_rejections(server_round, [
            {**r, "node_id": r["voter"], "subject": "vote"} for r in record.rejected_votes])

    @staticmethod
    def _parse_vote(msg: Message, voter: str, ballot: Sequence[str]) -> Vote:
        if msg.has_error():
            raise Rejected(f"voter error: {msg.error.reason}")
        content = msg.content
        metrics = content.get(P.METRICS)
        config = content.get(P.CONFIG)
        if not isinstance(metrics, MetricRecord) or not isinstance(config, ConfigRecord):
            raise Rejected(f"vote: expected a MetricRecord and a ConfigRecord, got {list(content)}")
        losses = metrics.get(P.LOSSES)
        ids = config.get(P.CANDIDATE_IDS)
        vote = validate_vote(
            voter, assigned=ballot,
            candidate_ids=ids if isinstance(ids, list) else None,
            base_loss=metrics.get(P.BASE_LOSS),
            losses=losses if isinstance(losses, list) else None,
        )
        # Tally on the micro-unit values the ledger records, so a replay is exact.
        return Vote(voter=voter, base_loss=to_micro(vote.base_loss) / MICRO,
                    losses={c: to_micro(v) / MICRO for c, v in vote.losses.items()})
