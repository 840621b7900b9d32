"""Shared fixtures for the ledger tests: deterministic keys and a small populated log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger import Log, Signer
from ledger.entries import make_key_entry, sign_entry

ORIGIN = "poi.example/test-log"


def seeded_signer(label: str) -> Signer:
    """A deterministic signer, so tests and subprocesses can rebuild the same keys."""
    return Signer.from_seed(label.encode().ljust(32, b".")[:32])


def candidate(author: Signer, seq: int, *, round_number: int = 0) -> bytes:
    return sign_entry(author,
        "candidate",
        seq=seq,
        fields={"task_id": "task-1", "round": round_number, "update_digest": f"{seq:064x}"},
    )


@pytest.fixture
def operator() -> Signer:
    return seeded_signer("operator")


@pytest.fixture
def authors() -> list[Signer]:
    return [seeded_signer(f"author-{number}") for number in range(3)]


@pytest.fixture
def log(tmp_path: Path, operator: Signer) -> Iterator[Log]:
    opened = Log.open(tmp_path / "ledger.db", operator, ORIGIN)
    yield opened
    opened.close()


def populate(log: Log, authors: list[Signer], *, batches: int = 4, per_author: int = 3) -> None:
    """Key entries, then ``batches`` group commits of candidates from every author."""
    log.append_many([make_key_entry(author) for author in authors])
    for batch in range(batches):
        log.append_many(
            [
                candidate(author, 1 + batch * per_author + offset, round_number=batch)
                for author in authors
                for offset in range(per_author)
            ]
        )
