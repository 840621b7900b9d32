"""Processes and ports for :mod:`server.deploy`: a free port or a refusal naming the one
taken, the machine's process list (``ps``), process groups and their descendants, a
SIGTERM-then-SIGKILL stop by group, starting a command in its own session with its output
in a log file, and the tail of such a log for error messages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.deploy.errors import PortInUse


# ----------------------------------------------------------------------------- ports
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int, *, role: str) -> None:
    """Raise :class:`PortInUse` when ``host:port`` cannot be bound (``role`` says who
    wanted it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                f"port {port} on {host} is already in use ({role}): stop what holds it, "
                f"or choose another port ({exc.strerror})") from None


# ------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    zombie: bool
    args: str


def list_processes() -> list[ProcessInfo]:
    """Every process on the machine (``ps``; Linux and macOS)."""
    out = subprocess.run(["ps", "-A", "-ww", "-o", "pid=,ppid=,pgid=,stat=,args="],
                         capture_output=True, text=True, check=True).stdout
    procs = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) < 4:
            continue
        procs.append(ProcessInfo(int(parts[0]), int(parts[1]), int(parts[2]),
                                 parts[3].startswith("Z"), parts[4] if len(parts) > 4 else ""))
    return procs


def live_members(procs: Iterable[ProcessInfo], pgids: Iterable[int]) -> list[ProcessInfo]:
    """Processes, zombies excepted, whose group is one of ``pgids``."""
    groups = set(pgids)
    return [p for p in procs if p.pgid in groups and not p.zombie]


def descendant_groups(procs: Sequence[ProcessInfo], roots: Iterable[int]) -> set[int]:
    """The process groups of every live descendant of ``roots`` (a SuperLink starts its
    SuperExec in a new session, so killing the SuperLink's group alone misses it)."""
    children: dict[int, list[ProcessInfo]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    groups: set[int] = set()
    stack = list(roots)
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            if child.pid in seen or child.zombie:
                continue
            seen.add(child.pid)
            groups.add(child.pgid)
            stack.append(child.pid)
    return groups


def stop_groups(pgids: Iterable[int], *, timeout: float = 10.0) -> list[int]:
    """SIGTERM each process group, wait up to ``timeout`` s, SIGKILL what is left.
    Returns the groups that needed SIGKILL."""
    groups = sorted(set(pgids))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not live_members(list_processes(), groups):
            return []
        time.sleep(0.1)
    stubborn = sorted({p.pgid for p in live_members(list_processes(), groups)})
    for pgid in stubborn:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while live_members(list_processes(), stubborn) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stubborn


def _spawn(cmd: Sequence[str], *, env: Mapping[str, str], log_path: Path,
           cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (so its own process group); stdout and stderr go
    to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                start_new_session=True)


def _alive(pid: int) -> bool:
    for proc in list_processes():
        if proc.pid == pid:
            return not proc.zombie
    return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
