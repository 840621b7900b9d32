"""Market runs for the payout benchmark (``python -m benchmarks.payouts --ledgers DIR``):
one directory per (attack, fraction, seed) under DIR, each with its ledger, blobs,
revealed validation set and report.json. In-process (no Ray): the real ClientApp
handlers and ``run_task`` over tests.conftest.InProcessGrid, about 25 s a run on one
core; run two at once with ``--part 0/2`` and ``--part 1/2``. Resumable (a finished run
has a ``done`` file).

    .venv/bin/python scripts/payout-ledgers.py DIR [--attacks a,b] [--fractions 0.4,0.45]
        [--seeds 0,1,2,3,4] [--part 0/1]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
logging.disable(logging.WARNING)

import torch  # noqa: E402

from client import protocol as P  # noqa: E402
from client.client_app import train, vote  # noqa: E402
from client.config import RunConfig  # noqa: E402
from server.experiments.compare import choose_attackers  # noqa: E402
from server.server_app import run_task  # noqa: E402
from tests.conftest import InProcessGrid, make_contexts, set_task_identity  # noqa: E402

ATTACKS = ("label-flip,label-flip+collude,fake-data,free-rider,sign-flip,noise,alie,ipm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--attacks", default=ATTACKS)
    parser.add_argument("--fractions", default="0.4,0.45")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--part", default="0/1", help="this process's share: INDEX/COUNT")
    args = parser.parse_args()
    index, count = (int(x) for x in args.part.split("/"))
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [("none", 0.0, s) for s in seeds] + [
        (a, float(f), s) for a in args.attacks.split(",") for f in args.fractions.split(",")
        for s in seeds]
    for number, (attack, fraction, seed) in enumerate(jobs):
        if number % count != index:
            continue
        out = args.out / f"{attack}__{fraction:g}__s{seed}"
        if (out / "done").exists():
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        set_task_identity()
        attackers = choose_attackers(args.subscribers, fraction, seed)
        mapping = {"num-subscribers": args.subscribers, "num-server-rounds": args.rounds,
                   "seed": seed, "attack": attack if attackers else "none",
                   "attackers": ",".join(map(str, attackers)) if attack != "none" else "",
                   "out-dir": str(out)}
        config = RunConfig.from_mapping(mapping)
        grid = InProcessGrid(make_contexts(mapping, args.subscribers),
                             {"train": train, P.VOTE_MESSAGE_TYPE: vote})
        started = time.perf_counter()
        report = run_task(grid, config, out)
        (out / "done").write_text(f"{time.perf_counter() - started:.1f}\n")
        print(f"[{number + 1}/{len(jobs)}] {attack} @ {fraction:g} seed {seed}: accuracy "
              f"{report['final_accuracy']:.3f}, audit {report['market'].get('audit_ok')}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
