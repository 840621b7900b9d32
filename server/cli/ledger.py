"""``poi ledger``: verify, show, prove and size a ledger file (wiring only; logic is in ``ledger``).

Mounted in the main CLI as ``app.add_typer(ledger_app, name="ledger")``. PATH is a
ledger database file or a run folder holding ``ledger.db``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated, Any

import rich.console
import rich.table
import typer

from ledger import LedgerError, LogReader, StoreError, hash_leaf, verify_log

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
        list[Path] | None,
        typer.Option(help="a checkpoint note held elsewhere, or a folder of *.note, to match"),
    ] = None,
    excuse_witness: Annotated[
        list[str] | None,
        typer.Option(help="a subscriber key id you accept as not having witnessed the end "
                          "(it went away); repeatable; the output names those that missed"),
    ] = None,
) -> None:
    """Audit signatures, encodings, roots, checkpoints and sequences; exit 1 on a failure."""
    report = _verified(path, log_key=log_key, trusted_checkpoints=_notes(checkpoint or []),
                       excused_witnesses=excuse_witness or ())
    reader = LogReader.open(path)
    try:
        root = reader.root(report.size).hex()
    finally:
        reader.close()
    _stdout.print(
        f"[green]OK[/green] {report.path}: {report.size} entries, "
        f"{report.checkpoints} checkpoints, {report.authors} authors, root {root}"
    )
    for key in report.excused:
        _stdout.print(f"[yellow]excused[/yellow] {key} did not witness the end (you named it)")


def _verified(path: Path, **options: Any) -> Any:
    """``verify_log(path, **options)``; exit 2 when the file cannot be read, 1 on a
    failure (both printed)."""
    try:
        report = verify_log(path, **options)
    except LedgerError as error:
        _stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    if report.failure is not None:
        _stderr.print(f"[red]FAILED[/red] {report.path}: {report.failure}")
        raise typer.Exit(1)
    return report


def _notes(paths: list[Path]) -> list[str]:
    """Note texts from files, or from every ``*.note`` under a directory."""
    found: list[str] = []
    for path in paths:
        files = sorted(path.rglob("*.note")) if path.is_dir() else [path]
        found.extend(file.read_text() for file in files)
    return found


@ledger_app.command("witness-check")
def witness_check(
    path: PathArgument,
    notes: Annotated[
        list[Path], typer.Option(help="a folder of notes subscribers cosigned (repeatable)")
    ],
) -> None:
    """Hold the log to the checkpoints subscribers cosigned and kept; exit 1 on a failure.

    Every note must verify with the log key and be reproduced by the leaves (same
    size, same root), and the log must verify in full (witnessed to the end)."""
    texts = _notes(notes)
    if not texts:
        _stderr.print(f"[red]error:[/red] no *.note files under {', '.join(map(str, notes))}")
        raise typer.Exit(2)
    report = _verified(path, trusted_checkpoints=texts)
    _stdout.print(
        f"[green]OK[/green] {report.path}: {report.size} entries agree with "
        f"{len(texts)} cosigned notes"
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
    index: Annotated[int | None, typer.Option(help="0-based entry index (inclusion proof)")] = None,
    from_size: Annotated[
        int | None, typer.Option("--from", help="older tree size (consistency proof)")
    ] = None,
    size: Annotated[int | None, typer.Option(help="tree size (default: latest)")] = None,
) -> None:
    """Print an RFC 9162 inclusion proof of one entry (``--index``) or a consistency
    proof from an older tree (``--from``), with the signed checkpoints, as JSON."""
    if (index is None) == (from_size is None):
        _stderr.print("[red]error:[/red] expected exactly one of --index and --from")
        raise typer.Exit(2)
    with _open(path) as reader, reader.snapshot():
        try:
            tree_size = reader.size if size is None else size
            note = reader.checkpoint_at(tree_size)
            root = reader.root(tree_size)
            if index is not None:
                leaf = reader.entry(index)
                document = {
                    "index": index,
                    "tree_size": tree_size,
                    "leaf": _b64(leaf),
                    "leaf_hash": _b64(hash_leaf(leaf)),
                    "proof": [_b64(node) for node in reader.inclusion_proof(index, tree_size)],
                }
            else:
                assert from_size is not None
                if not 0 < from_size <= tree_size:
                    raise StoreError(f"expected 0 < --from <= {tree_size}, got {from_size}")
                document = {
                    "old_size": from_size,
                    "tree_size": tree_size,
                    "old_root": _b64(reader.root(from_size)),
                    "old_checkpoint": reader.checkpoint_at(from_size),
                    "proof": [
                        _b64(node) for node in reader.consistency_proof(from_size, tree_size)
                    ],
                }
        except LedgerError as error:
            _stderr.print(f"[red]error:[/red] {error}")
            raise typer.Exit(1) from error
        document.update({"root": _b64(root), "checkpoint": note, "log_key": reader.log_key})
    typer.echo(json.dumps(document, indent=2))


@ledger_app.command()
def size(path: PathArgument) -> None:
    """Print the number of entries."""
    with _open(path) as reader:
        typer.echo(str(reader.size))
