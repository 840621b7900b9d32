"""``poi ledger``: verify, show, prove and size a ledger file (wiring only; logic is in ``ledger``).

Mounted in the main CLI as ``app.add_typer(ledger_app, name="ledger")``. PATH is a
ledger database file or a run folder holding ``ledger.db``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated

import rich.console
import rich.table
import typer

from ledger import LedgerError, LogReader, hash_leaf, verify_log

__all__ = ["ledger_app"]

ledger_app = typer.Typer(
    help="Inspect and verify a transparency-log ledger (RFC 9162, C2SP checkpoints).",
    no_args_is_help=True,
)
_stdout = rich.console.Console()
_stderr = rich.console.Console(stderr=True)

PathArgument = Annotated[Path, typer.Argument(help="ledger.db, or a run folder containing it")]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _open(path: Path) -> LogReader:
    try:
        return LogReader.open(path)
    except LedgerError as error:
        _stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error


@ledger_app.command()
def verify(
    path: PathArgument,
    log_key: Annotated[
        str | None, typer.Option(help="pin the operator's note verifier key")
    ] = None,
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="a checkpoint note held elsewhere that must match")
    ] = None,
) -> None:
    """Audit signatures, encodings, roots, checkpoints and sequences; exit 1 on a failure."""
    try:
        report = verify_log(
            path,
            log_key=log_key,
            trusted_checkpoints=[note.read_text() for note in checkpoint or []],
        )
    except LedgerError as error:
        _stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    if report.failure is not None:
        _stderr.print(f"[red]FAILED[/red] {report.path}: {report.failure}")
        raise typer.Exit(1)
    reader = LogReader.open(path)
    try:
        root = reader.root(report.size).hex()
    finally:
        reader.close()
    _stdout.print(
        f"[green]OK[/green] {report.path}: {report.size} entries, "
        f"{report.checkpoints} checkpoints, {report.authors} authors, root {root}"
    )


@ledger_app.command()
def show(
    path: PathArgument,
    kind: Annotated[str | None, typer.Option(help="only entries of this kind")] = None,
    author: Annotated[str | None, typer.Option(help="only entries by this key id")] = None,
) -> None:
    """List entries as a table (no verification: use ``verify`` for that)."""
    table = rich.table.Table(title=str(path))
    for column in ("index", "kind", "author", "seq", "fields"):
        table.add_column(column, overflow="fold")
    with _open(path) as reader:
        try:
            for index, entry in reader.entries(kind=kind, author=author):
                body = json.dumps(dict(entry.fields), sort_keys=True, separators=(",", ":"))
                table.add_row(str(index), entry.kind, entry.author, str(entry.seq), body)
        except LedgerError as error:
            _stderr.print(f"[red]error:[/red] {error}")
            raise typer.Exit(1) from error
    _stdout.print(table)


@ledger_app.command()
def prove(
    path: PathArgument,
    index: Annotated[int, typer.Option(help="0-based entry index")],
    size: Annotated[int | None, typer.Option(help="tree size (default: latest)")] = None,
) -> None:
    """Print an RFC 9162 inclusion proof of one entry, with the signed checkpoint, as JSON."""
    with _open(path) as reader:
        try:
            tree_size = reader.size if size is None else size
            leaf = reader.entry(index)
            proof = reader.inclusion_proof(index, tree_size)
            note = reader.checkpoint_at(tree_size)
            root = reader.root(tree_size)
        except LedgerError as error:
            _stderr.print(f"[red]error:[/red] {error}")
            raise typer.Exit(1) from error
        document = {
            "index": index,
            "tree_size": tree_size,
            "leaf": _b64(leaf),
            "leaf_hash": _b64(hash_leaf(leaf)),
            "proof": [_b64(node) for node in proof],
            "root": _b64(root),
            "checkpoint": note,
            "log_key": reader.log_key,
        }
    typer.echo(json.dumps(document, indent=2))


@ledger_app.command()
def size(path: PathArgument) -> None:
    """Print the number of entries."""
    with _open(path) as reader:
        typer.echo(str(reader.size))
