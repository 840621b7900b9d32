"""One task's market, run beside the rounds: open, score every round, close, reveal,
settle. The ServerApp drives it; the strategy calls :meth:`publish_score` after each
round. The Scientist signs with its own key (``scientist.pem``, mode 0600, beside the
ledger; ``scientist.pub`` is public); the operator signs ``fund``, ``escrow``, ``close``,
``deadline`` and ``settlement``. The settlement the operator records is the one
:func:`server.market.settlement_of` computes from the ledger and the blobs, the same
function ``poi audit`` runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log

from client.config import RunConfig
from client.task import Dataset
from server.market.game_losses import GAME_LOSSES_DIGEST
from server.market.replay import (
    MarketRecord,
    Replay,
    read_market,
    replay,
    settlement_fields,
    settlement_of,
)
from server.market.scientist import Scientist
from server.market.settlement import Settlement
from server.round.ledger_writer import RoundLedger, load_or_create_signer

SCIENTIST_KEY_FILE = "scientist.pem"


@dataclass
class Closing:
    """What the end of a task produced."""

    settlement: Settlement
    record: MarketRecord
    replay: Replay


class MarketSession:
    def __init__(self, ledger: RoundLedger, scientist: Scientist) -> None:
        self.ledger = ledger
        self.scientist = scientist
        self.last_round = 0

    @classmethod
    def open(cls, ledger: RoundLedger, *, out_dir: Path, config: RunConfig,
             validation: Dataset, initial_weights: Mapping[str, np.ndarray],
             model_digest: str) -> MarketSession:
        """The Scientist's key, the operator's record of the Scientist's payment, the
        offer (terms and commitments), the escrow, and the initial model's score."""
        signer = load_or_create_signer(out_dir / SCIENTIST_KEY_FILE)
        scientist = Scientist.create(signer, task_id=ledger.task_id, validation=validation,
                                     config=config)
        scientist.check_target(scientist.measure(initial_weights))
        session = cls(ledger, scientist)
        escrow = scientist.terms.money.escrow
        ledger.append_operator([("fund", {
            "account": scientist.key_id, "amount": escrow,
            "memo": "Scientist's payment for the task's escrow, received outside the ledger",
        })])
        ledger.append_signed(signer, [("offer", scientist.offer_fields(model_digest=model_digest))])
        ledger.append_operator([("escrow", {"task_id": ledger.task_id,
                                            "account": scientist.key_id, "amount": escrow})])
        session.append_score(*scientist.score_fields(0, initial_weights))
        log(INFO, "poi market: reward %s, escrow %s, %s validation examples committed",
            scientist.terms.reward, escrow, len(validation))
        return session

    # ------------------------------------------------------------------ rounds
    def publish_score(self, server_round: int, weights: Mapping[str, np.ndarray], *,
                      base: Mapping[str, np.ndarray],
                      deltas: Sequence[Mapping[str, np.ndarray]]) -> int:
        """The Scientist's signed ``score`` for the model after ``server_round`` (its
        Shapley orderings, when the round needs them, are drawn from the ledger root of
        the tree whose last leaf is the round's ``model`` entry, whatever came since)."""
        size = self.ledger.model_sizes.get(server_round)
        fields, game_losses = self.scientist.score_fields(
            server_round, weights, base, deltas,
            root=self.ledger.root(size) if size is not None else None)
        self.append_score(fields, game_losses)
        self.last_round = server_round
        return int(fields["loss_micro"])

    def append_score(self, fields: Mapping[str, Any], game_losses: bytes | None) -> None:
        """Store the round-game losses blob, then append the ``score`` entry naming it
        (blob first: a crash between the two leaves an unnamed blob, never a ledger
        naming a blob that is not there)."""
        if game_losses is not None:
            digest = self.ledger.blobs.put(game_losses)
            assert fields.get(GAME_LOSSES_DIGEST) == digest, "score names another blob"
        self.ledger.append_signed(self.scientist.signer, [("score", fields)])

    def publish_marginals(self, server_round: int, base: Mapping[str, np.ndarray], *,
                          trusted_mean: Mapping[str, np.ndarray], trusted_size: int,
                          base_digest: str, trusted_digest: str,
                          aggregate_digest: str, candidate_ids: Sequence[str],
                          deltas: Sequence[Mapping[str, np.ndarray]], members: Sequence[bool]
                          ) -> dict[str, int] | None:
        """The Scientist's signed ``validation_marginals`` for this round's candidates,
        published after the ballots are on the ledger; None when it withholds them."""
        fields = self.scientist.marginal_fields(
            server_round, base, trusted_mean=trusted_mean, trusted_size=trusted_size,
            base_digest=base_digest, trusted_digest=trusted_digest,
            aggregate_digest=aggregate_digest, candidate_ids=candidate_ids, deltas=deltas,
            members=members)
        if fields is None:
            return None
        self.ledger.append_signed(self.scientist.signer, [("validation_marginals", fields)])
        return dict(fields["marginals_micro"])

    @property
    def should_stop(self) -> bool:
        return self.scientist.patience_exhausted

    # ------------------------------------------------------------------- close
    def close(self, *, reason: str, grid: Any = None) -> Closing:
        """Close training, let the Scientist reveal (or not), record the deadline when
        no reveal came, then compute and record the settlement; with ``grid``, every
        subscriber then witnesses the final checkpoint (``RoundLedger.witness_final``)."""
        ledger = self.ledger
        ledger.append_operator([("close", {"task_id": ledger.task_id, "round": self.last_round,
                                           "reason": reason})])
        blob = self.scientist.reveal_blob()
        if blob is not None:
            digest = ledger.blobs.put(blob)
            ledger.append_signed(self.scientist.signer, [("reveal", {
                "task_id": ledger.task_id, "validation_digest": digest,
                "count": len(self.scientist.validation)})])
        else:
            # In deployment the operator waits reveal-deadline-rounds rounds of its clock
            # first; in simulation the withholding Scientist is known at once.
            log(WARNING, "poi market: no reveal; the deadline passes")
            ledger.append_operator([("deadline", {
                "task_id": ledger.task_id,
                "round": self.last_round + self.scientist.terms.reveal_deadline_rounds})])
        record, result = self.read()
        settlement, losses = settlement_of(record, result)
        ledger.append_operator([("settlement",
                                 settlement_fields(ledger.task_id, settlement, losses))])
        if settlement.forfeited:
            log(WARNING, "poi market: the Scientist forfeits (%s)", settlement.reason)
        if grid is not None:
            witnesses = ledger.witness_final(grid)
            log(INFO, "poi market: %s of %s subscribers cosigned the final checkpoint",
                witnesses, len(ledger.node_author))
        return Closing(settlement=settlement, record=record, replay=result)

    def read(self) -> tuple[MarketRecord, Replay]:
        record = read_market(self.ledger.log_.entries())
        return record, replay(record, self.ledger.blobs)

    def summary(self, closing: Closing) -> dict[str, Any]:
        s = closing.settlement
        return {
            "scientist": self.scientist.key_id, "reward": self.scientist.terms.reward,
            "escrow": self.scientist.terms.money.escrow, "forfeited": s.forfeited,
            "reason": s.reason, "payouts": s.payouts, "scientist_refund": s.scientist_refund,
            "fraction_micro": s.fraction.numerator * 1_000_000 // s.fraction.denominator,
            "published_loss_micro": dict(self.scientist.published),
            "payout_rule": closing.record.offer.get("payout", {"rule": "v1"}),
            # Per round, each applied update's credit (micro loss units, after the rule's
            # gates) and the closed-form Taylor estimate beside it (rule v2).
            "round_credits_micro": {
                str(t): {a: round(float(v), 3) for a, v in shares.items()}
                for t, shares in sorted(s.round_credits.items())},
            "taylor_micro": {
                str(t): {closing.record.author_of(t, d): round(v, 3) for d, v in zip(
                    closing.record.selections[t].selected, values, strict=True)}
                for t, values in sorted(closing.replay.taylor.items())
                if t in closing.record.selections},
        }
