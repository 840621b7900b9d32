"""What every ``poi`` subcommand shares: the console and the ``--run-config`` parser
(``"k=v k=v"`` into a validated :class:`~client.config.RunConfig`)."""

from __future__ import annotations

import shlex
import tomllib
from typing import Any

import typer
from rich.console import Console

from client.config import ConfigError, RunConfig

console = Console()


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
