"""The Scientist's side of a task (docs/market.md): the task's terms in minor units
(:class:`MarketTerms`, from the run config or an ``offer``), the model architecture the
offer names, and :class:`Scientist`, which holds its own Ed25519 key and the private
validation set, commits to every example (salted SHA-256, a Merkle root in the
``offer``), publishes the validation loss of every round's model (``score``, micro-units,
float64 on CPU; the round-game losses in a blob the entry names) and reveals the set at
the end (``reveal`` + blob). Also the loss functions the replay shares with it
(:func:`loss_micro`, :func:`coalition_losses`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from client.config import RunConfig
from client.marginal import marginal_ballot
from client.task import (
    Dataset,
    candidate_losses,
    evaluate,
    model_of,
    set_weights,
)
from client.witness import to_micro
from crypto.commitments import (
    Revealed,
    commitments,
    encode_reveal,
    new_salts,
)
from crypto.digests import tensors_digest
from ledger.entries import sign_entry
from ledger.keys import Signer
from ledger.merkle import hash_leaf, root_from_leaf_hashes
from server.market.attribution import (
    draw_permutations,
    fixed_k_coalition_losses,
    permutation_seed,
    prefix_losses,
)
from server.market.game_losses import GAME_LOSSES_DIGEST, GameLosses, encode_game_losses
from server.market.settlement import (
    PayoutRule,
    Terms,
)
from server.round.marginal import marginal_config_of
from server.round.selection import apply_updates

SCIENTIST_BEHAVIOURS = ("honest", "inflate-score", "tamper-reveal", "withhold-reveal",
                        "false-marginals", "withhold-marginals")
MAX_TOLERANCE_MICRO = 1000  # a score may be off by 0.001 at most, whatever the offer says
INFLATE_FACTOR = 1.02  # an inflating Scientist publishes 2% more loss than it measured
COALITION_BATCH = 512  # coalition models per vectorised pass


class MarketError(ValueError):
    """A ledger that does not describe a market (no offer, two offers, ...)."""


# ----------------------------------------------------------------------------- terms
@dataclass(frozen=True)
class MarketTerms:
    reward: int
    update_fee: int
    max_updates: int
    buyer_fee: int
    scientist_fee_share_ppm: int
    reveal_deadline_rounds: int
    score_tolerance_micro: int
    patience: int

    @classmethod
    def from_config(cls, config: RunConfig) -> MarketTerms:
        return cls(
            reward=config.reward, update_fee=config.update_fee,
            max_updates=config.num_subscribers * config.num_server_rounds,
            buyer_fee=config.buyer_fee, scientist_fee_share_ppm=config.scientist_fee_share_ppm,
            reveal_deadline_rounds=config.reveal_deadline_rounds,
            score_tolerance_micro=config.score_tolerance_micro, patience=config.patience,
        )

    @property
    def money(self) -> Terms:
        return Terms(reward=self.reward, deposit=self.reward, update_fee=self.update_fee,
                     max_updates=self.max_updates)

    @classmethod
    def from_offer(cls, offer: Mapping[str, Any]) -> MarketTerms:
        return cls(**{name: int(offer[name]) for name in cls.__dataclass_fields__})


def payout_rule_of(config: RunConfig) -> PayoutRule:
    """The payout rule a run's config asks for (``mean``: the legacy rule v1, no
    ``payout`` field in the offer)."""
    if config.payout_game == "mean":
        return PayoutRule.legacy(target_loss_micro=config.target_loss_micro)
    return PayoutRule(game="fixed-k", exact_max=config.shapley_exact_max,
                      permutations=config.shapley_permutations,
                      loss_rise=config.payout_loss_rise, vote_gate=config.payout_vote_gate,
                      high_water=config.payout_high_water,
                      target_loss_micro=config.target_loss_micro)


def architecture_of(config: RunConfig) -> dict[str, Any]:
    schema = config.schema
    return {"family": "poly-mlp", "input_dim": schema.features,
            "hidden_units": config.hidden_units, "activation": config.activation,
            "num_classes": schema.classes}


def validation_root(revealed: Revealed) -> str:
    """Hex RFC 9162 Merkle root over the examples' commitments."""
    return root_from_leaf_hashes([hash_leaf(c) for c in commitments(revealed)]).hex()


def loss_micro(weights: Mapping[str, np.ndarray], data: Dataset, *,
               architecture: Mapping[str, Any]) -> int:
    """Validation loss of ``weights`` in micro-units (float64 on CPU, see ``evaluate``)."""
    model = model_of(architecture)
    try:
        set_weights(model, weights)
        loss, _ = evaluate(model, data)
        return to_micro(loss)
    except (RuntimeError, KeyError, ValueError, IndexError, OverflowError) as exc:
        raise MarketError(f"model does not fit the offer's architecture or data: {exc}") from exc


def validation_marginals(base: Mapping[str, np.ndarray], data: Dataset, *,
                         architecture: Mapping[str, Any], trusted_mean: Mapping[str, np.ndarray],
                         trusted_size: int, deltas: Sequence[Mapping[str, np.ndarray]],
                         members: Sequence[bool]) -> list[int]:
    """Marginal of every candidate on ``data`` in micro-units (``client.marginal``); the
    Scientist publishes these and ``poi audit`` recomputes them after the reveal."""
    model = model_of(architecture)
    try:
        values = marginal_ballot(model, base, trusted_mean, trusted_size, deltas, members, data)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise MarketError(f"updates do not fit the offer's architecture or data: {exc}") from exc
    return [to_micro(v) for v in values]


def coalition_losses(base: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]],
                     data: Dataset, *, architecture: Mapping[str, Any]) -> dict[int, int]:
    """Loss of ``base`` plus the mean of every non-empty coalition of ``deltas`` (bit i =
    ``deltas[i]``), exactly as the strategy applies them (float32 weights), evaluated in
    batches of one vectorised pass (:func:`client.task.candidate_losses`). The full
    coalition is the round's model: its loss comes from :func:`loss_micro`, so it equals
    the round's score to the last bit."""
    model = model_of(architecture)
    masks = [sum(1 << i for i in members) for size in range(1, len(deltas) + 1)
             for members in combinations(range(len(deltas)), size)]
    full = (1 << len(deltas)) - 1
    out: dict[int, int] = {}
    base64_ = {k: np.asarray(v) for k, v in base.items()}
    for start in range(0, len(masks), COALITION_BATCH):
        chunk = [m for m in masks[start:start + COALITION_BATCH] if m != full]
        shifted = []
        for mask in chunk:
            weights = apply_updates(base64_, [deltas[i] for i in range(len(deltas))
                                              if mask >> i & 1])
            shifted.append({k: weights[k].astype(np.float64) - base64_[k].astype(np.float64)
                            for k in weights})
        if not shifted:
            continue
        try:
            _, losses = candidate_losses(model, base64_, shifted, data)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise MarketError(f"updates do not fit the offer's architecture: {exc}") from exc
        out.update({mask: to_micro(float(v)) for mask, v in zip(chunk, losses, strict=True)})
    out[full] = loss_micro(apply_updates(base64_, list(deltas)), data, architecture=architecture)
    return dict(sorted(out.items()))


def round_game_losses(rule: PayoutRule, base: Mapping[str, np.ndarray],
                      deltas: Sequence[Mapping[str, np.ndarray]], data: Dataset, *,
                      architecture: Mapping[str, Any], loss: int, root: bytes | None,
                      server_round: int) -> tuple[dict[int, int], list[list[int]] | None]:
    """What ``rule`` needs from the validation set to split a round of ``deltas`` (the
    round's model scoring ``loss``): every coalition's loss (rule v1's mean game, or the
    fixed-k game up to ``exact_max`` updates), or beyond ``exact_max`` the prefix losses
    of the orderings drawn from ``root``. The Scientist publishes these and the replay
    recomputes them with this same function."""
    if len(deltas) < 2:
        return {}, None
    if rule.game == "mean":
        return coalition_losses(base, deltas, data, architecture=architecture), None
    if len(deltas) <= rule.exact_max:
        coalitions = fixed_k_coalition_losses(base, deltas, data, architecture=architecture)
        coalitions[(1 << len(deltas)) - 1] = loss
        return coalitions, None
    if root is None:
        raise MarketError(f"round {server_round}: {len(deltas)} updates need the ledger root "
                          "after the round's model entry to draw the Shapley orderings")
    permutations = draw_permutations(permutation_seed(root, server_round), len(deltas),
                                     rule.permutations)
    return {}, prefix_losses(base, deltas, data, architecture=architecture,
                             permutations=permutations)


# ------------------------------------------------------------------------- scientist
@dataclass
class Scientist:
    """The task's owner: its key, its private validation set and the salts."""

    signer: Signer
    task_id: str
    validation: Dataset
    salts: np.ndarray
    architecture: dict[str, Any]
    terms: MarketTerms
    behaviour: str = "honest"
    best_loss: int | None = None
    rounds_without_gain: int = 0
    published: dict[int, int] = field(default_factory=dict)
    vote: dict[str, Any] = field(default_factory=dict)  # the offer's vote terms
    payout: PayoutRule = field(default_factory=PayoutRule.legacy)

    @classmethod
    def create(cls, signer: Signer, *, task_id: str, validation: Dataset, config: RunConfig
               ) -> Scientist:
        if config.scientist not in SCIENTIST_BEHAVIOURS:
            raise MarketError(f"expected scientist in {list(SCIENTIST_BEHAVIOURS)}, "
                              f"got {config.scientist!r}")
        return cls(signer=signer, task_id=task_id, validation=validation,
                   salts=new_salts(len(validation)), architecture=architecture_of(config),
                   terms=MarketTerms.from_config(config), behaviour=config.scientist,
                   vote=(marginal_config_of(config).to_terms() if config.vote_rule == "marginal"
                         else {}),
                   payout=payout_rule_of(config))

    @property
    def key_id(self) -> str:
        return self.signer.key_id

    @property
    def revealed(self) -> Revealed:
        return Revealed(x=np.asarray(self.validation.x, dtype=np.float32),
                        y=np.asarray(self.validation.y, dtype=np.int64), salts=self.salts)

    def offer_fields(self, *, model_digest: str) -> dict[str, Any]:
        terms = self.terms
        return {
            "task_id": self.task_id, "model_digest": model_digest,
            "architecture": self.architecture,
            "validation_root": validation_root(self.revealed),
            "validation_count": len(self.validation),
            "reward": terms.reward, "deposit": terms.reward, "update_fee": terms.update_fee,
            "max_updates": terms.max_updates, "buyer_fee": terms.buyer_fee,
            "scientist_fee_share_ppm": terms.scientist_fee_share_ppm,
            "reveal_deadline_rounds": terms.reveal_deadline_rounds,
            "score_tolerance_micro": terms.score_tolerance_micro, "patience": terms.patience,
            **({"vote": self.vote} if self.vote else {}),
            **({"payout": self.payout.to_terms()} if self.payout.game == "fixed-k" else {}),
            **({"target_loss_micro": self.payout.target_loss_micro}
               if self.payout.target_loss_micro else {}),
        }

    def check_target(self, initial_loss_micro: int) -> None:
        """Refuse a target loss L* the initial model already reaches (the paid fraction
        (L0 - L_T) / (L0 - L*) would divide by zero or pay for nothing)."""
        target = self.payout.target_loss_micro
        if target >= initial_loss_micro:
            raise MarketError(f"offer: expected target_loss_micro below the initial model's "
                              f"validation loss L0 = {initial_loss_micro}, got {target}")

    def measure(self, weights: Mapping[str, np.ndarray]) -> int:
        return loss_micro(weights, self.validation, architecture=self.architecture)

    def score_fields(self, server_round: int, weights: Mapping[str, np.ndarray],
                     base: Mapping[str, np.ndarray] | None = None,
                     deltas: Sequence[Mapping[str, np.ndarray]] = (),
                     root: bytes | None = None) -> tuple[dict[str, Any], bytes | None]:
        """The ``score`` entry for the model after ``server_round`` (round 0: the
        initial model) and the round-game losses blob it names. The entry carries the
        model's loss and, when several updates were applied, ``game_losses_digest``: the
        SHA-256 of the blob (:mod:`server.market.game_losses`) holding what the offer's
        payout rule needs to split the round: the loss of every coalition, or beyond
        ``exact_max`` updates the loss after each prefix of the orderings drawn from
        ``root`` (the ledger root after the round's ``model`` entry, kept inline as
        ``shapley_root``). The blob is None when the round has no game; the caller
        stores it before it appends the entry."""
        loss = self.measure(weights)
        coalitions: dict[int, int] = {}
        orderings: list[list[int]] = []
        root_hex = ""
        if base is not None:
            coalitions, prefixes = round_game_losses(
                self.payout, base, deltas, self.validation, architecture=self.architecture,
                loss=loss, root=root, server_round=server_round)
            if prefixes is not None:
                orderings, root_hex = prefixes, (root or b"").hex()
        if self.behaviour == "inflate-score" and server_round > 0:
            loss = int(loss * INFLATE_FACTOR)
            coalitions = {m: int(v * INFLATE_FACTOR) for m, v in coalitions.items()}
            orderings = [[int(v * INFLATE_FACTOR) for v in row] for row in orderings]
        self._track(loss)
        self.published[server_round] = loss
        game = GameLosses(coalitions_micro=dict(sorted(coalitions.items())),
                          prefix_losses_micro=orderings)
        blob = None if game.empty else encode_game_losses(game)
        return ({"task_id": self.task_id, "round": server_round, "loss_micro": loss,
                 "model_digest": tensors_digest(weights),
                 **({"shapley_root": root_hex} if root_hex else {}),
                 **({GAME_LOSSES_DIGEST: hashlib.sha256(blob).hexdigest()}
                    if blob is not None else {})},
                blob)

    def marginal_fields(self, server_round: int, base: Mapping[str, np.ndarray], *,
                        trusted_mean: Mapping[str, np.ndarray], trusted_size: int,
                        base_digest: str, trusted_digest: str,
                        aggregate_digest: str, candidate_ids: Sequence[str],
                        deltas: Sequence[Mapping[str, np.ndarray]], members: Sequence[bool]
                        ) -> dict[str, Any] | None:
        """The ``validation_marginals`` entry: for every candidate, how much including it
        in the trusted set's mean lowers the validation loss (micro-units), computed as
        the voters compute their ballots. None when this Scientist withholds them."""
        if self.behaviour == "withhold-marginals":
            return None
        values = validation_marginals(base, self.validation, architecture=self.architecture,
                                      trusted_mean=trusted_mean, trusted_size=trusted_size,
                                      deltas=deltas, members=members)
        if self.behaviour == "false-marginals":
            values = [-v for v in values]
        return {"task_id": self.task_id, "round": server_round,
                "base_digest": base_digest, "trusted_digest": trusted_digest,
                "aggregate_digest": aggregate_digest,
                "marginals_micro": dict(zip(candidate_ids, values, strict=True))}

    def _track(self, loss: int) -> None:
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss = loss
            self.rounds_without_gain = 0
        else:
            self.rounds_without_gain += 1

    @property
    def patience_exhausted(self) -> bool:
        """True once ``patience`` rounds in a row brought no new best loss (0 = never)."""
        return 0 < self.terms.patience <= self.rounds_without_gain

    def reveal_blob(self) -> bytes | None:
        """The reveal blob, per behaviour: None when withholding; one label changed when
        tampering (so its commitment no longer matches)."""
        if self.behaviour == "withhold-reveal":
            return None
        revealed = self.revealed
        if self.behaviour == "tamper-reveal":
            y = revealed.y.copy()
            y[0] = (y[0] + 1) % int(self.architecture["num_classes"])
            revealed = Revealed(x=revealed.x, y=y, salts=revealed.salts)
        return encode_reveal(revealed)

    def sign(self, kind: str, fields: Mapping[str, Any], *, seq: int) -> bytes:
        return sign_entry(self.signer, kind, seq=seq, fields=dict(fields))
