"""``poi serve`` and ``poi buy``: the encrypted-inference service and its buyer client
(wiring only; the work is in ``server.inference`` and ``client.buyer``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from server.cli.common import console

app = typer.Typer()


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A settled PoI run folder.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="HE worker processes (one per core).")] = 2,
    body_idle_seconds: Annotated[float, typer.Option(
        help="Longest pause between two chunks of a request body (then 408).")] = 15.0,
    header_seconds: Annotated[float, typer.Option(
        help="Longest time for a request's headers from their first byte (then closed).")
    ] = 10.0,
) -> None:
    """Serve encrypted predictions of the run's final model (OpenAPI docs at /docs)."""
    import uvicorn

    from server.inference.connections import server_config
    from server.inference.service import ServiceError, create_app

    try:
        api = create_app(run_dir, workers=workers, body_idle_seconds=body_idle_seconds)
    except (ServiceError, OSError) as exc:
        console.print(f"[red]cannot serve {run_dir}:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"serving {run_dir} on http://{host}:{port} (docs: /docs)")
    # h11 with 32 KiB of headers (431 above) that must arrive in time, keep-alive
    # connections closed after 5 s idle (server.inference.connections). Bodies are
    # bounded and timed by the service itself.
    uvicorn.Server(server_config(api, host=host, port=port, header_seconds=header_seconds,
                                 timeout_graceful_shutdown=10)).run()


@app.command()
def buy(
    url: Annotated[str, typer.Option(help="The service, e.g. http://127.0.0.1:8000")],
    input: Annotated[Path, typer.Option(
        help=".npz with x (n, features) or .csv with a column a feature (the model's "
             "features: 64 for digits)")],
    key: Annotated[Path, typer.Option(help="The buyer's key file (see poi buyer fund).")],
    layout: Annotated[str, typer.Option(help="auto, single or batch")] = "auto",
    log_key: Annotated[str | None, typer.Option(help="Pin the ledger's log key.")] = None,
) -> None:
    """Encrypt the rows of INPUT, buy their predictions, decrypt, print one JSON per row."""
    from client.buyer import Buyer, BuyerError
    from client.schema import Schema
    from client.task import DataError, load_features
    from ledger.keys import Signer

    try:
        signer = Signer.load(key)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        buyer = Buyer(url, signer, layout=layout, log_key=log_key)
        shape = buyer.shape()  # the served model's schema: the input is checked against it
        try:
            x = load_features(input, schema=Schema(shape.features, shape.classes))
        except (DataError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        logits = buyer.predict(x)
    except (BuyerError, ValueError) as exc:  # ValueError: a layout the model lacks
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for row, values in enumerate(logits):
        typer.echo(json.dumps({"row": row, "class": int(values.argmax()),
                               "logits": [round(float(v), 6) for v in values]}))
