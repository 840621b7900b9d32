"""A deployment's life in :mod:`server.deploy`: ``up`` (SuperLink with TLS and node
authentication, node keys registered, SuperNodes with their data started and awaited
online, everything stopped again on failure), ``add_nodes`` to a running deployment,
``submit`` a run and ``follow`` it to its recorded status, and ``down`` by process group.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.deploy.errors import DeployError, MissingFile
from server.deploy.flower import (
    _TOOLS,
    CONNECTION,
    child_env,
    config_toml,
    flwr_json,
    last_json,
    node_config_string,
    run_flwr,
    tool,
    write_connection,
)
from server.deploy.keys import KeyLayout, check_keys, create_node_auth_key, node_name
from server.deploy.processes import (
    _alive,
    _spawn,
    descendant_groups,
    ensure_port_free,
    free_port,
    list_processes,
    live_members,
    log_tail,
    stop_groups,
)
from server.deploy.state import (
    STATE_FILE,
    DeployState,
    NodeRecord,
    ProcessRecord,
    RunRecord,
    _is_ours,
    load_state,
    running_records,
)

ISOLATIONS = ("subprocess", "process")
# The SuperExec `up` runs for each node in process isolation unless told otherwise: ours,
# which forks a warm interpreter per ClientApp (server.deploy.superexec).
# One thread per ClientApp: every node of a `poi deploy` shares this machine's cores.
WARM_SUPEREXEC = (sys.executable, "-m", "server.deploy.superexec", "--threads", "1")
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL for every SuperExec `up` starts (Flower's default: 1 s).
DEFAULT_EXEC_POLL_SECONDS = 0.1
# The SuperNode's first idle wait after an empty pull (server.deploy.supernode; grows by half
# to Flower's 3 s). None or 0: Flower's flower-supernode as it is (a flat 3 s).
DEFAULT_NODE_POLL_SECONDS = 0.1


# -------------------------------------------------------------------------------- up
@dataclass(frozen=True)
class UpOptions:
    """``poi deploy up``: where, how many nodes, which keys, and the isolation mode."""

    work: Path
    keys: Path
    nodes: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    dataset: str = "digits"  # client.schema.DATASETS; the task's run config must match
    dataset_size: int = 0
    isolation: str = "process"
    exec_poll_seconds: float | None = DEFAULT_EXEC_POLL_SECONDS  # None: Flower's (1 s)
    node_poll_seconds: float | None = DEFAULT_NODE_POLL_SECONDS  # None/0: Flower's (3 s)
    timeout: float = 120.0
    # process isolation: the command that serves as each node's SuperExec (it gets
    # --runtime-api-address, --insecure and --parent-pid); default WARM_SUPEREXEC
    superexec: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)


def write_node_data(out_dir: Path, *, nodes: int, partitioner: str, dirichlet_alpha: float,
                    seed: int, dataset: str = "digits", size: int = 0) -> list[Path]:
    """One ``.npz`` (x (n, features) float32, y (n,) int64) per node: the same pool
    partitions a simulation of ``nodes`` subscribers with this config uses."""
    import numpy as np

    from client.task import load_partition

    paths = []
    for index in range(nodes):
        data = load_partition(index, nodes, partitioner=partitioner,
                              dirichlet_alpha=dirichlet_alpha, seed=seed, dataset=dataset,
                              size=size)
        path = out_dir / node_name(index) / "data.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=data.x.astype(np.float32), y=data.y.astype(np.int64))
        paths.append(path)
    return paths


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _wait_for_health(state: DeployState, proc: subprocess.Popen[bytes], log: Path,
                     ca_cert: Path, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(ca_cert))
    url = f"https://{state.address}/health"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited with code {proc.returncode} before "
                              f"it was ready; its log ({log}) ends:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise DeployError(f"the SuperLink did not answer {url} within {timeout:.0f} s; "
                              f"its log ({log}) ends:\n{log_tail(log)}")
        time.sleep(0.2)


def _register(state: DeployState, public_keys: Sequence[tuple[str, Path]]) -> dict[str, str]:
    """``flwr supernode register`` for each (name, public key) at once; node ids by name."""
    home = Path(state.flwr_home)
    procs = {
        name: subprocess.Popen(
            [tool("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", name,
             "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(home))
        for name, pub in public_keys
    }
    ids = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
                other.wait()
            raise DeployError(f"flwr supernode register did not answer for {name} within "
                              "120 s") from None
        try:
            payload = last_json(out)
        except DeployError:
            payload = {}
        if not payload.get("success") or "node-id" not in payload:
            raise DeployError(f"flwr supernode register failed for {name} "
                              f"(exit {proc.returncode}): {(out + err).strip()[-800:]}")
        ids[name] = str(payload["node-id"])
    return ids


def online_nodes(state: DeployState) -> set[str]:
    payload = flwr_json(["supernode", "ls", CONNECTION], flwr_home=Path(state.flwr_home))
    return {str(n["node-id"]) for n in payload.get("nodes", []) if n.get("status") == "online"}


def _start_node(state: DeployState, *, name: str, node_id: str, auth_key: Path,
                data_path: Path, ledger_key: Path, partition_id: int) -> NodeRecord:
    work = Path(state.work)
    node_dir = work / "nodes" / name
    flwr_home = node_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    runtime_port = free_port()
    config = node_config_string({"data-path": str(data_path), "ledger-key": str(ledger_key),
                                 "partition-id": partition_id})
    launcher = [tool("flower-supernode")]
    if state.node_poll_seconds:
        launcher = [sys.executable, "-m", "server.deploy.supernode", "--idle-poll",
                    repr(float(state.node_poll_seconds)), "--"]
    cmd = [*launcher, "--superlink", state.address,
           "--root-certificates", str(KeyLayout(Path(state.keys)).ca_cert),
           "--auth-supernode-private-key", str(auth_key),
           "--port", str(runtime_port), "--isolation", state.isolation,
           "--node-config", config]
    env = child_env(flwr_home, exec_poll_seconds=state.exec_poll_seconds,
                    extra=state.extra_env)
    log = node_dir / "supernode.log"
    proc = _spawn(cmd, env=env, log_path=log, cwd=node_dir)
    record = NodeRecord(
        name=name, node_id=node_id,
        process=ProcessRecord(name, proc.pid, proc.pid, marker=str(work), log=str(log)),
        runtime_port=runtime_port, flwr_home=str(flwr_home), data_path=str(data_path),
        ledger_key=str(ledger_key), auth_key=str(auth_key), partition_id=partition_id)
    state.nodes.append(record)
    state.save()
    if state.isolation == "process":
        # Flower's process isolation: we run the SuperExec that launches ClientApps.
        # (It cannot join the SuperNode's group: that is another session.)
        superexec = state.superexec or list(WARM_SUPEREXEC)
        address = f"127.0.0.1:{runtime_port}"
        exec_proc = _spawn([*superexec, "--runtime-api-address", address, "--insecure",
                            "--parent-pid", str(proc.pid)],
                           env=env, log_path=node_dir / "superexec.log", cwd=node_dir)
        state.extra.append(ProcessRecord(f"{name}-superexec", exec_proc.pid, exec_proc.pid,
                                         marker=address, log=str(node_dir / "superexec.log")))
        state.save()
    return record


def _wait_online(state: DeployState, records: Sequence[NodeRecord], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = {r.node_id for r in records}
    while True:
        for record in records:
            if not _alive(record.process.pid):
                raise DeployError(
                    f"SuperNode {record.name} exited before it came online; its log "
                    f"({record.process.log}) ends:\n{log_tail(Path(record.process.log))}")
        if wanted <= online_nodes(state):
            return
        if time.monotonic() > deadline:
            raise DeployError(f"SuperNodes not online within {timeout:.0f} s: "
                              f"{sorted(wanted - online_nodes(state))}")
        time.sleep(0.5)


def up(options: UpOptions, *, echo: Callable[[str], None] = print) -> DeployState:
    """Start a SuperLink (TLS, ``--enable-supernode-auth``), register the node keys,
    start ``options.nodes`` SuperNodes, and return once all are online.

    Refuses (:class:`MissingFile`, :class:`PortInUse`, :class:`DeployError`) before
    starting anything when a certificate or key is missing, the port is taken or
    ``work`` already runs a deployment. On any later failure it stops what it started.
    """
    if options.nodes < 1:
        raise DeployError(f"--nodes: expected at least 1, got {options.nodes}")
    if options.isolation not in ISOLATIONS:
        raise DeployError(f"--isolation: expected one of {ISOLATIONS}, got {options.isolation!r}")
    if options.partitioner not in ("iid", "dirichlet"):
        raise DeployError(f"--partitioner: expected iid or dirichlet, got {options.partitioner!r}")
    from client.schema import DATASETS, dataset_size, split_sizes

    if options.dataset not in DATASETS:
        raise DeployError(f"--dataset: expected one of {sorted(DATASETS)}, got "
                          f"{options.dataset!r}")
    try:
        size = dataset_size(options.dataset, options.dataset_size)
    except ValueError as exc:
        raise DeployError(f"--{exc}") from None
    pool = split_sizes(size)[2]
    if pool < 2 * options.nodes:
        raise DeployError(f"--nodes: {options.dataset} ({size:,} examples) leaves {pool:,} "
                          f"for node data files, at least 2 each: expected at most "
                          f"{pool // 2} nodes, got {options.nodes}")
    if options.node_poll_seconds is not None and not 0 <= options.node_poll_seconds <= 3:
        raise DeployError(f"--node-poll: expected 0 (Flower's 3 s) to 3 seconds, got "
                          f"{options.node_poll_seconds:g}")
    if options.superexec and options.isolation != "process":
        raise DeployError("--superexec: only with --isolation process (in subprocess "
                          "isolation each SuperNode starts flower-superexec itself)")
    work = options.work.expanduser().resolve()
    keys = KeyLayout(options.keys.expanduser().resolve())
    check_keys(keys, options.nodes)
    for tool_name in _TOOLS:
        tool(tool_name)
    if (work / STATE_FILE).is_file():
        previous = load_state(work)
        alive = running_records(previous)
        if alive:
            names = ", ".join(r.name for r in alive)
            raise DeployError(f"{work} already runs a deployment ({names}): "
                              f"run poi deploy down --workdir {work} first")
    if options.port:
        ensure_port_free(options.host, options.port, role="the SuperLink's port")
    port = options.port or free_port(options.host)
    work.mkdir(parents=True, exist_ok=True)
    state = DeployState(
        work=str(work), keys=str(keys.root), host=options.host, port=port,
        connect_host=_connect_host(options.host), flwr_home=str(work / "flwr-home"),
        isolation=options.isolation, exec_poll_seconds=options.exec_poll_seconds,
        node_poll_seconds=options.node_poll_seconds or None,
        superexec=list(options.superexec), extra_env=dict(options.extra_env),
        dataset=options.dataset, dataset_size=options.dataset_size)
    state.save()
    try:
        _up(state, options, keys, echo)
    except BaseException:
        echo("stopping what was started")
        _stop(state)
        raise
    return state


def _up(state: DeployState, options: UpOptions, keys: KeyLayout,
        echo: Callable[[str], None]) -> None:
    work = Path(state.work)
    from client.task import DataError, check_partitions

    try:
        check_partitions(options.nodes, options.partitioner, options.dirichlet_alpha,
                         options.seed, options.dataset, options.dataset_size)
    except DataError as exc:
        raise DeployError(str(exc).replace("num-subscribers", "--nodes", 1)) from None
    echo(f"writing {options.nodes} data files ({options.partitioner} partitions of the "
         f"{options.dataset} pool)")
    data_paths = write_node_data(work / "nodes", nodes=options.nodes,
                                 partitioner=options.partitioner,
                                 dirichlet_alpha=options.dirichlet_alpha, seed=options.seed,
                                 dataset=options.dataset, size=options.dataset_size)
    write_connection(Path(state.flwr_home), address=state.address, ca_cert=keys.ca_cert)

    link_dir = work / "superlink"
    link_dir.mkdir(parents=True, exist_ok=True)
    # A fresh deployment starts from a fresh SuperLink state: a previous one's database
    # would still hold its node registrations (and registering a key twice fails).
    for stale in link_dir.glob("state.db*"):
        stale.unlink()
    cmd = [tool("flower-superlink"), "--host", options.host, "--port", str(state.port),
           "--database", str(link_dir / "state.db"),
           "--ssl-ca-certfile", str(keys.ca_cert), "--ssl-certfile", str(keys.superlink_cert),
           "--ssl-keyfile", str(keys.superlink_key), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation"]
    log = link_dir / "superlink.log"
    echo(f"starting the SuperLink on {options.host}:{state.port} (TLS, node authentication)")
    proc = _spawn(cmd, env=child_env(link_dir / "flwr-home",
                                     exec_poll_seconds=options.exec_poll_seconds,
                                     extra=options.extra_env),
                  log_path=log, cwd=link_dir)
    state.superlink = ProcessRecord("superlink", proc.pid, proc.pid, marker=str(work),
                                    log=str(log))
    state.save()
    _wait_for_health(state, proc, log, keys.ca_cert, options.timeout)
    # The SuperLink starts its SuperExec in a session of its own: record that group too.
    for pgid in sorted(descendant_groups(list_processes(), [proc.pid]) - {proc.pid}):
        state.extra.append(ProcessRecord("superlink-superexec", pgid, pgid,
                                         marker=f":{state.port}"))
    state.save()

    names = [node_name(i) for i in range(options.nodes)]
    echo(f"registering {options.nodes} SuperNode keys")
    ids = _register(state, [(n, keys.auth_pub(i)) for i, n in enumerate(names)])
    records = [
        _start_node(state, name=name, node_id=ids[name], auth_key=keys.auth_key(i),
                    data_path=data_paths[i], ledger_key=keys.ledger_key(i), partition_id=i)
        for i, name in enumerate(names)
    ]
    echo(f"waiting for {options.nodes} SuperNodes to come online")
    _wait_online(state, records, options.timeout)


@dataclass(frozen=True)
class NewNode:
    """A subscriber to add: its data file and ledger key, passed to the node as they are
    (a missing or malformed one is the node's to report, with an error reply)."""

    data_path: Path
    ledger_key: Path
    name: str | None = None


def add_nodes(work: Path, nodes: Sequence[NewNode], *, timeout: float = 120.0
              ) -> list[NodeRecord]:
    """Register and start more SuperNodes in a running deployment, each with its own
    authentication key (created under ``WORK/nodes/NAME``); returns once all are online.
    Partition ids (report labels) continue after the existing nodes'."""
    state = load_state(work.expanduser().resolve())
    if not state.superlink or not _is_ours(state.superlink, list_processes()):
        raise DeployError(f"no SuperLink running in {state.work}: run poi deploy up first")
    taken = {n.name for n in state.nodes}
    first = len(state.nodes)
    names = [node.name or node_name(first + i) for i, node in enumerate(nodes)]
    clash = sorted(taken & set(names)) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DeployError(f"node name{'s' if len(clash) > 1 else ''} already used: "
                          f"{', '.join(clash)}")
    public_keys = []
    for name in names:
        node_dir = Path(state.work) / "nodes" / name
        if not (node_dir / "auth.key").exists():
            create_node_auth_key(node_dir / "auth.key", node_dir / "auth.pub")
        public_keys.append((name, node_dir / "auth.pub"))
    ids = _register(state, public_keys)
    records = []
    try:
        for index, (name, node) in enumerate(zip(names, nodes, strict=True)):
            node_dir = Path(state.work) / "nodes" / name
            records.append(_start_node(
                state, name=name, node_id=ids[name], auth_key=node_dir / "auth.key",
                data_path=node.data_path.expanduser().resolve(),
                ledger_key=node.ledger_key.expanduser().resolve(), partition_id=first + index))
        _wait_online(state, records, timeout)
    except BaseException:
        stop_groups([r.process.pgid for r in records])
        raise
    return records


# ------------------------------------------------------------------------------- run
def next_out_dir(work: Path) -> Path:
    """``WORK/run``, then ``WORK/run-2``, ...: the first that holds no run yet."""
    for index in range(1, 10_000):
        candidate = work / ("run" if index == 1 else f"run-{index}")
        if not candidate.exists() or not any(candidate.iterdir()):
            return candidate
    raise DeployError(f"{work}: no free run folder")


def submit(state: DeployState, *, app_dir: Path, run_config: Mapping[str, object],
           out_dir: Path) -> int:
    """``flwr run APP poi-deploy --run-config FILE``; returns the run id.

    ``num-subscribers`` is set to the number of nodes and ``out-dir`` to ``out_dir``
    (absolute); raises :class:`DeployError` when ``run_config`` says otherwise.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise MissingFile(f"expected a Flower app (pyproject.toml) in {app_dir}")
    config = dict(run_config)
    nodes = len(state.nodes)
    if int(config.get("num-subscribers", nodes)) != nodes:  # type: ignore[call-overload]
        raise DeployError(f"num-subscribers: this deployment has {nodes} nodes, the run "
                          f"config says {config['num-subscribers']}")
    config["num-subscribers"] = nodes
    config["out-dir"] = str(out_dir.resolve())
    from client.config import ConfigError, RunConfig

    try:
        parsed = RunConfig.from_mapping(config)
    except ConfigError as exc:
        raise DeployError(f"run config: {exc}") from None
    # The nodes hold partitions of the pool `up` was given; a run on another dataset (or
    # another MNIST-1D size, whose examples differ) would train on data its Scientist's
    # validation set overlaps or does not fit.
    if parsed.uses_dataset_schema and (parsed.dataset, parsed.dataset_size) != (
            state.dataset, state.dataset_size):
        raise DeployError(f"dataset: the nodes' data files come from {state.dataset} "
                          f"(dataset-size {state.dataset_size}), the run config says "
                          f"{parsed.dataset} (dataset-size {parsed.dataset_size}): expected "
                          "the same (poi deploy up --dataset/--dataset-size)")
    work = Path(state.work)
    config_path = work / "run-config.toml"
    config_path.write_text(config_toml(config))
    payload = flwr_json(["run", str(app_dir), CONNECTION, "--run-config", str(config_path)],
                        flwr_home=Path(state.flwr_home), cwd=app_dir, timeout=300)
    run_id = int(payload["run-id"])
    state.runs.append(RunRecord(run_id=run_id, out_dir=str(out_dir.resolve())))
    state.save()
    return run_id


def run_status(state: DeployState, run_id: int) -> str:
    """The run's status as ``flwr ls --run-id ID`` reports it (e.g. ``running``,
    ``finished:completed``)."""
    payload = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)],
                        flwr_home=Path(state.flwr_home))
    runs = payload.get("runs", [])
    if not runs:
        raise DeployError(f"flwr ls knows no run {run_id}")
    return str(runs[0]["status"])


def follow(state: DeployState, run_id: int, *, timeout: float = 3600.0,
           poll_seconds: float = 10.0, on_poll: Callable[[str], None] | None = None,
           probe: Callable[[], object] | None = None) -> str:
    """Ask ``flwr ls --run-id`` until the run is ``finished:*`` and return that status
    (never trust ``flwr run``'s exit code). Raises :class:`DeployError` on timeout or
    when the SuperLink dies.

    Each ``flwr ls`` costs about a CPU-second (a fresh interpreter importing flwr), which
    a 2-core machine takes from the run itself; so it is asked at most every
    ``poll_seconds``, and sooner (1 s, then backing off) after ``probe`` (a cheap check,
    e.g. the report's mtime) changes value, and at the start.
    """
    deadline = time.monotonic() + timeout
    failures = 0
    status = "unknown"
    interval = 1.0
    last_probe = probe() if probe else None
    while True:
        try:
            status = run_status(state, run_id)
            failures = 0
        except DeployError:
            failures += 1
            if failures >= 5:
                raise
        if on_poll is not None:
            on_poll(status)
        if status.startswith("finished:"):
            for record in state.runs:
                if record.run_id == run_id:
                    record.status = status
            state.save()
            return status
        if state.superlink and not _alive(state.superlink.pid):
            raise DeployError(f"the SuperLink exited while run {run_id} was {status}; its "
                              f"log ends:\n{log_tail(Path(state.superlink.log))}")
        next_check = time.monotonic() + interval
        interval = min(interval * 2, poll_seconds)
        while time.monotonic() < next_check:
            if time.monotonic() > deadline:
                raise DeployError(f"run {run_id} still {status} after {timeout:.0f} s")
            time.sleep(0.25)
            if probe is not None and (value := probe()) != last_probe:
                last_probe = value
                interval = 1.0
                break


def run_log(state: DeployState, run_id: int, lines: int = 30) -> str:
    done = run_flwr(["log", str(run_id), CONNECTION, "--show"],
                    flwr_home=Path(state.flwr_home), timeout=60)
    return "\n".join((done.stdout + done.stderr).splitlines()[-lines:])


# ------------------------------------------------------------------------------ down
def down(work: Path, *, timeout: float = 10.0) -> list[str]:
    """Stop every process group the deployment in ``work`` started (SuperNodes first,
    then the SuperLink with its SuperExec and ServerApp), SIGTERM then SIGKILL after
    ``timeout`` s. Returns the names of what was running. Raises :class:`DeployError`
    when there is no deployment or something survives SIGKILL."""
    state = load_state(work.expanduser().resolve())
    stopped = _stop(state, timeout=timeout)
    state.stopped = True
    state.save()
    return stopped


def _stop(state: DeployState, *, timeout: float = 10.0) -> list[str]:
    procs = list_processes()
    running = [r for r in state.records() if _is_ours(r, procs)]
    node_records = [n.process for n in state.nodes if n.process in running]
    link_records = [r for r in running if r not in node_records]
    node_groups = {r.pgid for r in node_records}
    node_groups |= descendant_groups(procs, [r.pid for r in node_records])
    link_groups = {r.pgid for r in link_records}
    link_groups |= descendant_groups(procs, [r.pid for r in link_records])
    stop_groups(node_groups, timeout=timeout)
    stop_groups(link_groups - node_groups, timeout=timeout)
    left = live_members(list_processes(), node_groups | link_groups)
    if left:
        raise DeployError("still running after SIGKILL: "
                          + ", ".join(f"{p.pid} ({p.args[:60]})" for p in left))
    return [r.name for r in running]
