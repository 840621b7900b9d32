"""Benchmark: Proof-of-Intelligence (marginal vote) against the old single-update vote,
Flower's built-in strategies, centered clipping and NNM + trimmed mean (issue targets).

Digits, 20 subscribers, Dirichlet alpha 0.5, DP on, 20 rounds, 5 seeds (3 seeds resolve
only about +-3 pp), attackers at 45% (and 40% with ``--fractions``), every attack alone
and label flip + colluding votes; the adaptive attacker (honest for R rounds, then label
flip + collusion) with ``--set attack-start-round=6`` into its own ``--out``.

    python -m benchmarks.strategy --out benchmarks/results/strategy [--attacks a,b]
        [--strategies poi,fedavg] [--seeds 0,1,2,3,4] [--set k=v ...] [--quick]

Runs resume: finished simulations under OUT/runs are reused, so the attack list can be
split across processes (shards); ``--aggregate-only`` then tabulates everything finished.
Writes OUT/compare.json, OUT/compare.md (mean +- std, attackers' share of applied updates)
and OUT/compare.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from client.config import RunConfig
from server.cli.common import parse_run_config
from server.experiments.compare import CompareSpec, run_compare

ATTACKS = ("label-flip,label-flip+collude,fake-data,sign-flip,noise,free-rider,alie,ipm,"
           "min-max,min-sum,targeted-flip")
STRATEGIES = ("poi,poi-single@5,fedavg,krum,multikrum,fedmedian,fedtrimmedavg,bulyan,"
              "centered-clipping,nnm-trimmed-mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/strategy"))
    parser.add_argument("--attacks", default=ATTACKS)
    parser.add_argument("--fractions", default="0,0.45")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--set", default="", help='extra run-config knobs, "k=v k=v"')
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
    if args.set:
        extra = {k.replace("-", "_"): v for k, v in parse_run_config(args.set).items()}
        base = replace(base, **extra)
        base.validate()
    spec = CompareSpec.parse(strategies=args.strategies, attacks=args.attacks,
                             fractions=args.fractions, seeds=seeds)
    run_compare(base, spec, args.out, console=Console(), run_missing=not args.aggregate_only)


if __name__ == "__main__":
    main()
