"""Benchmark: Proof-of-Intelligence against Flower's built-in strategies (issue targets).

Digits, 20 subscribers, Dirichlet alpha 0.5, DP on, 20 rounds, 3 seeds; PoI with top-k 1
and 5 beside FedAvg, Krum, MultiKrum, FedMedian, FedTrimmedAvg, Bulyan, centered clipping
and NNM + trimmed mean; no attackers, and 40% attackers for each attack and for label flip
+ colluding votes together.

    python -m benchmarks.strategy --out benchmarks/results/strategy [--attacks a,b] [--quick]

Runs resume: finished simulations under OUT/runs are reused, so the attack list can be
split across processes (shards); ``--aggregate-only`` then tabulates everything finished.
Writes OUT/compare.json, OUT/compare.md, OUT/compare.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from client.config import RunConfig
from server.experiments.compare import CompareSpec, run_compare

ATTACKS = "label-flip,sign-flip,noise,fake-data,free-rider,label-flip+collude"
STRATEGIES = ("poi@1,poi@5,fedavg,krum,multikrum,fedmedian,fedtrimmedavg,bulyan,"
              "centered-clipping,nnm-trimmed-mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/strategy"))
    parser.add_argument("--attacks", default=ATTACKS)
    parser.add_argument("--fractions", default="0,0.4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--aggregate-only", action="store_true",
                        help="only aggregate the runs already finished under OUT/runs")
    parser.add_argument("--quick", action="store_true",
                        help="8 subscribers, 5 rounds, one seed: a smoke run")
    args = parser.parse_args()
    base = RunConfig(num_subscribers=20, num_server_rounds=20, partitioner="dirichlet",
                     dirichlet_alpha=0.5)
    seeds = args.seeds
    if args.quick:
        base = RunConfig(num_subscribers=8, num_server_rounds=5)
        seeds = "0"
    spec = CompareSpec.parse(strategies=args.strategies, attacks=args.attacks,
                             fractions=args.fractions, seeds=seeds)
    run_compare(base, spec, args.out, console=Console(), run_missing=not args.aggregate_only)


if __name__ == "__main__":
    main()
