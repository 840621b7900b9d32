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

from server.deploy_cli import deploy_app  # noqa: E402

app.add_typer(deploy_app, name="deploy", help="Run on Flower's deployment engine "
              "(SuperLink, SuperNodes, TLS, node authentication).")


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
    line = f"round {rnd['round']:>3}  accuracy {acc:6.3f}"
    if rnd.get("published_validation_loss") is not None:
        line += f"  val-loss {rnd['published_validation_loss']:.4f}"
    line += f"  selected [{selected}]  rejected [{rejected}]"
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
    if "market" in report:
        market = report["market"]
        verdict = (f"[red]forfeited ({market['reason']})[/red]" if market["forfeited"]
                   else "settled")
        console.print(f"market {verdict}: paid {sum(market['payouts'].values())} of escrow "
                      f"{market['escrow']}, Scientist refund {market['scientist_refund']}; "
                      f"plot: {out / 'market.png'}")


def payout_table(audit: Any, report: dict[str, Any] | None = None) -> Any:
    """The payout table of an audit (partition ids and attackers when a report is at hand)."""
    from rich.table import Table

    who: dict[str, dict[str, Any]] = {}
    for sub in (report or {}).get("subscribers", []):
        if sub.get("key_id"):
            who[sub["key_id"]] = sub
    keys = sorted(set(audit.reward_payouts) | set(audit.fee_payouts) | set(who))
    table = Table(title="Payouts (minor units)")
    for column in ("subscriber key", "partition", "attacker", "reward", "fees", "total"):
        table.add_column(column, justify="right" if column in ("reward", "fees", "total")
                         else "left")
    for key in keys:
        sub = who.get(key, {})
        table.add_row(key[:16], str(sub.get("partition_id", "?")),
                      "yes" if sub.get("attacker") else "", str(audit.reward_payouts.get(key, 0)),
                      str(audit.fee_payouts.get(key, 0)), str(audit.payouts.get(key, 0)))
    table.add_row("Scientist refund", "", "", "", "", str(audit.scientist_refund))
    table.add_row("escrow", "", "", "", "", str(audit.escrow))
    return table


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A run folder holding ledger.db and blobs.")],
) -> None:
    """Independently re-check a task from its ledger, blobs and revealed validation set:
    commitments, the replayed model, every published score and the settlement. Writes
    RUN_DIR/audit.json; exit 0 only when everything matches."""
    from server.market_audit import audit_run, write_audit

    if not (run_dir / "ledger.db").is_file():
        console.print(f"[red]expected {run_dir / 'ledger.db'}, found none[/red]")
        raise typer.Exit(2)
    result = audit_run(run_dir)
    path = write_audit(run_dir, result)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if result.scientist_refund is not None:
        console.print(payout_table(result, report))
    console.print(f"reveal: {result.reveal}")
    for finding in result.findings:
        console.print(f"[yellow]finding:[/yellow] {finding}")
    if result.forfeited:
        console.print(f"[red]the Scientist forfeits reward and deposit ({result.reason})[/red]")
    if result.ok:
        console.print(f"[green]audit ok[/green]: {result.ledger_size} entries; "
                      f"wrote {path}")
        return
    console.print(f"[red]audit failed[/red]: {result.mismatches[0]}")
    for extra in result.mismatches[1:5]:
        console.print(f"  also: {extra}")
    console.print(f"wrote {path}")
    raise typer.Exit(1)


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


buyer_app = typer.Typer(help="Buyer accounts on a run's ledger.", no_args_is_help=True)
app.add_typer(buyer_app, name="buyer")


@buyer_app.command("fund")
def buyer_fund(
    run_dir: Annotated[Path, typer.Argument(help="The run folder (ledger.db, operator.pem).")],
    key: Annotated[Path, typer.Option(help="The buyer's key file (created if missing).")],
    amount: Annotated[int, typer.Option(help="Minor units received from the buyer.")],
) -> None:
    """Record a buyer's payment (received outside the system) as a credit on the ledger."""
    from server.inference import fund_account

    try:
        buyer, index = fund_account(run_dir, key, amount)
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"funded buyer {buyer} with {amount} (ledger index {index}); key: {key}")


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A settled PoI run folder.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="HE worker processes (one per core).")] = 2,
) -> None:
    """Serve encrypted predictions of the run's final model (OpenAPI docs at /docs)."""
    import uvicorn

    from server.inference import ServiceError, create_app

    try:
        api = create_app(run_dir, workers=workers)
    except (ServiceError, OSError) as exc:
        console.print(f"[red]cannot serve {run_dir}:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"serving {run_dir} on http://{host}:{port} (docs: /docs)")
    uvicorn.run(api, host=host, port=port, log_level="warning")


@app.command()
def buy(
    url: Annotated[str, typer.Option(help="The service, e.g. http://127.0.0.1:8000")],
    input: Annotated[Path, typer.Option(help=".npz with x (n, 64) or .csv with 64 columns")],
    key: Annotated[Path, typer.Option(help="The buyer's key file (see poi buyer fund).")],
    layout: Annotated[str, typer.Option(help="auto, single or batch")] = "auto",
    log_key: Annotated[str | None, typer.Option(help="Pin the ledger's log key.")] = None,
) -> None:
    """Encrypt the rows of INPUT, buy their predictions, decrypt, print one JSON per row."""
    from client.buyer import Buyer, BuyerError
    from client.task import DataError, load_features
    from ledger.keys import Signer

    try:
        x = load_features(input)
        signer = Signer.load(key)
    except (DataError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        logits = Buyer(url, signer, layout=layout, log_key=log_key).predict(x)
    except BuyerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for row, values in enumerate(logits):
        typer.echo(json.dumps({"row": row, "class": int(values.argmax()),
                               "logits": [round(float(v), 6) for v in values]}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
