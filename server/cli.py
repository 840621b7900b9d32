"""The ``poi`` command line: wiring only (typer + rich); the work lives elsewhere."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.config import ConfigError, RunConfig

app = typer.Typer(help="Proof-of-Intelligence: a federated learning market on Flower.",
                  no_args_is_help=True, add_completion=False)
console = Console()

try:  # the ledger commands (poi ledger verify|show|prove|size)
    from server.ledger_cli import ledger_app

    app.add_typer(ledger_app, name="ledger", help="Inspect and verify a run's ledger.")
except ImportError:  # pragma: no cover - only while the ledger package is absent
    pass


def parse_run_config(text: str) -> dict[str, Any]:
    """``"k=v k=v"`` into a mapping. Values are TOML when they parse as TOML (``3``,
    ``0.5``, ``true``, ``"x"``), else plain strings, so ``strategy=poi`` works as well
    as Flower's ``strategy='poi'``."""
    out: dict[str, Any] = {}
    for token in shlex.split(text):
        if "=" not in token:
            raise ConfigError(f"run-config: expected key=value pairs, got {token!r}")
        key, raw = token.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def load_config(run_config: str, **overrides: Any) -> RunConfig:
    mapping = parse_run_config(run_config)
    mapping.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.from_mapping(mapping)
    except ConfigError as exc:
        console.print(f"[red]Bad configuration:[/red] {exc}")
        raise typer.Exit(2) from None


def _fmt_round(report: dict[str, Any], index: int) -> str:
    rnd = report["rounds"][index]
    sel = rnd["selected"]
    rejected = ", ".join(f"{r['author']} ({r['reason'][:60]})" for r in rnd["rejected"]) or "-"
    acc = rnd["accuracy"]
    selected = "n/a" if report["strategy"] != "poi" else (", ".join(map(str, sel)) or "none")
    line = (f"round {rnd['round']:>3}  accuracy {acc:6.3f}  selected [{selected}]"
            f"  rejected [{rejected}]")
    ranked = sorted((c for c in rnd["candidates"] if c["score"] is not None),
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
    from server.simulation import run_simulation

    config = load_config(run_config)
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
    from server.compare import CompareSpec, run_compare

    base = load_config(run_config)
    spec = CompareSpec.parse(strategies=strategies, attacks=attacks, fractions=fractions,
                             seeds=seeds)
    run_compare(base, spec, out, console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
