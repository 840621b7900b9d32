"""``poi ledger``: verify, show, prove, size, serve and mirror a ledger (wiring only;
logic is in ``ledger``).

Mounted in the main CLI as ``app.add_typer(ledger_app, name="ledger")``. PATH is a
ledger database file or a run folder holding ``ledger.db``; ``verify`` and
``witness-check`` also take the URL of a log served as tiles (``serve``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import rich.console
import rich.progress
import rich.table
import typer

from ledger import LedgerError, LogReader, StoreError, hash_leaf, verify_log
from ledger.remote import RemoteError, is_url, mirror_log, verify_remote

__all__ = ["ledger_app"]

ledger_app = typer.Typer(
    help="Inspect and verify a transparency-log ledger (RFC 9162, C2SP checkpoints).",
    no_args_is_help=True,
)
_stdout = rich.console.Console()
_stderr = rich.console.Console(stderr=True)

PathArgument = Annotated[Path, typer.Argument(help="ledger.db, or a run folder containing it")]
SourceArgument = Annotated[
    str, typer.Argument(help="ledger.db, a run folder containing it, or the URL serving it")
]
MirrorOption = Annotated[
    Path | None,
    typer.Option(help="for a URL: keep the mirrored ledger in this folder (default: a "
                      "temporary one)"),
]


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
    path: SourceArgument,
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
    mirror: MirrorOption = None,
) -> None:
    """Audit signatures, encodings, roots, checkpoints and sequences; exit 1 on a failure.

    PATH may be a URL serving the log as C2SP tiles (``poi ledger serve``): the tiles
    are mirrored to a local file and that file audited in full."""
    report = _verified(path, mirror, log_key=log_key,
                       trusted_checkpoints=read_notes(checkpoint or []),
                       excused_witnesses=excuse_witness or ())
    _stdout.print(
        f"[green]OK[/green] {path}: {report.size} entries, "
        f"{report.checkpoints} checkpoints, {report.authors} authors, root {report.root}"
    )
    for key in report.excused:
        _stdout.print(f"[yellow]excused[/yellow] {key} did not witness the end (you named it)")


@dataclass(frozen=True)
class _Verified:
    size: int
    checkpoints: int
    authors: int
    root: str
    excused: tuple[str, ...]


def _verified(source: str, mirror: Path | None, **options: Any) -> _Verified:
    """``verify_log`` on a file or run folder, or on a mirror of a URL (kept in
    ``mirror`` when given); exit 2 when the source cannot be read, 1 on a failure (both
    printed)."""
    with contextlib.ExitStack() as stack:
        try:
            if is_url(source):
                folder = mirror or Path(stack.enter_context(tempfile.TemporaryDirectory()))
                with _progress(f"mirroring {source}") as progress:
                    report, fetched = verify_remote(source, folder, progress=progress, **options)
                _stderr.print(
                    f"fetched {fetched.requests} resources, {fetched.bytes / 1e6:.1f} MB, in "
                    f"{fetched.seconds:.1f} s"
                )
                if options.get("log_key") is None:
                    _stderr.print(f"[yellow]log key not pinned[/yellow]: trusting the key the "
                                  f"server sent, {fetched.log_key} (pin it with --log-key)")
            else:
                report = verify_log(Path(source), **options)
        except RemoteError as error:
            _stderr.print(f"[red]{'error' if error.unreachable else 'FAILED'}:[/red] {error}")
            raise typer.Exit(2 if error.unreachable else 1) from error
        except LedgerError as error:
            _stderr.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2) from error
        if report.failure is not None:
            _stderr.print(f"[red]FAILED[/red] {source}: {report.failure}")
            raise typer.Exit(1)
        with LogReader.open(report.path) as reader:
            root = reader.root(report.size).hex()
    return _Verified(report.size, report.checkpoints, report.authors, root, report.excused)


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, fed ``(done, total)``."""
    with rich.progress.Progress(
        rich.progress.TextColumn("{task.description}"), rich.progress.BarColumn(),
        rich.progress.MofNCompleteColumn(), rich.progress.TimeRemainingColumn(),
        console=_stderr, transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def read_notes(paths: list[Path]) -> list[str]:
    """Note texts from files, or from every ``*.note`` under a directory."""
    found: list[str] = []
    for path in paths:
        files = sorted(path.rglob("*.note")) if path.is_dir() else [path]
        found.extend(file.read_text() for file in files)
    return found


@ledger_app.command("witness-check")
def witness_check(
    path: SourceArgument,
    notes: Annotated[
        list[Path], typer.Option(help="a folder of notes subscribers cosigned (repeatable)")
    ],
    mirror: MirrorOption = None,
) -> None:
    """Hold the log to the checkpoints subscribers cosigned and kept; exit 1 on a failure.

    Every note must verify with the log key and be reproduced by the leaves (same
    size, same root), and the log must verify in full (witnessed to the end). PATH may
    be a URL (as for ``verify``)."""
    texts = read_notes(notes)
    if not texts:
        _stderr.print(f"[red]error:[/red] no *.note files under {', '.join(map(str, notes))}")
        raise typer.Exit(2)
    report = _verified(path, mirror, trusted_checkpoints=texts)
    _stdout.print(
        f"[green]OK[/green] {path}: {report.size} entries agree with "
        f"{len(texts)} cosigned notes"
    )


@ledger_app.command()
def serve(
    path: PathArgument,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8470,
) -> None:
    """Serve the ledger read-only over HTTP as C2SP tlog-tiles (checkpoint, tiles, entry
    bundles), with its checkpoint history and blobs, for ``verify URL`` and ``poi audit
    URL``."""
    import uvicorn

    from ledger.http import ledger_http_app

    try:
        app = ledger_http_app(path)
    except LedgerError as error:
        _stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    _stderr.print(f"serving {path} as tiles on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@ledger_app.command()
def mirror(
    url: Annotated[str, typer.Argument(help="where the log is served, e.g. http://host:8470/")],
    into: Annotated[Path, typer.Argument(help="folder for the mirrored ledger.db")],
) -> None:
    """Copy a served log into a local ledger file (not verified: run ``verify`` on it)."""
    try:
        with _progress(f"mirroring {url}") as progress:
            fetched = mirror_log(url, into, progress=progress)
    except RemoteError as error:
        _stderr.print(f"[red]{'error' if error.unreachable else 'FAILED'}:[/red] {error}")
        raise typer.Exit(2 if error.unreachable else 1) from error
    _stdout.print(f"mirrored {fetched.size} entries to {fetched.path} "
                  f"({fetched.requests} resources, {fetched.seconds:.1f} s)")


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
