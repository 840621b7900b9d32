"""Benchmark: a round's cost as the federation grows (issue #15), PoI against FedAvg.

MNIST-1D (40 features), Dirichlet 0.5, DP-SGD on every subscriber, PoI with committees
(``votes-per-candidate``, default 16), the same examples per subscriber at every size
(``--per-subscriber``, default 40: the dataset grows with N), each run through Flower's
Simulation Runtime (``poi simulate``, one Ray actor on the machine's cores) in its own
process. For each N and strategy: the median round wall time (rounds 2.. ; round 1 also
warms the actor), seconds per subscriber, the round's phases, the peak memory of the
whole process tree (sampled every 0.2 s from /proc), and for PoI the ledger's entries
and bytes per round and the time of ``poi audit`` over the finished task.

    python -m benchmarks.scale --out benchmarks/results/scale [--sizes 32,128,512,1024]
        [--rounds 3] [--per-subscriber 40] [--committee 16] [--set k=v ...] [--reuse]

Writes OUT/scale.json and OUT/scale.md; runs stay under OUT/runs (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from client.config import MAX_SUBSCRIBERS
from client.schema import size_for_pool

console = Console()


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and every descendant (Ray's workers included)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields.get("PPid", "0").strip() or 0)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack, seen = 0, [root], set()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_one(out: Path, strategy: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    saved = out / "runs" / f"{strategy}-{n}.row.json"
    if args.reuse and saved.is_file():
        return dict(json.loads(saved.read_text()))
    row = _run(out, strategy, n, args)
    saved.write_text(json.dumps(row, indent=2))
    return row


def _run(out: Path, strategy: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = out / "runs" / f"{strategy}-{n}"
    knobs = {"strategy": strategy, "num-subscribers": n, "num-server-rounds": args.rounds,
             "dataset": "mnist1d", "dataset-size": max(100, size_for_pool(args.per_subscriber * n)),
             "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "seed": 0}
    if strategy == "poi":
        knobs["votes-per-candidate"] = min(args.committee, n - 1)
    knobs.update(dict(item.split("=", 1) for item in shlex.split(args.set)))
    run_config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                          for k, v in knobs.items())
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--out", str(run_dir), "--force",
           "--run-config", run_config]
    peak = 0
    started = time.perf_counter()
    with open(out / "runs" / f"{strategy}-{n}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss_bytes(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{strategy} N={n} failed ({code}): see {log.name}")
    report = json.loads((run_dir / "report.json").read_text())
    rounds = report["rounds"]
    timed = [r["round_seconds"] for r in rounds[1:]] or [rounds[0]["round_seconds"]]
    phases: dict[str, float] = {}
    for name in rounds[-1]["phase_seconds"]:
        phases[name] = statistics.median(r["phase_seconds"].get(name, 0.0) for r in rounds[1:]
                                         or rounds)
    row: dict[str, Any] = {
        "strategy": strategy, "n": n, "rounds": len(rounds), "wall_seconds": wall,
        "median_round_seconds": statistics.median(timed),
        "seconds_per_subscriber": statistics.median(timed) / n,
        "phases": phases, "peak_rss_mib": peak / 2**20,
        "final_accuracy": report["final_accuracy"], "run_config": run_config,
    }
    if strategy == "poi":
        db = run_dir / "ledger.db"
        ledger = report.get("ledger", {})
        size = int(ledger.get("size", 0))
        blobs = sum(p.stat().st_size for p in (run_dir / "blobs").rglob("*") if p.is_file()) \
            if (run_dir / "blobs").is_dir() else 0
        row["ledger_entries_per_round"] = size / len(rounds)
        row["ledger_bytes_per_round"] = db.stat().st_size / len(rounds)
        row["blob_bytes_per_round"] = blobs / len(rounds)
        t0 = time.perf_counter()
        audit = subprocess.run([sys.executable, "-m", "server.cli", "audit", str(run_dir)],
                               capture_output=True, text=True)
        row["audit_seconds"] = time.perf_counter() - t0
        row["audit_ok"] = audit.returncode == 0
    return row


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {(r["strategy"], r["n"]): r for r in rows}
    lines = [
        f"MNIST-1D, Dirichlet 0.5, DP on, {args.per_subscriber} examples a subscriber, "
        f"{args.rounds} rounds (median of rounds 2..), PoI committees of {args.committee}; "
        "one run each, same machine, same session.",
        "",
        "| N | PoI round (s) | FedAvg round (s) | PoI / FedAvg | PoI s / subscriber | "
        "FedAvg s / subscriber | PoI peak MiB | FedAvg peak MiB | ledger entries / round | "
        "ledger MiB / round | audit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["n"] for r in rows}):
        poi, fed = by.get(("poi", n)), by.get(("fedavg", n))
        if not poi or not fed:
            continue
        lines.append(
            f"| {n} | {poi['median_round_seconds']:.2f} | {fed['median_round_seconds']:.2f} | "
            f"{poi['median_round_seconds'] / fed['median_round_seconds']:.2f}x | "
            f"{poi['seconds_per_subscriber'] * 1000:.0f} ms | "
            f"{fed['seconds_per_subscriber'] * 1000:.0f} ms | {poi['peak_rss_mib']:.0f} | "
            f"{fed['peak_rss_mib']:.0f} | {poi.get('ledger_entries_per_round', 0):.0f} | "
            f"{poi.get('ledger_bytes_per_round', 0) / 2**20:.2f} | "
            f"{poi.get('audit_seconds', 0):.1f} |")
    lines += ["", "PoI phases (median seconds a round):", "",
              "| N | " + " | ".join(sorted({k for r in rows if r["strategy"] == "poi"
                                             for k in r["phases"]})) + " |"]
    names = sorted({k for r in rows if r["strategy"] == "poi" for k in r["phases"]})
    lines.append("|---|" + "---|" * len(names))
    for r in sorted((r for r in rows if r["strategy"] == "poi"), key=lambda r: r["n"]):
        lines.append(f"| {r['n']} | " + " | ".join(f"{r['phases'].get(k, 0):.2f}"
                                                   for k in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    parser.add_argument("--sizes", default="32,128,512,1024")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-subscriber", type=int, default=40)
    parser.add_argument("--committee", type=int, default=16)
    parser.add_argument("--strategies", default="poi,fedavg")
    parser.add_argument("--set", default="", help='extra run-config knobs, "k=v k=v"')
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the rows of runs finished earlier under OUT/runs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    too_many = [n for n in sizes if n > MAX_SUBSCRIBERS]
    if too_many:
        raise SystemExit(f"--sizes: at most {MAX_SUBSCRIBERS} subscribers, got {too_many}")
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        for strategy in args.strategies.split(","):
            console.print(f"[bold]{strategy}[/bold] N={n} ...")
            row = run_one(args.out, strategy, n, args)
            console.print(f"  round {row['median_round_seconds']:.2f} s "
                          f"({row['seconds_per_subscriber'] * 1000:.0f} ms a subscriber), "
                          f"peak {row['peak_rss_mib']:.0f} MiB")
            rows.append(row)
            (args.out / "scale.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    (args.out / "scale.md").write_text(_markdown(rows, args))
    console.print((args.out / "scale.md").read_text())


if __name__ == "__main__":
    main()
