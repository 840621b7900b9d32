"""The ledger over HTTP as C2SP tlog-tiles (issue 13): byte-compatible tiles, a remote
audit that trusts nothing it fetches, and what a hostile server can and cannot do.

The tiles are held to an independent reader written from the specs (``tlog_reader``,
which imports nothing of ours); the remote audit is held to the local one on the same
log, and every kind of lie a server can tell (an altered entry, tile, checkpoint,
history row, key, or a malformed resource) must fail it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import tlog_reader
import uvicorn
from conftest import ORIGIN, candidate, populate, seeded_signer
from hypothesis import given
from hypothesis import strategies as st
from test_ledger_audit import _rebuild
from test_ledger_witnesses import AUTHORS, _cosign_all
from typer.testing import CliRunner

from ledger.audit import verify_log
from ledger.checkpoint import NoteVerifier
from ledger.entries import make_key_entry, sign_entry
from ledger.errors import EntryError
from ledger.http import IMMUTABLE, ledger_http_app
from ledger.log import Log, LogReader
from ledger.remote import RemoteError, mirror_log, verify_remote
from ledger.tiles import (
    MAX_ENTRY_SIZE,
    TileError,
    TileRef,
    decode_bundle,
    encode_bundle,
    parse_tile_path,
    tiles_for,
)
from server.cli.ledger import ledger_app
from server.deploy.processes import free_port

REPO = Path(__file__).resolve().parents[2]
EMPTY_ROOT_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- paths
def test_paths_are_the_specs_examples() -> None:
    assert TileRef(0, 1234067).path == "tile/0/x001/x234/067"
    assert parse_tile_path("tile/0/x001/x234/067") == TileRef(0, 1234067)
    assert TileRef(-1, 5, 17).path == "tile/entries/005.p/17"
    assert parse_tile_path("tile/entries/x001/000.p/255") == TileRef(-1, 1000, 255)
    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial
    # level 0 tile of width 112, one full level 1 tile, one partial level 1 tile of
    # width 17, and one partial level 2 tile of width 1"
    hashes = [ref for ref in tiles_for(70_000) if not ref.is_entries]
    assert [r for r in hashes if r.level == 0] == [TileRef(0, n) for n in range(273)] + [
        TileRef(0, 273, 112)
    ]
    assert [r for r in hashes if r.level > 0] == [
        TileRef(1, 0), TileRef(1, 1, 17), TileRef(2, 0, 1)
    ]
    # "a tree of size 256 will be represented by a full level 0 tile and a partial level
    # 1 tile of width 1"
    assert tiles_for(256, entries=False) == [TileRef(0, 0), TileRef(1, 0, 1)]
    assert tiles_for(0) == []


@given(st.integers(-1, 63), st.integers(0, 10**12), st.integers(1, 256))
def test_paths_round_trip_and_agree_with_the_independent_reader(
    level: int, index: int, width: int
) -> None:
    ref = TileRef(level, index, width)
    assert parse_tile_path(ref.path) == ref
    name = "entries" if level < 0 else str(level)
    assert ref.path == tlog_reader.tile_path(name, index, width)


@pytest.mark.parametrize("path", [
    "tile/00/000", "tile/64/000", "tile/0/0001", "tile/0/01", "tile/0/x000/001",
    "tile/0/001.p/0", "tile/0/001.p/256", "tile/0/001.p/01", "tile/0/x1/001",
    "tile/entries/001.p", "tile/0/001/", "tile//001", "tiles/0/001", "tile/-1/001",
    "tile/0/001.p/5/6", "tile/0/.p/5", "tile/0/x001", "tile/E/001",
])
def test_paths_the_spec_does_not_allow_are_refused(path: str) -> None:
    with pytest.raises(TileError):
        parse_tile_path(path)


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_bundles_round_trip(leaves: list[bytes]) -> None:
    assert decode_bundle(encode_bundle(leaves), len(leaves)) == leaves


def test_bundles_refuse_what_does_not_fit() -> None:
    with pytest.raises(TileError, match="at most 65535"):
        encode_bundle([b"x" * (MAX_ENTRY_SIZE + 1)])
    data = encode_bundle([b"abc", b"de"])
    for broken, count in ((data[:-1], 2), (data + b"\x00", 2), (data, 3), (data, 1)):
        with pytest.raises(TileError):
            decode_bundle(broken, count)


def test_the_log_refuses_an_entry_no_bundle_can_carry(log: Log) -> None:
    author = seeded_signer("author-0")
    log.append(make_key_entry(author))
    big = sign_entry(author, "candidate", seq=1, fields={
        "task_id": "t" * MAX_ENTRY_SIZE, "round": 0, "update_digest": "0" * 64})
    with pytest.raises(EntryError, match="at most 65535 bytes"):
        log.append(big)
    assert log.size == 1


def test_verify_reports_an_oversized_entry_planted_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    author = seeded_signer("author-0")
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        log.append(make_key_entry(author))
        big = sign_entry(author, "candidate", seq=1, fields={
            "task_id": "t" * MAX_ENTRY_SIZE, "round": 0, "update_digest": "0" * 64})
        log._bulk_load_unverified([big])
    report = verify_log(path)
    assert report.failure is not None and report.failure.index == 1
    assert "at most 65535 bytes" in report.failure.reason


# --------------------------------------------------------------------------- serving
class Served:
    """A ledger served by uvicorn on a free port, in a thread."""

    def __init__(self, path: Path) -> None:
        port = free_port()
        config = uvicorn.Config(ledger_http_app(path), host="127.0.0.1", port=port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}/"

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=headers)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def served(path: Path) -> Iterator[Served]:
    server = Served(path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def spec_sized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served]]:
    """70,000 entries (the spec's example size), loaded through the unverified fast
    path: for the layout, not the signatures."""
    path = tmp_path_factory.mktemp("spec") / "ledger.db"
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        for start in range(0, 70_000, 10_000):
            log._bulk_load_unverified([
                number.to_bytes(4, "big") * (1 + number % 7)
                for number in range(start, start + 10_000)
            ])
    with served(path) as server:
        yield path, server


@pytest.fixture(scope="module")
def witnessed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served]]:
    """A signed log of 3 authors across tile boundaries (about 760 entries), cosigned by
    all three after each of 6 group commits."""
    path = tmp_path_factory.mktemp("witnessed") / "ledger.db"
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        populate(log, AUTHORS, batches=1, per_author=2)
        _cosign_all(log, 1)
        for batch in range(6):
            log.append_many([candidate(a, log.next_seq(a.key_id) + i)
                             for a in AUTHORS for i in range(40)])
            _cosign_all(log, 2 + batch)
    with served(path) as server:
        yield path, server


def _vkey(path: Path) -> str:
    with LogReader.open(path) as reader:
        return reader.log_key


def test_tiles_read_by_an_independent_reader_from_the_spec(
    spec_sized: tuple[Path, Served],
) -> None:
    path, server = spec_sized
    size, entries = tlog_reader.read_log(lambda p: server.get(p).raise_for_status().content,
                                         _vkey(path))
    assert size == 70_000
    with LogReader.open(path) as reader:
        assert entries[::997] == [reader.entry(i) for i in range(0, size, 997)]


def test_served_resources_carry_the_specs_headers(spec_sized: tuple[Path, Served]) -> None:
    _, server = spec_sized
    checkpoint = server.get("checkpoint")
    assert checkpoint.headers["content-type"] == "text/plain; charset=utf-8"
    assert checkpoint.headers["cache-control"] == "no-cache"
    tile = server.get("tile/1/000")
    assert tile.headers["content-type"] == "application/octet-stream"
    assert tile.headers["cache-control"] == IMMUTABLE and len(tile.content) == 8192
    raw = httpx.get(server.url + "tile/entries/000", headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip" and "Accept-Encoding" in raw.headers["vary"]
    plain = httpx.get(server.url + "tile/entries/000", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert raw.content == plain.content  # httpx decodes the gzip body
    with httpx.stream("GET", server.url + "tile/entries/000",
                      headers={"Accept-Encoding": "gzip"}) as stream:
        assert gzip.decompress(b"".join(stream.iter_raw())) == plain.content


def test_partial_tiles_are_prefixes_and_what_the_tree_lacks_is_404(
    spec_sized: tuple[Path, Served],
) -> None:
    _, server = spec_sized
    full = server.get("tile/0/000").content
    assert server.get("tile/0/000.p/5").content == full[: 5 * 32]
    assert server.get("tile/1/001.p/17").status_code == 200
    for missing in ("tile/0/273", "tile/0/273.p/113", "tile/0/274.p/1", "tile/1/001",
                    "tile/2/000", "tile/3/000.p/1", "tile/entries/273", "tile/0/0001",
                    "tile/0/x000/001"):
        response = server.get(missing)
        assert response.status_code == 404, missing
        assert response.text  # a reason, as text
    assert server.get("tile/entries/273.p/112").status_code == 200


@pytest.mark.parametrize("name", ["..%2F..%2Fledger.db", "ledger.db", "0" * 63, "G" * 64])
def test_blobs_are_named_by_digest_only(spec_sized: tuple[Path, Served], name: str) -> None:
    _, server = spec_sized
    assert server.get(f"poi/blobs/{name}").status_code == 404


# --------------------------------------------------------------------------- remote audit
def test_a_remote_audit_agrees_with_the_local_one(
    witnessed: tuple[Path, Served], tmp_path: Path,
) -> None:
    path, server = witnessed
    local = verify_log(path, closing_kind=None)
    report, fetched = verify_remote(server.url, tmp_path, log_key=_vkey(path),
                                    closing_kind=None)
    assert local.ok and report.ok, report.failure
    assert (report.size, report.checkpoints, report.authors) == (
        local.size, local.checkpoints, local.authors)
    assert report.size > 700 and fetched.size == report.size
    with LogReader.open(path) as original, LogReader.open(fetched.path) as mirror:
        assert mirror.root() == original.root()
        assert mirror.checkpoint() == original.checkpoint()  # cosignatures included


class Hostile(httpx.BaseTransport):
    """A server that answers as the real one, except where ``lie`` changes the body."""

    def __init__(self, lie: Callable[[str, bytes], bytes]) -> None:
        self.real = httpx.HTTPTransport()
        self.lie = lie
        self.lied = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.real.handle_request(request)
        body = response.read()  # decoded from gzip already
        headers = [(k, v) for k, v in response.headers.items()
                   if k not in ("content-encoding", "content-length")]
        told = self.lie(request.url.path.lstrip("/"), body)
        self.lied |= told != body
        return httpx.Response(response.status_code, headers=headers, content=told)


def _history(change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def lie(path: str, body: bytes) -> bytes:
        if path != "poi/history":
            return body
        document = json.loads(body)
        change(document)
        return json.dumps(document).encode()
    return lie


def _flip(target: str, offset: int) -> Callable[[str, bytes], bytes]:
    def lie(path: str, body: bytes) -> bytes:
        if path != target:
            return body
        return body[:offset] + bytes([body[offset] ^ 1]) + body[offset + 1:]
    return lie


def _flip_signature(target: str) -> Callable[[str, bytes], bytes]:
    """One base64 character of the first entry's signature (its last 88 bytes)."""
    def lie(path: str, body: bytes) -> bytes:
        if path != target:
            return body
        end = 2 + int.from_bytes(body[:2], "big")
        at = end - 10
        return body[:at] + (b"A" if body[at:at + 1] != b"A" else b"B") + body[at + 1:]
    return lie


def _drop(rows: str, position: int) -> Callable[[dict], None]:
    return lambda document: document[rows].pop(position)


def _cosignature_line(document: dict) -> None:
    line = document["cosignatures"][3]["line"]
    document["cosignatures"][3]["line"] = line[:-6] + ("A" if line[-6] != "A" else "B") + line[-5:]


def _checkpoint_row(document: dict) -> None:
    row = document["checkpoints"][4]
    row["root"] = base64.b64encode(bytes(32)).decode()


LIES: dict[str, Callable[[str, bytes], bytes]] = {
    "an entry's payload": _flip("tile/entries/001", 100),
    "an entry's signature": _flip_signature("tile/entries/001"),
    "an entry in the partial bundle": _flip("tile/entries/002.p/239", 150),
    "a leaf hash in a level-0 tile": _flip("tile/0/001", 40),
    "a hash in the level-1 tile": _flip("tile/1/000.p/2", 3),
    "a checkpoint row dropped": _history(_drop("checkpoints", 3)),
    "the last checkpoint dropped": _history(_drop("checkpoints", -1)),
    "a cosignature row dropped": _history(_drop("cosignatures", 2)),
    "a cosignature line altered": _history(_cosignature_line),
    "a checkpoint row's root": _history(_checkpoint_row),
    "a smaller size claimed": _history(lambda d: d.update(size=d["size"] - 1)),
}


@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
def test_every_lie_of_a_hostile_server_fails_the_remote_audit(
    witnessed: tuple[Path, Served], tmp_path: Path, lie: str,
) -> None:
    path, server = witnessed
    assert verify_log(path, closing_kind=None).ok
    hostile = Hostile(LIES[lie])
    client = httpx.Client(transport=hostile, timeout=30)
    try:
        fetched = mirror_log(server.url, tmp_path, client=client)
    except RemoteError:
        assert hostile.lied
        return  # refused while fetching: as good as a failed audit
    finally:
        client.close()
    assert hostile.lied, "the lie must have been told"
    report = verify_log(fetched.path, log_key=_vkey(path),
                        trusted_checkpoints=[fetched.checkpoint], closing_kind=None)
    assert report.failure is not None, lie


def _refused(server: Served, tmp_path: Path, transport: httpx.BaseTransport) -> RemoteError:
    """The RemoteError a mirror through ``transport`` must end in."""
    client = httpx.Client(transport=transport, timeout=30)
    try:
        with pytest.raises(RemoteError) as raised:
            mirror_log(server.url, tmp_path, client=client)
    finally:
        client.close()
    return raised.value


@pytest.mark.parametrize("lie", ["truncated tile", "bundle with an extra entry", "history",
                                 "history field"])
def test_malformed_resources_are_refused_with_their_name(
    witnessed: tuple[Path, Served], tmp_path: Path, lie: str,
) -> None:
    _, server = witnessed

    def serve(path: str, body: bytes) -> bytes:
        if lie == "truncated tile" and path == "tile/0/001":
            return body[:-1]
        if lie == "bundle with an extra entry" and path == "tile/entries/000":
            return body + b"\x00\x01x"
        if lie == "history" and path == "poi/history":
            return b"{not json"
        if lie == "history field" and path == "poi/history":
            return json.dumps({**json.loads(body), "size": "760"}).encode()
        return body

    raised = _refused(server, tmp_path, Hostile(serve))
    assert not raised.unreachable
    named = {"truncated tile": "tile/0/001", "bundle with an extra entry": "tile/entries/000",
             "history": "poi/history", "history field": "poi/history.size"}[lie]
    assert named in str(raised)


def test_a_swapped_log_key_fails_a_pinned_audit(
    witnessed: tuple[Path, Served], tmp_path: Path,
) -> None:
    path, server = witnessed
    stranger = NoteVerifier.for_key(ORIGIN, seeded_signer("stranger").public_key_bytes).vkey()
    report, _ = verify_remote(server.url, tmp_path, log_key=stranger, closing_kind=None)
    assert report.failure is not None and "expected log key" in report.failure.reason


def test_a_fork_served_to_an_auditor_fails_against_the_subscribers_notes(
    witnessed: tuple[Path, Served], tmp_path: Path,
) -> None:
    """The operator rewrites one entry and re-signs every tree with its own key: the
    forged log verifies on its own, but not against the notes subscribers cosigned."""
    path, _ = witnessed
    with LogReader.open(path) as reader:
        notes = [row.note for row in reader.stored_checkpoints()]
    forged = tmp_path / "forged" / "ledger.db"
    forged.parent.mkdir()
    shutil.copy(path, forged)
    db = sqlite3.connect(forged, isolation_level=None)
    for table in ("entries", "nodes", "checkpoints", "cosignatures"):
        db.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        db.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    db.execute("BEGIN")
    author = AUTHORS[1]
    (index, seq), = db.execute("SELECT idx, seq FROM entries WHERE author = ? AND kind = ? "
                               "ORDER BY idx LIMIT 1 OFFSET 10", (author.key_id, "candidate"))
    rewritten = sign_entry(author, "candidate", seq=seq, fields={
        "task_id": "task-1", "round": 0, "update_digest": "f" * 64})  # the author's own key
    db.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (rewritten, index))
    # and drops the witnesses' evidence (its own cosignature entries), renumbering the rest
    kept = [row for row in db.execute("SELECT leaf, author, seq, kind FROM entries "
                                      "WHERE kind != 'cosignature' AND author != ? ORDER BY idx",
                                      (seeded_signer("operator").key_id,))]
    db.execute("DELETE FROM entries")
    db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                   [(i, *row) for i, row in enumerate(kept)])
    db.execute("DELETE FROM cosignatures")
    db.execute("DELETE FROM checkpoints")
    db.execute("INSERT INTO checkpoints (size, root, note) VALUES (0, ?, ?)",
               (bytes.fromhex(EMPTY_ROOT_HEX), notes[0]))
    _rebuild(db, keep_old_checkpoints=True, sign_all=False)
    db.execute("COMMIT")
    db.close()
    assert verify_log(forged, log_key=_vkey(path), closing_kind=None).ok  # alone: it passes
    with served(forged) as server:
        alone = CliRunner().invoke(ledger_app, ["verify", server.url, "--log-key", _vkey(path)])
        assert alone.exit_code == 0, alone.output
        report, _ = verify_remote(server.url, tmp_path / "mirror", log_key=_vkey(path),
                                  trusted_checkpoints=notes, closing_kind=None)
        assert report.failure is not None and "checkpoint" in report.failure.reason


# --------------------------------------------------------------------------- CLI
def test_serve_and_verify_a_url_from_the_command_line(
    witnessed: tuple[Path, Served], tmp_path: Path,
) -> None:
    path, _ = witnessed
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "ledger", "serve", str(path), "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/checkpoint").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        runner = CliRunner()
        ok = runner.invoke(ledger_app, ["verify", url, "--log-key", _vkey(path),
                                        "--mirror", str(tmp_path / "m")])
        # no settlement in this log, so "witnessed to the end" does not apply
        assert ok.exit_code == 0, ok.output
        assert f"OK {url}" in ok.output and (tmp_path / "m" / "ledger.db").is_file()
        wrong = runner.invoke(ledger_app, ["verify", url, "--log-key", "x+00000000+AQ=="])
        assert wrong.exit_code == 1
        mirrored = runner.invoke(ledger_app, ["mirror", url, str(tmp_path / "copy")])
        assert mirrored.exit_code == 0 and "mirrored" in mirrored.output
    finally:
        process.terminate()
        process.wait(timeout=30)
    gone = CliRunner().invoke(ledger_app, ["verify", url])
    assert gone.exit_code == 2 and "cannot fetch" in gone.output


# --------------------------------------------------------------------------- live
def test_a_remote_audit_of_a_live_log_has_no_false_failure(tmp_path: Path) -> None:
    """A writer appends while the log is mirrored and audited, five times over."""
    path = tmp_path / "live" / "ledger.db"
    path.parent.mkdir()
    author = seeded_signer("author-0")
    with Log.open(path, seeded_signer("operator"), ORIGIN) as log:
        log.append(make_key_entry(author))
        log.append_many([candidate(author, seq) for seq in range(1, 600)])
        stop = threading.Event()

        def append() -> None:
            while not stop.is_set():
                log.append(candidate(author, log.next_seq(author.key_id)))
                time.sleep(0.005)

        writer = threading.Thread(target=append)
        with served(path) as server:
            writer.start()
            try:
                failures = []
                for check in range(5):
                    report, _ = verify_remote(server.url, tmp_path / f"m{check}",
                                              closing_kind=None)
                    if report.failure is not None:
                        failures.append(str(report.failure))
            finally:
                stop.set()
                writer.join()
        assert failures == []
        assert log.size > 600


# --------------------------------------------------------------------------- attacker review
class Bomb(httpx.BaseTransport):
    """A server whose one resource ``target`` is ``body`` (gzip-encoded when ``gzipped``)."""

    def __init__(self, target: str, body: bytes, *, gzipped: bool = False) -> None:
        self.real, self.target, self.body, self.gzipped = (
            httpx.HTTPTransport(), target, body, gzipped)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.lstrip("/") != self.target:
            return self.real.handle_request(request)
        headers = {"content-encoding": "gzip"} if self.gzipped else {}
        return httpx.Response(200, headers=headers, content=self.body)


@pytest.mark.parametrize("target", ["tile/0/000", "tile/entries/000", "checkpoint"])
def test_a_gzip_bomb_is_refused_at_the_resources_bound(
    witnessed: tuple[Path, Served], tmp_path: Path, target: str,
) -> None:
    _, server = witnessed
    bomb = gzip.compress(bytes(200 << 20), compresslevel=9)  # 200 MiB of zeros in ~200 KB
    assert "expected at most" in str(_refused(server, tmp_path,
                                              Bomb(target, bomb, gzipped=True)))


def test_a_huge_claimed_size_fails_at_its_first_missing_tile(
    witnessed: tuple[Path, Served], tmp_path: Path,
) -> None:
    _, server = witnessed
    started = time.monotonic()
    huge = Hostile(_history(lambda d: d.update(size=2**50)))
    assert "expected 200" in str(_refused(server, tmp_path, huge))
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("value", ["\ud800", 2**63])
def test_values_sqlite_cannot_store_are_refused_not_a_traceback(
    witnessed: tuple[Path, Served], tmp_path: Path, value: object,
) -> None:
    _, server = witnessed

    def change(document: dict) -> None:
        if isinstance(value, str):
            document["checkpoints"][2]["note"] += value
        else:
            document["cosignatures"][0]["id"] = value

    assert "served" in str(_refused(server, tmp_path, Hostile(_history(change))))


def test_mirroring_never_replaces_a_ledger_it_did_not_make(
    witnessed: tuple[Path, Served], tmp_path: Path,
) -> None:
    path, server = witnessed
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "ledger.db")
    before = (run / "ledger.db").read_bytes()
    with pytest.raises(RemoteError, match="not a mirror"):
        mirror_log(server.url, run)
    assert (run / "ledger.db").read_bytes() == before
    result = CliRunner().invoke(ledger_app, ["mirror", server.url, str(run)])
    assert result.exit_code == 1 and (run / "ledger.db").read_bytes() == before
    mirror_log(server.url, tmp_path / "m")
    mirror_log(server.url, tmp_path / "m")  # an earlier mirror is replaced


def test_gzip_only_when_the_client_accepts_it(spec_sized: tuple[Path, Served]) -> None:
    _, server = spec_sized
    for header, gzipped in (("gzip", True), ("gzip;q=0", False), ("identity", False),
                            ("br, gzip;q=0.5", True), ("*", True), ("gzip;q=0.0, br", False)):
        with httpx.stream("GET", server.url + "tile/entries/000",
                          headers={"Accept-Encoding": header}) as response:
            assert (response.headers.get("content-encoding") == "gzip") is gzipped, header


def test_history_is_built_once_per_commit(witnessed: tuple[Path, Served]) -> None:
    path, server = witnessed
    first = server.get("poi/history").content
    assert server.get("poi/history").content == first
    document = json.loads(first)
    with LogReader.open(path) as reader:
        assert document["size"] == reader.size
        assert len(document["checkpoints"]) == len(reader.stored_checkpoints())
