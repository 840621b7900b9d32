"""Benchmark: the market's payouts (issue targets).

Part A (``attack``): the attackers' share of the payouts. 20 subscribers, Dirichlet 0.5,
DP on, 20 rounds, seeds 0-4; PoI (the marginal vote, payout rule round-game/v2); no
attack, and 40% and 45% attackers for each attack and for label flip + colluding votes.
Target: attackers get <= 1% of what is paid to subscribers. The simulations go through
``server.experiments.compare.run_compare`` into OUT/attack (runs resume from OUT/attack/runs).

Part B (``fidelity``): do the payouts follow the subscribers' worth? 8 subscribers,
Dirichlet 0.5, 10 rounds, no attackers, seeds 0-4. One PoI market run per seed and payout
rule (``FIDELITY_VARIANTS``: v2 with its gates, v2 without, the legacy v1),
against the exact data Shapley value of every subscriber, the utility
of a coalition being the final test accuracy of FedAvg trained on that coalition alone
(same init, same DP-SGD local training and seeds as an honest subscriber). Target:
Spearman >= 0.9 between payouts and Shapley values. Also the cost of the Shapley values
(local trainings, wall time) against the cost of PoI's settlement.

    python -m benchmarks.market --out benchmarks/results/market [--quick] [--part all]

Writes OUT/market.json, OUT/market.md and OUT/market.png. Running one part keeps the
other part's results from an existing OUT/market.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from client.config import RunConfig
from server.experiments.compare import CompareSpec, choose_attackers, run_compare, setting_label
from server.round.report import write_json

ATTACKS = ("label-flip,sign-flip,noise,fake-data,free-rider,label-flip+collude,alie,ipm")
SHARE_TARGET = 0.01
SPEARMAN_TARGET = 0.9
TIMING_REPEATS = 3


# ============================================================================ part A
def attack_setup(quick: bool) -> tuple[RunConfig, CompareSpec]:
    if quick:
        base = RunConfig(num_subscribers=8, num_server_rounds=3, partitioner="dirichlet",
                         dirichlet_alpha=0.5)
        spec = CompareSpec.parse(strategies="poi", attacks="label-flip",
                                 fractions="0,0.45", seeds="0")
    else:
        base = RunConfig(num_subscribers=20, num_server_rounds=20, partitioner="dirichlet",
                         dirichlet_alpha=0.5)
        spec = CompareSpec.parse(strategies="poi", attacks=ATTACKS,
                                 fractions="0,0.4,0.45", seeds="0,1,2,3,4")
    return base, spec


def run_dir_of(root: Path, variant_name: str, attack: str, fraction: float, seed: int) -> Path:
    """The run directory ``run_compare`` uses for one (strategy, setting, seed)."""
    label = variant_name.replace("@", "-top")
    return root / "runs" / f"{label}__{attack}__{fraction:g}__s{seed}"


def payout_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What one PoI run paid, to whom: attackers' share of the subscribers' payouts."""
    market = report.get("market")
    if not market:
        raise RuntimeError("report.json has no 'market' section: not a settled PoI run")
    subs = report["subscribers"]
    total = sum(int(s.get("payout") or 0) for s in subs)
    to_attackers = sum(int(s.get("payout") or 0) for s in subs if s["attacker"])
    attackers = set(report["attackers"])
    picks = [a for rnd in report["selected"] if rnd for a in rnd]
    return {
        "final_accuracy": report["final_accuracy"],
        "total_paid": total,
        "attacker_paid": to_attackers,
        # Nothing paid: the attackers' share is 0 (flagged by nothing_paid).
        "attacker_share": to_attackers / total if total else 0.0,
        "nothing_paid": total == 0,
        "payouts": [int(s.get("payout") or 0) for s in subs],
        "selections": len(picks),
        "attacker_selections": sum(1 for a in picks if a in attackers),
        "payees": sum(1 for s in subs if (s.get("payout") or 0) > 0),
        "attacker_payees": sum(1 for s in subs if s["attacker"] and (s.get("payout") or 0) > 0),
        "fraction_of_convergence": market["fraction_micro"] / 1e6,
        "forfeited": bool(market["forfeited"]),
        "reason": market.get("reason", ""),
        "reward": market.get("reward"),
        "scientist_refund": market.get("scientist_refund"),
        "escrow": market.get("escrow"),
        "audit_ok": market.get("audit_ok"),
    }


def attack_cells(runs: Sequence[dict[str, Any]], settings: Sequence[str],
                 variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per setting and strategy: the attackers' share (mean, max over seeds) and more."""
    cells: dict[str, dict[str, Any]] = {}
    for setting in settings:
        cells[setting] = {}
        for name in variants:
            rows = [r for r in runs if r["setting"] == setting and r["strategy"] == name]
            shares = [r["attacker_share"] for r in rows]
            cells[setting][name] = {
                "n": len(rows),
                "share_mean": statistics.fmean(shares),
                "share_max": max(shares),
                "paid_mean": statistics.fmean(r["total_paid"] for r in rows),
                "attacker_paid_mean": statistics.fmean(r["attacker_paid"] for r in rows),
                "selections": sum(r["selections"] for r in rows),
                "attacker_selections": sum(r["attacker_selections"] for r in rows),
                "accuracy_mean": statistics.fmean(r["final_accuracy"] for r in rows),
                "fraction_mean": statistics.fmean(r["fraction_of_convergence"] for r in rows),
                "nothing_paid": sum(r["nothing_paid"] for r in rows),
                "forfeited": sum(r["forfeited"] for r in rows),
                "attacker_payees_mean": statistics.fmean(r["attacker_payees"] for r in rows),
                "payees_mean": statistics.fmean(r["payees"] for r in rows),
                "audit_failed": sum(1 for r in rows if r["audit_ok"] is False),
            }
    return cells


def run_attack(out: Path, quick: bool, console: Console, *, run: bool = True
               ) -> dict[str, Any]:
    """Part A; with ``run=False`` only re-read the finished runs (``seconds`` is None)."""
    base, spec = attack_setup(quick)
    root = out / "attack"
    started = time.perf_counter()
    if run:
        run_compare(base, spec, root, console=console)
    runs = []
    for attack, fraction in spec.settings():
        for seed in spec.seeds:
            attackers = choose_attackers(base.num_subscribers, fraction, seed)
            for variant in spec.strategies:
                path = run_dir_of(root, variant.name, attack, fraction, seed) / "report.json"
                report = json.loads(path.read_text())
                runs.append({
                    "strategy": variant.name, "top_k": variant.top_k, "attack": attack,
                    "fraction": fraction, "seed": seed, "setting": setting_label(attack, fraction),
                    "attackers": list(attackers) if attack != "none" else [],
                    **payout_summary(report),
                })
    settings = [setting_label(a, f) for a, f in spec.settings()]
    variants = [v.name for v in spec.strategies]
    return {
        "config": base.to_mapping(),
        "strategies": variants, "settings": settings,
        "seeds": list(spec.seeds), "fraction": max(spec.fractions),
        "runs": runs, "cells": attack_cells(runs, settings, variants),
        "seconds": time.perf_counter() - started if run else None,
    }


# ============================================================================ part B
# The payout rules compared (run-config overrides; the vote is the same in all).
FIDELITY_VARIANTS: dict[str, dict[str, Any]] = {
    "poi": {},  # the defaults: round-game/v2, fixed-k game, loss-rise, vote gate, high water
    "poi-nogates": {"payout_loss_rise": False, "payout_vote_gate": False,
                    "payout_high_water": False},
    "poi-v1": {"payout_game": "mean"},  # the legacy rule: Shapley over the coalition mean
}


@dataclass(frozen=True)
class FidelitySetup:
    num_subscribers: int
    num_server_rounds: int
    seeds: tuple[int, ...]
    variants: tuple[str, ...]  # keys of FIDELITY_VARIANTS

    def config(self, seed: int, variant: str = "poi") -> RunConfig:
        from dataclasses import replace

        base = RunConfig(num_subscribers=self.num_subscribers,
                         num_server_rounds=self.num_server_rounds, seed=seed)
        return replace(base, **FIDELITY_VARIANTS[variant])


def fidelity_setup(quick: bool) -> FidelitySetup:
    if quick:
        return FidelitySetup(4, 3, (0,), ("poi", "poi-v1"))
    return FidelitySetup(8, 10, (0, 1, 2, 3, 4), tuple(FIDELITY_VARIANTS))


# ---- the coalition trainer (runs in worker processes) ----------------------
_WORKER: dict[str, Any] = {}


def _quiet_torch() -> None:
    import torch

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    torch.set_num_threads(1)  # as a subscriber does (client_app)


def _init_worker(config: RunConfig, first_deltas: dict[int, dict[str, np.ndarray]]) -> None:
    """Load the partitions once per worker; ``first_deltas`` are the round-1 updates
    (every coalition starts from the same model, so round 1 is shared)."""
    import client.client_app  # noqa: F401 - its import (flwr) is slow: not in the timings
    from client.task import digits_split, load_partition

    _quiet_torch()
    _WORKER["config"] = config
    _WORKER["first"] = first_deltas
    _WORKER["data"] = [
        load_partition(p, config.num_subscribers, partitioner=config.partitioner,
                       dirichlet_alpha=config.dirichlet_alpha, seed=config.seed)
        for p in range(config.num_subscribers)]
    _WORKER["split"] = digits_split()


def local_update(config: RunConfig, weights: dict[str, np.ndarray], data: Any,
                 server_round: int, partition_id: int) -> dict[str, np.ndarray]:
    """One honest subscriber's round, as ``client.client_app.train`` does it: DP-SGD from
    the global weights with the run's knobs and the simulation's seed; the update is
    new weights - global weights (float32)."""
    from client.client_app import _seed
    from client.privacy import train_private
    from client.task import get_weights, make_model, set_weights

    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed)
    set_weights(model, weights)
    train_private(
        model, data, epochs=config.local_epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm, target_delta=config.target_delta,
        accountant=config.accountant,
        seed=_seed(config.seed, "train", server_round, partition_id),
    )
    trained = get_weights(model)
    return {k: (trained[k] - weights[k]).astype(np.float32) for k in weights}


def fedavg_step(weights: dict[str, np.ndarray], deltas: Sequence[dict[str, np.ndarray]],
                counts: Sequence[int]) -> dict[str, np.ndarray]:
    """The global model plus the example-count-weighted mean of the updates."""
    total = float(sum(counts))
    out = {}
    for k, w in weights.items():
        mean = sum(n * d[k].astype(np.float64) for n, d in zip(counts, deltas, strict=True))
        out[k] = (w.astype(np.float64) + mean / total).astype(np.float32)
    return out


def initial_weights(config: RunConfig) -> dict[str, np.ndarray]:
    from client.task import get_weights, make_model

    return get_weights(make_model(hidden_units=config.hidden_units,
                                  activation=config.activation, seed=config.seed))


def coalition_value(mask: int) -> dict[str, Any]:
    """Train FedAvg on the coalition ``mask`` (bit p = partition p) for the run's rounds;
    return its final test accuracy and validation loss, the trainings done and the time."""
    from client.task import evaluate, make_model, set_weights

    started = time.perf_counter()
    config: RunConfig = _WORKER["config"]
    data = _WORKER["data"]
    members = [p for p in range(config.num_subscribers) if mask >> p & 1]
    weights = initial_weights(config)
    trainings = 0
    for server_round in range(1, config.num_server_rounds + 1):
        if server_round == 1:
            deltas = [_WORKER["first"][p] for p in members]
        else:
            deltas = [local_update(config, weights, data[p], server_round, p) for p in members]
            trainings += len(members)
        weights = fedavg_step(weights, deltas, [len(data[p]) for p in members])
    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed)
    set_weights(model, weights)
    _, accuracy = evaluate(model, _WORKER["split"].test)
    validation_loss, _ = evaluate(model, _WORKER["split"].validation)
    return {"mask": mask, "accuracy": accuracy, "validation_loss": validation_loss,
            "trainings": trainings, "seconds": time.perf_counter() - started}


def exact_shapley(n: int, value: dict[int, float]) -> list[float]:
    """Exact Shapley values; ``value`` maps every bitmask over n players (0 included)."""
    weights = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
               for s in range(n)]
    phi = [0.0] * n
    for mask in range(1 << n):
        size = bin(mask).count("1")
        for i in range(n):
            if not mask >> i & 1:
                phi[i] += weights[size] * (value[mask | 1 << i] - value[mask])
    return phi


def data_shapley(config: RunConfig, progress: Progress | None = None) -> dict[str, Any]:
    """v(C) for all 2^n coalitions and the exact Shapley values of the n subscribers."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _data_shapley(config, progress)
    finally:
        torch.set_num_threads(threads)


def _data_shapley(config: RunConfig, progress: Progress | None) -> dict[str, Any]:
    from client.task import digits_split, evaluate, load_partition, make_model

    _quiet_torch()
    n = config.num_subscribers
    started = time.perf_counter()
    data = [load_partition(p, n, partitioner=config.partitioner,
                           dirichlet_alpha=config.dirichlet_alpha, seed=config.seed)
            for p in range(n)]
    weights0 = initial_weights(config)
    first = {p: local_update(config, weights0, data[p], 1, p) for p in range(n)}
    model = make_model(hidden_units=config.hidden_units, activation=config.activation,
                       seed=config.seed)
    split = digits_split()
    _, acc0 = evaluate(model, split.test)
    val0, _ = evaluate(model, split.validation)
    results: dict[int, dict[str, Any]] = {0: {"mask": 0, "accuracy": acc0,
                                              "validation_loss": val0, "trainings": 0,
                                              "seconds": 0.0}}
    masks = sorted(range(1, 1 << n), key=lambda m: -bin(m).count("1"))  # big ones first
    context = multiprocessing.get_context("spawn")
    task = progress.add_task(f"Shapley seed {config.seed}", total=len(masks)) if progress else None
    with ProcessPoolExecutor(max_workers=2, mp_context=context, initializer=_init_worker,
                             initargs=(config, first)) as pool:
        futures = [pool.submit(coalition_value, m) for m in masks]
        for future in as_completed(futures):
            result = future.result()
            results[result["mask"]] = result
            if progress is not None and task is not None:
                progress.advance(task)
    seconds = time.perf_counter() - started
    accuracy = {m: r["accuracy"] for m, r in results.items()}
    # The same coalitions, utility = validation-loss reduction (what PoI's scores measure).
    loss_gain = {m: val0 - r["validation_loss"] for m, r in results.items()}
    full = (1 << n) - 1
    return {
        "shapley_accuracy": exact_shapley(n, accuracy),
        "shapley_validation_loss": exact_shapley(n, loss_gain),
        "v_empty": acc0, "v_full": accuracy[full],
        "coalitions": len(masks),
        "trainings": n + sum(r["trainings"] for r in results.values()),
        "seconds": seconds,
        "grand_coalition_seconds": results[full]["seconds"],
        "coalition_seconds_median": statistics.median(r["seconds"] for m, r in results.items()
                                                      if m),
        "examples": [len(d) for d in data],
        "first_round_digests": {p: _digest(first[p]) for p in range(n)},
    }


def _digest(tensors: dict[str, np.ndarray]) -> str:
    from crypto.digests import tensors_digest

    return tensors_digest(tensors)


# ---- the PoI side -----------------------------------------------------------
def settlement_seconds(run_dir: Path) -> dict[str, Any]:
    """Wall time of PoI's settlement from the ledger: ``read_market`` + ``replay`` +
    ``settlement_of`` (median of TIMING_REPEATS); reading the entries is timed apart."""
    from ledger import LogReader
    from ledger.blobs import BlobStore
    from server.market.replay import read_market, replay, settlement_of

    db = run_dir / "ledger.db"
    times, reads = [], []
    payouts: dict[str, int] = {}
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        with LogReader.open(db) as reader:
            entries = list(reader.entries())
        t1 = time.perf_counter()
        record = read_market(entries)
        result = replay(record, BlobStore.beside(db))
        settlement, _ = settlement_of(record, result)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        times.append(t2 - t1)
        payouts = settlement.payouts
    return {"seconds": statistics.median(times), "read_entries_seconds": statistics.median(reads),
            "entries": len(entries), "payouts": payouts}


def poi_run(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    from server.experiments.simulation import run_simulation

    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if (report is None or "market" not in report
            or len(report.get("rounds", [])) != config.num_server_rounds):
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_simulation(config, run_dir)
        report = json.loads(report_path.read_text())
    timing = settlement_seconds(run_dir)
    by_key = {s["key_id"]: s["payout"] for s in report["subscribers"]}
    if any(by_key.get(k, 0) != v for k, v in timing["payouts"].items()):
        raise RuntimeError(f"{run_dir}: the replayed settlement differs from the report's")
    first_round = {c["author"]: c["id"] for c in report["rounds"][0]["candidates"]}
    return {
        "run_dir": str(run_dir),
        "payouts": [int(s["payout"] or 0) for s in report["subscribers"]],
        "final_accuracy": report["final_accuracy"],
        "fraction_of_convergence": report["market"]["fraction_micro"] / 1e6,
        "forfeited": report["market"]["forfeited"],
        "audit_ok": report["market"].get("audit_ok"),
        "selected": report["selected"],
        "wall_seconds": report["wall_seconds"],
        "settlement_seconds": timing["seconds"],
        "read_entries_seconds": timing["read_entries_seconds"],
        "ledger_entries": timing["entries"],
        "first_round_digests": first_round,
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None  # undefined for a constant vector
    return float(spearmanr(a, b).statistic)


def kendall(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy.stats import kendalltau

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(kendalltau(a, b).statistic)


def tie_ceiling(payouts: Sequence[int], values: Sequence[float]) -> float | None:
    """The highest Spearman any payouts with as many zero payouts could reach against
    ``values``: the payees being exactly the top values, paid in their order."""
    zeros = sum(1 for p in payouts if p <= 0)
    order = sorted(range(len(values)), key=lambda i: values[i])
    ideal = [0.0] * len(values)
    for rank, i in enumerate(order):
        ideal[i] = 0.0 if rank < zeros else float(rank)
    return spearman(ideal, values)


SHAPLEY_KEYS = ("num-subscribers", "num-server-rounds", "partitioner", "dirichlet-alpha",
                "noise-multiplier", "max-grad-norm", "local-epochs", "batch-size",
                "learning-rate", "hidden-units", "activation", "target-delta")


def _known_shapley(previous: dict[str, Any] | None, config: RunConfig) -> dict[str, Any] | None:
    """The data Shapley values an earlier run of this part computed for ``config`` (same
    seed and training knobs), so a rerun does not train 9,224 models again."""
    if not previous:
        return None
    wanted = config.to_mapping()
    old = previous.get("config", {})
    if any(old.get(k) != wanted[k] for k in SHAPLEY_KEYS):
        return None
    for entry in previous.get("per_seed", []):
        if entry.get("seed") == config.seed and "shapley" in entry:
            return dict(entry["shapley"])
    return None


def lever_fidelity(run_dir: Path, keys: Sequence[str], shapley: dict[str, Any]
                   ) -> dict[str, dict[str, float | None]]:
    """Every payout-rule variant of ``benchmarks.payouts`` settled on this run's ledger:
    Spearman and Kendall of its reward payouts against both Shapley utilities."""
    from benchmarks.payouts import variant_settlements

    out = {}
    for name, s in variant_settlements(run_dir).items():
        pay = [float(s.reward_payouts.get(k, 0)) for k in keys]
        out[name] = {
            "spearman": spearman(pay, shapley["shapley_accuracy"]),
            "kendall": kendall(pay, shapley["shapley_accuracy"]),
            "spearman_validation_loss_utility": spearman(pay,
                                                         shapley["shapley_validation_loss"]),
        }
    return out


def run_fidelity(out: Path, quick: bool, console: Console,
                 previous: dict[str, Any] | None = None) -> dict[str, Any]:
    setup = fidelity_setup(quick)
    started = time.perf_counter()
    seeds: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        runs_task = progress.add_task("PoI market runs",
                                      total=len(setup.seeds) * len(setup.variants))
        for seed in setup.seeds:
            entry: dict[str, Any] = {"seed": seed, "poi": {}}
            for name in setup.variants:
                progress.update(runs_task, description=f"PoI {name} seed {seed}")
                run_dir = out / "fidelity" / "runs" / f"seed-{seed}-{name}"
                entry["poi"][name] = poi_run(setup.config(seed, name), run_dir)
                progress.advance(runs_task)
            shapley = (_known_shapley(previous, setup.config(seed))
                        or data_shapley(setup.config(seed), progress))
            entry["shapley"] = shapley
            default_run = out / "fidelity" / "runs" / f"seed-{seed}-{setup.variants[0]}"
            report = json.loads((default_run / "report.json").read_text())
            keys = [s["key_id"] for s in sorted(report["subscribers"],
                                                key=lambda s: s["partition_id"])]
            entry["levers"] = lever_fidelity(default_run, keys, shapley)
            for key, utility in (("", "shapley_accuracy"),
                                 ("_validation_loss_utility", "shapley_validation_loss")):
                entry["spearman" + key] = {n: spearman(r["payouts"], shapley[utility])
                                           for n, r in entry["poi"].items()}
                entry["kendall" + key] = {n: kendall(r["payouts"], shapley[utility])
                                          for n, r in entry["poi"].items()}
            entry["spearman_examples"] = spearman(shapley["examples"],
                                                  shapley["shapley_accuracy"])
            poi1 = entry["poi"][setup.variants[0]]
            entry["first_round_reproduced"] = sum(
                1 for p, d in shapley["first_round_digests"].items()
                if poi1["first_round_digests"].get(p) == d)
            seeds.append(entry)
            console.print(
                f"seed {seed}: Spearman "
                + ", ".join(f"{n} {_fmt_rho(r)}" for n, r in entry["spearman"].items())
                + f"; Shapley {shapley['seconds']:.0f} s, {shapley['trainings']} trainings")
    return {
        "num_subscribers": setup.num_subscribers, "num_server_rounds": setup.num_server_rounds,
        "seeds": list(setup.seeds), "variants": list(setup.variants),
        "config": setup.config(setup.seeds[0]).to_mapping(),
        "per_seed": seeds, "seconds": time.perf_counter() - started,
    }


# ============================================================================ output
def _fmt_rho(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def attack_markdown(part: dict[str, Any]) -> list[str]:
    cfg = part["config"]
    variants = part["strategies"]
    seeds = ", ".join(map(str, part["seeds"]))
    lines = [
        "## A. Attackers' share of the payouts",
        "",
        f"{cfg['num-subscribers']} subscribers, Dirichlet alpha {cfg['dirichlet-alpha']}, "
        f"DP-SGD (noise {cfg['noise-multiplier']}, clip {cfg['max-grad-norm']}), "
        f"{cfg['num-server-rounds']} rounds, seeds {seeds}; "
        f"{part['fraction']:.0%} attackers (drawn per seed, as in `poi compare`). "
        f"Reward {cfg['reward']:,} minor units, update fee {cfg['update-fee']}. "
        "Share = attackers' payouts / all subscribers' payouts (reward + fees) per run; "
        "0 when nothing was paid. Runs under `attack/runs/` (not committed).",
        "",
        "| setting | " + " | ".join(
            f"{v} share mean | {v} share max | {v} paid | {v} acc" for v in variants) + " |",
        "|---|" + "---|" * (4 * len(variants)),
    ]
    for setting in part["settings"]:
        cells = []
        for v in variants:
            c = part["cells"][setting][v]
            cells += [_pct(c["share_mean"]), _pct(c["share_max"]), f"{c['paid_mean']:,.0f}",
                      f"{c['accuracy_mean']:.3f}"]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Mean over seeds {seeds}; max = the worst seed; paid = mean total paid to "
        "subscribers (minor units); acc = mean final test accuracy.",
        "",
        "| setting | " + " | ".join(
            f"{v} attackers' selections | {v} to attackers | {v} conv. fraction | "
            f"{v} payees (attackers) | {v} nothing paid / forfeited" for v in variants) + " |",
        "|---|" + "---|" * (5 * len(variants)),
    ]
    for setting in part["settings"]:
        cells = []
        for v in variants:
            c = part["cells"][setting][v]
            cells += [f"{c['attacker_selections']} / {c['selections']}",
                      f"{c['attacker_paid_mean']:,.0f}", f"{c['fraction_mean']:.3f}",
                      f"{c['payees_mean']:.1f} ({c['attacker_payees_mean']:.1f})",
                      f"{c['nothing_paid']} / {c['forfeited']} of {c['n']}"]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "attackers' selections = applied updates by attackers / all applied, "
              "over the seeds; to attackers = mean paid to attackers (minor units, of a reward of "
              f"{cfg['reward']:,}); conv. fraction = the market's fraction of convergence "
              "(L0 - L_T) / L0, mean; payees = subscribers paid anything, mean per run "
              "(of them attackers)."]
    failed = sum(c["audit_failed"] for row in part["cells"].values() for c in row.values())
    lines.append(f"Independent audit (`audit.json`) failed in {failed} of {len(part['runs'])} "
                 "runs.")
    return lines


def fidelity_markdown(part: dict[str, Any]) -> list[str]:
    seeds = part["per_seed"]
    variants = part["variants"]
    n = part["num_subscribers"]
    cfg = part["config"]
    seed_list = ", ".join(str(s["seed"]) for s in seeds)
    lines = [
        "## B. Payout fidelity: PoI payouts against exact data Shapley values",
        "",
        f"{n} subscribers, Dirichlet alpha {cfg['dirichlet-alpha']}, "
        f"{part['num_server_rounds']} rounds, no attackers, seeds {seed_list}; PoI market "
        f"runs under the payout rules {', '.join(variants)} (same partitions and vote). "
        f"Shapley utility v(C) = final test accuracy of FedAvg (example-weighted mean of the "
        f"updates) trained on coalition C alone for {part['num_server_rounds']} rounds from "
        "the run's initial model, each member training exactly like an honest subscriber "
        f"(DP-SGD, noise {cfg['noise-multiplier']}, clip {cfg['max-grad-norm']}, "
        f"{cfg['local-epochs']} epochs, batch {cfg['batch-size']}, lr {cfg['learning-rate']}, "
        "the simulation's per-(seed, round, partition) seeds); v(empty) = the initial "
        f"model's accuracy. All {2 ** n - 1} non-empty coalitions, exact weights "
        "|S|!(n-|S|-1)!/n!.",
        "",
        "| seed | " + " | ".join(f"Spearman {v}" for v in variants)
        + " | " + " | ".join(f"{v} payees (ceiling)" for v in variants)
        + " | Spearman (examples, Shapley) | v(empty) | v(all) |",
        "|---|" + "---|" * (2 * len(variants) + 3),
    ]
    for s in seeds:
        payees = []
        for v in variants:
            pay = s["poi"][v]["payouts"]
            ceiling = tie_ceiling(pay, s["shapley"]["shapley_accuracy"])
            payees.append(f"{sum(1 for p in pay if p > 0)} of {n} ({_fmt_rho(ceiling)})")
        lines.append(
            f"| {s['seed']} | " + " | ".join(_fmt_rho(s["spearman"][v]) for v in variants)
            + " | " + " | ".join(payees)
            + f" | {_fmt_rho(s['spearman_examples'])} | {s['shapley']['v_empty']:.3f} | "
            f"{s['shapley']['v_full']:.3f} |")
    medians = []
    for v in variants:
        rhos = [s["spearman"][v] for s in seeds if s["spearman"][v] is not None]
        medians.append(f"{v} {statistics.median(rhos):.2f}" if rhos else f"{v} undefined")
    lines += [
        "",
        f"Median Spearman over seeds {seed_list}: " + ", ".join(medians) + ".",
        "",
        "Spearman over the subscribers' ranks (ties averaged, scipy). payees = subscribers "
        "paid anything; the rest tie at 0. ceiling = the best Spearman any payouts with that "
        "many zeros could reach (the payees being exactly the top Shapley values, paid in "
        "their order). Spearman (examples, Shapley): the ranking by "
        "partition size alone, for reference. With the validation-loss reduction as the "
        "utility (what PoI's scores measure) instead of accuracy: "
        + "; ".join(
            f"seed {s['seed']} " + ", ".join(
                f"{v} {_fmt_rho(s['spearman_validation_loss_utility'][v])}" for v in variants)
            for s in seeds) + ".",
        "",
        "Per subscriber (payouts in minor units; Shapley in accuracy points, pp):",
        "",
        "| seed | partition | examples | " + " | ".join(f"{v} payout" for v in variants)
        + " | Shapley (pp) |",
        "|---|---|---|" + "---|" * (len(variants) + 1),
    ]
    for s in seeds:
        sh = s["shapley"]
        for p in range(n):
            lines.append(
                f"| {s['seed']} | {p} | {sh['examples'][p]} | "
                + " | ".join(f"{s['poi'][v]['payouts'][p]:,}" for v in variants)
                + f" | {100 * sh['shapley_accuracy'][p]:+.2f} |")
    lines += [
        "",
        "Cost: the Shapley values against PoI's settlement (read_market + replay + "
        f"settlement_of on the run's ledger, median of {TIMING_REPEATS}; reading the "
        "entries from SQLite not included):",
        "",
        "| seed | Shapley wall time | local trainings | coalitions | " + " | ".join(
            f"{v} settlement | ratio" for v in variants) + " | PoI run |",
        "|---|---|---|---|" + "---|" * (2 * len(variants) + 1),
    ]
    for s in seeds:
        sh = s["shapley"]
        cells = []
        for v in variants:
            t = s["poi"][v]["settlement_seconds"]
            cells += [f"{t:.3f} s", f"{sh['seconds'] / t:,.0f}x"]
        lines.append(f"| {s['seed']} | {sh['seconds']:.0f} s | {sh['trainings']:,} | "
                     f"{sh['coalitions']} | " + " | ".join(cells)
                     + f" | {s['poi'][variants[0]]['wall_seconds']:.0f} s |")
    sh0 = seeds[0]["shapley"]
    rounds = part["num_server_rounds"]
    lines += [
        "",
        f"Shapley: 2 worker processes; the {n} round-1 updates are shared by every "
        f"coalition (same start model), so {n} + (rounds - 1) x sum |C| = "
        f"{sh0['trainings']:,} trainings per seed instead of {rounds * n * 2 ** (n - 1):,}. "
        "One coalition takes "
        f"{statistics.median(s['shapley']['coalition_seconds_median'] for s in seeds):.2f} s "
        "(median over coalitions, then seeds; the grand coalition "
        f"{statistics.median(s['shapley']['grand_coalition_seconds'] for s in seeds):.2f} s). "
        "PoI's settlement needs no "
        "training at all: it replays the selected updates and re-scores the models on the "
        "revealed validation set.",
        "",
        "Check: the round-1 updates trained here are bit-identical to the subscribers' "
        "round-1 candidates in the PoI ledger for "
        + ", ".join(f"{s['first_round_reproduced']} of {n} (seed {s['seed']})" for s in seeds)
        + " subscribers.",
    ]
    if all("levers" in s for s in seeds):
        names = list(seeds[0]["levers"])
        lines += [
            "", "Every payout-rule variant (`benchmarks.payouts.VARIANTS`) settled on the "
            "default run's ledger (same vote, same applied updates): Spearman (accuracy "
            "Shapley) per seed, its median, Kendall median, Spearman against the "
            "validation-loss Shapley (median).", "",
            "| variant | " + " | ".join(f"seed {s['seed']}" for s in seeds)
            + " | median | Kendall | validation-loss utility |",
            "|---|" + "---|" * (len(seeds) + 3)]
        for name in names:
            rhos = [s["levers"][name]["spearman"] for s in seeds]
            taus = [s["levers"][name]["kendall"] for s in seeds]
            loss = [s["levers"][name]["spearman_validation_loss_utility"] for s in seeds]

            def med(values: list[float | None]) -> str:
                known = [v for v in values if v is not None]
                return f"{statistics.median(known):.2f}" if known else "undefined"

            lines.append(f"| {name} | " + " | ".join(_fmt_rho(r) for r in rhos)
                         + f" | {med(rhos)} | {med(taus)} | {med(loss)} |")
    return lines


def targets_markdown(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | result | verdict |", "|---|---|---|"]
    attack = results.get("attack")
    if attack:
        for v in attack["strategies"]:
            attacked = {s: c for s, c in attack["cells"].items() if s != "no attack"}
            worst = max(((c[v]["share_max"], s) for s, c in attacked.items()),
                        key=lambda x: x[0])
            missed = [s for s, c in attack["cells"].items() if c[v]["share_max"] > SHARE_TARGET]
            verdict = "**met**" if not missed else f"**missed** ({', '.join(missed)})"
            lines.append(
                f"| attackers' share <= {SHARE_TARGET:.0%}, {v}, every setting and seed | "
                f"worst {_pct(worst[0])} ({worst[1]}) | {verdict} |")
    fidelity = results.get("fidelity")
    if fidelity:
        for v in fidelity["variants"]:
            for key, utility in (("", "accuracy"), ("_validation_loss_utility",
                                                    "validation-loss")):
                rhos = [s["spearman" + key][v] for s in fidelity["per_seed"]]
                taus = [s.get("kendall" + key, {}).get(v) for s in fidelity["per_seed"]]
                shown = ", ".join(_fmt_rho(r) for r in rhos)
                ok = all(r is not None and r >= SPEARMAN_TARGET for r in rhos)
                some = sum(1 for r in rhos if r is not None and r >= SPEARMAN_TARGET)
                verdict = "**met**" if ok else f"**missed** ({some} of {len(rhos)} seeds)"
                lines.append(f"| Spearman >= {SPEARMAN_TARGET}, {v}, {utility} Shapley, every "
                             f"seed | {shown} (Kendall {', '.join(_fmt_rho(t) for t in taus)}) "
                             f"| {verdict} |")
    return lines


def attack_notes(part: dict[str, Any]) -> list[str]:
    """Observations on part A, computed from its runs."""
    notes = []
    cells, runs = part["cells"], part["runs"]
    attacked = [s for s in part["settings"] if s != "no attack"]
    variants = part["strategies"]
    never = [s for s in attacked if all(cells[s][v]["attacker_selections"] == 0
                                        for v in variants)]
    if never:
        notes.append(f"{', '.join(never)}: no attacker's update was ever applied (0 "
                     "selections with every top-k), so attackers earned nothing.")
    for setting in attacked:
        for v in variants:
            c = cells[setting][v]
            if c["share_max"] == 0 and c["attacker_selections"] > 0:
                if c["nothing_paid"] == c["n"]:
                    why = ("nothing was paid to anyone in any seed: the final validation loss "
                           "was not below L0, so the reward pool was 0 (the target holds only "
                           "vacuously)")
                else:
                    why = ("their net credit was <= 0: on balance their applied updates "
                           "raised the Scientist's validation loss, and a net negative credit "
                           "pays nothing")
                notes.append(f"{setting}, {v}: attackers were {c['attacker_selections']} of "
                             f"{c['selections']} applied updates yet got 0%: {why}.")
    for setting in attacked:
        for v in variants:
            c = cells[setting][v]
            if c["share_max"] <= SHARE_TARGET:
                continue
            rows = [r for r in runs if r["setting"] == setting and r["strategy"] == v]
            top = sum(1 for r in rows if r["total_paid"] and max(
                range(len(r["payouts"])), key=lambda i: r["payouts"][i]) in r["attackers"])
            note = (f"{setting}, {v}: attackers were {c['attacker_selections']} of "
                    f"{c['selections']} applied updates and got {_pct(c['share_mean'])} of "
                    f"the payouts (worst seed {_pct(c['share_max'])}; mean "
                    f"{c['attacker_paid_mean']:,.0f} of {c['paid_mean']:,.0f} paid); an "
                    f"attacker was the largest payee in {top} of {c['n']} runs.")
            if setting.startswith("free-rider"):
                note += (" A free rider replays the last change of the global model. With "
                         "top-1 that is the previous round's applied update, already seen, "
                         "so it is rejected as a repeat; with top-k > 1 it is the mean of k "
                         "applied updates, a new digest, smoother than any single update: it "
                         "wins selection and a large Shapley share of the round's improvement "
                         "(the other free riders send the same bytes and are rejected as "
                         "repeats, so one of them collects).")
            elif setting.startswith("fake-data"):
                note += (f" The model barely improved (fraction of convergence "
                         f"{c['fraction_mean']:.3f}), so the reward pool was small, but what "
                         "improvement there was came from the attackers' updates (nearly all "
                         "the applied ones), and the settlement pays for it.")
            notes.append(note)
    return notes


def fidelity_notes(part: dict[str, Any]) -> list[str]:
    """Observations on part B, computed from its runs."""
    notes = []
    seeds, variants, n = part["per_seed"], part["variants"], part["num_subscribers"]
    ceilings = [(s["seed"], v, tie_ceiling(s["poi"][v]["payouts"],
                                           s["shapley"]["shapley_accuracy"]))
                for s in seeds for v in variants]
    capped = [(seed, v, c) for seed, v, c in ceilings if c is not None and c < SPEARMAN_TARGET]
    payees = [sum(1 for p in s["poi"][v]["payouts"] if p > 0) for s in seeds for v in variants]
    notes.append(
        f"Zero payouts tie: PoI paid {min(payees)}-{max(payees)} of {n} subscribers. All "
        f"{n} have a positive Shapley value (min "
        f"{min(100 * min(s['shapley']['shapley_accuracy']) for s in seeds):+.1f} pp), so the "
        f"ties alone cap Spearman below {SPEARMAN_TARGET} in {len(capped)} of "
        f"{len(ceilings)} (seed, variant) pairs (ceiling column), whatever the order of the "
        "payees.")
    best_unpaid, unpaid_selected = 0, []
    for s in seeds:
        values = s["shapley"]["shapley_accuracy"]
        best = max(range(n), key=lambda i: values[i])
        for v in variants:
            run = s["poi"][v]
            if run["payouts"][best] == 0:
                best_unpaid += 1
            for p in range(n):
                times = sum(1 for rnd in run["selected"] if rnd and p in rnd)
                if times and run["payouts"][p] == 0:
                    unpaid_selected.append(f"seed {s['seed']} {v} partition {p} "
                                           f"({times} of {len(run['selected'])} rounds)")
    notes.append(
        f"The payees are not the most valuable subscribers: the subscriber with the highest "
        f"Shapley value was paid nothing in {best_unpaid} of {len(ceilings)} (seed, variant) "
        "pairs. Selection is by peer votes on the voters' own (skewed) data, credit by the "
        "Scientist's validation loss, and Shapley by the test accuracy of FedAvg over "
        "coalitions: three different measures. A subscriber whose applied updates raise the "
        "validation loss on balance gets nothing however often it is selected: "
        + ("; ".join(unpaid_selected) if unpaid_selected else "no such case here") + ".")
    loss_rhos = [s["spearman_validation_loss_utility"][v] for s in seeds for v in variants]
    acc_rhos = [s["spearman"][v] for s in seeds for v in variants]
    known = [r for r in loss_rhos if r is not None]
    if known:
        loss_median = statistics.median(known)
        acc_median = statistics.median([r for r in acc_rhos if r is not None] or [math.nan])
        notes.append(
            "With the validation-loss reduction as the Shapley utility (PoI's own measure) "
            f"the median Spearman over all (seed, variant) pairs is {loss_median:.2f} (accuracy "
            f"utility: {acc_median:.2f}); "
            + ("still short of the target." if loss_median < SPEARMAN_TARGET
               else "at or above the target."))
    spreads = [100 * (max(s["shapley"]["shapley_accuracy"]) - min(s["shapley"]["shapley_accuracy"]))
               for s in seeds]
    notes.append(
        f"The Shapley values span {min(spreads):.1f}-{max(spreads):.1f} pp between the least "
        "and the most valuable subscriber (per seed), of "
        f"{100 * min(s['shapley']['v_full'] - s['shapley']['v_empty'] for s in seeds):.0f}+ "
        "pp in total; ranking by partition size alone gives Spearman "
        + ", ".join(_fmt_rho(s["spearman_examples"]) for s in seeds) + ".")
    times = [s["shapley"]["seconds"] for s in seeds]
    per = [s["shapley"]["coalition_seconds_median"] for s in seeds]
    shapley_median = statistics.median(times)
    costs = []
    for v in variants:
        settle = statistics.median(s["poi"][v]["settlement_seconds"] for s in seeds)
        costs.append(f"{v} {1000 * settle:.0f} ms ({shapley_median / settle:,.0f}x)")
    notes.append(
        f"Cost: exact data Shapley took {shapley_median:.0f} s per seed (median; "
        f"{seeds[0]['shapley']['trainings']:,} local DP trainings, {2 ** n - 1} FedAvg runs "
        "on 2 cores) against PoI's settlement from the ledger: " + ", ".join(costs)
        + " (medians; a round with k > 1 applied updates re-scores every coalition of them each "
        f"round). Shapley grows as 2^n: {2 ** n - 1} FedAvg runs at {n} subscribers, about "
        "10^6 at 20.")
    if max(per) > 1.5 * min(per):
        notes.append(
            f"The Shapley wall times vary by seed ({', '.join(f'{t:.0f} s' for t in times)}; "
            f"median coalition {', '.join(f'{t:.2f} s' for t in per)}): the machine was "
            "probably shared with other work (other sessions' tests) during the slower "
            "seed(s); the values do not depend on it (the trainings are seeded).")
    return notes


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [
        "# Market benchmark",
        "",
        "`python -m benchmarks.market --out " + results["out"]
        + (" --quick" if results["quick"] else "") + "`"
        + " (2 CPU cores, no GPU). Raw data: `market.json`; plot: `market.png`.",
        "",
    ]
    lines += targets_markdown(results) + [""]
    if results.get("attack"):
        lines += attack_markdown(results["attack"]) + [
            "", f"Part A took {results['attack']['seconds'] / 60:.1f} min.", ""]
    if results.get("fidelity"):
        lines += fidelity_markdown(results["fidelity"]) + [
            "", f"Part B took {results['fidelity']['seconds'] / 60:.1f} min.", ""]
    notes = attack_notes(results["attack"]) if results.get("attack") else []
    notes += fidelity_notes(results["fidelity"]) if results.get("fidelity") else []
    if notes:
        lines += ["## Why (from the data above)", ""] + [f"- {note}" for note in notes] + [""]
    path.write_text("\n".join(lines))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    attack = results.get("attack")
    if attack:
        settings = attack["settings"]
        names = attack["strategies"]
        width = 0.8 / len(names)
        xs = np.arange(len(settings))
        for i, name in enumerate(names):
            means = [100 * attack["cells"][s][name]["share_mean"] for s in settings]
            maxes = [100 * attack["cells"][s][name]["share_max"] for s in settings]
            pos = xs + i * width - 0.4 + width / 2
            left.bar(pos, means, width, label=f"{name} (mean)")
            left.scatter(pos, maxes, marker="_", s=120, color="black",
                         label="worst seed" if i == 0 else None, zorder=3)
        left.axhline(100 * SHARE_TARGET, color="red", linestyle="--", linewidth=1,
                     label=f"target {SHARE_TARGET:.0%}")
        left.set_xticks(xs, settings, rotation=25, ha="right", fontsize=8)
        left.set_ylabel("attackers' share of payouts (%)")
        left.set_title("A. Attackers' share of subscriber payouts")
        left.legend(fontsize=7)
    else:
        left.text(0.5, 0.5, "part A not run", ha="center", va="center")
        left.set_axis_off()
    fidelity = results.get("fidelity")
    if fidelity:
        markers = {v: m for v, m in zip(fidelity["variants"], "os^D", strict=False)}
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j, s in enumerate(fidelity["per_seed"]):
            sh = 100 * np.asarray(s["shapley"]["shapley_accuracy"])
            for v in fidelity["variants"]:
                pay = np.asarray(s["poi"][v]["payouts"], dtype=float)
                share = 100 * pay / pay.sum() if pay.sum() else pay
                right.scatter(sh, share, marker=markers[v], color=colors[j % len(colors)],
                              alpha=0.75, label=f"seed {s['seed']} {v} "
                              f"(rho {_fmt_rho(s['spearman'][v])})")
        right.set_xlabel("data Shapley value (accuracy pp)")
        right.set_ylabel("share of PoI payouts (%)")
        right.set_title("B. PoI payouts vs exact data Shapley")
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "part B not run", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/market"))
    parser.add_argument("--part", choices=("attack", "fidelity", "all"), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: A 8 subscribers, 3 rounds, label-flip, one seed; "
                             "B 4 subscribers, 3 rounds, one seed")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite market.md and market.png from OUT/market.json")
    args = parser.parse_args()
    console = Console()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous_path = out / "market.json"
    results: dict[str, Any] = {}
    if previous_path.is_file():
        previous = json.loads(previous_path.read_text())
        if previous.get("quick") == args.quick:
            results = previous
    results.update({"out": str(out), "quick": args.quick})
    if args.report_only:
        if not results:
            raise SystemExit(f"--report-only: expected {previous_path} from a "
                             f"{'quick' if args.quick else 'full'} run, found none")
        if "attack" in results:  # re-read the runs (the tables may have grown columns)
            seconds = results["attack"]["seconds"]
            results["attack"] = run_attack(out, args.quick, console, run=False)
            results["attack"]["seconds"] = seconds
            write_json(previous_path, results)
    elif args.part in ("attack", "all"):
        console.rule("Part A: attackers' share of the payouts")
        results["attack"] = run_attack(out, args.quick, console)
        write_json(previous_path, results)
    if args.part in ("fidelity", "all") and not args.report_only:
        console.rule("Part B: payout fidelity against data Shapley")
        results["fidelity"] = run_fidelity(out, args.quick, console,
                                           previous=results.get("fidelity"))
        write_json(previous_path, results)
    write_markdown(results, out / "market.md")
    plot(results, out / "market.png")
    console.print((out / "market.md").read_text())


if __name__ == "__main__":
    main()
