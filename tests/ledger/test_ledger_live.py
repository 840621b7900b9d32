"""Verify and the CLI on a live log: another process appends while they read.

Issue 13 found 20 of 20 in-process and 10 of 10 CLI checks failing on a healthy log
being appended to (size, checkpoints, entries and nodes read in separate statements).
Each check now reads one snapshot: 0 false failures in 100 checks.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ORIGIN, candidate, seeded_signer
from typer.testing import CliRunner

from ledger.audit import verify_log
from ledger.entries import make_key_entry
from ledger.log import Log
from server.cli.ledger import ledger_app

REPO = Path(__file__).resolve().parents[2]
CHECKS = 100

APPENDER = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import ORIGIN, candidate, seeded_signer
from ledger.log import Log
log = Log.open(sys.argv[1], seeded_signer("operator"), ORIGIN)
author = seeded_signer("author-0")
print("ready", flush=True)
while True:
    start = log.next_seq(author.key_id)
    log.append(candidate(author, start))
    time.sleep(0.02)  # ~50 commits a second: many land inside every check, and the log
    # stays small enough that a loaded machine's checks keep up with it
"""


@pytest.fixture
def live_log(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A ledger (``request.param`` entries), and a writer process appending to it."""
    path = tmp_path / "ledger.db"
    author = seeded_signer("author-0")
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        log.append(make_key_entry(author))
        log.append_many([candidate(author, seq) for seq in range(1, request.param)])
    writer = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    try:
        yield path
    finally:
        writer.kill()
        writer.wait()


def _growth(path: Path, checks: int, check: object, *, min_growth: int = 0
            ) -> tuple[list[str], int]:
    """Run ``check`` ``checks`` times, and on until the writer has appended at least
    ``min_growth`` entries since the first (a faster verify must not outrun the writer
    and leave the log still): (failures, entries appended meanwhile)."""
    from ledger.log import LogReader

    with LogReader.open(path) as reader:
        before = reader.size
    failures: list[str] = []
    done, grown, deadline = 0, 0, time.monotonic() + 120
    while done < checks or (grown < min_growth and time.monotonic() < deadline):
        reason = check()  # type: ignore[operator]
        if reason:
            failures.append(str(reason))
        done += 1
        with LogReader.open(path) as reader:
            grown = reader.size - before
    return failures, grown


@pytest.mark.parametrize("live_log", [50], indirect=True)
def test_verify_never_fails_while_another_process_appends(live_log: Path) -> None:
    def check() -> str | None:
        report = verify_log(live_log, workers=1)
        return None if report.ok else str(report.failure)

    failures, grown = _growth(live_log, CHECKS, check, min_growth=50)
    assert failures == [], failures[:3]
    assert grown >= 50  # the writer really was committing all through the checks


@pytest.mark.parametrize("live_log", [4100], indirect=True)
def test_pooled_verify_and_cli_never_fail_while_appending(live_log: Path) -> None:
    runner = CliRunner()

    def pooled() -> str | None:
        report = verify_log(live_log, workers=2)
        return None if report.ok else str(report.failure)

    def cli() -> str | None:
        result = runner.invoke(ledger_app, ["verify", str(live_log)])
        return None if result.exit_code == 0 else result.output

    failures, grown = _growth(live_log, 3, pooled)
    cli_failures, _ = _growth(live_log, 5, cli)
    assert failures == [] and cli_failures == [], (failures + cli_failures)[:3]
    assert grown > 0
