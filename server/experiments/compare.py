"""``poi compare``: PoI and Flower's built-in strategies side by side.

Every strategy runs on the same partitions, seeds, attacks and attacker sets (the
attackers of a (fraction, seed) pair are drawn once from the seed), each run through
Flower's simulation engine. Runs already finished under ``OUT/runs`` are reused, so an
interrupted comparison resumes. Writes ``compare.json`` (every run's summary and the
aggregates), ``compare.md`` (strategy x attack setting -> mean +- std final accuracy, and
the PoI / FedAvg round wall-time ratio) and ``compare.png``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.config import ATTACKS, STRATEGIES, ConfigError, RunConfig
from server.round.report import write_json


@dataclass(frozen=True)
class StrategyVariant:
    name: str  # label in tables: "poi", "poi-single@5", "fedavg", ...
    strategy: str
    top_k: int | None
    vote_rule: str | None = None  # PoI only: "marginal" (poi) or "single" (poi-single)


@dataclass(frozen=True)
class CompareSpec:
    strategies: tuple[StrategyVariant, ...]
    attacks: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]

    @classmethod
    def parse(cls, *, strategies: str, attacks: str, fractions: str, seeds: str) -> CompareSpec:
        variants = []
        for item in _split(strategies):
            name, _, k = item.partition("@")
            if name == "poi-single":
                variants.append(StrategyVariant(item, "poi", int(k) if k else None, "single"))
                continue
            if name not in STRATEGIES:
                raise ConfigError(
                    f"strategies: expected names from {list(STRATEGIES)}, got {name!r}")
            if k and name != "poi":
                raise ConfigError(f"strategies: only poi takes @top-k, got {item!r}")
            variants.append(StrategyVariant(item, name, int(k) if k else None,
                                            "marginal" if name == "poi" else None))
        attack_list = tuple(_split(attacks))
        for attack in attack_list:
            for kind in attack.split("+"):
                if kind not in ATTACKS or kind == "none":
                    raise ConfigError(
                        f"attacks: expected names from {list(ATTACKS[1:])}, got {kind!r}")
        try:
            fraction_list = tuple(float(f) for f in _split(fractions))
            seed_list = tuple(int(s) for s in _split(seeds))
        except ValueError as exc:
            raise ConfigError(f"fractions/seeds: expected numbers ({exc})") from None
        if any(not 0.0 <= f < 1.0 for f in fraction_list):
            raise ConfigError(f"fractions: expected values in [0, 1), got {fraction_list}")
        return cls(tuple(variants), attack_list, fraction_list, seed_list)

    def settings(self) -> list[tuple[str, float]]:
        """(attack, fraction) columns; fraction 0 gives one 'none' column."""
        out: list[tuple[str, float]] = []
        for fraction in self.fractions:
            if fraction == 0.0:
                out.append(("none", 0.0))
            else:
                out.extend((attack, fraction) for attack in self.attacks)
        return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def choose_attackers(num_subscribers: int, fraction: float, seed: int) -> tuple[int, ...]:
    count = int(round(fraction * num_subscribers))
    rng = np.random.default_rng(1_000_003 * seed + 17)
    return tuple(sorted(int(i) for i in rng.choice(num_subscribers, size=count, replace=False)))


def setting_label(attack: str, fraction: float) -> str:
    return "no attack" if attack == "none" else f"{attack} @{fraction:.0%}"


def run_compare(base: RunConfig, spec: CompareSpec, out: Path, *, console: Console,
                run_missing: bool = True) -> dict[str, Any]:
    """Run every (strategy, setting, seed) not finished yet under ``out/runs`` (with
    ``run_missing=False`` only aggregate what is there), then write the outputs."""
    from server.experiments.simulation import run_simulation

    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for attack, fraction in spec.settings():
        for seed in spec.seeds:
            attackers = choose_attackers(base.num_subscribers, fraction, seed)
            for variant in spec.strategies:
                config = replace(
                    base, strategy=variant.strategy, seed=seed,
                    top_k=variant.top_k if variant.top_k else base.top_k,
                    vote_rule=variant.vote_rule or base.vote_rule,
                    attack=attack if attackers else "none",
                    attackers=",".join(map(str, attackers)) if attack != "none" else "",
                )
                config.validate()
                label = variant.name.replace("@", "-top")
                run_dir = out / "runs" / f"{label}__{attack}__{fraction:g}__s{seed}"
                jobs.append((variant, attack, fraction, seed, config, run_dir))
    runs: list[dict[str, Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("simulations", total=len(jobs))
        for variant, attack, fraction, seed, config, run_dir in jobs:
            bar.update(task,
                       description=f"{variant.name} {setting_label(attack, fraction)} s{seed}")
            report_path = run_dir / "report.json"
            report = _finished(report_path, config)
            if report is None and not run_missing:
                bar.advance(task)
                continue
            if report is None:
                if run_dir.exists():  # an interrupted run: start it afresh
                    shutil.rmtree(run_dir)
                started = time.perf_counter()
                run_simulation(config, run_dir)
                report = json.loads(report_path.read_text())
                report["simulation_seconds"] = time.perf_counter() - started
                write_json(report_path, report)
            runs.append(_summary(variant, attack, fraction, seed, report))
            bar.advance(task)
    summary = aggregate(runs, spec)
    payload = {"config": base.to_mapping(), "runs": runs, "aggregate": summary}
    write_json(out / "compare.json", payload)
    (out / "compare.md").write_text(markdown_table(summary, spec))
    plot(summary, spec, out / "compare.png")
    console.print((out / "compare.md").read_text())
    return payload


def _finished(path: Path, config: RunConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    if len(report.get("rounds", [])) != config.num_server_rounds:
        return None
    return report  # type: ignore[no-any-return]


def _summary(variant: StrategyVariant, attack: str, fraction: float, seed: int,
             report: dict[str, Any]) -> dict[str, Any]:
    attackers = set(report["attackers"])
    selected = [s for s in report["selected"] if s is not None]
    picks = [a for rnd in selected for a in rnd]
    return {
        "strategy": variant.name, "attack": attack, "fraction": fraction, "seed": seed,
        "final_accuracy": report["final_accuracy"],
        "median_round_seconds": report["median_round_seconds"],
        "attackers": sorted(attackers),
        "attacker_selections": sum(1 for a in picks if a in attackers) if selected else None,
        "selections": len(picks) if selected else None,
        "max_epsilon": max((s["epsilon"] or 0.0) for s in report["subscribers"]),
        "attack_success_rate": report.get("final_attack_success_rate"),
    }


def aggregate(runs: Sequence[dict[str, Any]], spec: CompareSpec) -> dict[str, Any]:
    cells: dict[str, dict[str, Any]] = {}
    for variant in spec.strategies:
        row: dict[str, Any] = {}
        for attack, fraction in spec.settings():
            accs = [r["final_accuracy"] for r in runs
                    if r["strategy"] == variant.name and r["attack"] == attack
                    and r["fraction"] == fraction]
            picked = [(r["attacker_selections"], r["selections"]) for r in runs
                      if r["strategy"] == variant.name and r["attack"] == attack
                      and r["fraction"] == fraction and r["selections"]]
            asr = [r["attack_success_rate"] for r in runs
                   if r["strategy"] == variant.name and r["attack"] == attack
                   and r["fraction"] == fraction and r.get("attack_success_rate") is not None]
            secs = [r["median_round_seconds"] for r in runs
                    if r["strategy"] == variant.name and r["attack"] == attack
                    and r["fraction"] == fraction]
            if accs:
                row[setting_label(attack, fraction)] = {
                    "mean": statistics.fmean(accs),
                    "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs),
                    "median_round_seconds": statistics.median(secs),
                    "attacker_share": (sum(a for a, _ in picked) / sum(n for _, n in picked)
                                       if picked else None),
                    "attack_success_rate": statistics.fmean(asr) if asr else None,
                }
        cells[variant.name] = row
    return cells


def markdown_table(summary: dict[str, Any], spec: CompareSpec) -> str:
    columns = [setting_label(a, f) for a, f in spec.settings()]
    lines = ["| strategy | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, row in summary.items():
        cells = []
        for col in columns:
            cell = row.get(col)
            if not cell:
                cells.append("-")
                continue
            text = f"{cell['mean']:.3f} ± {cell['std']:.3f}"
            if cell.get("n", 0) != len(spec.seeds):
                text += f" (n={cell['n']})"
            if cell.get("attacker_share") is not None and col != "no attack":
                text += f" [{cell['attacker_share']:.0%}]"
            if col.startswith("targeted-flip") and cell.get("attack_success_rate") is not None:
                text += f" ASR {cell['attack_success_rate']:.1%}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Final test accuracy, mean ± std over seeds "
                 f"{', '.join(map(str, spec.seeds))} (n = seeds finished when fewer); "
                 "[x%]: the attackers' share of the updates applied (strategies that say "
                 "whose update they applied); ASR: the targeted flip's attack success rate "
                 "(source-class test examples predicted as the target class).")
    fedavg = summary.get("fedavg", {})
    for name, row in summary.items():
        if not name.startswith("poi"):
            continue
        ratios = [row[c]["median_round_seconds"] / fedavg[c]["median_round_seconds"]
                  for c in columns if c in row and c in fedavg
                  and fedavg[c]["median_round_seconds"]]
        if ratios:
            lines.append(f"Round wall time {name} / fedavg (median over settings): "
                         f"{statistics.median(ratios):.2f}x")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], spec: CompareSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [setting_label(a, f) for a, f in spec.settings()]
    names = list(summary)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns) + 2), 4.5))
    for i, name in enumerate(names):
        means = [summary[name].get(c, {}).get("mean", np.nan) for c in columns]
        stds = [summary[name].get(c, {}).get("std", 0.0) for c in columns]
        xs = np.arange(len(columns)) + i * width - 0.4 + width / 2
        ax.bar(xs, means, width, yerr=stds, label=name, capsize=2)
    ax.set_xticks(np.arange(len(columns)), columns, rotation=20, ha="right")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Proof-of-Intelligence vs Flower built-ins")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
