"""Quick in-process runs of the vote for mechanism experiments (no Ray: the real
ClientApp handlers and ``run_task`` over tests.conftest.InProcessGrid, about 25 s for 20
subscribers x 20 rounds on 2 cores). Prints final accuracy and the attackers' applied
updates per round. The benchmark (``python -m benchmarks.strategy``) is the reference;
this is for choosing directions (docs/vote.md).

    .venv/bin/python scripts/vote-experiment.py '{"reputation-rate": 4}' 0,1,2 0.45 \\
        label-flip+collude [subscribers=20] [rounds=20]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
logging.disable(logging.WARNING)

from client import protocol as P  # noqa: E402
from client.client_app import train, vote  # noqa: E402
from client.config import RunConfig  # noqa: E402
from server.experiments.compare import choose_attackers  # noqa: E402
from server.server_app import run_task  # noqa: E402
from tests.conftest import InProcessGrid, make_contexts, set_task_identity  # noqa: E402


def run(extra: dict[str, object], seed: int, fraction: float, attack: str,
        subscribers: int, rounds: int) -> tuple[float, list[int], int, float]:
    set_task_identity()
    attackers = choose_attackers(subscribers, fraction, seed)
    mapping: dict[str, object] = {
        "num-subscribers": subscribers, "num-server-rounds": rounds, "seed": seed,
        "attack": attack if attackers else "none",
        "attackers": ",".join(map(str, attackers)), **extra}
    out = Path(tempfile.mkdtemp(prefix="poi-vote-"))
    mapping["out-dir"] = str(out)
    config = RunConfig.from_mapping(mapping)
    grid = InProcessGrid(make_contexts(mapping, subscribers),
                         {"train": train, P.VOTE_MESSAGE_TYPE: vote})
    started = time.perf_counter()
    report = run_task(grid, config, out)
    bad = set(report["attackers"])
    per_round = [sum(a in bad for a in r["selected"] or []) for r in report["rounds"]]
    applied = sum(len(r["selected"] or []) for r in report["rounds"])
    return report["final_accuracy"], per_round, applied, time.perf_counter() - started


def main() -> None:
    extra = json.loads(sys.argv[1])
    seeds = [int(s) for s in sys.argv[2].split(",")]
    fraction, attack = float(sys.argv[3]), sys.argv[4]
    subscribers = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 20
    for seed in seeds:
        accuracy, per_round, applied, seconds = run(extra, seed, fraction, attack,
                                                    subscribers, rounds)
        print(f"{json.dumps(extra)} seed {seed} {attack}@{fraction}: accuracy {accuracy:.3f}, "
              f"attackers' applied updates {sum(per_round)}/{applied} {per_round} "
              f"({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
