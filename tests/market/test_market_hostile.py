"""A hostile operator or Scientist writing well-signed but wrong market entries: the
audit names the problem (never crashes), and the settlement rules cannot be bent.

Each case rebuilds a signed ledger from an honest run: the first leaves verbatim, then
new entries signed with the run's own operator or Scientist key."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crypto.commitments import Revealed, encode_reveal, new_salts
from ledger import LogReader, Signer, parse_entry
from ledger.blobs import BlobStore
from ledger.checkpoint import ALG_COSIGNATURE_V1, NoteVerifier, cosign_checkpoint
from ledger.cosignatures import witness_verifier
from ledger.entries import sign_entry
from ledger.log import Log
from server.market.audit import audit_run
from server.market.replay import balances, read_market, replay, settlement_fields, settlement_of
from server.market.scientist import MarketError
from tests.conftest import set_task_identity
from tests.market.test_market import market_run


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    set_task_identity()
    out = tmp_path_factory.mktemp("honest-src")
    market_run(out)
    return out


class Rebuilt:
    def __init__(self, src: Path, dst: Path, cut_kind: str) -> None:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ledger.db*", "audit.json"))
        with LogReader.open(src / "ledger.db") as reader:
            self.entries = list(reader.entries())
            cut = next(i for i, e in self.entries if e.kind == cut_kind)
            leaves = [reader.entry(i) for i in range(cut)]
            origin = reader.checkpoint().split("\n", 1)[0]
            sizes = [c.size for c in reader.stored_checkpoints() if 0 < c.size <= cut]
        self.dst = dst
        self.operator = Signer.load(dst / "operator.pem")
        self.scientist = Signer.load(dst / "scientist.pem")
        self.log = Log.open(dst / "ledger.db", self.operator, origin=origin)
        for size in sizes:  # the same group commits, cosignatures recorded as such
            batch = [e for i, e in self.entries[self.log.size:size]]
            if batch and batch[0].kind == "cosignature":
                for entry in batch:
                    self.log.add_cosignature(str(entry.fields["note"]), witness=witness_verifier(
                        str(entry.fields["witness"])))
            else:
                self.log.append_many(leaves[self.log.size:size])
        self.task_id = read_market(self.entries).task_id

    def fields(self, kind: str) -> dict[str, Any]:
        return dict(next(e for _, e in self.entries if e.kind == kind).fields)

    def add(self, signer: Signer, kind: str, fields: dict[str, Any]) -> int:
        seq = self.log.next_seq(signer.key_id)
        return self.log.append(sign_entry(signer, kind, seq=seq, fields=fields))

    def settle_by_the_rules(self) -> Any:
        record = read_market(self.log.entries())
        settlement, losses = settlement_of(record, replay(record, BlobStore.beside(
            self.dst / "ledger.db")))
        self.add(self.operator, "settlement", settlement_fields(self.task_id, settlement, losses))
        return settlement

    def close(self) -> None:
        """Every subscriber witnesses the rebuilt end (the ledger requires it)."""
        note = self.log.checkpoint()
        for key in sorted((self.dst / "keys").glob("partition-*.pem")):
            signer = Signer.load(key)
            name = f"subscriber-{signer.key_id}"
            self.log.add_cosignature(
                cosign_checkpoint(note, signer, name=name, timestamp=1),
                witness=NoteVerifier.for_key(name, signer.public_key_bytes,
                                             algorithm=ALG_COSIGNATURE_V1))
        self.log.close()


def test_a_close_before_the_last_round_run_fails_the_audit(honest: Path, tmp_path: Path) -> None:
    ledger = Rebuilt(honest, tmp_path / "run", "close")
    ledger.add(ledger.operator, "close", {"task_id": ledger.task_id, "round": 1,
                                          "reason": "completed"})
    ledger.add(ledger.scientist, "reveal", ledger.fields("reveal"))
    with pytest.raises(MarketError, match="close says round 1"):
        read_market(ledger.log.entries())
    ledger.close()
    result = audit_run(ledger.dst)
    assert not result.ok and "close says round 1" in result.mismatches[0]


def test_an_early_deadline_cannot_force_an_honest_scientist_to_forfeit(
        honest: Path, tmp_path: Path) -> None:
    ledger = Rebuilt(honest, tmp_path / "run", "close")
    close = ledger.fields("close")
    ledger.add(ledger.operator, "close", close)
    ledger.add(ledger.operator, "deadline", {"task_id": ledger.task_id,
                                             "round": close["round"]})  # due at round + 2
    ledger.add(ledger.scientist, "reveal", ledger.fields("reveal"))
    settlement = ledger.settle_by_the_rules()
    ledger.close()
    assert settlement.forfeited is False
    result = audit_run(ledger.dst)
    assert result.ok and any("deadline before it was due" in f for f in result.findings)


@pytest.mark.parametrize("case", ["3 features", "label 10", "nan", "empty"])
def test_a_malformed_validation_set_is_a_forfeiture_not_a_crash(
        honest: Path, tmp_path: Path, case: str) -> None:
    rng = np.random.default_rng(0)
    n = 0 if case == "empty" else 12
    x = rng.random((n, 3 if case == "3 features" else 64)).astype(np.float32)
    if case == "nan":
        x[0, 0] = np.nan
    y = np.full(n, 10 if case == "label 10" else 1, dtype=np.int64)
    revealed = Revealed(x=x, y=y, salts=new_salts(n))
    ledger = Rebuilt(honest, tmp_path / "run", "close")
    ledger.add(ledger.operator, "close", ledger.fields("close"))
    digest = BlobStore.beside(ledger.dst / "ledger.db").put(encode_reveal(revealed))
    ledger.add(ledger.scientist, "reveal", {"task_id": ledger.task_id,
                                            "validation_digest": digest, "count": n})
    settlement = ledger.settle_by_the_rules()
    ledger.close()
    assert settlement.forfeited and settlement.reason == "reveal-mismatch"
    result = audit_run(ledger.dst)
    assert result.ok and result.forfeited


def test_a_settlement_with_hostile_amounts_fails_the_audit_without_a_crash(
        honest: Path, tmp_path: Path) -> None:
    ledger = Rebuilt(honest, tmp_path / "run", "settlement")
    fields = ledger.fields("settlement")
    ledger.add(ledger.operator, "settlement", {**fields, "payouts": {"x": "abc"}})
    ledger.close()
    result = audit_run(ledger.dst)
    assert not result.ok and "integers >= 0" in result.mismatches[0]


def test_entries_after_the_settlement_do_not_change_it(honest: Path, tmp_path: Path) -> None:
    run = tmp_path / "late"
    shutil.copytree(honest, run)
    with LogReader.open(run / "ledger.db") as reader:
        origin = reader.checkpoint().split("\n", 1)[0]
    operator, scientist = Signer.load(run / "operator.pem"), Signer.load(run / "scientist.pem")
    log = Log.open(run / "ledger.db", operator, origin=origin)
    score = dict(next(e for _, e in log.entries(kind="score") if e.fields["round"] == 1).fields)
    log.append(sign_entry(scientist, "score", seq=log.next_seq(scientist.key_id),
                                    fields={**score, "loss_micro": 1}))
    log.close()
    result = audit_run(run)
    assert result.ok and any("after the settlement" in f for f in result.findings)


def test_a_second_different_score_for_a_round_is_a_score_mismatch(
        honest: Path, tmp_path: Path) -> None:
    ledger = Rebuilt(honest, tmp_path / "run", "close")
    score = dict(next(e for _, e in ledger.entries
                      if e.kind == "score" and e.fields["round"] == 2).fields)
    ledger.add(ledger.scientist, "score", {**score, "loss_micro": score["loss_micro"] // 2})
    ledger.add(ledger.operator, "close", ledger.fields("close"))
    ledger.add(ledger.scientist, "reveal", ledger.fields("reveal"))
    settlement = ledger.settle_by_the_rules()
    ledger.close()
    assert settlement.forfeited and settlement.reason == "score-mismatch"
    assert audit_run(ledger.dst).ok


def test_the_refund_goes_to_the_scientist_even_beside_an_operator_signed_offer() -> None:
    operator, scientist = Signer.generate(), Signer.generate()
    seq = {operator.key_id: 1, scientist.key_id: 1}

    def entry(signer: Signer, kind: str, **fields: Any) -> Any:
        seq[signer.key_id] += 1
        return parse_entry(sign_entry(signer, kind, seq=seq[signer.key_id], fields=fields))

    offer = {"task_id": "t", "reward": 5}
    entries = list(enumerate([
        entry(operator, "task", task_id="t"),
        entry(operator, "fund", account=scientist.key_id, amount=10, memo=""),
        entry(operator, "offer", **_offer(offer)),  # no standing: the operator
        entry(scientist, "offer", **_offer(offer)),
        entry(operator, "escrow", task_id="t", account=scientist.key_id, amount=10),
        entry(operator, "settlement", task_id="t", forfeited=False, reason="",
              payouts={"s1": 4}, reward_payouts={"s1": 4}, fee_payouts={},
              scientist_refund=6, losses_micro=[]),
    ]))
    money, violations = balances(entries, operator=operator.key_id)
    assert violations == []
    assert money == {scientist.key_id: 6, "s1": 4}


def _offer(base: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": base["task_id"], "model_digest": "m", "validation_root": "r",
            "validation_count": 1, "reward": base["reward"], "deposit": base["reward"],
            "update_fee": 0, "max_updates": 1, "buyer_fee": 0, "scientist_fee_share_ppm": 0,
            "reveal_deadline_rounds": 1, "score_tolerance_micro": 0, "patience": 0,
            "architecture": {"family": "poly-mlp", "hidden_units": 4, "activation": "square"}}
