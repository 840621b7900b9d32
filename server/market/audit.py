"""``poi audit RUN_DIR``: the independent auditor of a task's market.

From the ledger, its blobs and the revealed validation set alone (no report, no key,
nothing the operator or the Scientist say outside the ledger) it

1. verifies the ledger itself (signatures, encodings, Merkle roots, checkpoints);
2. checks the escrow covers the offer's terms;
3. checks the revealed examples against the salted commitments' Merkle root;
4. replays the model from the initial weights through every selected update, checking
   each round's model digest, and recomputes every published score (and the round-game
   losses in the blob the score names) on the revealed set within the offer's tolerance;
5. recomputes the settlement (including any forfeiture) and compares it, amount by
   amount, with the operator's ``settlement`` entry;
6. checks every buyer fee settlement (the buyer's signed voucher, the amount, the
   split) and derives every balance, checking none ever goes below zero.

``ok`` is true only when everything matches; ``mismatches`` lists what did not, the
first one first. A Scientist's false score is not an audit failure when the
settlement recorded the forfeiture it causes: it is reported as ``findings``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from crypto import vouchers
from ledger import AuditReport, LedgerError, LogReader, verify_log
from ledger.blobs import BlobStore
from ledger.entries import BULK_FIELD, Entry
from server.market.fees import split_fee
from server.market.replay import (
    MarketRecord,
    balances,
    orderings_of,
    read_market,
    replay,
    settlement_fields,
    settlement_of,
)
from server.market.scientist import MarketError
from server.market.settlement import SettlementError, sampled_shapley
from server.round.report import write_json

LEDGER_FILE = "ledger.db"
AUDIT_FILE = "audit.json"


@dataclass
class MarketAudit:
    ok: bool = False
    mismatches: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    task_id: str = ""
    scientist: str = ""
    forfeited: bool | None = None
    reason: str = ""
    reveal: str = ""
    payouts: dict[str, int] = field(default_factory=dict)
    reward_payouts: dict[str, int] = field(default_factory=dict)
    fee_payouts: dict[str, int] = field(default_factory=dict)
    scientist_refund: int | None = None
    escrow: int = 0
    fraction_micro: int | None = None  # total fraction of convergence, in millionths
    losses_micro: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    ledger_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _compare_settlement(record: MarketRecord, expected: Mapping[str, Any]) -> list[str]:
    if record.settlement_index is None:
        return ["settlement: the ledger has no settlement entry"]
    out = []
    for name, want in expected.items():
        got = record.settlement.get(name)
        if got != want:
            out.append(f"settlement entry {record.settlement_index}: {name} is {got!r}, "
                       f"the rules give {want!r}")
    return out


# The blobs each entry kind names (digest fields); ``poi audit`` checks every one.
BLOB_FIELDS: dict[str, tuple[str, ...]] = {
    "task": ("config_digest", "model_digest"),
    "offer": ("model_digest",),
    "candidate": ("update_digest",),
    "model": ("model_digest",),
    "score": ("model_digest", "game_losses_digest"),
    "reveal": ("validation_digest",),
}


def named_blobs(entries: Sequence[tuple[int, Entry]]) -> list[str]:
    """Every blob digest the entries name (in :data:`BLOB_FIELDS`, and the bulk blob of
    an entry read as stored), first mention first."""
    found: dict[str, None] = {}
    for _, entry in entries:
        for name in (*BLOB_FIELDS.get(entry.kind, ()), BULK_FIELD):
            digest = entry.fields.get(name)
            if isinstance(digest, str):
                found.setdefault(digest)
    return list(found)


def check_blobs(entries: Sequence[tuple[int, Entry]], blobs: BlobStore) -> list[str]:
    """Every blob the ledger names is there and hashes to its name, whether or not the
    replay reads it (an unselected update, the config). Reported by name; a damaged
    reveal is damaged storage, not a settlement the rules do not give."""
    out: list[str] = []
    checked: dict[str, str | None] = {}
    for index, entry in entries:
        for name in BLOB_FIELDS.get(entry.kind, ()):
            digest = entry.fields.get(name)
            if not isinstance(digest, str):
                continue
            if digest not in checked:
                try:
                    blobs.get(digest)
                    checked[digest] = None
                except LedgerError as exc:
                    missing = "found none" in str(exc)
                    checked[digest] = "missing" if missing else "altered (damaged storage)"
            problem = checked[digest]
            if problem is not None:
                where = f"{entry.kind} entry {index}"
                if isinstance(entry.fields.get("round"), int):
                    where += f", round {entry.fields['round']}"
                out.append(f"blob {digest} ({where}, {name}): {problem}")
    return out


def check_fee_settlements(entries: Sequence[tuple[int, Entry]], record: MarketRecord
                          ) -> list[str]:
    """Each ``fee_settlement``: the buyer's voucher verifies with the buyer's key and
    says the recorded cumulative total; its nonce is above that of the buyer's previous
    settlement (a voucher is settled once: the service admits nonces in rising order, so
    a repeated or lower nonce is a replayed voucher); the amount is the increase since the
    buyer's previous settlement; the split is what ``server.market.fees.split_fee``
    gives."""
    out: list[str] = []
    keys: dict[str, bytes] = {}
    settled: dict[str, int] = {}
    nonces: dict[str, int] = {}  # buyer -> nonce of its previous settled voucher
    contributions = {str(k): v for k, v in record.settlement.get("payouts", {}).items()
                     if isinstance(v, int)}
    share = int(record.offer["scientist_fee_share_ppm"])
    for index, entry in entries:
        f = entry.fields
        if entry.kind == "key":
            keys[entry.author] = base64.b64decode(str(f["public_key"]))
            continue
        if entry.kind != "fee_settlement" or entry.author != record.operator:
            continue
        where = f"fee settlement entry {index}"
        buyer, voucher = str(f["buyer"]), dict(f["voucher"])
        if record.settlement_index is None or index < record.settlement_index:
            out.append(f"{where}: comes before the task's settlement")
            continue
        try:
            signature = base64.b64decode(str(f["voucher_signature"]), validate=True)
            if buyer not in keys:
                raise vouchers.VoucherError(f"buyer {buyer[:16]} has no key entry before it")
            vouchers.verify(keys[buyer], voucher, signature)
        except (vouchers.VoucherError, ValueError) as exc:
            out.append(f"{where}: {exc}")
            continue
        if voucher["buyer"] != buyer or voucher["cumulative"] != f["cumulative"] \
                or voucher["task_id"] != record.task_id:
            out.append(f"{where}: the voucher is for buyer {voucher['buyer'][:16]}, task "
                       f"{voucher['task_id'][:16]}, cumulative {voucher['cumulative']}, the "
                       f"entry says {buyer[:16]}, {record.task_id[:16]}, {f['cumulative']}")
            continue
        previous_nonce = nonces.get(buyer, -1)
        nonces[buyer] = max(previous_nonce, int(voucher["nonce"]))
        if voucher["nonce"] <= previous_nonce:
            out.append(f"{where}: voucher nonce {voucher['nonce']}, expected above "
                       f"{previous_nonce} (the buyer's previous settlement): a replayed "
                       "voucher")
            continue
        previous = settled.get(buyer, 0)
        settled[buyer] = int(f["cumulative"])  # the buyer-signed total, whatever follows
        if f["amount"] != f["cumulative"] - previous:
            out.append(f"{where}: amount {f['amount']}, expected {f['cumulative'] - previous} "
                       f"(cumulative {f['cumulative']} - previously settled {previous})")
            continue
        expected = split_fee(int(f["amount"]), scientist=record.scientist, share_ppm=share,
                             contributions=contributions)
        if dict(f["payouts"]) != expected:
            out.append(f"{where}: payouts {dict(f['payouts'])}, the rule gives {expected}")
    return out


def audit_run(run_dir: Path, *, log_key: str | None = None,
              trusted_checkpoints: Sequence[str] = (),
              verified: AuditReport | None = None) -> MarketAudit:
    """Audit the task recorded in ``run_dir/ledger.db`` (module docstring). Never
    raises for what a ledger holds: anything unexpected becomes a mismatch.
    ``log_key`` pins the operator's key; ``trusted_checkpoints`` are notes the leaves
    must reproduce (a served checkpoint, subscribers' notes). ``verified`` is the
    caller's own ``verify_log`` report of this very file, with those options (a mirror
    that nothing writes to): the log is then not verified a second time."""
    audit = MarketAudit()
    try:
        return _audit(Path(run_dir), audit, log_key=log_key,
                      trusted_checkpoints=trusted_checkpoints, verified=verified)
    except Exception as exc:  # noqa: BLE001 - a hostile ledger must give a verdict
        audit.mismatches.append(f"audit could not complete: {type(exc).__name__}: {exc}")
        audit.ok = False
        return audit


def _audit(run_dir: Path, audit: MarketAudit, *, log_key: str | None,
           trusted_checkpoints: Sequence[str], verified: AuditReport | None) -> MarketAudit:
    db = run_dir / LEDGER_FILE if run_dir.is_dir() else run_dir
    try:
        report = verified or verify_log(db, log_key=log_key,
                                        trusted_checkpoints=trusted_checkpoints)
    except LedgerError as exc:
        audit.mismatches.append(f"ledger: {exc}")
        return audit
    audit.ledger_size = report.size
    if report.failure is not None:
        audit.mismatches.append(f"ledger: {report.failure}")
        return audit
    try:
        with LogReader.open(db) as reader:  # the tree verify_log checked, not since
            entries = list(reader.entries(end=report.size))
    except LedgerError as exc:  # a bulk blob missing or not what its entry signed
        audit.mismatches.append(f"ledger: {exc}")
        return audit
    try:
        record = read_market(entries)
    except MarketError as exc:
        audit.mismatches.append(f"market: {exc}")
        return audit
    audit.task_id, audit.scientist = record.task_id, record.scientist
    audit.findings.extend(record.problems)
    terms = record.terms.money
    audit.escrow = record.escrowed
    if record.escrowed != terms.escrow:
        audit.mismatches.append(
            f"escrow: expected {terms.escrow} (reward + deposit + fee escrow), "
            f"the ledger escrowed {record.escrowed}")
    blobs = BlobStore.beside(db)
    audit.mismatches.extend(check_blobs(entries, blobs))
    result = replay(record, blobs)
    audit.reveal = result.reveal_status + (f": {result.reveal_detail}" if result.reveal_detail
                                           else "")
    audit.mismatches.extend(result.mismatches)
    audit.findings.extend(result.score_mismatches)
    for server_round in range(0, record.last_round + 1):
        selection = record.selections.get(server_round)
        score = record.scores.get(server_round)
        audit.rounds.append({
            "round": server_round,
            "published_loss_micro": score.loss_micro if score else None,
            "replayed_loss_micro": result.losses.get(server_round),
            "selected": [record.author_of(server_round, d) for d in selection.selected]
            if selection else [],
        })
    if not result.mismatches:
        try:
            settlement, losses = settlement_of(record, result)
        except (MarketError, SettlementError) as exc:
            audit.mismatches.append(f"settlement: {exc}")
        else:
            expected = settlement_fields(record.task_id, settlement, losses)
            audit.mismatches.extend(_compare_settlement(record, expected))
            audit.forfeited, audit.reason = settlement.forfeited, settlement.reason
            audit.payouts = settlement.payouts
            audit.reward_payouts = settlement.reward_payouts
            audit.fee_payouts = settlement.fee_payouts
            audit.scientist_refund = settlement.scientist_refund
            audit.losses_micro = losses
            frac = settlement.fraction
            audit.fraction_micro = frac.numerator * 1_000_000 // frac.denominator
            explain_credits(audit.rounds, settlement.round_credits, result.taylor)
            explain_sampling(audit.rounds, record, losses, result.prefixes)
    audit.mismatches.extend(check_fee_settlements(entries, record))
    audit.balances, violations = balances(entries, operator=record.operator)
    audit.mismatches.extend(f"balance: {v}" for v in violations)
    audit.ok = not audit.mismatches
    return audit


def explain_credits(rounds: list[dict[str, Any]],
                    credits: Mapping[int, Mapping[str, Fraction]],
                    taylor: Mapping[int, Sequence[float]]) -> None:
    """Per round, each applied update's author: the credit the settlement used (micro
    loss units, after the rule's gates) and the closed-form Taylor estimate beside it."""
    for entry in rounds:
        server_round = entry["round"]
        shares = credits.get(server_round)
        if shares is None:
            continue
        entry["credit_micro"] = {a: round(float(v), 3) for a, v in shares.items()}
        estimates = taylor.get(server_round)
        if estimates is not None and len(estimates) == len(entry["selected"]):
            entry["taylor_micro"] = {a: round(v, 3)
                                     for a, v in zip(entry["selected"], estimates, strict=True)}


def explain_sampling(rounds: list[dict[str, Any]], record: MarketRecord,
                     losses: Sequence[int], prefixes: Mapping[int, list[list[int]]]) -> None:
    """For a round split by sampled Shapley (rule v2, k > exact_max): each author's
    standard error (micro), from the replayed prefix losses."""
    rule = record.payout
    if rule.game != "fixed-k":
        return
    for entry in rounds:
        t, selected = entry["round"], entry["selected"]
        if not t or len(selected) <= rule.exact_max or t not in prefixes or t >= len(losses):
            continue
        try:
            orders = orderings_of(record, t, len(selected))
            _, errors = sampled_shapley(selected, losses[t - 1], losses[t], orders,
                                        prefixes[t])
        except (MarketError, SettlementError):
            continue
        entry["credit_se_micro"] = {a: round(v, 3) for a, v in errors.items()}


def write_audit(run_dir: Path, audit: MarketAudit) -> Path:
    path = Path(run_dir) / AUDIT_FILE
    write_json(path, audit.to_json())
    return path
