"""Ledger benchmarks: append, proofs at 1M entries, a subscriber's round check, audit.

Run: ``.venv/bin/python -m benchmarks.ledger.bench --out benchmarks/results [--quick]``.
Writes ``ledger.json`` and ``ledger.md`` (a markdown table of medians) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ledger import merkle
from ledger.audit import verify_log
from ledger.checkpoint import parse_checkpoint
from ledger.entries import make_key_entry, sign_entry
from ledger.keys import Signer
from ledger.log import Log
from ledger.remote import verify_remote
from server.deploy.processes import free_port

ORIGIN = "bench.poi.example/ledger"


def _median_ms(action: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings)


def _time_ms(action: Callable[[int, int], object], first: int, second: int) -> float:
    started = time.perf_counter()
    action(first, second)
    return (time.perf_counter() - started) * 1e3


def bench_append(folder: Path, *, entries: int, batch: int) -> dict[str, float]:
    """Author-signed entries, verified by the sequencer and durably group-committed."""
    operator = Signer.generate()
    authors = [Signer.generate() for _ in range(16)]
    started = time.perf_counter()
    leaves = _signed_leaves(0, entries, authors)
    signing_s = time.perf_counter() - started
    rates = []
    with Log.open(folder / "ledger.db", operator, ORIGIN) as log:
        for offset in range(0, len(leaves), batch):
            chunk = leaves[offset : offset + batch]
            started = time.perf_counter()
            log.append_many(chunk)
            rates.append(len(chunk) / (time.perf_counter() - started))
    return {
        "entries": entries,
        "batch": batch,
        "append_entries_per_s_median": statistics.median(rates),
        "author_signing_entries_per_s": entries / signing_s,
    }


def _signed_leaves(start: int, end: int, authors: list[Signer]) -> list[bytes]:
    """Leaves ``start .. end - 1`` of a benchmark log: each author's key entry, then
    votes signed by the authors in turn."""
    out = []
    for position in range(start, end):
        if position < len(authors):
            out.append(make_key_entry(authors[position]))
            continue
        number = position - len(authors)
        author = authors[number % len(authors)]
        out.append(
            sign_entry(author, "vote", seq=1 + number // len(authors), fields={
                "task_id": "task-1", "round": number // 1000, "candidate": f"{number:064x}",
                "base_loss_micro": 693_147, "candidate_loss_micro": 600_000 + number % 1000,
            })
        )
    return out


def bench_remote(folder: Path, *, entries: int, batch: int, repeats: int) -> dict[str, Any]:
    """A log of ``entries`` author-signed entries appended in batches of ``batch``
    (the append rate at that size), served by ``poi ledger serve`` in its own process
    and audited remotely (mirror of the tiles + full audit) and locally, alternately,
    ``repeats`` times each, on the same machine."""
    operator = Signer.generate()
    authors = [Signer.generate() for _ in range(16)]
    rates = []
    with Log.open(folder / "ledger.db", operator, ORIGIN) as log:
        for offset in range(0, entries, 100_000):  # signed in slices to bound memory
            leaves = _signed_leaves(offset, min(entries, offset + 100_000), authors)
            for start in range(0, len(leaves), batch):
                chunk = leaves[start : start + batch]
                started = time.perf_counter()
                log.append_many(chunk)
                rates.append(len(chunk) / (time.perf_counter() - started))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "ledger", "serve", str(folder), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    local_rates, remote_rates, mirror_s, verify_s, fetched = [], [], [], [], None
    try:
        _wait_for(url + "checkpoint")
        for _ in range(repeats):
            started = time.perf_counter()
            report = verify_log(folder / "ledger.db")
            local_rates.append(report.size / (time.perf_counter() - started))
            assert report.ok, report.failure
            with tempfile.TemporaryDirectory() as mirror:
                started = time.perf_counter()
                report, fetched = verify_remote(url, mirror)
                elapsed = time.perf_counter() - started
                assert report.ok, report.failure
                remote_rates.append(report.size / elapsed)
                mirror_s.append(fetched.seconds)
                verify_s.append(elapsed - fetched.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert fetched is not None
    return {
        "entries": entries,
        "batch": batch,
        "append_entries_per_s_median": statistics.median(rates),
        "local_audit_entries_per_s": statistics.median(local_rates),
        "remote_audit_entries_per_s": statistics.median(remote_rates),
        "remote_audit_runs": remote_rates,
        "local_audit_runs": local_rates,
        "mirror_s_median": statistics.median(mirror_s),
        "verify_s_median": statistics.median(verify_s),
        "resources_fetched": fetched.requests,
        "bytes_fetched": fetched.bytes,
    }


def _wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {seconds} s")
        time.sleep(0.2)


def bench_audit(folder: Path, *, repeats: int = 3) -> dict[str, Any]:
    """Full audits (every signature, one worker per core); the median of ``repeats`` runs."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        report = verify_log(folder / "ledger.db")
        elapsed = time.perf_counter() - started
        assert report.ok, report.failure
        rates.append(report.size / elapsed)
    return {
        "audit_entries": report.size,
        "audit_runs": repeats,
        "audit_entries_per_s": statistics.median(rates),
        "audit_entries_per_s_runs": rates,
    }


def bench_proofs(folder: Path, *, size: int, samples: int) -> dict[str, float]:
    """Proof generation at ``size`` leaves, loaded through the unverified fast path."""
    operator = Signer.generate()
    started = time.perf_counter()
    with Log.open(folder / "big.db", operator, ORIGIN) as log:
        chunk = 100_000
        for offset in range(0, size, chunk):
            log._bulk_load_unverified(
                [
                    number.to_bytes(8, "big") * 8
                    for number in range(offset, min(size, offset + chunk))
                ]
            )
        load_s = time.perf_counter() - started
        rng = random.Random(0)
        indexes = [rng.randrange(size) for _ in range(samples)]
        root = log.root()
        inclusion = [_time_ms(log.inclusion_proof, index, size) for index in indexes]
        lengths = [len(log.inclusion_proof(index, size)) for index in indexes[:100]]
        index = indexes[0]
        merkle.verify_inclusion(
            index=index,
            size=size,
            leaf_hash=merkle.hash_leaf(log.entry(index)),
            proof=log.inclusion_proof(index, size),
            root=root,
        )
        old_sizes = [rng.randrange(1, size) for _ in range(samples)]
        consistency = [_time_ms(log.consistency_proof, old, size) for old in old_sizes]
        # A subscriber's per-round check: the new checkpoint's signature, then the
        # consistency proof from the checkpoint it saw last round.
        old_size = size - 1000
        old_root = log.root(old_size)
        note = log.checkpoint()
        proof = log.consistency_proof(old_size, size)
        verifier = log.verifier

        def subscriber_check() -> None:
            checkpoint = parse_checkpoint(note, verifier=verifier, origin=ORIGIN)
            merkle.verify_consistency(
                size1=old_size,
                size2=checkpoint.size,
                proof=proof,
                root1=old_root,
                root2=checkpoint.root_hash,
            )

        subscriber_ms = _median_ms(subscriber_check, samples)
    return {
        "tree_size": size,
        "load_s": load_s,
        "inclusion_proof_ms_median": statistics.median(inclusion),
        "inclusion_proof_hashes_median": statistics.median(lengths),
        "consistency_proof_ms_median": statistics.median(consistency),
        "consistency_proof_hashes": len(proof),
        "subscriber_round_check_ms_median": subscriber_ms,
    }


def _table(results: dict[str, dict[str, float]]) -> str:
    append, audit, proofs = results["append"], results["audit"], results["proofs"]
    remote = results["remote"]
    served = f"{remote['entries']:,} entries"
    at = f"{proofs['tree_size']:,} entries"
    rows = [
        (
            "Append (author-signed, verified, durable)",
            f"{append['append_entries_per_s_median']:,.0f} entries/s",
            ">= 5,000 entries/s",
        ),
        (
            f"Inclusion proof at {at}",
            f"{proofs['inclusion_proof_ms_median']:.3f} ms, "
            f"{proofs['inclusion_proof_hashes_median']:.0f} hashes",
            "<= 0.2 ms, ~20 hashes",
        ),
        (f"Consistency proof at {at}", f"{proofs['consistency_proof_ms_median']:.3f} ms", ""),
        (
            "Subscriber round check (signature + consistency)",
            f"{proofs['subscriber_round_check_ms_median']:.3f} ms",
            "<= 1 ms",
        ),
        (
            "Full audit incl. signatures",
            f"{audit['audit_entries_per_s']:,.0f} entries/s",
            ">= 10,000 entries/s",
        ),
        (
            f"Append at {served} (batches of {remote['batch']})",
            f"{remote['append_entries_per_s_median']:,.0f} entries/s",
            ">= 6,000 entries/s",
        ),
        (
            f"Remote full audit of {served} served as tiles (loopback)",
            f"{remote['remote_audit_entries_per_s']:,.0f} entries/s "
            f"(mirror {remote['mirror_s_median']:.0f} s + audit {remote['verify_s_median']:.0f} s)",
            ">= 10,000 entries/s",
        ),
        (
            f"Local full audit of the same {served}, same run",
            f"{remote['local_audit_entries_per_s']:,.0f} entries/s",
            "",
        ),
        (
            "Author signing (client side, reference)",
            f"{append['author_signing_entries_per_s']:,.0f} entries/s",
            "",
        ),
    ]
    lines = ["| Measure | Median | Target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--remote-entries", type=int, default=None,
                        help="size of the served log for the remote audit (default 1M, "
                             "quick 20k)")
    parser.add_argument("--remote-repeats", type=int, default=3)
    args = parser.parse_args()
    entries, size, samples = (3_000, 100_000, 200) if args.quick else (20_000, 1_000_000, 1_000)
    remote = args.remote_entries or (20_000 if args.quick else 1_000_000)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        results = {"append": bench_append(folder, entries=entries, batch=500)}
        results["audit"] = bench_audit(folder)
        results["proofs"] = bench_proofs(folder, size=size, samples=samples)
    with tempfile.TemporaryDirectory() as scratch:
        results["remote"] = bench_remote(Path(scratch), entries=remote, batch=500,
                                         repeats=args.remote_repeats)
    machine = {
        "python": platform.python_version(),
        "cpu": platform.machine(),
        "cpus": os.cpu_count(),
    }
    results["machine"] = machine  # type: ignore[assignment]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ledger.json").write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results)
    (args.out / "ledger.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
