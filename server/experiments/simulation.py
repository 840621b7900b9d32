"""Run one configuration through Flower's Simulation Runtime, in this process.

This is the code path ``flwr run .`` takes inside its simulation process
(``flwr.simulation.run_simulation._run_simulation`` with the app directory, the run's
override config and ``is_app=True``), minus the detached SuperLink: the apps are loaded
from this project's ``pyproject.toml`` and get the fused run config, and the ClientApps
run in Ray actors. Pinned to flwr 1.41 (the function is private API).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from client.config import RunConfig

PROJECT_DIR = Path(__file__).resolve().parents[2]
CPUS = 2


def backend_config(num_cpus: int = CPUS) -> dict[str, Any]:
    """One Ray actor using every core: on 2 cores that beat two 1-CPU actors
    (FLOWER_NOTES.md), and torch runs one thread per actor."""
    return {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
    }


def preflight(config: RunConfig) -> None:
    """What a simulation refuses before it starts anything (ValueError, naming why): a
    schema that is not the dataset's, and a federation the partitioner cannot split."""
    if not config.uses_dataset_schema:
        raise ValueError(
            f"num-features / num-classes: a simulation partitions {config.dataset} "
            f"({config.schema.features} features and {config.schema.classes} classes "
            "asked): expected the dataset's schema; a task of its own schema runs on "
            "subscribers' files (poi deploy, node config data-path)")
    from client.task import check_partitions

    check_partitions(config.num_subscribers, config.partitioner, config.dirichlet_alpha,
                     config.seed, config.dataset, config.dataset_size)


def run_simulation(config: RunConfig, out_dir: Path, *, quiet: bool = True) -> None:
    """Simulate ``config`` with ``num-subscribers`` SuperNodes; the ServerApp writes
    ``out_dir/report.json``."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import NOOP_FEDERATION_ID, _run_simulation
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    if not (PROJECT_DIR / "pyproject.toml").is_file():
        raise FileNotFoundError(f"expected the Flower app's pyproject.toml in {PROJECT_DIR}")
    preflight(config)
    out_dir = out_dir.resolve()
    override = {**config.to_mapping(), "out-dir": str(out_dir)}
    fused = RunConfig.from_mapping(override).to_mapping()
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run = Run.create_empty(run_id=_run_id(out_dir))
    run.override_config = dict(fused)  # type: ignore[arg-type]
    run.primary_task_id = run.run_id
    run.federation_id = NOOP_FEDERATION_ID
    # What `run_simulation` does for a run it creates itself: the ServerApp thread builds
    # Messages, which read the task identity.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(fused))  # type: ignore[arg-type]
    from flwr.supercore.telemetry import EventType

    _run_simulation(
        num_supernodes=config.num_subscribers,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr="server.server_app:app",
        client_app_attr="client.client_app:app",
        backend_name="ray",
        backend_config=backend_config(),  # type: ignore[arg-type]
        app_dir=str(PROJECT_DIR),
        run=run,
        server_app_context=context,
        is_app=True,
    )
    if not (out_dir / "report.json").is_file():
        raise RuntimeError(f"the simulation ended without writing {out_dir / 'report.json'}")


def _run_id(out_dir: Path) -> int:
    import hashlib
    import time

    material = f"{out_dir}|{time.time_ns()}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") >> 1
