"""The ``poi`` command line: one entry point, a module of subcommands per concern
(wiring only, typer + rich; the work lives elsewhere).

- ``server.cli.simulate``: ``poi simulate``, ``poi compare``
- ``server.cli.market``: ``poi audit``, ``poi buyer fund``
- ``server.cli.inference``: ``poi serve``, ``poi buy``
- ``server.cli.ledger``: ``poi ledger verify|show|prove|size``
- ``server.cli.deploy``: ``poi deploy keys|up|add-node|run|down``
"""

from __future__ import annotations

import typer

from server.cli import inference, market, simulate
from server.cli.common import load_config, parse_run_config
from server.cli.deploy import deploy_app
from server.cli.ledger import ledger_app

__all__ = ["app", "load_config", "main", "parse_run_config"]

app = typer.Typer(help="Proof-of-Intelligence: a federated learning market on Flower.",
                  no_args_is_help=True, add_completion=False)
for _module in (simulate, market, inference):
    for _command in _module.app.registered_commands:
        app.registered_commands.append(_command)
    for _group in _module.app.registered_groups:
        app.registered_groups.append(_group)
app.add_typer(ledger_app, name="ledger", help="Inspect and verify a run's ledger.")
app.add_typer(deploy_app, name="deploy", help="Run on Flower's deployment engine "
              "(SuperLink, SuperNodes, TLS, node authentication).")


def main() -> None:
    app()

