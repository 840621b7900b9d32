"""``poi audit URL``: the market audited from its served ledger (issue 13), with the
same verdict as the audit of the run folder, and what a server that withholds or
damages a blob, or serves another tree, gets."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from test_market import honest  # noqa: F401 - the module-scoped run, shared
from typer.testing import CliRunner

from ledger import LogReader
from ledger.http import ledger_http_app
from server.cli import app
from server.deploy.processes import free_port
from server.market.audit import named_blobs


@contextmanager
def served(run: Path, *, inference: bool = False) -> Iterator[str]:
    """The run's ledger over HTTP (``poi ledger serve``'s app, or ``poi serve``'s mount)."""
    if inference:
        from server.inference.service import create_app

        asgi: Any = create_app(run, workers=1)
        prefix = "ledger/"
    else:
        asgi, prefix = ledger_http_app(run), ""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/{prefix}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_audit_of_a_url_matches_the_audit_of_the_folder(
    honest: tuple[Path, dict], tmp_path: Path,  # noqa: F811
) -> None:
    out, _ = honest
    run = _copy(out, tmp_path)
    runner = CliRunner()
    local = runner.invoke(app, ["audit", str(run)])
    assert local.exit_code == 0, local.output
    expected = json.loads((run / "audit.json").read_text())
    with served(run) as url:
        remote = runner.invoke(app, ["audit", url, "--mirror", str(tmp_path / "mirror")])
    assert remote.exit_code == 0, remote.output
    got = json.loads((tmp_path / "mirror" / "audit.json").read_text())
    assert got == expected  # the same verdict, payouts, rounds and credits
    with LogReader.open(run / "ledger.db") as reader:
        digests = named_blobs(list(reader.entries()))
    assert digests and all((tmp_path / "mirror" / "blobs" / d).is_file() for d in digests)


def test_poi_serve_serves_the_ledger_for_the_audit(
    honest: tuple[Path, dict], tmp_path: Path,  # noqa: F811
) -> None:
    out, _ = honest
    run = _copy(out, tmp_path)
    with served(run, inference=True) as url:
        assert httpx.get(url + "checkpoint").status_code == 200
        result = CliRunner().invoke(app, ["audit", url, "--mirror", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("harm", ["withheld", "damaged"])
def test_a_blob_the_server_withholds_or_damages_fails_the_audit_by_name(
    honest: tuple[Path, dict], tmp_path: Path, harm: str,  # noqa: F811
) -> None:
    out, _ = honest
    run = _copy(out, tmp_path)
    with LogReader.open(run / "ledger.db") as reader:
        entries = list(reader.entries())
    digest = next(str(e.fields["update_digest"]) for _, e in entries if e.kind == "candidate")
    blob = run / "blobs" / digest
    if harm == "withheld":
        blob.unlink()
    else:
        blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    with served(run) as url:
        result = CliRunner().invoke(app, ["audit", url, "--mirror", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    audit = json.loads((tmp_path / "m" / "audit.json").read_text())
    named = [m for m in audit["mismatches"] if digest in m]
    assert named, audit["mismatches"]
    assert ("missing" if harm == "withheld" else "damaged") in named[0]


def test_a_server_showing_another_log_key_fails_a_pinned_audit_and_gets_no_fetch(
    honest: tuple[Path, dict], tmp_path: Path,  # noqa: F811
) -> None:
    """...and no blob is fetched for a ledger that does not verify."""
    out, _ = honest
    run = _copy(out, tmp_path)
    with served(run) as url:
        result = CliRunner().invoke(app, ["audit", url, "--mirror", str(tmp_path / "m"),
                                          "--log-key", "other+00000000+AQ=="])
    assert result.exit_code == 1
    audit = json.loads((tmp_path / "m" / "audit.json").read_text())
    assert "expected log key" in audit["mismatches"][0]
    blobs = tmp_path / "m" / "blobs"
    assert not blobs.exists() or not any(blobs.iterdir())


def test_an_unreachable_url_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    port = free_port()
    result = CliRunner().invoke(app, ["audit", f"http://127.0.0.1:{port}/"])
    assert result.exit_code == 2 and "cannot reach" in result.output


def test_a_blob_left_in_a_reused_mirror_never_hides_one_the_server_withholds(
    honest: tuple[Path, dict], tmp_path: Path,  # noqa: F811
) -> None:
    out, _ = honest
    run = _copy(out, tmp_path)
    mirror = tmp_path / "m"
    with served(run) as url:
        assert CliRunner().invoke(app, ["audit", url, "--mirror", str(mirror)]).exit_code == 0
    with LogReader.open(run / "ledger.db") as reader:
        digest = next(str(e.fields["update_digest"]) for _, e in reader.entries()
                      if e.kind == "candidate")
    (run / "blobs" / digest).unlink()  # the server now withholds it; the mirror still has it
    with served(run) as url:
        result = CliRunner().invoke(app, ["audit", url, "--mirror", str(mirror)])
    assert result.exit_code == 1
    audit = json.loads((mirror / "audit.json").read_text())
    assert any(digest in m and "missing" in m for m in audit["mismatches"])
