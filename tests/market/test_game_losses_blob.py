"""The round-game losses live in a blob the ``score`` entry names (``game_losses_digest``),
so a score leaf stays far below the 65,535 bytes a C2SP tlog-tiles entry bundle can
frame: the encoding's known answers and refusals, the leaf size at 12 applied updates,
the audit naming a damaged or missing blob, a blob of the wrong shape forfeiting, and
ledgers written before the blob (inline numbers) still replaying."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.config import RunConfig
from client.task import digits_split, get_weights, make_model
from ledger import LogReader, Signer
from ledger.blobs import BlobStore
from ledger.checkpoint import ALG_COSIGNATURE_V1, NoteVerifier, cosign_checkpoint
from ledger.entries import sign_entry
from ledger.log import Log
from server.market.audit import audit_run
from server.market.game_losses import (
    GAME_LOSSES_DIGEST,
    GameLosses,
    GameLossesError,
    decode_game_losses,
    encode_game_losses,
)
from server.market.replay import (
    published_game_losses,
    read_market,
    replay,
    settlement_fields,
    settlement_of,
)
from server.market.scientist import INFLATE_FACTOR, Scientist, round_game_losses
from server.market.settlement import FORFEIT_SCORE
from tests.conftest import set_task_identity
from tests.market.test_market import market_run

TLOG_TILES_MAX_ENTRY = 65_535  # C2SP tlog-tiles: entries are uint16 length-prefixed
APPLIED = 12  # rule v2's largest exact round (4,095 coalitions)


# ------------------------------------------------------------------------ the encoding
def test_the_blob_is_rfc_8785_canonical_json_of_both_fields() -> None:
    game = GameLosses(coalitions_micro={2: 7, 10: -3, 1: 5}, prefix_losses_micro=[[9, 8]])
    data = encode_game_losses(game)
    # RFC 8785 section 3.2.3: keys sorted by UTF-16 code units, so "10" before "2"
    assert data == (b'{"coalitions_micro":{"1":5,"10":-3,"2":7},'
                    b'"prefix_losses_micro":[[9,8]]}')
    assert decode_game_losses(data) == game
    assert encode_game_losses(GameLosses()) == b'{"coalitions_micro":{},"prefix_losses_micro":[]}'


@pytest.mark.parametrize(("data", "match"), [
    (b"\xff", "undecodable"),
    (b"[]", "an object with keys"),
    (b'{"coalitions_micro":{}}', "an object with keys"),
    (b'{"coalitions_micro":{},"extra":1,"prefix_losses_micro":[]}', "an object with keys"),
    (b'{"coalitions_micro":{"1":1.5},"prefix_losses_micro":[]}', "integer loss"),
    (b'{"coalitions_micro":{"1":true},"prefix_losses_micro":[]}', "integer loss"),
    (b'{"coalitions_micro":{"1":NaN},"prefix_losses_micro":[]}', "got NaN"),
    (b'{"coalitions_micro":{"0":1},"prefix_losses_micro":[]}', "masks as decimal"),
    (b'{"coalitions_micro":{"01":1},"prefix_losses_micro":[]}', "masks as decimal"),
    (b'{"coalitions_micro":{"x":1},"prefix_losses_micro":[]}', "masks as decimal"),
    (b'{"coalitions_micro":[],"prefix_losses_micro":[]}', "coalitions_micro as an object"),
    (b'{"coalitions_micro":{},"prefix_losses_micro":{}}', "prefix_losses_micro as a list"),
    (b'{"coalitions_micro":{},"prefix_losses_micro":[[1,"2"]]}', r"prefix_losses_micro\[0\]"),
    (b'{"coalitions_micro":{},"prefix_losses_micro":[[9007199254740992]]}', "2\\*\\*53"),
    (b'{"prefix_losses_micro":[],"coalitions_micro":{}}', "canonical"),
    (b'{"coalitions_micro":{}, "prefix_losses_micro":[]}', "canonical"),
    (b'{"coalitions_micro":{"2":1,"1":1},"prefix_losses_micro":[]}', "canonical"),
    (b'{"coalitions_micro":{"1":1,"1":2},"prefix_losses_micro":[]}', "canonical"),
])
def test_anything_but_the_canonical_encoding_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(GameLossesError, match=match):
        decode_game_losses(data)


# ------------------------------------------------------------ the Scientist's score leaf
def _round_of(config: RunConfig, *, seed: int = 0) -> tuple[Any, ...]:
    validation = digits_split().validation
    base = get_weights(make_model(hidden_units=config.hidden_units,
                                  activation=config.activation, seed=seed))
    rng = np.random.default_rng(seed)
    deltas = [{n: (rng.standard_normal(v.shape) * 0.05).astype(np.float32)
               for n, v in base.items()} for _ in range(APPLIED)]
    weights = {n: v + np.mean([d[n] for d in deltas], axis=0) for n, v in base.items()}
    return validation, base, deltas, weights


@pytest.mark.parametrize("payout", [
    {"payout-game": "fixed-k"},  # rule v2, exact: 4,095 coalitions
    {"payout-game": "mean"},  # rule v1: 4,095 coalitions of the mean game
    {"payout-game": "fixed-k", "shapley-exact-max": 11, "shapley-permutations": 64},
])
def test_a_score_leaf_at_12_updates_fits_a_tiles_entry_and_its_blob_round_trips(
        payout: dict[str, Any]) -> None:
    config = RunConfig.from_mapping(payout)
    validation, base, deltas, weights = _round_of(config)
    scientist = Scientist.create(Signer.generate(), task_id="t" * 32, validation=validation,
                                 config=config)
    root = hashlib.sha256(b"the ledger root after the round's model entry").digest()
    fields, blob = scientist.score_fields(3, weights, base, deltas, root=root)
    leaf = sign_entry(scientist.signer, "score", seq=4, fields=fields)
    # The inline numbers made this leaf 60,660 bytes; now it holds no per-coalition byte.
    assert len(leaf) < 1_024 < TLOG_TILES_MAX_ENTRY
    assert not set(fields) & {"coalitions_micro", "prefix_losses_micro"}
    assert blob is not None and fields[GAME_LOSSES_DIGEST] == hashlib.sha256(blob).hexdigest()
    coalitions, prefixes = round_game_losses(
        scientist.payout, base, deltas, validation, architecture=scientist.architecture,
        loss=fields["loss_micro"], root=root, server_round=3)
    assert decode_game_losses(blob) == GameLosses(coalitions_micro=coalitions,
                                                  prefix_losses_micro=prefixes or [])
    if prefixes is None:
        assert len(coalitions) == 2**APPLIED - 1 and "shapley_root" not in fields
    else:
        assert len(prefixes) == 64 and fields["shapley_root"] == root.hex()


def test_an_inflating_scientist_inflates_the_blob_and_a_round_without_a_game_has_none() -> None:
    config = RunConfig.from_mapping({"scientist": "inflate-score"})
    validation, base, deltas, weights = _round_of(config)
    honest = Scientist.create(Signer.generate(), task_id="t" * 32, validation=validation,
                              config=RunConfig.from_mapping({}))
    liar = Scientist.create(Signer.generate(), task_id="t" * 32, validation=validation,
                            config=config)
    truth = decode_game_losses(honest.score_fields(1, weights, base, deltas)[1] or b"")
    fields, blob = liar.score_fields(1, weights, base, deltas)
    published = decode_game_losses(blob or b"")
    assert published.coalitions_micro == {m: int(v * INFLATE_FACTOR)
                                          for m, v in truth.coalitions_micro.items()}
    for server_round, applied in ((0, []), (1, deltas[:1])):  # round 0; one update
        fields, blob = liar.score_fields(server_round, weights, base if applied else None,
                                         applied)
        assert blob is None and GAME_LOSSES_DIGEST not in fields


# ------------------------------------------------------------------------- the audit
@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    set_task_identity()
    out = tmp_path_factory.mktemp("honest-blob")
    report = market_run(out)
    assert report["market"]["audit_ok"] is True
    return out


def _entries(run: Path) -> list[Any]:
    with LogReader.open(run / "ledger.db") as reader:
        return list(reader.entries())


def _scored_round(run: Path) -> tuple[int, int, str]:
    """(entry index, round, blob digest) of the first score with round-game losses."""
    return next((i, int(e.fields["round"]), str(e.fields[GAME_LOSSES_DIGEST]))
                for i, e in _entries(run)
                if e.kind == "score" and GAME_LOSSES_DIGEST in e.fields)


def test_the_honest_run_publishes_its_game_losses_in_blobs(honest: Path) -> None:
    scores = [e for _, e in _entries(honest) if e.kind == "score"]
    assert all(not set(e.fields) & {"coalitions_micro", "prefix_losses_micro"} for e in scores)
    assert any(GAME_LOSSES_DIGEST in e.fields for e in scores)
    record = read_market(_entries(honest))
    published, unreadable = published_game_losses(record, BlobStore.beside(honest / "ledger.db"))
    assert unreadable == [] and sorted(published) == sorted(record.scores)
    assert audit_run(honest).ok


def test_one_changed_number_in_the_game_losses_blob_fails_the_audit(
        honest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(honest, run)
    index, server_round, digest = _scored_round(run)
    path = BlobStore.beside(run / "ledger.db").path(digest)
    game = decode_game_losses(path.read_bytes())
    mask = min(game.coalitions_micro)
    game.coalitions_micro[mask] += 1  # damaged storage: new bytes under the old name
    os.chmod(path, 0o644)
    path.write_bytes(encode_game_losses(game))
    result = audit_run(run)
    assert not result.ok
    assert (f"blob {digest} (score entry {index}, round {server_round}, game_losses_digest): "
            "altered (damaged storage)") in result.mismatches
    # the replay could not read the Scientist's numbers: it says which and pays on none
    assert any(f"round {server_round}: game losses blob {digest}" in f and "hashing to" in f
               for f in result.findings)
    assert result.forfeited is True and result.reason == FORFEIT_SCORE


def test_a_deleted_game_losses_blob_is_reported_missing_by_name(
        honest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(honest, run)
    index, server_round, digest = _scored_round(run)
    path = BlobStore.beside(run / "ledger.db").path(digest)
    os.chmod(path, 0o644)
    path.unlink()
    result = audit_run(run)
    assert not result.ok
    assert (f"blob {digest} (score entry {index}, round {server_round}, game_losses_digest): "
            "missing") in result.mismatches
    assert any(f"round {server_round}: game losses blob {digest}" in f and "found none" in f
               for f in result.findings)


# --------------------------------------------------- what the Scientist signed, rebuilt
Rewrite = Callable[[dict[str, Any], BlobStore], dict[str, Any]]


def _rebuild(src: Path, dst: Path, rewrite: Rewrite) -> Path:
    """``src``'s ledger up to its settlement, in its group commits, with every Scientist's
    ``score`` re-signed as ``rewrite(fields, blobs)`` gives it and every subscriber's
    cosignature made again over the new tree; then settled by the rules and witnessed
    by every subscriber (as ``test_market_hostile.Rebuilt`` does, leaves rewritten)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ledger.db*", "audit.json"))
    scientist = Signer.load(dst / "scientist.pem")
    operator = Signer.load(dst / "operator.pem")
    witnesses = {f"subscriber-{s.key_id}": s for s in map(
        Signer.load, sorted((dst / "keys").glob("partition-*.pem")))}
    blobs = BlobStore.beside(dst / "ledger.db")
    with LogReader.open(src / "ledger.db") as reader:
        origin = reader.checkpoint().split("\n", 1)[0]
        entries = list(reader.entries())
        cut = next(i for i, e in entries if e.kind == "settlement")
        leaves = [reader.entry(i) for i in range(cut)]
        sizes = [c.size for c in reader.stored_checkpoints() if 0 < c.size <= cut]
    for index, entry in entries[:cut]:
        if entry.kind == "score" and entry.author == scientist.key_id:
            leaves[index] = sign_entry(scientist, "score", seq=entry.seq,
                                       fields=rewrite(dict(entry.fields), blobs))
    log = Log.open(dst / "ledger.db", operator, origin=origin)

    def cosign(note: str, name: str) -> None:
        log.add_cosignature(
            cosign_checkpoint(note, witnesses[name], name=name, timestamp=1),
            witness=NoteVerifier.for_key(name, witnesses[name].public_key_bytes,
                                         algorithm=ALG_COSIGNATURE_V1))

    for size in sizes:
        batch = [e for _, e in entries[log.size:size]]
        if batch and batch[0].kind == "cosignature":
            for entry in batch:
                cosign(log.checkpoint_at(int(entry.fields["tree_size"])),
                       str(entry.fields["witness"]).split("+", 1)[0])
        else:
            log.append_many(leaves[log.size:size])
    record = read_market(log.entries())
    settlement, losses = settlement_of(record, replay(record, blobs))
    log.append(sign_entry(operator, "settlement", seq=log.next_seq(operator.key_id),
                          fields=settlement_fields(record.task_id, settlement, losses)))
    note = log.checkpoint()
    for name in sorted(witnesses):
        cosign(note, name)
    log.close()
    return dst


def _inline(fields: dict[str, Any], blobs: BlobStore) -> dict[str, Any]:
    """A score as the Scientist wrote it before the blob: ``coalitions_micro`` always,
    ``prefix_losses_micro`` beside ``shapley_root`` in a sampled round."""
    digest = fields.pop(GAME_LOSSES_DIGEST, None)
    game = decode_game_losses(blobs.get(digest)) if digest else GameLosses()
    fields["coalitions_micro"] = {str(m): v for m, v in sorted(game.coalitions_micro.items())}
    if "shapley_root" in fields:
        fields["prefix_losses_micro"] = game.prefix_losses_micro
    return fields


def test_a_ledger_written_before_the_blob_still_replays_and_audits(
        honest: Path, tmp_path: Path) -> None:
    old = _rebuild(honest, tmp_path / "old", _inline)
    scores = [e for _, e in _entries(old) if e.kind == "score"]
    assert all("coalitions_micro" in e.fields and GAME_LOSSES_DIGEST not in e.fields
               for e in scores)
    assert any(len(e.fields["coalitions_micro"]) > 1 for e in scores)
    for _, entry in _entries(honest):  # the inline numbers are read, not the blobs
        if entry.kind == "score" and GAME_LOSSES_DIGEST in entry.fields:
            path = BlobStore.beside(old / "ledger.db").path(entry.fields[GAME_LOSSES_DIGEST])
            os.chmod(path, 0o644)
            path.unlink()
    result, before = audit_run(old), audit_run(honest)
    assert result.ok, result.mismatches
    assert result.findings == before.findings and result.forfeited is False
    assert (result.payouts, result.losses_micro) == (before.payouts, before.losses_micro)
    assert [r.get("credit_micro") for r in result.rounds] == \
        [r.get("credit_micro") for r in before.rounds]


def test_a_score_with_both_the_digest_and_inline_numbers_is_malformed(
        honest: Path, tmp_path: Path) -> None:
    _, server_round, digest = _scored_round(honest)

    def both(fields: dict[str, Any], blobs: BlobStore) -> dict[str, Any]:
        if fields.get(GAME_LOSSES_DIGEST) == digest:
            fields["coalitions_micro"] = {
                str(m): v for m, v in decode_game_losses(blobs.get(digest))
                .coalitions_micro.items()}
        return fields

    run = _rebuild(honest, tmp_path / "both", both)
    record = read_market(_entries(run))
    assert any("carries both game_losses_digest and the inline ['coalitions_micro']" in p
               for p in record.problems)
    result = audit_run(run)  # the settlement recorded the forfeiture the rules give
    assert result.ok and result.forfeited is True and result.reason == FORFEIT_SCORE
    assert any(f.startswith(f"round {server_round}: score entry") and "carries both" in f
               for f in result.findings)


@pytest.mark.parametrize(("body", "why"), [
    (b'{"coalitions_micro":{"1":1}}', "expected an object with keys"),
    (b'{"coalitions_micro":{"1":1.0},"prefix_losses_micro":[]}', "integer loss"),
    (b'{"coalitions_micro": {}, "prefix_losses_micro": []}', "canonical"),
    (b"not json", "undecodable"),
])
def test_a_signed_blob_of_the_wrong_shape_forfeits_and_names_round_and_digest(
        honest: Path, tmp_path: Path, body: bytes, why: str) -> None:
    _, server_round, digest = _scored_round(honest)
    garbage = hashlib.sha256(body).hexdigest()

    def wrong_shape(fields: dict[str, Any], blobs: BlobStore) -> dict[str, Any]:
        if fields.get(GAME_LOSSES_DIGEST) == digest:
            fields[GAME_LOSSES_DIGEST] = blobs.put(body)
        return fields

    run = _rebuild(honest, tmp_path / "shape", wrong_shape)
    result = audit_run(run)
    # present and hashing to its name: no storage damage, the Scientist signed it
    assert result.ok and result.forfeited is True and result.reason == FORFEIT_SCORE
    assert any(f.startswith(f"round {server_round}: game losses blob {garbage}") and why in f
               for f in result.findings), result.findings
