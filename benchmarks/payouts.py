"""Benchmark: what the payout rule round-game/v2 costs per round, and a whole audit.

Per round, at k applied updates (digits MLP 64 -> 32 -> 10, the 360-example validation
split, updates the size of an honest DP update): the validation losses the Scientist
publishes (every coalition up to 12 updates, the prefixes of 32 orderings beyond; the
audit recomputes the same numbers), the settlement's Shapley values from them, and the
closed-form Taylor estimate. Medians of ``--repeats`` runs, measured side by side in one
process. With ``--runs DIR``: ``poi audit`` (``audit_run``) of every finished run in DIR
(a run directory with ledger.db and audit.json), median of 3 each.

    python -m benchmarks.payouts --out benchmarks/results/payouts [--ks 12,20,100,1024]
        [--runs DIR] [--ledgers DIR]

With ``--ledgers DIR`` (runs made by ``scripts/payout-ledgers.py``, directories named
ATTACK__FRACTION__sSEED): every run settled under each payout-rule variant
(``VARIANTS``), the attackers' share of the reward per setting.

Writes OUT/payouts.json and OUT/payouts.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.round.report import write_json

AUDIT_TARGET_SECONDS = 5.0


def round_costs(k: int, repeats: int) -> dict[str, Any]:
    import torch

    from client.task import Dataset, digits_split, get_weights, make_model
    from server.market.attribution import (
        EXACT_MAX,
        PERMUTATIONS,
        draw_permutations,
        fixed_k_coalition_losses,
        permutation_seed,
        prefix_losses,
        taylor_shapley,
    )
    from server.market.scientist import loss_micro
    from server.market.settlement import PayoutRule, RoundOutcome, round_shares
    from server.round.selection import apply_updates

    torch.set_num_threads(2)
    split = digits_split()
    data = Dataset(x=split.validation.x, y=split.validation.y)
    arch = {"family": "poly-mlp", "input_dim": 64, "hidden_units": 32, "activation": "square",
            "num_classes": 10}
    base = get_weights(make_model(hidden_units=32, activation="square", seed=0))
    rng = np.random.default_rng(k)
    deltas = [{n: (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
               for n, v in base.items()} for _ in range(k)]
    authors = tuple(f"{i:032x}" for i in range(k))
    previous = loss_micro(base, data, architecture=arch)
    full = loss_micro(apply_updates(base, deltas), data, architecture=arch)
    rule = PayoutRule()
    times: dict[str, list[float]] = {"losses": [], "shapley": [], "taylor": []}
    models = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        if k <= EXACT_MAX:
            coalitions = fixed_k_coalition_losses(base, deltas, data, architecture=arch)
            coalitions[(1 << k) - 1] = full
            outcome = RoundOutcome(round=1, selected=authors, loss_micro=full,
                                   coalitions_micro=coalitions)
            models = len(coalitions)
        else:
            orders = draw_permutations(permutation_seed(b"\x07" * 32, 1), k, PERMUTATIONS)
            rows = prefix_losses(base, deltas, data, architecture=arch, permutations=orders)
            outcome = RoundOutcome(round=1, selected=authors, loss_micro=full,
                                   permutations=tuple(tuple(o) for o in orders),
                                   permutation_losses_micro=tuple(tuple(r) for r in rows))
            models = PERMUTATIONS * (k - 1)
        t1 = time.perf_counter()
        shares = round_shares(outcome, previous, rule)
        t2 = time.perf_counter()
        taylor_shapley(base, deltas, data, architecture=arch)
        t3 = time.perf_counter()
        times["losses"].append(t1 - t0)
        times["shapley"].append(t2 - t1)
        times["taylor"].append(t3 - t2)
        if sum(shares.values()) != previous - full:
            raise RuntimeError(f"k={k}: the shares do not add up to the round's improvement")
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {"k": k, "method": "exact" if k <= EXACT_MAX else f"sampled ({PERMUTATIONS})",
            "models": models, **{f"{n}_seconds": v for n, v in medians.items()},
            "round_seconds": sum(medians.values()), "repeats": repeats}


def audit_costs(runs: Path) -> list[dict[str, Any]]:
    from server.market.audit import audit_run

    out = []
    for run in sorted(p for p in runs.iterdir() if (p / "ledger.db").is_file()):
        times, ok = [], False
        for _ in range(3):
            t0 = time.perf_counter()
            result = audit_run(run)
            times.append(time.perf_counter() - t0)
            ok = result.ok
        report = json.loads((run / "report.json").read_text()) if (
            run / "report.json").is_file() else {}
        out.append({"run": run.name, "seconds": statistics.median(times), "ok": ok,
                    "rounds": len(report.get("rounds", [])),
                    "subscribers": len(report.get("subscribers", [])),
                    "applied": sum(len(r or []) for r in report.get("selected", [])),
                    "ledger_size": result.ledger_size})
    return out


# The payout-rule variants settled on every run's ledger (the vote is the same: only
# the settlement differs). "v1" is Shapley over the coalition mean (the legacy rule).
VARIANTS: dict[str, dict[str, Any]] = {
    "v1": {"game": "mean"},
    "v2 game only": {"loss_rise": False, "vote_gate": False, "high_water": False},
    "v2 + loss-rise": {"loss_rise": True, "vote_gate": False, "high_water": False},
    "v2 + vote gate": {"loss_rise": False, "vote_gate": True, "high_water": False},
    "v2 + high water": {"loss_rise": False, "vote_gate": False, "high_water": True},
    "v2 loss-rise + high water": {"loss_rise": True, "vote_gate": False, "high_water": True},
    "v2 (default: all three)": {},
}
SHARE_TARGET = 0.01


def variant_settlements(run: Path) -> dict[str, Any]:
    """The settlement of one finished run under every payout-rule variant, from the
    replay on its revealed validation set (``Settlement`` per variant name)."""
    from dataclasses import replace

    from ledger import LogReader
    from ledger.blobs import BlobStore
    from server.market.replay import eligible_authors, read_market, replay, round_outcomes
    from server.market.settlement import PayoutRule, settle

    with LogReader.open(run / "ledger.db") as reader:
        record = read_market(list(reader.entries()))
    blobs = BlobStore.beside(run / "ledger.db")
    tolerance = int(record.offer["score_tolerance_micro"])
    replays = {}
    for game, terms in (("mean", None), ("fixed-k", PayoutRule().to_terms())):
        record.offer.pop("payout", None)
        if terms is not None:
            record.offer["payout"] = terms
        result = replay(record, blobs)
        replays[game] = (result, round_outcomes(record, result.losses, result.coalitions,
                                                result.prefixes))
    eligible = eligible_authors(record, replays["fixed-k"][0])
    out = {}
    for name, change in VARIANTS.items():
        if change.get("game") == "mean":
            rule, (result, outcomes) = PayoutRule.legacy(), replays["mean"]
        else:
            rule = replace(PayoutRule(), tolerance_micro=tolerance, **change)
            result, outcomes = replays["fixed-k"]
        out[name] = settle(record.terms.money, result.losses[0], outcomes, rule=rule,
                           eligible=eligible)
    return out


def attack_shares(ledgers: Path, console: Console) -> dict[str, Any]:
    """Settle every finished run under ``ledgers`` (run directories with ledger.db,
    report.json, named ATTACK__FRACTION__sSEED) under each payout-rule variant, from the
    replay on the revealed validation set; the attackers' share of the reward paid."""
    runs = sorted(p for p in ledgers.iterdir() if (p / "report.json").is_file())
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("settling ledgers", total=len(runs))
        for run in runs:
            bar.update(task, description=run.name)
            report = json.loads((run / "report.json").read_text())
            bad = {s["key_id"] for s in report["subscribers"] if s["attacker"]}
            attack, fraction, seed = run.name.split("__")
            row: dict[str, Any] = {"run": run.name, "attack": attack, "fraction": float(fraction),
                                   "seed": int(seed.lstrip("s")),
                                   "final_accuracy": report["final_accuracy"]}
            for name, s in variant_settlements(run).items():
                paid = sum(s.reward_payouts.values())
                to_bad = sum(v for k, v in s.reward_payouts.items() if k in bad)
                row[name] = to_bad / paid if paid else 0.0
                row[name + " paid"] = paid
            rows.append(row)
            bar.advance(task)
    cells: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = f"{row['attack']} @ {row['fraction']:g}"
        cells.setdefault(key, {"runs": []})["runs"].append(row)
    for cell in cells.values():
        for name in VARIANTS:
            shares = [r[name] for r in cell["runs"]]
            cell[name] = {"mean": statistics.mean(shares), "max": max(shares),
                          "min": min(shares)}
    return {"runs": rows, "cells": cells, "variants": list(VARIANTS)}


def shares_markdown(part: dict[str, Any]) -> list[str]:
    variants = part["variants"]
    lines = ["", "## Attackers' share of the reward paid, by payout rule", "",
             "Each finished run's ledger settled under each rule from the replay on the "
             "revealed validation set (the vote and the applied updates are the same; only "
             "the settlement differs). Mean over seeds (min-max); target <= "
             f"{SHARE_TARGET:.0%} in every run.", "",
             "| setting | seeds | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for key in sorted(part["cells"]):
        cell = part["cells"][key]
        lines.append(f"| {key} | {len(cell['runs'])} | " + " | ".join(
            f"{100 * cell[v]['mean']:.1f}% ({100 * cell[v]['min']:.0f}-"
            f"{100 * cell[v]['max']:.0f})" for v in variants) + " |")
    default = variants[-1]
    attacked = {k: c for k, c in part["cells"].items() if not k.startswith("none")}
    missed = sorted(k for k, c in attacked.items() if c[default]["max"] > SHARE_TARGET)
    lines += ["", f"Target with the default ({default}): "
              + ("**met**" if not missed else f"**missed** in {', '.join(missed)}") + "."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Payout rule round-game/v2: cost", "",
             "Per round at k applied updates (medians of "
             f"{results['rounds'][0]['repeats'] if results['rounds'] else 0} in one process, "
             "2 threads): the validation losses the Scientist publishes and the audit "
             "recomputes, the Shapley values from them, the Taylor estimate.", "",
             "| k | method | models scored | losses | Shapley | Taylor | per round |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rounds"]:
        lines.append(f"| {r['k']} | {r['method']} | {r['models']:,} | {r['losses_seconds']:.2f} s "
                     f"| {r['shapley_seconds']:.3f} s | {r['taylor_seconds']:.3f} s | "
                     f"{r['round_seconds']:.2f} s |")
    audits = results.get("audits") or []
    if audits:
        seconds = [a["seconds"] for a in audits]
        worst = max(seconds)
        lines += ["", f"`poi audit` of {len(audits)} finished runs (median of 3 each): median "
                  f"{statistics.median(seconds):.2f} s, worst {worst:.2f} s; target < "
                  f"{AUDIT_TARGET_SECONDS:.0f} s for 20 rounds x 20 subscribers: "
                  + ("**met**" if worst < AUDIT_TARGET_SECONDS else "**missed**")
                  + f"; all ok: {all(a['ok'] for a in audits)}.", "",
                  "| run | rounds | subscribers | applied updates | ledger entries | audit |",
                  "|---|---|---|---|---|---|"]
        for a in audits:
            lines.append(f"| {a['run']} | {a['rounds']} | {a['subscribers']} | {a['applied']} | "
                         f"{a['ledger_size']:,} | {a['seconds']:.2f} s |")
    if results.get("shares"):
        lines += shares_markdown(results["shares"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/payouts"))
    parser.add_argument("--ks", default="2,12,20,100,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=None,
                        help="time poi audit of every run directory here")
    parser.add_argument("--ledgers", type=Path, default=None,
                        help="settle every run here under each payout-rule variant")
    args = parser.parse_args()
    console = Console()
    ks = [int(k) for k in args.ks.split(",") if k]
    previous = args.out / "payouts.json"
    # A part not asked for this time keeps its results from the last run.
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    results["rounds"] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("rounds", total=len(ks))
        for k in ks:
            bar.update(task, description=f"k = {k}")
            results["rounds"].append(round_costs(k, args.repeats))
            bar.advance(task)
    if args.runs is not None:
        results["audits"] = audit_costs(args.runs)
    if args.ledgers is not None:
        results["shares"] = attack_shares(args.ledgers, console)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "payouts.json", results)
    text = markdown(results)
    (args.out / "payouts.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
