"""``poi ledger`` commands: verify, show, prove, size."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import ORIGIN, populate, seeded_signer
from typer.testing import CliRunner

from ledger import merkle
from ledger.checkpoint import NoteVerifier, parse_checkpoint
from ledger.log import Log
from server.cli.ledger import ledger_app

runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    authors = [seeded_signer(f"author-{number}") for number in range(2)]
    with Log.open(tmp_path / "ledger.db", seeded_signer("operator"), ORIGIN) as log:
        populate(log, authors, batches=2)
    return tmp_path


def test_size_and_verify(run_dir: Path) -> None:
    result = runner.invoke(ledger_app, ["size", str(run_dir)])
    assert result.exit_code == 0 and result.stdout.strip() == "14"
    result = runner.invoke(ledger_app, ["verify", str(run_dir / "ledger.db")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout and "14 entries" in result.stdout


def test_verify_names_the_first_failure(run_dir: Path) -> None:
    db = sqlite3.connect(run_dir / "ledger.db")
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("UPDATE entries SET leaf = replace(leaf, 'task-1', 'task-2') WHERE idx = 6")
    db.commit()
    db.close()
    result = runner.invoke(ledger_app, ["verify", str(run_dir)])
    assert result.exit_code == 1
    assert "entry 6:" in result.output and "does not verify" in result.output


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    result = runner.invoke(ledger_app, ["verify", str(tmp_path / "nope.db")])
    assert result.exit_code == 2 and "expected a ledger database" in result.output


def test_show_filters(run_dir: Path) -> None:
    author = seeded_signer("author-1").key_id
    result = runner.invoke(
        ledger_app, ["show", str(run_dir), "--kind", "candidate", "--author", author]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("candidate") == 6


def test_prove_prints_a_verifiable_proof(run_dir: Path) -> None:
    result = runner.invoke(ledger_app, ["prove", str(run_dir), "--index", "5", "--size", "8"])
    assert result.exit_code == 0, result.output
    proof = json.loads(result.stdout)
    assert set(proof) == {
        "index", "tree_size", "leaf", "leaf_hash", "proof", "root", "checkpoint", "log_key"
    }  # fmt: skip
    verifier = NoteVerifier.from_vkey(proof["log_key"])
    checkpoint = parse_checkpoint(proof["checkpoint"], verifier=verifier, origin=ORIGIN)
    leaf = base64.b64decode(proof["leaf"])
    assert base64.b64decode(proof["leaf_hash"]) == merkle.hash_leaf(leaf)
    assert checkpoint.size == proof["tree_size"] == 8
    merkle.verify_inclusion(
        index=5,
        size=8,
        leaf_hash=merkle.hash_leaf(leaf),
        proof=[base64.b64decode(node) for node in proof["proof"]],
        root=checkpoint.root_hash,
    )
    result = runner.invoke(ledger_app, ["prove", str(run_dir), "--index", "5", "--size", "7"])
    assert result.exit_code == 1 and "checkpoint of size 7" in result.output


def test_prove_from_prints_a_verifiable_consistency_proof(run_dir: Path) -> None:
    result = runner.invoke(ledger_app, ["prove", str(run_dir), "--from", "2", "--size", "8"])
    assert result.exit_code == 0, result.output
    proof = json.loads(result.stdout)
    assert set(proof) == {
        "old_size", "tree_size", "old_root", "old_checkpoint", "proof", "root", "checkpoint",
        "log_key",
    }  # fmt: skip
    verifier = NoteVerifier.from_vkey(proof["log_key"])
    old = parse_checkpoint(proof["old_checkpoint"], verifier=verifier, origin=ORIGIN)
    new = parse_checkpoint(proof["checkpoint"], verifier=verifier, origin=ORIGIN)
    merkle.verify_consistency(
        size1=old.size, size2=new.size, root1=old.root_hash, root2=new.root_hash,
        proof=[base64.b64decode(node) for node in proof["proof"]],
    )
    for bad in (["--from", "9", "--size", "8"], ["--from", "0"], ["--index", "1", "--from", "2"]):
        result = runner.invoke(ledger_app, ["prove", str(run_dir), *bad])
        assert result.exit_code in (1, 2) and "error" in result.output
