"""``poi audit`` and ``poi buyer fund``: replaying a task's market from its ledger, and
crediting a buyer's account (wiring only; the work is in ``server.market`` and
``server.inference``)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from ledger.remote import is_url
from server.cli.common import console
from server.cli.ledger import read_notes

app = typer.Typer()


def payout_table(audit: Any, report: dict[str, Any] | None = None) -> Any:
    """The payout table of an audit (partition ids and attackers when a report is at hand)."""
    from rich.table import Table

    who: dict[str, dict[str, Any]] = {}
    for sub in (report or {}).get("subscribers", []):
        if sub.get("key_id"):
            who[sub["key_id"]] = sub
    # Each author's credit summed over the rounds (micro loss units, after the rule's
    # gates), the closed-form Taylor estimate beside it, and the rounds it was applied in.
    credit: dict[str, float] = {}
    taylor: dict[str, float] = {}
    applied: dict[str, int] = {}
    for rnd in audit.rounds:
        for author, value in rnd.get("credit_micro", {}).items():
            credit[author] = credit.get(author, 0.0) + value
            applied[author] = applied.get(author, 0) + 1
        for author, value in rnd.get("taylor_micro", {}).items():
            taylor[author] = taylor.get(author, 0.0) + value
    keys = sorted(set(audit.reward_payouts) | set(audit.fee_payouts) | set(who) | set(credit))
    table = Table(title="Payouts (minor units) and credit (validation-loss decrease, micro)")
    numeric = ("rounds", "credit", "Taylor, ungated", "reward", "fees", "total")
    for column in ("subscriber key", "partition", "attacker", *numeric):
        table.add_column(column, justify="right" if column in numeric else "left")
    for key in keys:
        sub = who.get(key, {})
        table.add_row(key[:16], str(sub.get("partition_id", "?")),
                      "yes" if sub.get("attacker") else "", str(applied.get(key, 0)),
                      f"{credit[key]:,.0f}" if key in credit else "",
                      f"{taylor[key]:,.0f}" if key in taylor else "",
                      str(audit.reward_payouts.get(key, 0)),
                      str(audit.fee_payouts.get(key, 0)), str(audit.payouts.get(key, 0)))
    table.add_row("Scientist refund", "", "", "", "", "", "", "", str(audit.scientist_refund))
    table.add_row("escrow", "", "", "", "", "", "", "", str(audit.escrow))
    return table


@app.command()
def audit(
    source: Annotated[str, typer.Argument(
        help="A run folder holding ledger.db and blobs, or the URL serving its ledger "
             "(poi ledger serve, or poi serve's /ledger/).")],
    mirror: Annotated[Path | None, typer.Option(
        help="For a URL: mirror the ledger and blobs into this folder and write audit.json "
             "there (default: a temporary folder, audit.json in the current one).")] = None,
    log_key: Annotated[str | None, typer.Option(
        help="Pin the operator's note verifier key.")] = None,
    notes: Annotated[list[Path] | None, typer.Option(
        help="Checkpoint notes subscribers cosigned (a file, or a folder of *.note; "
             "repeatable): the leaves must reproduce every one.")] = None,
) -> None:
    """Independently re-check a task from its ledger, blobs and revealed validation set:
    commitments, the replayed model, every published score and the settlement. Writes
    audit.json (in RUN_DIR for a folder); exit 0 only when everything matches."""
    from server.market.audit import audit_run, write_audit

    held = read_notes(notes or [])
    with contextlib.ExitStack() as stack:
        if is_url(source):
            folder = mirror or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            trusted, verified = _mirror_market(source, folder, log_key=log_key, notes=held)
            result = audit_run(folder, log_key=log_key, trusted_checkpoints=trusted,
                               verified=verified)
            path = write_audit(mirror or Path.cwd(), result)
            report = None
        else:
            run_dir = Path(source)
            if not (run_dir / "ledger.db").is_file():
                console.print(f"[red]expected {run_dir / 'ledger.db'}, found none[/red]")
                raise typer.Exit(2)
            result = audit_run(run_dir, log_key=log_key, trusted_checkpoints=held)
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


def _mirror_market(url: str, folder: Path, *, log_key: str | None,
                   notes: list[str]) -> tuple[list[str], Any]:
    """Mirror the ledger served at ``url`` into ``folder`` and, once it verifies, the
    blobs its verified entries name; returns the checkpoints the audit must hold the
    leaves to (the served one and ``notes``) and the mirror's ``verify_log`` report (the
    audit reuses it). Exit 2 when the server cannot be reached; what it serves wrongly
    is the audit's to report."""
    from ledger import LedgerError, LogReader, verify_log
    from ledger.remote import RemoteError, fetch_blobs, mirror_log
    from server.market.audit import named_blobs

    try:
        fetched = mirror_log(url, folder)
        trusted = [fetched.checkpoint, *notes]
        report = verify_log(fetched.path, log_key=log_key, trusted_checkpoints=trusted)
        digests: list[str] = []
        missing: list[str] = []
        if report.ok:  # blobs only for entries that verified: nothing else is fetched
            with LogReader.open(fetched.path) as reader:
                # as stored: a bulk blob is fetched before anything reads through it
                digests = named_blobs(list(reader.entries(end=report.size, bulk=False)))
            missing = fetch_blobs(url, folder, digests)
    except RemoteError as exc:
        console.print(f"[red]{'cannot reach' if exc.unreachable else 'bad ledger at'} "
                      f"{url}:[/red] {exc}")
        raise typer.Exit(2 if exc.unreachable else 1) from None
    except LedgerError as exc:
        console.print(f"[red]cannot audit {url}:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"mirrored {fetched.size} entries and {len(digests) - len(missing)} blobs "
                  f"from {url} in {fetched.seconds:.1f} s"
                  + (f" ({len(missing)} blobs the server does not have)" if missing else ""))
    if log_key is None:
        console.print(f"[yellow]log key not pinned[/yellow]: trusting the key the server "
                      f"sent, {fetched.log_key} (pin it with --log-key)")
    return trusted, report


buyer_app = typer.Typer(help="Buyer accounts on a run's ledger.", no_args_is_help=True)
app.add_typer(buyer_app, name="buyer")


@buyer_app.command("fund")
def buyer_fund(
    run_dir: Annotated[Path, typer.Argument(help="The run folder (ledger.db, operator.pem).")],
    key: Annotated[Path, typer.Option(help="The buyer's key file (created if missing).")],
    amount: Annotated[int, typer.Option(help="Minor units received from the buyer.")],
) -> None:
    """Record a buyer's payment (received outside the system) as a credit on the ledger."""
    from server.inference.service import fund_account

    try:
        buyer, index = fund_account(run_dir, key, amount)
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"funded buyer {buyer} with {amount} (ledger index {index}); key: {key}")
