"""Witnessed to the end (issue 13, findings 1 and 2): after the settlement every
subscriber checks, cosigns and keeps the final checkpoint, so an operator who rewrites
any part of a finished task and re-signs the tree is caught by ``verify`` (the final
cosignatures no longer match) and by every subscriber's notes (``witness-check``).

Each forgery here is otherwise competent: with the witnessing requirement off and
without the notes, the forged log verifies.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from client import protocol as P
from client.client_app import train, vote, witness
from client.config import RunConfig
from client.witness import notes_dir
from ledger import Log, LogReader, Signer, parse_entry, verify_log
from ledger.checkpoint import (
    ALG_COSIGNATURE_V1,
    NoteVerifier,
    cosign_checkpoint,
    parse_checkpoint,
)
from ledger.cosignatures import witness_verifier
from ledger.entries import Entry, make_key_entry, sign_entry
from server.cli.ledger import ledger_app
from server.market.audit import audit_run
from server.server_app import run_task
from tests.conftest import InProcessGrid, make_contexts, set_task_identity

HANDLERS = {"train": train, P.VOTE_MESSAGE_TYPE: vote, P.WITNESS_MESSAGE_TYPE: witness}
RUN = {"num-subscribers": 4, "num-server-rounds": 2, "partitioner": "iid", "seed": 7,
       "reward": 100_000, "update-fee": 7}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    set_task_identity()
    out = tmp_path_factory.mktemp("witnessed-run")
    run = {**RUN, "out-dir": str(out)}
    config = RunConfig.from_mapping(run)
    run_task(InProcessGrid(make_contexts(run, config.num_subscribers), HANDLERS), config, out)
    return out


def _notes(run: Path) -> list[Path]:
    return sorted(p for p in (run / "keys").iterdir() if p.is_dir())


def _all_notes(run: Path) -> list[str]:
    return [f.read_text() for d in _notes(run) for f in sorted(d.glob("*.note"))]


def test_every_subscriber_cosigned_and_kept_the_final_checkpoint(finished: Path) -> None:
    with LogReader.open(finished) as reader:
        settlement = max(i for i, _ in reader.entries(kind="settlement"))
        verifier = reader.verifier
        final_witnesses = {
            witness_verifier(str(e.fields["witness"])).vkey()
            for _, e in reader.entries(kind="cosignature") if e.fields["tree_size"] > settlement
        }
    assert len(final_witnesses) == RUN["num-subscribers"]
    folders = _notes(finished)
    assert [f.name for f in folders] == [f"partition-{n}-notes" for n in range(4)]
    assert folders[0] == notes_dir(finished / "keys" / "partition-0.pem")
    for folder in folders:
        sizes = [parse_checkpoint(f.read_text(), verifier=verifier).size
                 for f in folder.glob("*.note")]
        assert max(sizes) > settlement and len(sizes) >= 2 * RUN["num-server-rounds"]
        assert list(folder.glob("*.payout"))
    assert verify_log(finished, trusted_checkpoints=_all_notes(finished)).ok
    assert audit_run(finished).ok
    result = CliRunner().invoke(ledger_app, ["witness-check", str(finished),
                                             *[a for f in folders for a in ("--notes", str(f))]])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ the forger
def _replace_ids(fields: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return json.loads(json.dumps(fields).replace(old, new))


Body = list[tuple[int, bytes, Entry]]  # (original index, leaf, entry), cosignatures left out


def _forge(run: Path, target: Path, rewrite: Callable[[Body], tuple[int, list[bytes]]],
           stolen: Signer | None = None) -> None:
    """Rebuild the run's log as a dishonest operator would. ``rewrite`` gets the entries
    without the cosignatures and returns (the original index of its first change, the
    new entries, in order). Everything before that index is kept as it was (its
    cosignatures too: they still verify); after it, the operator's entries are
    re-signed with fresh seqs, every checkpoint is re-signed, and the cosignatures
    (which no longer verify) are dropped. With ``stolen``, the forger's key for a
    subscriber, that key also cosigns the forged final tree."""
    shutil.copytree(run, target)
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm", "ledger.db.lock"):
        (target / name).unlink(missing_ok=True)
    operator = Signer.load(run / "operator.pem")
    with LogReader.open(run) as reader:
        origin = reader.origin
        rows = [(i, reader.entry(i), parse_entry(reader.entry(i))) for i in range(reader.size)]
    body = [row for row in rows if row[2].kind != "cosignature"]
    first_change, new_body = rewrite(body)
    with Log.open(target, operator, origin) as log:
        for _, leaf, entry in rows[:first_change]:
            if entry.kind == "cosignature":
                log.add_cosignature(str(entry.fields["note"]),
                                    witness=witness_verifier(str(entry.fields["witness"])))
            else:
                log.append(leaf)
        kept = sum(1 for index, _, _ in body if index < first_change)
        for leaf in new_body[kept:]:
            entry = parse_entry(leaf)
            if entry.author == operator.key_id:
                leaf = sign_entry(operator, entry.kind, seq=log.next_seq(operator.key_id),
                                  fields=dict(entry.fields))
            log.append(leaf)
        if stolen is not None:
            name = f"subscriber-{stolen.key_id}"
            log.add_cosignature(
                cosign_checkpoint(log.checkpoint(), stolen, name=name, timestamp=1),
                witness=NoteVerifier.for_key(name, stolen.public_key_bytes,
                                             algorithm=ALG_COSIGNATURE_V1))


def _swap(kind: str, other: str | None = None) -> Callable[[Body], tuple[int, list[bytes]]]:
    """Swap the last two entries of ``kind`` (or the last ``kind`` and the last ``other``)."""
    def rewrite(body: Body) -> tuple[int, list[bytes]]:
        positions = [n for n, (_, _, e) in enumerate(body) if e.kind == kind]
        a, b = positions[-2:] if other is None else (
            positions[-1], [n for n, (_, _, e) in enumerate(body) if e.kind == other][-1])
        a, b = min(a, b), max(a, b)
        leaves = [leaf for _, leaf, _ in body]
        leaves[a], leaves[b] = leaves[b], leaves[a]
        return body[a][0], leaves
    return rewrite


def _steal(victim: str, thief: Signer) -> Callable[[Body], tuple[int, list[bytes]]]:
    """Identity theft: the victim's key entry replaced by the thief's, its entries
    re-signed with the thief's key, every mention of its key id (selections, the
    settlement's payouts) moved to the thief's."""
    def rewrite(body: Body) -> tuple[int, list[bytes]]:
        out, first = [], None
        for index, leaf, entry in body:
            if entry.author == victim:
                first = index if first is None else first
                leaf = make_key_entry(thief) if entry.kind == "key" else sign_entry(
                    thief, entry.kind, seq=entry.seq, fields=dict(entry.fields))
            elif victim in leaf.decode():
                first = index if first is None else first
                fields = json.loads(json.dumps(dict(entry.fields)).replace(victim, thief.key_id))
                leaf = sign_entry(_signer_of(entry), entry.kind, seq=entry.seq, fields=fields)
            out.append(leaf)
        assert first is not None
        return first, out
    return rewrite


_SIGNERS: dict[str, Signer] = {}


def _signer_of(entry: Entry) -> Signer:
    return _SIGNERS[entry.author]


def _check_forgery_caught(run: Path, forged: Path) -> None:
    # a competent forgery: without the witnessing rule and the notes, it verifies
    assert verify_log(forged, closing_kind=None).ok, verify_log(forged, closing_kind=None).failure
    report = verify_log(forged)
    assert report.failure is not None and "not witnessed to the end" in report.failure.reason
    assert not audit_run(forged).ok
    notes = _all_notes(run)
    report = verify_log(forged, trusted_checkpoints=notes, closing_kind=None)
    assert report.failure is not None, "the subscribers' notes must catch it"
    for folder in _notes(run):  # every single subscriber catches it with its own notes
        result = CliRunner().invoke(ledger_app, ["witness-check", str(forged),
                                                 "--notes", str(folder)])
        assert result.exit_code == 1, result.output


@pytest.mark.parametrize("rewrite", [
    pytest.param(lambda: _swap("ballot"), id="last-round-ballots-swapped"),
    pytest.param(lambda: _swap("score", "close"), id="last-score-and-close-swapped"),
    pytest.param(lambda: _swap("selection", "model"), id="last-selection-and-model-swapped"),
])
def test_rewrites_of_the_last_round_are_caught(finished: Path, tmp_path: Path,
                                               rewrite: Callable[[], Any]) -> None:
    _forge(finished, tmp_path / "forged", rewrite())
    _check_forgery_caught(finished, tmp_path / "forged")


def test_identity_theft_is_refused_by_verify_audit_and_every_subscriber(
        finished: Path, tmp_path: Path) -> None:
    _SIGNERS.update({s.key_id: s for s in (Signer.load(finished / "operator.pem"),
                                           Signer.load(finished / "scientist.pem"))})
    victim = Signer.load(finished / "keys" / "partition-1.pem").key_id
    thief = Signer.from_seed(b"t" * 32)
    honest = audit_run(finished)
    assert honest.payouts.get(victim, 0) > 0
    _forge(finished, tmp_path / "forged", _steal(victim, thief), stolen=thief)
    # the forged settlement pays the thief what the victim earned ...
    with LogReader.open(tmp_path / "forged") as reader:
        (_, settlement), = list(reader.entries(kind="settlement"))
    assert settlement.fields["payouts"][thief.key_id] == honest.payouts[victim]
    assert victim not in settlement.fields["payouts"]
    # ... and nobody accepts it
    _check_forgery_caught(finished, tmp_path / "forged")


# ------------------------------------------------------------- every blob checked
def _blob_of(run: Path, kind: str, field: str, pick: int = 0) -> str:
    with LogReader.open(run) as reader:
        return str([e for _, e in reader.entries(kind=kind)][pick].fields[field])


@pytest.mark.parametrize("kind, field, damage", [
    ("task", "config_digest", "alter"),
    ("candidate", "update_digest", "delete"),
    ("reveal", "validation_digest", "alter"),
])
def test_audit_checks_every_blob_the_ledger_names(finished: Path, tmp_path: Path, kind: str,
                                                  field: str, damage: str) -> None:
    import os

    from ledger.blobs import BlobStore

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    digest = _blob_of(run, kind, field, pick=-1)  # the last candidate: often unselected
    path = BlobStore.beside(run / "ledger.db").path(digest)
    os.chmod(path, 0o644)
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes() + b"\0")
    result = audit_run(run)
    assert not result.ok
    problem = "missing" if damage == "delete" else "altered (damaged storage)"
    assert result.mismatches[0].startswith(f"blob {digest} ({kind} entry"), result.mismatches
    assert result.mismatches[0].endswith(f"{field}): {problem}")


def test_a_subscriber_gone_before_the_end_fails_verify_unless_the_verifier_excuses_it(
        tmp_path: Path) -> None:
    """Subscriber 1001 never answers the final witness message: verify fails naming it;
    a verifier who accepts that (``--excuse-witness KEY``) gets OK with the key named;
    excusing someone else changes nothing."""
    set_task_identity()
    run = {**RUN, "out-dir": str(tmp_path)}
    config = RunConfig.from_mapping(run)

    def silent_at_the_end(node: int, reply: Any) -> Any:
        return None if node == 1001 and reply.metadata.message_type == "query.witness" \
            else reply

    run_task(InProcessGrid(make_contexts(run, config.num_subscribers), HANDLERS,
                           tamper=silent_at_the_end), config, tmp_path)
    gone = Signer.load(tmp_path / "keys" / "partition-1.pem").key_id
    other = Signer.load(tmp_path / "keys" / "partition-2.pem").key_id
    strict = verify_log(tmp_path)
    assert strict.failure is not None and gone in strict.failure.reason
    assert verify_log(tmp_path, excused_witnesses=[other]).failure is not None
    excused = verify_log(tmp_path, excused_witnesses=[gone])
    assert excused.ok and excused.excused == (gone,)
    result = CliRunner().invoke(ledger_app, ["verify", str(tmp_path), "--excuse-witness", gone])
    assert result.exit_code == 0 and "excused" in result.output and gone in result.output
    assert CliRunner().invoke(ledger_app, ["verify", str(tmp_path)]).exit_code == 1
