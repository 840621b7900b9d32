"""The market end to end over an in-process Grid (real ClientApp handlers, the real
``run_task``): task creation, scores, reveal, settlement, forfeiture, and the independent
audit, which must fail on a mutated blob, a mutated score or a settlement that is not
what the rules give."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from client import protocol as P
from client.client_app import train, vote
from client.config import RunConfig
from ledger import LogReader, Signer
from ledger.blobs import BlobStore
from ledger.entries import sign_entry
from server.market.audit import audit_run
from server.market.game_losses import decode_game_losses, encode_game_losses
from server.market.replay import (
    balances,
    published_game_losses,
    read_market,
    replay,
    settlement_of,
)
from server.market.settlement import FORFEIT_MISMATCH, FORFEIT_NO_REVEAL, FORFEIT_SCORE
from server.server_app import run_task
from tests.conftest import InProcessGrid, make_contexts, set_task_identity

HANDLERS = {"train": train, P.VOTE_MESSAGE_TYPE: vote}
BASE = {"num-subscribers": 5, "num-server-rounds": 2, "partitioner": "iid", "seed": 3,
        "reward": 100_000, "update-fee": 7}


def market_run(out: Path, **extra: Any) -> dict[str, Any]:
    run = {**BASE, **extra, "out-dir": str(out)}
    config = RunConfig.from_mapping(run)
    grid = InProcessGrid(make_contexts(run, config.num_subscribers), HANDLERS)
    return run_task(grid, config, out)


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    set_task_identity()
    out = tmp_path_factory.mktemp("honest")
    return out, market_run(out)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _entries(run: Path) -> list[Any]:
    with LogReader.open(run / "ledger.db") as reader:
        return list(reader.entries())


# ------------------------------------------------------------------------- honest
def test_honest_market_settles_conserves_money_and_audits(honest: tuple[Path, dict]) -> None:
    out, report = honest
    market = report["market"]
    assert market["forfeited"] is False and market["audit_ok"] is True
    escrow = 2 * 100_000 + 7 * 5 * 2
    assert market["escrow"] == escrow
    assert sum(market["payouts"].values()) + market["scientist_refund"] == escrow
    audit = json.loads((out / "audit.json").read_text())
    assert audit["ok"] is True and audit["mismatches"] == []
    assert audit["payouts"] == market["payouts"] and audit["forfeited"] is False
    assert audit["scientist_refund"] == market["scientist_refund"]
    # every published score is reproduced by the replay on the revealed set
    for rnd in audit["rounds"]:
        assert abs(rnd["published_loss_micro"] - rnd["replayed_loss_micro"]) <= 10
    # report: each subscriber's key id is its key file's, its payout the settlement's
    for sub in report["subscribers"]:
        key = Signer.load(out / "keys" / f"partition-{sub['partition_id']}.pem").key_id
        assert sub["key_id"] == key
        assert sub["payout"] == market["payouts"].get(key, 0)
    assert (out / "market.png").stat().st_size > 10_000
    # the pool is R times the fraction of convergence, rounded down
    losses = audit["losses_micro"]
    pool = 100_000 * (losses[0] - losses[-1]) // losses[0]
    assert sum(audit["reward_payouts"].values()) == max(pool, 0)


def test_the_selected_author_is_credited_with_the_round_improvement(
        honest: tuple[Path, dict]) -> None:
    """Credit per author from a reference written here: one applied update takes the
    round's improvement; several split it by Shapley values computed over every order in
    which they could join (the coalition losses the Scientist published)."""
    from fractions import Fraction
    from itertools import permutations

    out, report = honest
    audit = json.loads((out / "audit.json").read_text())
    record = read_market(_entries(out))
    published, unreadable = published_game_losses(record, BlobStore.beside(out / "ledger.db"))
    assert unreadable == []
    losses = audit["losses_micro"]
    credit: dict[str, Fraction] = {}
    assert any(len(r["selected"]) > 1 for r in audit["rounds"][1:])  # the marginal vote
    for rnd in audit["rounds"][1:]:
        t, authors = rnd["round"], rnd["selected"]
        before = losses[t - 1]
        coalition = dict(published[t].coalitions_micro)
        coalition[(1 << len(authors)) - 1] = losses[t]

        def utility(mask: int, before: int = before, coalition: dict = coalition) -> int:
            return 0 if mask == 0 else before - coalition[mask]

        orders = list(permutations(range(len(authors))))
        for i, author in enumerate(authors):
            total = Fraction(0)
            for order in orders:
                mask = sum(1 << j for j in order[:order.index(i)])
                total += utility(mask | 1 << i) - utility(mask)
            credit[author] = credit.get(author, Fraction(0)) + total / len(orders)
    positive = {k for k, v in credit.items() if v > 0}
    assert set(audit["reward_payouts"]) == positive
    for author in set(credit) - positive:
        assert author not in audit["payouts"]


def test_balances_are_derived_from_the_ledger(honest: tuple[Path, dict]) -> None:
    out, report = honest
    entries = _entries(out)
    record = read_market(entries)
    money, violations = balances(entries, operator=record.operator)
    assert violations == []
    assert money.get(f"escrow:{record.task_id}", 0) == 0  # all of the escrow was settled
    assert money.get(record.scientist) == report["market"]["scientist_refund"]
    for key, amount in report["market"]["payouts"].items():
        assert money[key] == amount


def test_settlement_ignores_the_order_of_unrelated_entries(honest: tuple[Path, dict]) -> None:
    out, _ = honest
    entries = _entries(out)
    record = read_market(entries)
    result = replay(record, BlobStore.beside(out / "ledger.db"))
    expected = settlement_of(record, result)
    unrelated = [i for i, (_, e) in enumerate(entries)
                 if e.kind in ("vote", "ballot", "rejection", "cosignature", "fund", "key")]
    assert len(unrelated) > 10
    rng = random.Random(0)
    for _ in range(5):
        shuffled = list(entries)
        positions = list(unrelated)
        rng.shuffle(positions)
        for src, dst in zip(unrelated, positions, strict=True):
            shuffled[dst] = entries[src]
        assert settlement_of(read_market(shuffled), result) == expected


# ------------------------------------------------------------------- forfeiture
@pytest.mark.parametrize(("behaviour", "reason"), [
    ("inflate-score", FORFEIT_SCORE),
    ("tamper-reveal", FORFEIT_MISMATCH),
    ("withhold-reveal", FORFEIT_NO_REVEAL),
])
def test_a_lying_or_silent_scientist_forfeits(tmp_path: Path, behaviour: str,
                                              reason: str) -> None:
    report = market_run(tmp_path, scientist=behaviour)
    market = report["market"]
    assert market["forfeited"] is True and market["reason"] == reason
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] is True and audit["forfeited"] is True and audit["reason"] == reason
    fees = 7 * 5 * 2  # every update was valid and scored
    # reward, deposit and the fee pool all go to the subscribers; nothing comes back
    assert sum(market["payouts"].values()) == 2 * 100_000 + fees
    assert market["scientist_refund"] == 0
    if behaviour == "inflate-score":
        assert any("published loss" in f for f in audit["findings"])
    else:  # nothing to replay on: equal shares among the five contributors
        amounts = sorted(market["payouts"].values())
        assert len(amounts) == 5 and amounts[-1] - amounts[0] <= 1


# --------------------------------------------------------------------- the audit
def test_a_mutated_update_blob_fails_the_audit(honest: tuple[Path, dict], tmp_path: Path) -> None:
    run = _copy(honest[0], tmp_path)
    record = read_market(_entries(run))
    digest = record.selections[2].selected[0]
    path = BlobStore.beside(run / "ledger.db").path(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    result = audit_run(run)
    assert not result.ok
    assert digest[:16] in result.mismatches[0] and "round 2" in result.mismatches[0]


def test_a_mutated_score_fails_the_audit(honest: tuple[Path, dict], tmp_path: Path) -> None:
    run = _copy(honest[0], tmp_path)
    index = next(i for i, e in _entries(run) if e.kind == "score" and e.fields["round"] == 1)
    with sqlite3.connect(run / "ledger.db") as db:
        db.execute("DROP TRIGGER IF EXISTS entries_no_update")
        triggers = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='trigger'")]
        for name in triggers:
            db.execute(f"DROP TRIGGER {name}")
        (leaf,) = db.execute("SELECT CAST(leaf AS BLOB) FROM entries WHERE idx = ?",
                             (index,)).fetchone()
        score = json.loads(bytes(leaf).split(b"\n")[0])["loss_micro"]
        mutated = bytes(leaf).replace(b'"loss_micro":%d' % score, b'"loss_micro":%d' % (score + 1))
        assert mutated != bytes(leaf)
        db.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (mutated, index))
    result = audit_run(run)
    assert not result.ok and result.mismatches[0].startswith("ledger:")
    assert str(index) in result.mismatches[0]


def test_a_missing_reveal_blob_fails_the_audit(honest: tuple[Path, dict], tmp_path: Path) -> None:
    run = _copy(honest[0], tmp_path)
    record = read_market(_entries(run))
    BlobStore.beside(run / "ledger.db").path(record.reveal["validation_digest"]).unlink()
    result = audit_run(run)
    # the rules now say "forfeited", the ledger's settlement says otherwise
    assert not result.ok and result.forfeited is True
    assert any("settlement entry" in m and "forfeited" in m for m in result.mismatches)


def test_a_settlement_the_rules_do_not_give_fails_the_audit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.market.session as session

    real = session.settlement_of

    def skim(record, result):  # type: ignore[no-untyped-def]
        settlement, losses = real(record, result)
        payouts = dict(settlement.reward_payouts)
        victim = next(iter(payouts))
        payouts[victim] -= 1  # the operator keeps one unit back for the Scientist
        from dataclasses import replace
        return replace(settlement, reward_payouts=payouts,
                       scientist_refund=settlement.scientist_refund + 1), losses

    monkeypatch.setattr(session, "settlement_of", skim)
    report = market_run(tmp_path)
    assert report["market"]["audit_ok"] is False
    result = audit_run(tmp_path)
    assert not result.ok and "payouts" in result.mismatches[0]


def test_audit_cli_exit_codes_and_audit_json(honest: tuple[Path, dict], tmp_path: Path) -> None:
    from server.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["audit", str(honest[0])], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "audit ok" in ok.output and "Scientist refund" in ok.output
    audit = json.loads((honest[0] / "audit.json").read_text())
    # each credited author's summed credit is in its row, as audit.json has it
    summed: dict[str, float] = {}
    for rnd in audit["rounds"]:
        for author, value in rnd.get("credit_micro", {}).items():
            summed[author] = summed.get(author, 0.0) + value
    assert summed
    for author, value in summed.items():
        row = next(line for line in ok.output.splitlines() if author[:16] in line)
        assert f"{value:,.0f}" in row, (row, value)
    for key in ("ok", "payouts", "scientist_refund", "forfeited", "mismatches"):
        assert key in audit
    run = _copy(honest[0], tmp_path)
    record = read_market(_entries(run))
    model = BlobStore.beside(run / "ledger.db").path(record.models[1])
    os.chmod(model, 0o644)
    model.unlink()
    bad = runner.invoke(app, ["audit", str(run)], env={"COLUMNS": "200"})
    assert bad.exit_code == 1 and "audit failed" in bad.output
    assert json.loads((run / "audit.json").read_text())["ok"] is False
    missing = runner.invoke(app, ["audit", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2


# ---------------------------------------------------------------- top-k, patience
def test_top_k_splits_each_round_by_exact_shapley(tmp_path: Path) -> None:
    report = market_run(tmp_path, **{"top-k": 2, "num-server-rounds": 1})
    entries = _entries(tmp_path)
    score = next(e for _, e in entries if e.kind == "score" and e.fields["round"] == 1)
    assert "coalitions_micro" not in score.fields  # in the blob the score names
    coalitions = decode_game_losses(BlobStore.beside(tmp_path / "ledger.db").get(
        score.fields["game_losses_digest"])).coalitions_micro
    assert set(coalitions) == {1, 2, 3} and coalitions[3] == score.fields["loss_micro"]
    l0 = next(e for _, e in entries if e.kind == "score" and e.fields["round"] == 0)
    base = l0.fields["loss_micro"]
    # two players: phi_a = (v(a) + v(ab) - v(b)) / 2 with v(C) = L0 - L(C)
    v = {m: base - loss for m, loss in coalitions.items()}
    record = read_market(entries)
    first, second = (record.author_of(1, d) for d in record.selections[1].selected)
    phi = {first: (v[1] + v[3] - v[2]) / 2, second: (v[2] + v[3] - v[1]) / 2}
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] is True
    positive = {k for k, x in phi.items() if x > 0}
    assert set(audit["reward_payouts"]) == positive
    if len(positive) == 2:
        pool = sum(audit["reward_payouts"].values())
        share = phi[first] / (phi[first] + phi[second]) * pool
        assert abs(audit["reward_payouts"][first] - share) <= 1
    assert report["market"]["forfeited"] is False


def test_patience_stops_training_when_the_validation_loss_stalls(tmp_path: Path) -> None:
    # updates of ~1e-8 move the loss by far less than a micro-unit: no round improves
    report = market_run(tmp_path, **{"num-server-rounds": 6, "patience": 2,
                                     "learning-rate": 1e-7, "noise-multiplier": 0.0})
    assert report["stopped"] == "patience"
    assert len(report["rounds"]) == 2
    closes = [e for _, e in _entries(tmp_path) if e.kind == "close"]
    assert [(c.fields["round"], c.fields["reason"]) for c in closes] == [(2, "patience")]
    assert json.loads((tmp_path / "audit.json").read_text())["ok"] is True


def test_market_terms_are_checked(tmp_path: Path) -> None:
    from client.config import ConfigError

    with pytest.raises(ConfigError, match="reward"):
        RunConfig.from_mapping({"reward": -1})
    with pytest.raises(ConfigError, match="scientist"):
        RunConfig.from_mapping({"scientist": "sloppy"})
    with pytest.raises(ConfigError, match="scientist-fee-share-ppm"):
        RunConfig.from_mapping({"scientist-fee-share-ppm": 1_000_001})
    with pytest.raises(ConfigError, match="escrow"):
        RunConfig.from_mapping({"reward": 2**52})


def test_a_hostile_offer_is_refused_with_a_reason_not_a_crash() -> None:
    from ledger.entries import parse_entry
    from server.market.scientist import MarketError

    operator, scientist = Signer.generate(), Signer.generate()
    offer = {"task_id": "t", "model_digest": "m", "validation_root": "r",
             "validation_count": 1, "reward": 10, "deposit": 10, "update_fee": 0,
             "max_updates": 1, "buyer_fee": 0, "scientist_fee_share_ppm": 0,
             "reveal_deadline_rounds": 1, "score_tolerance_micro": 0, "patience": 0,
             "architecture": {"family": "poly-mlp", "hidden_units": 2**40,
                              "activation": "square"}}
    task = parse_entry(sign_entry(operator, "task", seq=1, fields={"task_id": "t"}))
    for change, match in [({}, "hidden_units"), ({"deposit": 9}, "deposit"),
                          ({"reward": -1}, "reward")]:
        bad = {**offer, **change}
        if change:
            bad["architecture"] = {**offer["architecture"], "hidden_units": 8}
        entry = parse_entry(sign_entry(scientist, "offer", seq=1, fields=bad))
        with pytest.raises(MarketError, match=match):
            read_market([(0, task), (1, entry)])


# ------------------------------------------------------------- the payout rule v2
def test_a_free_rider_market_settles_audits_and_pays_it_nothing(tmp_path: Path) -> None:
    """A free rider's zero update is refused in round 1; it must not vote in that round
    (the audit refuses a ballot from a key with no candidate: this once crashed the
    settlement of every free-rider run)."""
    report = market_run(tmp_path, **{"attack": "free-rider", "attackers": "1"})
    market = report["market"]
    assert market["audit_ok"] is True and market["forfeited"] is False
    rider = next(s for s in report["subscribers"] if s["partition_id"] == 1)
    assert rider["payout"] == 0


def test_sampled_shapley_rounds_replay_and_a_changed_prefix_loss_forfeits(
        tmp_path: Path) -> None:
    import copy

    report = market_run(tmp_path, **{"shapley-exact-max": 1, "shapley-permutations": 4,
                                     "num-subscribers": 6})
    assert report["market"]["audit_ok"] is True
    entries = _entries(tmp_path)
    record = read_market(entries)
    assert record.offer["payout"]["exact_max"] == 1
    blobs = BlobStore.beside(tmp_path / "ledger.db")
    published, _ = published_game_losses(record, blobs)
    sampled = [t for t, game in published.items() if game.prefix_losses_micro]
    assert sampled, "expected a round with at least 2 applied updates"
    t = sampled[0]
    k = len(record.selections[t].selected)
    assert [len(r) for r in published[t].prefix_losses_micro] == [k - 1] * 4
    assert published[t].coalitions_micro == {}
    assert record.scores[t].shapley_root == record.model_roots[t]
    assert replay(record, blobs).score_mismatches == []

    lying = copy.deepcopy(record)  # the Scientist signed a blob with one changed number
    game = copy.deepcopy(published[t])
    game.prefix_losses_micro[0][0] += 5_000
    lying.scores[t].game_losses_digest = blobs.put(encode_game_losses(game))
    result = replay(lying, blobs)
    assert any("ordering 0 prefix 1" in m for m in result.score_mismatches)
    settlement, _ = settlement_of(lying, result)
    assert settlement.forfeited and settlement.reason == FORFEIT_SCORE

    audit = json.loads((tmp_path / "audit.json").read_text())
    errors = next(r for r in audit["rounds"] if r["round"] == t)["credit_se_micro"]
    assert set(errors) == set(record.author_of(t, d) for d in record.selections[t].selected)

    other_root = copy.deepcopy(record)
    other_root.scores[t].shapley_root = "00" * 32
    assert any("drawn from root" in m for m in replay(other_root, blobs).score_mismatches)


def test_a_target_loss_the_initial_model_reaches_is_refused_at_the_offer(
        tmp_path: Path) -> None:
    from server.market.scientist import MarketError

    with pytest.raises(MarketError, match=r"below the initial model's validation loss "
                                          r"L0 = \d+, got 1000000000"):
        market_run(tmp_path, **{"target-loss-micro": 10**9})


def test_every_payout_is_explained_per_round(honest: tuple[Path, dict]) -> None:
    """audit.json and report.json give, per round and applied update's author, the
    credit the settlement used and the closed-form estimate beside it."""
    out, report = honest
    audit = json.loads((out / "audit.json").read_text())
    credited = [r for r in audit["rounds"] if r["selected"]]
    assert credited
    for rnd in credited:
        assert set(rnd["credit_micro"]) == set(rnd["selected"])
        assert set(rnd["taylor_micro"]) == set(rnd["selected"])
        assert report["market"]["round_credits_micro"][str(rnd["round"])] == rnd["credit_micro"]
    # the net credits, summed from the rounds, are what the reward was split by
    net: dict[str, float] = {}
    for rnd in credited:
        for author, value in rnd["credit_micro"].items():
            net[author] = net.get(author, 0.0) + value
    paid = {a for a, v in audit["reward_payouts"].items() if v > 0}
    assert paid == {a for a, v in net.items() if v > 0}
    assert report["market"]["payout_rule"]["rule"] == "round-game/v2"
    assert (out / "market.png").stat().st_size > 10_000
