"""The ledger in the rounds: subscribers sign candidates and votes and cosign checkpoints
after verifying consistency; the operator records the round; anyone can recompute the
committees from the ledger; a subscriber refuses a forked or rolled-back log."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client import protocol as P
from client.client_app import train, vote
from client.config import RunConfig
from client.task import digits_split, get_weights, make_model
from client.witness import LedgerRefusal, SeenTree, check_checkpoint
from crypto.digests import canonical_tensor_bytes, tensors_digest
from ledger import Log, LogReader, Signer, parse_entry, verify_log
from ledger.entries import make_key_entry, sign_entry
from server.market.session import MarketSession
from server.round.ledger_writer import RoundLedger
from server.round.selection import assign_committees
from server.round.strategy import PoIConfig, ProofOfIntelligence, arrays_to_numpy, numpy_to_arrays
from server.server_app import make_central_evaluate, train_config_for
from tests.conftest import InProcessGrid, make_contexts, reply_tensors

HANDLERS = {"train": train, P.VOTE_MESSAGE_TYPE: vote}


def _ledger_run(tmp_path: Path, run: dict, rounds: int, poi: PoIConfig, tamper=None):  # type: ignore[no-untyped-def]
    run = {**run, "out-dir": str(tmp_path)}
    config = RunConfig.from_mapping(run)
    contexts = make_contexts(run, config.num_subscribers)
    grid = InProcessGrid(contexts, HANDLERS, tamper)
    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed)
    initial = ArrayRecord(model.state_dict())
    weights = arrays_to_numpy(initial)
    ledger = RoundLedger.create(tmp_path, config=config.to_mapping(),
                                initial_model=canonical_tensor_bytes(weights))
    market = MarketSession.open(ledger, out_dir=tmp_path, config=config,
                                validation=digits_split().validation, initial_weights=weights,
                                model_digest=tensors_digest(weights))
    strategy = ProofOfIntelligence(config=poi, min_available_nodes=config.num_subscribers,
                                   ledger=ledger, market=market)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                   train_config=train_config_for(config),
                   evaluate_fn=make_central_evaluate(config))
    ledger.close()
    return strategy, ledger, contexts


def test_rounds_are_recorded_verifiable_and_committees_recomputable(tmp_path: Path) -> None:
    run = {"num-subscribers": 5, "partitioner": "iid", "attack": "label-flip",
           "attackers": "3", "seed": 5}
    strategy, ledger, contexts = _ledger_run(tmp_path, run, 2,
                                             PoIConfig(vote_rule="single", votes_per_candidate=2, seed=5))
    report = verify_log(tmp_path / "ledger.db")
    assert report.ok, report.failure
    reader = LogReader.open(tmp_path / "ledger.db")
    entries = [parse_entry(reader.entry(i)) for i in range(reader.size)]
    kinds = [e.kind for e in entries]
    assert kinds[:7] == ["key", "task", "fund", "key", "offer", "escrow", "score"]
    for server_round in (1, 2):
        in_round = [e for e in entries if e.fields.get("round") == server_round]
        candidates = [e for e in in_round if e.kind == "candidate"]
        votes = [e for e in in_round if e.kind == "vote"]
        assert len(candidates) == 5
        assert len(votes) == 5 * 2
        assert [e.kind for e in in_round if e.kind in ("selection", "model", "score")] == [
            "selection", "model", "score"]
        # the committee seed is the root at the start of the vote: recompute it
        first_vote = next(i for i, e in enumerate(entries)
                          if e.kind == "vote" and e.fields["round"] == server_round)
        seed = reader.root(first_vote)
        authors = {e.fields["update_digest"]: e.author for e in candidates}
        committees = assign_committees(authors, sorted(set(authors.values())),
                                       votes_per_candidate=2, seed=seed)
        recorded = {(e.fields["candidate"], e.author) for e in votes}
        assert recorded == {(c, v) for c, vs in committees.items() for v in vs}
        # votes are what the strategy tallied
        record = strategy.history[server_round - 1]
        for candidate in record.candidates:
            assert len(candidate.improvements) == 2
        selection = next(e for e in in_round if e.kind == "selection")
        assert selection.fields["selected"] == [c.candidate_id for c in record.candidates
                                                if c.selected]
    # every candidate's update and every model is a blob with its digest
    for e in entries:
        if e.kind == "candidate":
            assert e.fields["update_digest"] in ledger.blobs
        if e.kind == "model":
            assert e.fields["model_digest"] in ledger.blobs
    assert ledger.cosignatures >= 5 * 2  # each subscriber cosigned in both phases
    cosigned = reader.connection.execute("SELECT COUNT(*) FROM cosignatures").fetchone()[0]
    assert cosigned == ledger.cosignatures
    # subscriber keys live under the run directory, private and 0600
    keys = sorted((tmp_path / "keys").glob("partition-*.pem"))
    assert len(keys) == 5 and all((k.stat().st_mode & 0o777) == 0o600 for k in keys)
    assert all(int(c.state["ledger"]["size"]) > 0 for c in contexts.values())
    reader.close()


def test_a_tampered_signed_digest_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    run = {"num-subscribers": 4, "partitioner": "iid", "seed": 6}

    def tamper(node: int, reply: Message) -> Message:
        if node == 1001 and reply.metadata.message_type == "train":
            arrays = reply_tensors(reply.content[P.ARRAYS])
            name = next(iter(arrays))
            arrays[name] = arrays[name] * 0.5  # the update no longer matches its signature
            reply.content[P.ARRAYS] = numpy_to_arrays(arrays)
        return reply

    strategy, _, _ = _ledger_run(tmp_path, run, 1, PoIConfig(vote_rule="single", seed=6), tamper)
    record = strategy.history[0]
    reasons = [r["reason"] for r in record.rejected if r["node_id"] == "1001"]
    assert len(reasons) == 1 and "signed candidate says update_digest=" in reasons[0]
    assert len(record.candidates) == 3 and record.selected
    assert verify_log(tmp_path / "ledger.db").ok


def _log_with_entries(tmp_path: Path, n: int) -> tuple[Log, Signer]:
    operator = Signer.generate()
    log = Log.open(tmp_path / "l.db", operator, origin="poi/task/test")
    log.append(make_key_entry(operator))
    for i in range(n):
        log.append(sign_entry(operator, "task", seq=1 + i, fields={"task_id": f"t{i}"}))
    return log, operator


def test_subscriber_checkpoint_check_accepts_growth_and_refuses_forks(tmp_path: Path) -> None:
    log, _ = _log_with_entries(tmp_path, 3)
    note4, key, root4 = log.checkpoint(), log.log_key, log.root()
    first = check_checkpoint(note4, log_key=key, proof=[], proof_from=0, seen=None)  # TOFU
    assert first.size == 4
    seen = SeenTree(key, 4, root4)
    for _ in range(3):
        log.append(make_key_entry(Signer.generate()))
    note7 = log.checkpoint()
    proof = log.consistency_proof(4, 7)
    assert check_checkpoint(note7, log_key=key, proof=proof, proof_from=4, seen=seen).size == 7
    with pytest.raises(LedgerRefusal, match="expected a consistency proof from size 4, got one from 3"):
        check_checkpoint(note7, log_key=key, proof=proof, proof_from=3, seen=seen)
    bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    with pytest.raises(LedgerRefusal, match="consistency proof from 4 to 7"):
        check_checkpoint(note7, log_key=key, proof=bad, proof_from=4, seen=seen)
    with pytest.raises(LedgerRefusal, match="expected a tree of at least 7 entries, got 4"):
        check_checkpoint(note4, log_key=key, proof=[], proof_from=7,
                         seen=SeenTree(key, 7, log.root()))
    with pytest.raises(LedgerRefusal, match="two roots for tree size 4"):
        check_checkpoint(note4, log_key=key, proof=[], proof_from=4,
                         seen=SeenTree(key, 4, b"\x00" * 32))
    other, _ = _log_with_entries(tmp_path / "other", 3)
    with pytest.raises(LedgerRefusal, match="expected the pinned log key"):
        check_checkpoint(other.checkpoint(), log_key=other.log_key, proof=[], proof_from=0,
                         seen=seen)
    forged = note7.replace(base64.b64encode(log.root()).decode(),
                           base64.b64encode(b"\x01" * 32).decode())
    with pytest.raises(LedgerRefusal, match="checkpoint does not verify"):
        check_checkpoint(forged, log_key=key, proof=proof, proof_from=4, seen=seen)
    log.close()
    other.close()


def test_subscriber_refuses_work_on_a_rolled_back_log(tmp_path: Path) -> None:
    log, _ = _log_with_entries(tmp_path, 5)
    run = {"num-subscribers": 2, "partitioner": "iid", "hidden-units": 8,
           "out-dir": str(tmp_path)}
    ctx = make_contexts(run, 2)[1000]
    weights = get_weights(make_model(hidden_units=8, activation="square", seed=0))

    def message(note: str, proof_from: int) -> Message:
        config = ConfigRecord({P.SERVER_ROUND: 1, P.NOISE_MULTIPLIER: 1.0, P.TARGET_EPSILON: 0.0,
                               P.MAX_GRAD_NORM: 1.0, P.TARGET_DELTA: 1e-5, P.PLANNED_ROUNDS: 2,
                               P.TASK_ID: "test", P.BASE_DIGEST: tensors_digest(weights),
                               P.LEDGER_CHECKPOINT: note,
                               P.LEDGER_LOG_KEY: log.log_key, P.LEDGER_PROOF: [],
                               P.LEDGER_PROOF_FROM: proof_from, P.LEDGER_NEXT_SEQ: -1})
        return Message(RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: config}),
                       dst_node_id=1000, message_type="train")

    old = log.checkpoint_at(1)
    ok = train(message(log.checkpoint(), 0), ctx)
    assert not ok.has_error()
    cosigned = ok.content[P.LEDGER][P.LEDGER_COSIGNED]
    assert cosigned.startswith(log.checkpoint().split("\n\n")[0])
    refused = train(message(old, 6), ctx)
    assert refused.has_error() and refused.error.code == P.ERROR_LEDGER
    assert "expected a tree of at least 6 entries, got 1" in refused.error.reason
    log.close()


def test_a_lost_vote_does_not_lock_the_subscriber_out(tmp_path: Path) -> None:
    """The subscriber verified a newer tree for a vote whose reply was lost; the next
    round's message carries a proof from that tree too, so it keeps working."""
    run = {"num-subscribers": 4, "partitioner": "iid", "seed": 8}
    lost = {"done": False}

    def tamper(node: int, reply: Message):  # type: ignore[no-untyped-def]
        if node == 1001 and reply.metadata.message_type == P.VOTE_MESSAGE_TYPE and not lost["done"]:
            lost["done"] = True
            return None  # the reply never arrives
        return reply

    strategy, _, _ = _ledger_run(tmp_path, run, 3, PoIConfig(vote_rule="single", seed=8), tamper)
    first, second, third = strategy.history
    assert any(v["voter"] == "1001" and "timeout" in v["reason"] for v in first.rejected_votes)
    for record in (second, third):
        assert not [r for r in record.rejected if r["node_id"] == "1001"]
        assert not [v for v in record.rejected_votes if v["voter"] == "1001"]
    assert verify_log(tmp_path / "ledger.db").ok


def test_subscriber_refuses_unpinned_work_wrong_base_and_swapped_candidates(tmp_path: Path) -> None:
    log, _ = _log_with_entries(tmp_path, 2)
    run = {"num-subscribers": 2, "partitioner": "iid", "hidden-units": 8, "out-dir": str(tmp_path)}
    ctx = make_contexts(run, 2)[1000]
    weights = get_weights(make_model(hidden_units=8, activation="square", seed=0))

    def config(**extra: object) -> ConfigRecord:
        return ConfigRecord({P.SERVER_ROUND: 1, P.NOISE_MULTIPLIER: 1.0, P.TARGET_EPSILON: 0.0,
                             P.MAX_GRAD_NORM: 1.0, P.TARGET_DELTA: 1e-5, P.PLANNED_ROUNDS: 2,
                             P.TASK_ID: "test", P.BASE_DIGEST: tensors_digest(weights),
                             P.LEDGER_CHECKPOINT: log.checkpoint(), P.LEDGER_LOG_KEY: log.log_key,
                             P.LEDGER_PROOF: [], P.LEDGER_PROOF_FROM: 0, P.LEDGER_NEXT_SEQ: -1,
                             **extra})

    def train_msg(cfg: ConfigRecord) -> Message:
        return Message(RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: cfg}),
                       dst_node_id=1000, message_type="train")

    wrong_origin = train(train_msg(config(**{P.TASK_ID: "another-task"})), ctx)
    assert wrong_origin.has_error() and "expected origin" in wrong_origin.error.reason
    wrong_base = train(train_msg(config(**{P.BASE_DIGEST: "00" * 32})), ctx)
    assert wrong_base.has_error() and "is not the digest of the model received" in wrong_base.error.reason
    assert not train(train_msg(config()), ctx).has_error()
    unpinned = config()
    del unpinned[P.LEDGER_CHECKPOINT]
    refused = train(train_msg(unpinned), ctx)
    assert refused.has_error() and "expected a checkpoint from the pinned log" in refused.error.reason
    rng = np.random.default_rng(0)
    honest = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}
    other = {k: v * 2 for k, v in honest.items()}
    digest = tensors_digest(honest)
    vote_cfg = config(**{P.CANDIDATE_IDS: [digest], P.CANDIDATE_AUTHORS: ["1"],
                         P.LEDGER_PROOF_FROM: log.size, P.LEDGER_NEXT_SEQ: 2})
    content = RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: vote_cfg,
                          P.CANDIDATE_PREFIX + digest: numpy_to_arrays(other)})
    swapped = vote(Message(content, dst_node_id=1000, message_type=P.VOTE_MESSAGE_TYPE), ctx)
    assert swapped.has_error() and "not the one with that digest" in swapped.error.reason
    log.close()
