"""Flower's command-line side of :mod:`server.deploy`: finding the Flower executables, the
environment every started process gets (its own ``FLWR_HOME``, no telemetry, no runtime
installs), running ``flwr`` and reading its JSON answer, the ``config.toml`` connection to
the SuperLink, and the TOML and ``--node-config`` strings handed to Flower.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.deploy.errors import DeployError, MissingFile

CONNECTION = "poi-deploy"  # the connection name in WORK/flwr-home/config.toml
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL: the one polling interval Flower 1.41 lets us set.
EXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
_TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")


# ------------------------------------------------------------------- config strings
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: object) -> str:
    """A TOML literal for a run- or node-config value (bool, int, float, str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = []
        for char in value:
            if char in '"\\':
                escaped.append("\\" + char)
            elif ord(char) < 0x20 or ord(char) == 0x7F:
                escaped.append(f"\\u{ord(char):04x}")
            else:
                escaped.append(char)
        return '"' + "".join(escaped) + '"'
    raise DeployError(f"config value: expected a bool, number or string, got {value!r}")


def config_toml(mapping: Mapping[str, object]) -> str:
    """``key = value`` lines that ``flwr run --run-config FILE.toml`` reads."""
    lines = []
    for key, value in mapping.items():
        if not _KEY.match(key):
            raise DeployError(f"config key: expected letters, digits, - or _, got {key!r}")
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def node_config_string(mapping: Mapping[str, object]) -> str:
    """Flower's ``--node-config "k=v k=v"``; strings become single-quoted TOML literals
    (Flower's parser splits on spaces outside quotes and allows no escapes)."""
    parts = []
    for key, value in mapping.items():
        if not _KEY.match(key):
            raise DeployError(f"node config key: expected letters, digits, - or _, got {key!r}")
        if isinstance(value, str):
            if "'" in value or "\n" in value:
                raise DeployError(f"node config {key}: a quote or newline in {value!r} cannot "
                                  "pass through --node-config; rename the file")
            parts.append(f"{key}='{value}'")
        else:
            parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


# ------------------------------------------------------------------ environment, flwr
def tool(name: str) -> str:
    """A Flower executable: next to this interpreter first (the virtual environment),
    then on PATH. Raises :class:`MissingFile` when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise MissingFile(f"cannot find the {name} executable (is flwr installed?)")
    return found


def child_env(flwr_home: Path, *, exec_poll_seconds: float | None = None,
              extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process we start: its own FLWR_HOME, the virtual
    environment's bin first on PATH (Flower starts flower-superexec, flwr-serverapp and
    flwr-clientapp by name), no runtime dependency installation, no update check, no
    telemetry; then ``extra``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.pop(EXEC_POLL_ENV, None)
    if exec_poll_seconds is not None:
        env[EXEC_POLL_ENV] = repr(float(exec_poll_seconds))
    env.update(extra or {})
    return env


def run_flwr(args: Sequence[str], *, flwr_home: Path, timeout: float = 120.0,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI with ``flwr_home``'s connections."""
    try:
        return subprocess.run([tool("flwr"), *args], capture_output=True, text=True,
                              env=child_env(flwr_home), cwd=cwd, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"flwr {' '.join(args[:2])} did not answer within {timeout:.0f} s"
                          ) from exc


def last_json(text: str) -> dict[str, Any]:
    """The last JSON object printed on stdout (flwr may print other lines first)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    with contextlib.suppress(ValueError):
        start = text.index("{")
        value = json.loads(text[start:])
        if isinstance(value, dict):
            return value
    raise DeployError(f"expected JSON from flwr, got: {text.strip()[-500:]!r}")


def flwr_json(args: Sequence[str], *, flwr_home: Path, timeout: float = 120.0,
              cwd: Path | None = None) -> dict[str, Any]:
    done = run_flwr([*args, "--format", "json"], flwr_home=flwr_home, timeout=timeout, cwd=cwd)
    try:
        payload = last_json(done.stdout)
    except DeployError:
        raise DeployError(f"flwr {' '.join(args[:2])} failed (exit {done.returncode}): "
                          f"{(done.stdout + done.stderr).strip()[-800:]}") from None
    if not payload.get("success", False):
        raise DeployError(f"flwr {' '.join(args[:2])} failed: "
                          f"{payload.get('error-message', payload)}")
    return payload


def write_connection(flwr_home: Path, *, address: str, ca_cert: Path) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default: where
    ``flwr run``, ``flwr ls`` and ``flwr supernode`` read addresses and the root CA."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {toml_value(address)}\n"
        f"root-certificates = {toml_value(str(ca_cert.resolve()))}\n"
    )
    return path
