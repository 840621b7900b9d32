"""Reading a task's market back from the ledger (docs/market.md): :func:`read_market`
turns the entries into a :class:`MarketRecord` (pure), :func:`replay` recomputes the
models and the losses from the blobs and the revealed validation set,
:func:`settlement_of` decides the settlement (pure given the replay) and
:func:`balances` derives every account's balance (pure).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.config import ACTIVATIONS
from client.marginal import BallotError, trusted_digest
from client.schema import MAX_CLASSES, MAX_FEATURES
from client.task import Dataset, schema_of
from client.witness import to_micro
from crypto.commitments import (
    Revealed,
    RevealError,
    commitments,
    decode_reveal,
)
from crypto.digests import TensorEncodingError, parse_canonical_tensor_bytes, tensors_digest
from ledger.blobs import BlobStore, is_digest
from ledger.entries import Entry
from ledger.errors import LedgerError
from ledger.merkle import frontier_append, hash_leaf, root_from_frontier, root_from_leaf_hashes
from server.market.attribution import (
    AttributionError,
    draw_permutations,
    permutation_seed,
    taylor_shapley,
)
from server.market.game_losses import (
    GAME_LOSSES_DIGEST,
    GameLosses,
    GameLossesError,
    decode_game_losses,
    parse_coalitions,
    parse_prefix_rows,
)
from server.market.scientist import (
    MAX_TOLERANCE_MICRO,
    MarketError,
    MarketTerms,
    loss_micro,
    round_game_losses,
    validation_marginals,
)
from server.market.settlement import (
    FORFEIT_MISMATCH,
    FORFEIT_NO_REVEAL,
    FORFEIT_SCORE,
    PayoutRule,
    RoundOutcome,
    Settlement,
    SettlementError,
    settle,
)
from server.round.marginal import (
    MarginalConfig,
    RoundTally,
    TallyError,
    VoteState,
    mean_update,
    tally_round,
    trusted_set,
)
from server.round.selection import apply_updates


# ------------------------------------------------------------------ reading the ledger
@dataclass
class ScoreRecord:
    """The Scientist's ``score`` entry for a round. Its round-game losses are in the blob
    ``game_losses_digest`` names (:func:`published_game_losses` reads it) or, in a ledger
    written before that field, inline in the entry (``inline``); ``malformed`` says why
    the entry's round-game losses cannot be used at all."""

    index: int
    loss_micro: int
    model_digest: str
    shapley_root: str = ""  # hex; rounds beyond the rule's exact_max updates
    game_losses_digest: str = ""  # hex SHA-256 of the round-game losses blob
    inline: GameLosses = field(default_factory=GameLosses)  # old ledgers: in the entry
    malformed: str = ""


@dataclass
class SelectionRecord:
    selected: list[str]  # update digests, in selection order
    scored: list[str]  # update digests of every scored (valid) candidate
    fields: dict[str, Any] = field(default_factory=dict)  # the entry, for the vote replay


@dataclass
class BallotRecord:
    """A voter's signed marginal ballot (vote-rule marginal)."""

    index: int
    base_digest: str
    trusted_digest: str
    aggregate_digest: str
    trusted_size: int
    marginals_micro: dict[str, int]


@dataclass
class MarginalsRecord:
    """The Scientist's signed validation marginals for a round (``malformed``: an entry
    whose numbers no replay can use; it counts as withheld)."""

    index: int
    base_digest: str
    trusted_digest: str
    aggregate_digest: str
    marginals_micro: dict[str, int]
    malformed: bool = False


@dataclass
class MarketRecord:
    """What the ledger says about a task's market, in log order."""

    task_id: str = ""
    operator: str = ""
    initial_model_digest: str = ""
    scientist: str = ""
    offer: dict[str, Any] = field(default_factory=dict)
    offer_index: int = -1
    escrowed: int = 0
    candidates: dict[tuple[int, str], str] = field(default_factory=dict)  # -> author
    selections: dict[int, SelectionRecord] = field(default_factory=dict)
    models: dict[int, str] = field(default_factory=dict)
    scores: dict[int, ScoreRecord] = field(default_factory=dict)
    close_round: int | None = None
    close_reason: str = ""
    reveal: dict[str, Any] = field(default_factory=dict)
    reveal_index: int | None = None
    deadline_index: int | None = None
    settlement: dict[str, Any] = field(default_factory=dict)
    settlement_index: int | None = None
    problems: list[str] = field(default_factory=list)
    conflicting_scores: set[int] = field(default_factory=set)
    ballots: dict[int, dict[str, BallotRecord]] = field(default_factory=dict)  # round, voter
    marginals: dict[int, MarginalsRecord] = field(default_factory=dict)
    model_roots: dict[int, str] = field(default_factory=dict)  # ledger root after `model`

    @property
    def terms(self) -> MarketTerms:
        return MarketTerms.from_offer(self.offer)

    @property
    def payout(self) -> PayoutRule:
        return PayoutRule.from_offer(self.offer)

    @property
    def last_round(self) -> int:
        if self.close_round is not None:
            return self.close_round
        return max(self.models, default=0)

    def author_of(self, server_round: int, digest: str) -> str:
        return self.candidates.get((server_round, digest), "")


MAX_SELECTED = 16  # rule v1: exact Shapley over at most this many updates per round
MAX_SELECTED_V2 = 4096  # rule v2: sampled Shapley beyond exact_max


def _selection_cap(offer: Mapping[str, Any]) -> int:
    """The most updates a round may apply: 16 when the settlement enumerates every
    coalition (rule v1), else the marginal vote's max_accepted (the Scientist's own
    bound), at most MAX_SELECTED_V2."""
    try:
        rule = PayoutRule.from_offer(offer)
    except SettlementError:
        return MAX_SELECTED
    if rule.game != "fixed-k":
        return MAX_SELECTED
    vote = offer.get("vote")
    if isinstance(vote, Mapping) and isinstance(vote.get("max_accepted"), int):
        return max(1, min(MAX_SELECTED_V2, int(vote["max_accepted"])))
    return MAX_SELECTED


INLINE_GAME_FIELDS = ("coalitions_micro", "prefix_losses_micro")  # before the blob


def _read_score(record: MarketRecord, index: int, f: Mapping[str, Any]) -> ScoreRecord:
    """A score entry's record: its round-game losses named by ``game_losses_digest`` or,
    in a ledger written before that field, inline (``coalitions_micro``,
    ``prefix_losses_micro``, read as they always were). Both at once, or a digest that
    is not a lowercase SHA-256 hex string, is malformed (a problem, and a score
    mismatch in the replay)."""
    rnd = int(f["round"])
    score = ScoreRecord(index=index, loss_micro=int(f["loss_micro"]),
                        model_digest=str(f.get("model_digest", "")),
                        shapley_root=str(f.get("shapley_root", "")))
    digest = f.get(GAME_LOSSES_DIGEST)
    inline = [name for name in INLINE_GAME_FIELDS if name in f]
    if digest is not None:
        if inline:
            score.malformed = (f"score entry {index} carries both {GAME_LOSSES_DIGEST} and "
                               f"the inline {inline}, expected one of them")
        elif not is_digest(digest):
            score.malformed = (f"score entry {index}: expected {GAME_LOSSES_DIGEST} as a "
                               f"lowercase SHA-256 hex digest, got {str(digest)[:80]!r}")
        else:
            score.game_losses_digest = digest
        if score.malformed:
            record.problems.append(f"entry {index}: round {rnd}: {score.malformed}")
        return score
    coalitions: dict[int, int] = {}
    prefixes: list[list[int]] = []
    try:
        coalitions = parse_coalitions(f.get("coalitions_micro", {}))
    except GameLossesError:
        record.problems.append(f"entry {index}: malformed coalitions_micro")
    try:
        prefixes = parse_prefix_rows(f.get("prefix_losses_micro", []))
    except GameLossesError:
        record.problems.append(f"entry {index}: malformed prefix_losses_micro")
    score.inline = GameLosses(coalitions_micro=coalitions, prefix_losses_micro=prefixes)
    return score


def _amounts(value: object) -> dict[str, int] | None:
    """A key id -> non-negative integer mapping, or None when it is not one."""
    if not isinstance(value, dict):
        return None
    out = {}
    for key, amount in value.items():
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            return None
        out[str(key)] = amount
    return out


MAX_MARGINAL_MICRO = 100_000_000  # |marginal| <= 100 nats, as the strategy checks


def _micro_map(value: object) -> dict[str, int] | None:
    """A candidate id -> integer (|x| <= MAX_MARGINAL_MICRO) mapping, or None."""
    if not isinstance(value, dict):
        return None
    out = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, int) or abs(item) > MAX_MARGINAL_MICRO:
            return None
        out[str(key)] = item
    return out


def _read_ballot(record: MarketRecord, index: int, author: str, f: Mapping[str, Any]) -> None:
    rnd = int(f["round"])
    values = _micro_map(f["marginals_micro"])
    trusted_size = f["trusted_size"]
    if author in (record.operator, record.scientist):
        record.problems.append(f"entry {index}: a ballot by the operator or Scientist, ignored")
    elif values is None or isinstance(trusted_size, bool) or trusted_size < 1:
        record.problems.append(f"entry {index}: malformed ballot, ignored")
    elif author in record.ballots.get(rnd, {}):
        record.problems.append(f"entry {index}: a second ballot by {author[:16]} in round "
                               f"{rnd}, ignored")
    else:
        record.ballots.setdefault(rnd, {})[author] = BallotRecord(
            index=index, base_digest=str(f["base_digest"]),
            trusted_digest=str(f["trusted_digest"]),
            aggregate_digest=str(f["aggregate_digest"]), trusted_size=int(trusted_size),
            marginals_micro=values)


def read_market(entries: Iterable[tuple[int, Entry]]) -> MarketRecord:
    """Collect the market's entries, in log order, up to the settlement (market entries
    after it are findings, not inputs). Entries whose author has no standing (a score not
    by the Scientist, a settlement not by the operator, ...) are recorded as problems and
    ignored, and so are a reveal before ``close`` and a ``deadline`` that comes too early.
    Raises :class:`MarketError` when there is no task or offer, or when the operator's
    own entries contradict each other (two models for a round, a ``close`` that is not
    the last round run)."""
    record = MarketRecord()
    conflicting: set[int] = set()
    frontier: list[bytes] = []
    size = 0  # leaves folded into the frontier (the root after each model entry)
    for index, entry in entries:
        if index == size:
            frontier, _ = frontier_append(frontier, size=size, leaf_hash=hash_leaf(entry.leaf))
            size += 1
        f = entry.fields
        kind, author = entry.kind, entry.author
        if kind == "task":
            if record.task_id:
                record.problems.append(f"entry {index}: a second task entry")
                continue
            record.task_id, record.operator = str(f["task_id"]), author
            record.initial_model_digest = str(f.get("model_digest", ""))
            continue
        if kind == "ballot" and record.task_id and f.get("task_id") == record.task_id \
                and record.settlement_index is None:
            _read_ballot(record, index, author, f)
            continue
        if kind in ("fund", "key", "cosignature", "vote", "rejection", "fee_settlement") \
                or not record.task_id:
            continue
        if f.get("task_id") != record.task_id:
            record.problems.append(f"entry {index}: {kind} for another task {f.get('task_id')!r}")
            continue
        if record.settlement_index is not None:
            record.problems.append(f"entry {index}: {kind} after the settlement, ignored")
            continue
        by_operator = author == record.operator
        server_round = f.get("round")
        if isinstance(server_round, int) and not 0 <= server_round <= 10**6:
            raise MarketError(f"entry {index}: {kind} for round {server_round}, "
                              f"expected 0..1000000")
        if kind == "offer":
            if record.offer:
                record.problems.append(f"entry {index}: a second offer")
            elif by_operator:
                record.problems.append(f"entry {index}: an offer by the operator, not a Scientist")
            else:
                record.offer, record.scientist, record.offer_index = dict(f), author, index
        elif kind == "escrow" and by_operator:
            if record.scientist and f["account"] == record.scientist:
                record.escrowed += int(f["amount"])
            else:
                record.problems.append(f"entry {index}: escrow from {str(f['account'])[:16]}, "
                                       "not from the Scientist after its offer")
        elif kind == "candidate":
            record.candidates.setdefault((int(f["round"]), str(f["update_digest"])), author)
        elif kind == "selection" and by_operator:
            rnd = int(f["round"])
            if rnd in record.selections:
                raise MarketError(f"entry {index}: a second selection for round {rnd}")
            selected = [str(d) for d in f["selected"]]
            limit = _selection_cap(record.offer)
            if len(selected) > limit or len(set(selected)) != len(selected):
                raise MarketError(f"entry {index}: expected at most {limit} distinct "
                                  f"selected updates, got {len(selected)}")
            scored = f.get("scores_micro", {})
            record.selections[rnd] = SelectionRecord(
                selected=selected, scored=sorted(scored) if isinstance(scored, dict) else [],
                fields=dict(f))
        elif kind == "model" and by_operator:
            rnd = int(f["round"])
            if rnd in record.models:
                raise MarketError(f"entry {index}: a second model for round {rnd}")
            record.models[rnd] = str(f["model_digest"])
            if index + 1 == size:
                record.model_roots[rnd] = root_from_frontier(frontier).hex()
        elif kind == "score" and author == record.scientist and record.scientist:
            rnd = int(f["round"])
            score = _read_score(record, index, f)
            known = record.scores.get(rnd)
            if known is None:
                record.scores[rnd] = score
            elif (known.loss_micro, known.shapley_root, known.game_losses_digest,
                  known.inline, known.malformed) != (
                    score.loss_micro, score.shapley_root, score.game_losses_digest,
                    score.inline, score.malformed):
                conflicting.add(rnd)
                record.problems.append(f"entry {index}: a second, different score for round {rnd}")
        elif kind == "validation_marginals" and author == record.scientist and record.scientist:
            rnd = int(f["round"])
            values = _micro_map(f["marginals_micro"])
            if rnd in record.marginals:
                conflicting.add(rnd)
                record.problems.append(f"entry {index}: second validation marginals for round "
                                       f"{rnd}")
            else:
                if values is None:
                    record.problems.append(f"entry {index}: malformed validation marginals")
                record.marginals[rnd] = MarginalsRecord(
                    index=index, base_digest=str(f["base_digest"]),
                    trusted_digest=str(f["trusted_digest"]),
                    aggregate_digest=str(f["aggregate_digest"]),
                    marginals_micro=values or {}, malformed=values is None)
        elif kind == "close" and by_operator and record.close_round is None:
            record.close_round, record.close_reason = int(f["round"]), str(f["reason"])
        elif kind == "reveal" and author == record.scientist and record.reveal_index is None:
            if record.close_round is None:
                record.problems.append(f"entry {index}: a reveal before close, ignored")
            else:
                record.reveal, record.reveal_index = dict(f), index
        elif kind == "deadline" and by_operator and record.deadline_index is None:
            due = (record.close_round or 0) + int(record.offer.get("reveal_deadline_rounds", 0))
            if record.close_round is None or int(f["round"]) < due:
                record.problems.append(f"entry {index}: a deadline before it was due (close "
                                       f"round + reveal_deadline_rounds = {due}), ignored")
            else:
                record.deadline_index = index
        elif kind == "settlement" and by_operator:
            names = ("payouts", "reward_payouts", "fee_payouts")
            if any(_amounts(f[n]) is None for n in names) or f["scientist_refund"] < 0:
                raise MarketError(f"entry {index}: settlement amounts must be integers >= 0")
            record.settlement, record.settlement_index = dict(f), index
        else:
            record.problems.append(f"entry {index}: {kind} by {author} ignored (no standing)")
    if not record.task_id:
        raise MarketError("expected a task entry in the ledger, found none")
    if not record.offer:
        raise MarketError("expected a Scientist's offer entry in the ledger, found none")
    check_offer(record.offer)
    ran = max([*record.models, *record.selections], default=0)
    if record.close_round is not None and record.close_round != ran:
        raise MarketError(f"close says round {record.close_round}, the ledger has selections "
                          f"and models up to round {ran}")
    record.conflicting_scores = conflicting
    return record


def check_offer(offer: Mapping[str, Any]) -> None:
    """Raise :class:`MarketError` for an offer no settlement or replay can use."""
    for name in MarketTerms.__dataclass_fields__:
        value = offer.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MarketError(f"offer: expected {name} as an integer >= 0, got {value!r}")
    if offer.get("deposit") != offer.get("reward"):
        raise MarketError(f"offer: expected a deposit equal to the reward ({offer.get('reward')}), "
                          f"got {offer.get('deposit')!r}")
    if int(offer["score_tolerance_micro"]) > MAX_TOLERANCE_MICRO:
        raise MarketError(f"offer: expected score_tolerance_micro <= {MAX_TOLERANCE_MICRO}, "
                          f"got {offer['score_tolerance_micro']}")
    arch = offer.get("architecture")
    if not isinstance(arch, dict) or arch.get("family") != "poly-mlp":
        raise MarketError(f"offer: expected a poly-mlp architecture, got {arch!r}")
    hidden, activation = arch.get("hidden_units"), arch.get("activation")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= 4096:
        raise MarketError(f"offer: expected hidden_units in 1..4096, got {hidden!r}")
    if activation not in ACTIVATIONS:
        raise MarketError(f"offer: expected activation in {list(ACTIVATIONS)}, got {activation!r}")
    for name, low, high in (("input_dim", 1, MAX_FEATURES), ("num_classes", 2, MAX_CLASSES)):
        value = arch.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise MarketError(f"offer: expected architecture {name} in {low}..{high}, "
                              f"got {value!r}")
    try:
        PayoutRule.from_offer(offer)
    except SettlementError as exc:
        raise MarketError(str(exc)) from exc
    if "vote" in offer:
        vote = offer["vote"]
        if not isinstance(vote, dict) or vote.get("rule") != "marginal":
            raise MarketError(f"offer: expected vote terms of the marginal rule, got {vote!r}")
        try:
            MarginalConfig.from_terms(vote)
        except TallyError as exc:
            raise MarketError(f"offer: {exc}") from exc


# ------------------------------------------------------------------------------ replay
@dataclass
class Replay:
    """What recomputing the task from the blobs gave."""

    mismatches: list[str] = field(default_factory=list)  # the ledger contradicts itself
    reveal_status: str = ""  # "valid", FORFEIT_MISMATCH or FORFEIT_NO_REVEAL, or "pending"
    reveal_detail: str = ""
    losses: dict[int, int] = field(default_factory=dict)  # round -> replayed loss (micro)
    coalitions: dict[int, dict[int, int]] = field(default_factory=dict)
    prefixes: dict[int, list[list[int]]] = field(default_factory=dict)  # sampled rounds
    # round -> the round-game losses the Scientist published (its score entry's blob, or
    # inline in an old ledger); a round whose numbers could not be read is absent.
    published: dict[int, GameLosses] = field(default_factory=dict)
    # The closed-form (second-order Taylor) Shapley estimate of every applied update, in
    # micro loss units, beside the credit (rule v2 only; a cross-check, never paid).
    taylor: dict[int, list[float]] = field(default_factory=dict)
    score_mismatches: list[str] = field(default_factory=list)  # published vs replayed
    weights: dict[str, np.ndarray] | None = None
    vote_rounds: dict[int, VoteRound] = field(default_factory=dict)  # marginal vote replayed


@dataclass
class VoteRound:
    """One round of the marginal vote as replayed from the ledger."""

    candidates: list[str]
    trusted: list[str]
    trusted_mean: dict[str, np.ndarray]
    aggregate_digest: str
    tally: RoundTally | None = None


def _tensors(blobs: BlobStore, digest: str, what: str) -> dict[str, np.ndarray]:
    try:
        return parse_canonical_tensor_bytes(blobs.get(digest))
    except (LedgerError, TensorEncodingError) as exc:
        raise MarketError(f"{what}: {exc}") from exc


def check_reveal(record: MarketRecord, blobs: BlobStore) -> tuple[str, str, Revealed | None]:
    """("valid" | FORFEIT_MISMATCH | FORFEIT_NO_REVEAL | "pending", why, the set)."""
    on_time = record.reveal_index is not None and (
        record.deadline_index is None or record.reveal_index < record.deadline_index)
    if not on_time:
        if record.deadline_index is not None:
            return FORFEIT_NO_REVEAL, "no reveal before the operator's deadline entry", None
        return "pending", "no reveal and no deadline yet", None
    try:
        revealed = decode_reveal(blobs.get(str(record.reveal["validation_digest"])))
    except (LedgerError, RevealError) as exc:
        return FORFEIT_MISMATCH, f"reveal blob: {exc}", None
    offer = record.offer
    x, y = revealed.x, revealed.y
    schema = schema_of(offer["architecture"])
    features, classes = schema.features, schema.classes
    if x.shape[1:] != (features,) or len(revealed) == 0 or not np.all(np.isfinite(x)) \
            or (len(y) and (y.min() < 0 or y.max() >= classes)):
        return (FORFEIT_MISMATCH, f"reveal: expected n >= 1 finite examples of {features} "
                f"features with labels 0..{classes - 1}, got x {x.shape}", None)
    if len(revealed) != int(offer["validation_count"]) or len(revealed) != int(
            record.reveal["count"]):
        return (FORFEIT_MISMATCH, f"reveal: expected {offer['validation_count']} examples, "
                f"got {len(revealed)}", None)
    leaves = commitments(revealed)
    root = root_from_leaf_hashes([hash_leaf(c) for c in leaves]).hex()
    if root != offer["validation_root"]:
        return (FORFEIT_MISMATCH, f"reveal: commitments' root {root[:16]} does not match the "
                f"offer's {str(offer['validation_root'])[:16]}", None)
    return "valid", "", revealed


def published_game_losses(record: MarketRecord, blobs: BlobStore
                          ) -> tuple[dict[int, GameLosses], list[str]]:
    """Every scored round's round-game losses as the Scientist published them: decoded
    from the blob its score entry names (present, hashing to its name, the canonical
    JSON of :mod:`server.market.game_losses`), or inline in a ledger written before the
    blob. A round whose numbers cannot be read is left out and named, with the blob,
    in the second list: numbers nobody can check are no published score (the replay
    counts them as a score mismatch; nothing is paid on them)."""
    published: dict[int, GameLosses] = {}
    problems: list[str] = []
    for server_round, score in sorted(record.scores.items()):
        if score.malformed:
            problems.append(f"round {server_round}: {score.malformed}")
            continue
        digest = score.game_losses_digest
        if not digest:
            published[server_round] = score.inline
            continue
        try:
            published[server_round] = decode_game_losses(blobs.get(digest))
        except (LedgerError, GameLossesError) as exc:
            problems.append(f"round {server_round}: game losses blob {digest} (score entry "
                            f"{score.index}) cannot be read: {exc}")
    return published, problems


def replay(record: MarketRecord, blobs: BlobStore) -> Replay:
    """Recompute every round's model from the initial weights and the selected updates,
    checking each against the ledger's ``model`` digests; with a valid reveal, recompute
    every published score (and coalition loss, read from the score's blob) and compare
    within the tolerance."""
    out = Replay()
    out.published, unreadable = published_game_losses(record, blobs)
    out.score_mismatches.extend(unreadable)
    status, detail, revealed = check_reveal(record, blobs)
    out.reveal_status, out.reveal_detail = status, detail
    data = (Dataset(x=revealed.x, y=revealed.y) if revealed is not None else None)
    tolerance = int(record.offer["score_tolerance_micro"])
    if record.initial_model_digest != record.offer["model_digest"]:
        out.mismatches.append("offer: model digest differs from the task entry's")
    try:
        weights = _tensors(blobs, record.initial_model_digest, "initial model")
    except MarketError as exc:
        out.mismatches.append(str(exc))
        return out

    def compare(server_round: int, replayed: int, coalitions: dict[int, int],
                prefixes: list[list[int]] | None = None) -> None:
        out.losses[server_round] = replayed
        out.coalitions[server_round] = coalitions
        if prefixes is not None:
            out.prefixes[server_round] = prefixes
        published = record.scores.get(server_round)
        if published is None:
            out.score_mismatches.append(f"round {server_round}: no score published")
            return
        if server_round in record.conflicting_scores:
            out.score_mismatches.append(f"round {server_round}: two different scores published")
        game = out.published.get(server_round)  # None: unreadable, already a mismatch
        if game is not None and coalitions \
                and game.coalitions_micro.get(max(coalitions)) != published.loss_micro:
            out.score_mismatches.append(
                f"round {server_round}: the full coalition's published loss differs from the "
                f"round's score {published.loss_micro}")
        if abs(published.loss_micro - replayed) > tolerance:
            out.score_mismatches.append(
                f"round {server_round}: published loss {published.loss_micro} micro, replay "
                f"gives {replayed} (tolerance {tolerance})")
        if game is None:
            return
        for mask, value in coalitions.items():
            claimed = game.coalitions_micro.get(mask)
            if claimed is None or abs(claimed - value) > tolerance:
                out.score_mismatches.append(
                    f"round {server_round}: coalition {mask} published {claimed}, "
                    f"replay gives {value}")
                break
        if prefixes is not None:
            _compare_prefixes(out, published.shapley_root, game.prefix_losses_micro,
                              server_round, prefixes, record.model_roots.get(server_round, ""),
                              tolerance)

    try:
        out.mismatches.extend(replay_vote(record, blobs, out.vote_rounds))
    except MarketError as exc:
        out.mismatches.append(str(exc))
    try:
        _replay_rounds(out, record, blobs, data, weights, compare)
    except (MarketError, AttributionError) as exc:
        out.mismatches.append(str(exc))
    return out


def _compare_prefixes(out: Replay, shapley_root: str, claimed: list[list[int]],
                      server_round: int, prefixes: list[list[int]], root_hex: str,
                      tolerance: int) -> None:
    """A sampled round's published orderings: drawn from the ledger root after the
    round's model entry (``shapley_root``), one list of k-1 prefix losses each
    (``claimed``), every loss within the tolerance of the replay's."""
    if shapley_root != root_hex:
        out.score_mismatches.append(
            f"round {server_round}: Shapley orderings drawn from root "
            f"{shapley_root[:16]!r}, the ledger's root after the model entry is "
            f"{root_hex[:16]!r}")
        return
    if [len(row) for row in claimed] != [len(row) for row in prefixes]:
        out.score_mismatches.append(
            f"round {server_round}: expected {len(prefixes)} orderings of "
            f"{len(prefixes[0]) if prefixes else 0} prefix losses, the score has "
            f"{len(claimed)}")
        return
    for p, (row, replayed) in enumerate(zip(claimed, prefixes, strict=True)):
        for position, (value, expected) in enumerate(zip(row, replayed, strict=True)):
            if abs(value - expected) > tolerance:
                out.score_mismatches.append(
                    f"round {server_round}: ordering {p} prefix {position + 1} published "
                    f"{value}, replay gives {expected}")
                return


# ------------------------------------------------------------------- the marginal vote
def replay_vote(record: MarketRecord, blobs: BlobStore,
                rounds_out: dict[int, VoteRound] | None = None) -> list[str]:
    """Recompute the marginal vote from the ledger (``server.round.marginal``) and return
    the operator's mismatches (empty when all agree): per round, the candidate list the
    ``selection`` entry names; the trusted set from the author scores so far and its
    mean (from the update blobs); every ballot must come from a key that submitted a
    candidate this round, before the Scientist's numbers, on the round's base model,
    trusted set and trusted mean, and (``votes_per_candidate`` 0) cover every candidate
    but the voter's own; then the tally, whose accepted set, scores, weights and author
    scores must equal the ``selection`` entry's. A round without usable Scientist's
    numbers must apply nothing and end the task (the Scientist's fault: :func:`replay`
    reports it as a missing score)."""
    vote = record.offer.get("vote")
    if not vote:
        return []
    config = MarginalConfig.from_terms(vote)
    state = VoteState()
    out: list[str] = []
    halted = False
    for rnd in range(1, record.last_round + 1):
        selection = record.selections.get(rnd)
        if selection is None:
            break
        if halted:
            out.append(f"round {rnd}: rounds ran after the Scientist withheld its numbers")
            break
        candidates = selection.fields.get("candidates")
        if not isinstance(candidates, list) or candidates != sorted(set(map(str, candidates))):
            if selection.selected or record.ballots.get(rnd):
                out.append(f"round {rnd}: the selection entry names no sorted candidate list")
                break
            _no_tally_fields(out, rnd, selection)
            continue  # a round with no valid candidate
        if not candidates:
            if selection.selected:
                out.append(f"round {rnd}: updates applied in a round with no candidates")
            _no_tally_fields(out, rnd, selection)
            continue  # nothing to vote on: no ballots, no numbers, nothing applied
        published = record.marginals.get(rnd)
        if published is None or published.malformed or \
                sorted(published.marginals_micro) != candidates:
            if selection.selected:
                out.append(f"round {rnd}: updates applied without the Scientist's usable "
                           "validation marginals")
            _no_tally_fields(out, rnd, selection)
            halted = True
            continue
        try:
            state = _replay_vote_round(out, record, blobs, rnd, candidates, published, state,
                                       config, rounds_out)
        except (MarketError, BallotError, TallyError) as exc:
            out.append(f"round {rnd}: {exc}")
            break
    return out


TALLY_FIELDS = ("trusted", "voter_weights_micro", "author_scores_micro")


def _no_tally_fields(out: list[str], rnd: int, selection: SelectionRecord) -> None:
    """A round the vote replay does not tally must not carry a tally's numbers (nobody
    could check them)."""
    present = [name for name in TALLY_FIELDS if name in selection.fields]
    if present:
        out.append(f"round {rnd}: the selection entry carries {present} in a round with no "
                   "tally")


def _replay_vote_round(out: list[str], record: MarketRecord, blobs: BlobStore, rnd: int,
                       candidates: list[str], published: MarginalsRecord, state: VoteState,
                       config: MarginalConfig, rounds_out: dict[int, VoteRound] | None
                       ) -> VoteState:
    selection = record.selections[rnd]
    authors = {c: record.author_of(rnd, c) for c in candidates}
    unsigned = [c[:16] for c, a in authors.items() if not a]
    if unsigned:
        raise MarketError(f"candidates without a signed candidate entry {unsigned}")
    trusted = trusted_set(authors, state.author_scores, min_trusted=config.min_trusted)
    if selection.fields.get("trusted") != trusted:
        out.append(f"round {rnd}: trusted set {len(trusted)} candidates by the replay, the "
                   f"selection entry says {len(selection.fields.get('trusted') or [])}")
    mean = mean_update([_tensors(blobs, c, f"round {rnd} update {c[:16]}") for c in trusted])
    expected = {"base": record.models.get(rnd - 1, record.initial_model_digest)
                if rnd > 1 else record.initial_model_digest,
                "trusted": trusted_digest(trusted), "aggregate": tensors_digest(mean)}
    signed = (published.base_digest, published.trusted_digest, published.aggregate_digest)
    if signed != (expected["base"], expected["trusted"], expected["aggregate"]):
        out.append(f"round {rnd}: the Scientist's numbers are for base/trusted/mean "
                   f"{[s[:12] for s in signed]}, the replay gives "
                   f"{[s[:12] for s in expected.values()]}")
    submitters = {a for (r, _), a in record.candidates.items() if r == rnd}
    ballots: dict[str, dict[str, int]] = {}
    for voter, ballot in sorted(record.ballots.get(rnd, {}).items()):
        where = f"round {rnd}: ballot of {voter[:16]}"
        if voter not in submitters:
            out.append(f"{where}: the key submitted no candidate this round")
            continue
        if ballot.index > published.index:
            out.append(f"{where}: comes after the Scientist's numbers (entry "
                       f"{ballot.index} > {published.index})")
            continue
        if (ballot.base_digest, ballot.trusted_digest, ballot.aggregate_digest,
                ballot.trusted_size) != (expected["base"], expected["trusted"],
                                         expected["aggregate"], len(trusted)):
            out.append(f"{where}: is on another base model, trusted set or trusted mean")
            continue
        own = {c for c, a in authors.items() if a == voter}
        if config.votes_per_candidate == 0 and set(ballot.marginals_micro) != set(authors) - own:
            out.append(f"{where}: scores {len(ballot.marginals_micro)} candidates, expected "
                       f"every candidate but its own ({len(set(authors) - own)})")
        ballots[voter] = ballot.marginals_micro
    tally = tally_round(state, authors=authors, ballots=ballots,
                       validation_micro=published.marginals_micro, config=config)
    if tally.accepted != selection.selected:
        out.append(f"round {rnd}: the tally accepts {[c[:12] for c in tally.accepted]}, "
                   f"the selection applied {[c[:12] for c in selection.selected]}")
    for name, replayed in (
            ("scores_micro", {c: to_micro(s) for c, s in tally.scores.items()}),
            ("voter_weights_micro", {v: to_micro(w) for v, w in tally.weights.items()}),
            ("author_scores_micro", {a: to_micro(s) for a, s in
                                     sorted(tally.state.author_scores.items())})):
        if selection.fields.get(name) != replayed:
            out.append(f"round {rnd}: {name} in the selection entry differ from the replay")
    if rounds_out is not None:
        rounds_out[rnd] = VoteRound(candidates=candidates, trusted=trusted, trusted_mean=mean,
                                    aggregate_digest=expected["aggregate"], tally=tally)
    return tally.state


def _replay_rounds(out: Replay, record: MarketRecord, blobs: BlobStore, data: Dataset | None,
                   weights: dict[str, np.ndarray], compare: Any) -> None:
    architecture = record.offer["architecture"]
    if data is not None:
        compare(0, loss_micro(weights, data, architecture=architecture), {})
    for server_round in range(1, record.last_round + 1):
        selection = record.selections.get(server_round)
        if selection is None:
            out.mismatches.append(f"round {server_round}: no selection entry")
            return
        try:
            deltas = [_tensors(blobs, d, f"round {server_round} update {d[:16]}")
                      for d in selection.selected]
        except MarketError as exc:
            out.mismatches.append(str(exc))
            return
        for digest in selection.selected:
            if not record.author_of(server_round, digest):
                out.mismatches.append(
                    f"round {server_round}: selected update {digest[:16]} has no signed candidate")
        base = weights
        try:
            weights = apply_updates(base, deltas)
        except (KeyError, ValueError) as exc:
            out.mismatches.append(f"round {server_round}: selected updates do not fit the "
                                  f"model ({type(exc).__name__}: {exc})")
            return
        digest = tensors_digest(weights)
        if record.models.get(server_round) != digest:
            out.mismatches.append(
                f"round {server_round}: replayed model {digest[:16]} does not match the "
                f"ledger's {str(record.models.get(server_round))[:16]}")
            return
        try:
            blobs.get(digest)
        except LedgerError as exc:
            out.mismatches.append(f"round {server_round}: model blob: {exc}")
        score = record.scores.get(server_round)
        if score is not None and score.model_digest and score.model_digest != digest:
            out.score_mismatches.append(f"round {server_round}: score is for another model")
        if data is not None:
            _check_marginals(out, record, blobs, data, base, server_round)
            loss = loss_micro(weights, data, architecture=architecture)
            root = record.model_roots.get(server_round)
            coalitions, prefixes = round_game_losses(
                record.payout, base, deltas, data, architecture=architecture, loss=loss,
                root=bytes.fromhex(root) if root is not None else None,
                server_round=server_round)
            compare(server_round, loss, coalitions, prefixes)
            if deltas and record.payout.game == "fixed-k":
                out.taylor[server_round] = [
                    1e6 * v for v in taylor_shapley(base, deltas, data,
                                                    architecture=architecture)]
    out.weights = weights


def orderings_of(record: MarketRecord, server_round: int, k: int) -> list[list[int]]:
    """The orderings a sampled round's Shapley value averages over, drawn from the
    ledger root after the round's ``model`` entry."""
    root = record.model_roots.get(server_round)
    if root is None:
        raise MarketError(f"round {server_round}: no ledger root after its model entry (the "
                          "entries are not the whole log)")
    return draw_permutations(permutation_seed(bytes.fromhex(root), server_round), k,
                             record.payout.permutations)


def _check_marginals(out: Replay, record: MarketRecord, blobs: BlobStore, data: Dataset,
                     base: Mapping[str, np.ndarray], server_round: int) -> None:
    """After the reveal: recompute the Scientist's validation marginals for the round and
    compare within the offer's tolerance (a false number forfeits like a false score).
    Ballots without marginals: the Scientist withheld them (a missing score)."""
    if not record.offer.get("vote"):
        return
    published = record.marginals.get(server_round)
    if published is None:
        if record.ballots.get(server_round):
            out.score_mismatches.append(
                f"round {server_round}: the Scientist published no validation marginals")
        return
    named = (record.selections.get(server_round) or SelectionRecord([], [])).fields.get(
        "candidates")
    if published.malformed or sorted(published.marginals_micro) != named:
        out.score_mismatches.append(
            f"round {server_round}: the Scientist's validation marginals are malformed or do "
            "not cover the round's candidates")
        return
    plan = out.vote_rounds.get(server_round)
    if plan is None:
        return  # the vote replay already reported why
    trusted = set(plan.trusted)
    deltas = [_tensors(blobs, c, f"round {server_round} update {c[:16]}")
              for c in plan.candidates]
    replayed = validation_marginals(
        base, data, architecture=record.offer["architecture"],
        trusted_mean=plan.trusted_mean, trusted_size=len(plan.trusted), deltas=deltas,
        members=[c in trusted for c in plan.candidates])
    tolerance = int(record.offer["score_tolerance_micro"])
    for candidate, value in zip(plan.candidates, replayed, strict=True):
        claimed = published.marginals_micro[candidate]
        if abs(claimed - value) > tolerance:
            out.score_mismatches.append(
                f"round {server_round}: validation marginal of {candidate[:16]} published "
                f"{claimed}, replay gives {value} (tolerance {tolerance})")
            return


# -------------------------------------------------------------------------- settlement
def round_outcomes(record: MarketRecord, losses: Mapping[int, int],
              coalitions: Mapping[int, Mapping[int, int]],
              prefixes: Mapping[int, Sequence[Sequence[int]]] | None = None
              ) -> list[RoundOutcome]:
    out = []
    rule = record.payout
    for server_round in range(1, record.last_round + 1):
        selection = record.selections.get(server_round, SelectionRecord([], []))
        selected = tuple(record.author_of(server_round, d) for d in selection.selected)
        orderings: tuple[tuple[int, ...], ...] = ()
        rows: tuple[tuple[int, ...], ...] = ()
        if prefixes is not None and rule.game == "fixed-k" and len(selected) > rule.exact_max:
            orderings = tuple(tuple(o) for o in orderings_of(record, server_round,
                                                             len(selected)))
            rows = tuple(tuple(r) for r in prefixes.get(server_round, ()))
        out.append(RoundOutcome(
            round=server_round,
            selected=selected,
            loss_micro=losses[server_round],
            coalitions_micro=dict(coalitions.get(server_round, {})),
            scored=tuple(sorted({record.author_of(server_round, d) for d in selection.scored}
                                - {""})),
            permutations=orderings, permutation_losses_micro=rows,
        ))
    return out


def final_author_scores(record: MarketRecord, result: Replay) -> dict[str, float] | None:
    """The marginal vote's verdict on every author after the last round, from the
    replayed tally (never from the operator's fields: a round the replay skips could
    carry any); None when the task ran another vote."""
    if not record.offer.get("vote"):
        return None
    if not result.vote_rounds:
        return {}
    return dict(result.vote_rounds[max(result.vote_rounds)].tally.state.author_scores)


def eligible_authors(record: MarketRecord, result: Replay) -> list[str] | None:
    """Who the vote gate lets be credited (final author score > 0); None: no gate."""
    scores = final_author_scores(record, result)
    if scores is None:
        return None
    return sorted(a for a, v in scores.items() if v > 0)


def settlement_of(record: MarketRecord, result: Replay) -> tuple[Settlement, list[int]]:
    """The settlement the rules give, and the losses [L0..LT] it used. Raises
    :class:`MarketError` while the reveal is pending or the replay failed."""
    if result.mismatches:
        raise MarketError(f"cannot settle: {result.mismatches[0]}")
    if result.reveal_status == "pending":
        raise MarketError("cannot settle: no reveal yet and the deadline has not passed")
    terms = record.terms.money
    rule = record.payout
    eligible = eligible_authors(record, result)
    rounds = range(0, record.last_round + 1)
    try:
        if result.reveal_status in (FORFEIT_MISMATCH, FORFEIT_NO_REVEAL):
            empty = {t: 0 for t in rounds}
            outcomes = round_outcomes(record, empty, {})
            return settle(terms, 1, outcomes, forfeit=result.reveal_status), []
        if result.score_mismatches:
            outcomes = round_outcomes(record, result.losses, result.coalitions, result.prefixes)
            return (settle(terms, result.losses[0], outcomes, forfeit=FORFEIT_SCORE,
                           rule=rule, eligible=eligible),
                    [result.losses[t] for t in rounds])
        published = {t: record.scores[t].loss_micro for t in rounds}
        unread = [t for t in rounds if t not in result.published]
        if unread:  # the replay's score mismatches say why; never pay on unread numbers
            raise MarketError(f"cannot settle: no readable round-game losses for rounds "
                              f"{unread}")
        coalitions = {t: result.published[t].coalitions_micro for t in rounds}
        prefixes = {t: result.published[t].prefix_losses_micro for t in rounds}
        outcomes = round_outcomes(record, published, coalitions, prefixes)
        return (settle(terms, published[0], outcomes, rule=rule, eligible=eligible),
                [published[t] for t in rounds])
    except SettlementError as exc:
        raise MarketError(f"cannot settle: {exc}") from exc


def settlement_fields(task_id: str, settlement: Settlement, losses: Sequence[int]
                      ) -> dict[str, Any]:
    return {
        "task_id": task_id, "forfeited": settlement.forfeited, "reason": settlement.reason,
        "payouts": settlement.payouts, "reward_payouts": settlement.reward_payouts,
        "fee_payouts": settlement.fee_payouts, "scientist_refund": settlement.scientist_refund,
        "losses_micro": list(losses),
    }


# ---------------------------------------------------------------------------- balances
def balances(entries: Iterable[tuple[int, Entry]], *, operator: str
             ) -> tuple[dict[str, int], list[str]]:
    """Every account's balance from the operator's ``fund``, ``escrow``, ``settlement``
    and ``fee_settlement`` entries (escrow held per task under ``escrow:<task id>``), and the
    entries that would have driven a balance below zero (refused, not applied)."""
    balance: dict[str, int] = {}
    violations: list[str] = []
    scientist_of: dict[str, str] = {}
    for index, entry in entries:
        f = entry.fields
        if entry.kind == "offer" and entry.author != operator:
            scientist_of.setdefault(str(f["task_id"]), entry.author)
        if entry.author != operator:
            continue
        for name in ("account", "buyer"):
            if str(f.get(name, "")).startswith("escrow:"):
                violations.append(f"entry {index}: {name} {f[name]!r} is reserved for escrow")
                break
        else:
            name = ""
        if name:
            continue
        if entry.kind in ("settlement", "fee_settlement") and _amounts(f["payouts"]) is None:
            violations.append(f"entry {index}: payouts must be integers >= 0")
            continue
        if entry.kind == "fund":
            amount = int(f["amount"])
            if amount <= 0:
                violations.append(f"entry {index}: fund of {amount}, expected > 0")
                continue
            balance[str(f["account"])] = balance.get(str(f["account"]), 0) + amount
        elif entry.kind == "escrow":
            account, amount = str(f["account"]), int(f["amount"])
            if amount < 0 or balance.get(account, 0) < amount:
                violations.append(f"entry {index}: escrow of {amount} from {account[:16]} "
                                  f"whose balance is {balance.get(account, 0)}")
                continue
            balance[account] -= amount
            pot = f"escrow:{f['task_id']}"
            balance[pot] = balance.get(pot, 0) + amount
        elif entry.kind == "fee_settlement":
            buyer, amount = str(f["buyer"]), int(f["amount"])
            payouts = {str(k): int(v) for k, v in dict(f["payouts"]).items()}
            if amount < 0 or balance.get(buyer, 0) < amount or sum(payouts.values()) != amount \
                    or min(payouts.values(), default=0) < 0:
                violations.append(f"entry {index}: fee settlement of {amount} from "
                                  f"{buyer[:16]} (balance {balance.get(buyer, 0)}) paying "
                                  f"{sum(payouts.values())}")
                continue
            balance[buyer] -= amount
            for who, paid in payouts.items():
                balance[who] = balance.get(who, 0) + paid
        elif entry.kind == "settlement":
            pot = f"escrow:{f['task_id']}"
            payouts = {str(k): int(v) for k, v in dict(f["payouts"]).items()}
            refund = int(f["scientist_refund"])
            total = sum(payouts.values()) + refund
            if total != balance.get(pot, 0) or min([refund, *payouts.values()]) < 0:
                violations.append(f"entry {index}: settlement pays {total}, escrow holds "
                                  f"{balance.get(pot, 0)}")
                continue
            balance[pot] = 0
            for who, amount in payouts.items():
                balance[who] = balance.get(who, 0) + amount
            scientist = scientist_of.get(str(f["task_id"]), "")
            balance[scientist] = balance.get(scientist, 0) + refund
    return {k: v for k, v in sorted(balance.items()) if v}, violations
