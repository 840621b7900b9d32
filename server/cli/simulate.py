"""``poi simulate`` and ``poi compare``: one configuration, or a matrix of strategies,
attacks and seeds, through Flower's Simulation Runtime (wiring only; the work is in
``server.experiments``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.cli.common import console, load_config

app = typer.Typer()


LIST_UP_TO = 8  # a round's selected / rejected are listed up to this many, else counted


def _fmt_round(report: dict[str, Any], index: int) -> str:
    """One console line a round, whatever the federation's size: the selected and the
    rejected are listed while short, counted beyond :data:`LIST_UP_TO` (the report keeps
    every one)."""
    rnd = report["rounds"][index]
    sel = rnd["selected"]
    rejected_list = rnd["rejected"]
    acc = rnd["accuracy"]
    candidates = rnd["candidates"]
    if report["strategy"] != "poi":
        selected = "selected [n/a]"
    elif len(sel) > LIST_UP_TO:
        attackers = sum(1 for c in candidates if c["attacker"] and c["selected"])
        selected = f"selected {len(sel)}/{len(candidates)} ({attackers} attackers)"
    else:
        selected = f"selected [{', '.join(map(str, sel)) or 'none'}]"
    if len(rejected_list) > LIST_UP_TO:
        rejected = f"rejected {len(rejected_list)}"
    else:
        rejected = "rejected [" + (", ".join(f"{r['author']} ({r['reason'][:60]})"
                                             for r in rejected_list) or "-") + "]"
    line = f"round {rnd['round']:>3}  accuracy {acc:6.3f}"
    if rnd.get("published_validation_loss") is not None:
        line += f"  val-loss {rnd['published_validation_loss']:.4f}"
    line += f"  {selected}  {rejected}"
    ranked = sorted((c for c in candidates if c["score"] is not None),
                    key=lambda c: (-c["score"], c["id"]))
    attacker_ranks = [i + 1 for i, c in enumerate(ranked) if c["attacker"]]
    if attacker_ranks:
        line += f"  best attacker rank {attacker_ranks[0]}/{len(ranked)}"
    return line


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Run directory (report.json goes here).")],
    run_config: Annotated[str, typer.Option(help='Task knobs, "k=v k=v" (see README).')] = "",
    verbose: Annotated[bool, typer.Option(help="Show Flower's own logs.")] = False,
    force: Annotated[bool, typer.Option(help="Replace a previous run in --out.")] = False,
) -> None:
    """Run one configuration through Flower's simulation engine and write report.json."""
    from server import progress
    from server.experiments.simulation import preflight, run_simulation

    config = load_config(run_config)
    try:
        preflight(config)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    previous = [name for name in ("report.json", "ledger.db") if (out / name).exists()]
    if previous and not force:
        console.print(f"[red]{out} already holds a run ({', '.join(previous)}):[/red] "
                      "choose another --out, or pass --force to replace it")
        raise typer.Exit(2)
    if previous:
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]poi simulate[/bold]: strategy={config.strategy} "
                  f"subscribers={config.num_subscribers} rounds={config.num_server_rounds} "
                  f"attack={config.attack} attackers={list(config.attacker_ids)} -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("rounds", total=config.num_server_rounds)

        def on_event(event: dict[str, Any]) -> None:
            report = event["report"]
            bar.console.print(_fmt_round(report, len(report["rounds"]) - 1))
            bar.update(task, completed=event["round"])

        unsubscribe = progress.subscribe(on_event)
        try:
            run_simulation(config, out, quiet=not verbose)
        finally:
            unsubscribe()
    report = json.loads((out / "report.json").read_text())
    console.print(f"final accuracy {report['final_accuracy']:.4f} "
                  f"(initial {report['initial_accuracy']:.4f}); report: {out / 'report.json'}")
    if "ledger" in report:
        ledger = report["ledger"]
        console.print(f"ledger {ledger['path']}: {ledger['size']} entries, root {ledger['root']}, "
                      f"{ledger['cosignatures']} subscriber cosignatures")
    if "market" in report:
        market = report["market"]
        verdict = (f"[red]forfeited ({market['reason']})[/red]" if market["forfeited"]
                   else "settled")
        console.print(f"market {verdict}: paid {sum(market['payouts'].values())} of escrow "
                      f"{market['escrow']}, Scientist refund {market['scientist_refund']}; "
                      f"plot: {out / 'market.png'}")


@app.command()
def compare(
    out: Annotated[Path, typer.Option(help="Output directory (compare.json/.md/.png).")],
    run_config: Annotated[str, typer.Option(help='Shared knobs, "k=v k=v".')] = "",
    strategies: Annotated[str, typer.Option(
        help="Comma-separated; poi@K is PoI with top-k K.")] =
        "poi@1,poi@5,fedavg,krum,multikrum,fedmedian,fedtrimmedavg,bulyan",
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks (use + to combine).")] =
        "label-flip",
    fractions: Annotated[str, typer.Option(help="Attacker fractions; 0 runs no attack.")] =
        "0,0.4",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
) -> None:
    """Run PoI and Flower's built-ins on the same partitions, seeds and attacks."""
    from server.experiments.compare import CompareSpec, run_compare

    base = load_config(run_config)
    spec = CompareSpec.parse(strategies=strategies, attacks=attacks, fractions=fractions,
                             seeds=seeds)
    run_compare(base, spec, out, console=console)
