"""What a deployment started, as :mod:`server.deploy` records it in ``WORK/deploy.json``:
the process, node and run records, :class:`DeployState` with its atomic save and strict
load, and which recorded process groups are still ours and running (a recycled group id
is recognised by its command line's marker and never counted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.deploy.errors import DeployError
from server.deploy.processes import ProcessInfo, list_processes

STATE_FILE = "deploy.json"
STATE_VERSION = 1


@dataclass
class ProcessRecord:
    """A process group ``up`` started; ``marker`` is a string its command line holds,
    checked before signalling so a recycled group id is never killed."""

    name: str
    pid: int
    pgid: int
    marker: str
    log: str = ""


@dataclass
class NodeRecord:
    name: str
    node_id: str
    process: ProcessRecord
    runtime_port: int
    flwr_home: str
    data_path: str
    ledger_key: str
    auth_key: str
    partition_id: int


@dataclass
class RunRecord:
    run_id: int
    out_dir: str
    status: str = "submitted"


@dataclass
class DeployState:
    """What ``up`` started, saved as ``WORK/deploy.json``."""

    work: str
    keys: str
    host: str
    port: int
    connect_host: str
    flwr_home: str
    isolation: str
    exec_poll_seconds: float | None
    node_poll_seconds: float | None = None  # None: Flower's flower-supernode as it is
    superexec: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    # the pool the nodes' data files came from: a run must name the same
    dataset: str = "digits"
    dataset_size: int = 0
    superlink: ProcessRecord | None = None
    nodes: list[NodeRecord] = field(default_factory=list)
    extra: list[ProcessRecord] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    stopped: bool = False
    version: int = STATE_VERSION

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    @property
    def path(self) -> Path:
        return Path(self.work) / STATE_FILE

    def records(self) -> list[ProcessRecord]:
        heads = [self.superlink] if self.superlink else []
        return [*heads, *self.extra, *(n.process for n in self.nodes)]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeployState:
        data = dict(data)
        if data.get("version") != STATE_VERSION:
            raise DeployError(f"deploy.json: expected version {STATE_VERSION}, "
                              f"got {data.get('version')!r}")
        link = data.pop("superlink")
        nodes = data.pop("nodes")
        extra = data.pop("extra")
        runs = data.pop("runs")
        return cls(
            **data,
            superlink=ProcessRecord(**link) if link else None,
            nodes=[NodeRecord(**{**n, "process": ProcessRecord(**n["process"])}) for n in nodes],
            extra=[ProcessRecord(**e) for e in extra],
            runs=[RunRecord(**r) for r in runs],
        )


def load_state(work: Path) -> DeployState:
    """The deployment recorded in ``work``; raises :class:`DeployError` when there is
    none or it cannot be read."""
    path = work / STATE_FILE
    if not path.is_file():
        raise DeployError(f"no deployment in {work} (expected {path}; run poi deploy up)")
    try:
        return DeployState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise DeployError(f"{path}: cannot read it ({exc})") from exc


def _is_ours(record: ProcessRecord, procs: Sequence[ProcessInfo]) -> bool:
    return any(p.pgid == record.pgid and not p.zombie and record.marker in p.args
               for p in procs)


def running_records(state: DeployState) -> list[ProcessRecord]:
    procs = list_processes()
    return [r for r in state.records() if _is_ours(r, procs)]
