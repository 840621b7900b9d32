"""``poi serve`` as a process: SIGTERM, SIGINT, SIGKILL and a run folder that vanishes
leave no worker behind; bodies stalled mid-way get 408 and close; eight concurrent
maximum-size context uploads do not grow the service's memory by their size."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crypto import vouchers
from ledger import Signer
from server.inference.requests import MAX_CONTEXT_BYTES
from server.inference.service import fund_account
from tests.inference.test_inference import run_dir as run_dir  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rss_kib(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Served:
    def __init__(self, run: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "poi"), "serve", str(run), "--port", str(self.port),
             "--workers", "1", *extra], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/v1/model", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.workers = _children(self.process.pid)
        assert self.workers, "expected HE worker processes"

    def stop(self, sig: int, timeout: float = 60) -> str:
        self.process.send_signal(sig)
        out, _ = self.process.communicate(timeout=timeout)
        return out


@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("inference", "*.lock"))
    yield run


def _gone(pids: set[int], within: float = 10.0) -> set[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = {p for p in pids if _alive(p)}
        if not alive:
            return set()
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "vanished-then-SIGTERM", "SIGKILL"])
def test_no_worker_outlives_the_service(run_copy: Path, how: str) -> None:
    served = Served(run_copy)
    workers = set(served.workers)
    if how.startswith("vanished"):
        shutil.rmtree(run_copy)
    sig = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL,
           "vanished-then-SIGTERM": signal.SIGTERM}[how]
    out = served.stop(sig)
    assert not _gone(workers), f"{how}: workers left behind; service said:\n{out}"
    assert "Traceback" not in out or how == "SIGKILL", out


def test_stalled_bodies_get_408_and_the_service_keeps_serving(run_copy: Path) -> None:
    signer_path = run_copy / "stall.pem"
    fund_account(run_copy, signer_path, 100)
    signer = Signer.load(signer_path)
    served = Served(run_copy, "--body-idle-seconds", "1")
    try:
        task_id = httpx.get(f"{served.url}/v1/model").json()["task_id"]
        digest = "ab" * 32
        signature = base64.b64encode(signer.sign(vouchers.context_message(
            task_id, "batch", digest))).decode()
        head = (f"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                f"Content-Type: application/octet-stream\r\nX-Poi-Layout: batch\r\n"
                f"X-Poi-Buyer: {signer.key_id}\r\nX-Poi-Context-Sha256: {digest}\r\n"
                f"X-Poi-Signature: {signature}\r\n\r\n").encode()
        sockets = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", served.port))
            s.sendall(head + b"x" * 1000)  # then nothing
            s.settimeout(10)
            sockets.append(s)
        replies = [_read_reply(s) for s in sockets]
        # one buyer: two of its uploads are read (and time out), the rest get 429 at once
        statuses = Counter(r[9:12] for r in replies)
        assert statuses[b"408"] >= 2 and statuses[b"408"] + statuses[b"429"] == 20, replies[:2]
        assert all(b'"error"' in r for r in replies)
        for s in sockets:
            s.close()
        assert httpx.get(f"{served.url}/v1/model").status_code == 200
    finally:
        out = served.stop(signal.SIGTERM)
    assert "Traceback" not in out, out


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while b'"error"' not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_memory_stays_bounded_under_eight_maximum_size_uploads(run_copy: Path) -> None:
    signer_path = run_copy / "big.pem"
    fund_account(run_copy, signer_path, 100)
    signer = Signer.load(signer_path)
    served = Served(run_copy)
    limit = MAX_CONTEXT_BYTES["single"]
    try:
        task_id = httpx.get(f"{served.url}/v1/model").json()["task_id"]
        pids = {served.process.pid} | _children(served.process.pid)
        base = _rss_kib(pids)
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib({served.process.pid}
                                                | _children(served.process.pid)))
                time.sleep(0.05)

        statuses: list[int] = []

        def upload(i: int) -> None:
            chunk = bytes([i]) * (1 << 20)
            digest = hashlib.sha256(chunk * (limit >> 20)).hexdigest()
            signature = base64.b64encode(signer.sign(vouchers.context_message(
                task_id, "single", digest))).decode()

            def body() -> Iterator[bytes]:
                for _ in range(limit >> 20):
                    yield chunk

            response = httpx.post(f"{served.url}/v1/contexts", content=body(), timeout=300,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(limit),
                                           "X-Poi-Layout": "single",
                                           "X-Poi-Buyer": signer.key_id,
                                           "X-Poi-Context-Sha256": digest,
                                           "X-Poi-Signature": signature})
            statuses.append(response.status_code)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        sampler.join()
        growth_mib = (peak[0] - base) / 1024
        print(f"\nmemory: 8 concurrent {limit >> 20} MiB uploads, service RSS "
              f"{base / 1024:.0f} MiB -> peak {peak[0] / 1024:.0f} MiB "
              f"(+{growth_mib:.0f} MiB), statuses {sorted(statuses)}")
        assert all(400 <= s < 500 for s in statuses), statuses  # garbage contexts: 422
        assert growth_mib < 2 * (limit >> 20), "uploads must not be held in memory"
        assert not list((run_copy / "inference" / "tmp").iterdir())
    finally:
        served.stop(signal.SIGTERM)


def _status_line(s: socket.socket) -> bytes:
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.split(b"\r\n", 1)[0]


def test_headers_are_bounded_in_size_and_time(run_copy: Path) -> None:
    """Headers over 32 KiB get 431 from a real ``poi serve`` (before the fix, httptools
    ignored the limit and buffered them all); 8 connections each pushing 16 MiB of one
    unfinished header do not grow the service's memory; a connection whose headers do not
    complete within --header-seconds is answered 408 and closed. Mutation: serving with
    uvicorn's default HTTP implementation fails all three."""
    served = Served(run_copy, "--header-seconds", "2")
    try:
        big = b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (40 << 10) + b"\r\n\r\n"
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            s.sendall(big)
            assert _status_line(s) == b"HTTP/1.1 431 Request Header Fields Too Large"
        pids = {served.process.pid} | served.workers
        base = _rss_kib(pids)
        sockets = []
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
            s.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Junk: ")
            try:
                for _ in range(16):
                    s.sendall(b"a" * (1 << 20))
            except OSError:  # refused and closed at 32 KiB
                pass
            sockets.append(s)
        growth_mib = (_rss_kib(pids) - base) / 1024
        assert growth_mib < 16, f"unfinished headers held in memory: +{growth_mib:.0f} MiB"
        for s in sockets:
            assert _status_line(s) in (b"", b"HTTP/1.1 431 Request Header Fields Too Large")
            s.close()
        slow = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        started = time.monotonic()
        slow.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a line now and then: before the fix this kept it open
            time.sleep(0.5)
            slow.sendall(b"X-Slow: 1\r\n")
        assert _status_line(slow) == b"HTTP/1.1 408 Request Timeout"
        assert time.monotonic() - started < 8
        assert slow.recv(100) == b""  # closed
        slow.close()
        idle = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        assert idle.recv(100) == b""  # a connection that sends nothing is closed too
        idle.close()
        assert httpx.get(f"{served.url}/v1/model").status_code == 200
    finally:
        out = served.stop(signal.SIGTERM)
    assert "Traceback" not in out, out


def test_a_second_service_on_the_same_run_refuses_to_start(run_copy: Path) -> None:
    """Two ``poi serve`` of one run would each admit the same voucher from their own copy
    of the charged totals: the second one exits 2 while the first holds the run."""
    served = Served(run_copy)
    try:
        second = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "poi"), "serve", str(run_copy), "--port", "1",
             "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "COLUMNS": "250"})
        assert second.returncode == 2, second.stdout + second.stderr
        assert "in use by another poi serve" in second.stdout + second.stderr
        assert httpx.get(f"{served.url}/v1/model").status_code == 200
    finally:
        served.stop(signal.SIGTERM)
