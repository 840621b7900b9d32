"""``poi deploy``: keys, up, add-node, run, down (wiring only; the work is in
``server.deploy``).

Mounted in the main CLI as ``app.add_typer(deploy_app, name="deploy")``. Exit codes: 0
done, 1 the run did not finish ``completed``, 2 refused (missing file, port in use, bad
option, no deployment).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from server import deploy as D

__all__ = ["deploy_app"]

deploy_app = typer.Typer(
    help="Run the task on Flower's deployment engine: a SuperLink with TLS and SuperNode "
         "authentication, and SuperNodes (see docs/deployment.md).",
    no_args_is_help=True,
)
console = Console(soft_wrap=True)  # paths stay on one line, copyable
APP_DIR = Path(__file__).resolve().parents[2]  # the Flower app: the repository root

WorkOption = Annotated[Path, typer.Option("--workdir", help="The deployment's folder "
                                          "(state, logs, data files, runs).")]


def _refuse(exc: Exception) -> typer.Exit:
    console.print(f"[red]poi deploy:[/red] {exc}", highlight=False)
    return typer.Exit(2)


@deploy_app.command()
def keys(
    directory: Annotated[Path, typer.Argument(help="Where to write certificates and keys.")],
    nodes: Annotated[int, typer.Option(help="SuperNode key sets to create.")] = 3,
    san: Annotated[list[str] | None, typer.Option(
        help="A host name or IP the SuperLink is reached at (repeat; default 127.0.0.1 "
             "and localhost).")] = None,
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
) -> None:
    """Create the CA, the SuperLink certificate and the node keys.

    Per node: a SuperNode authentication key pair (P-384, OpenSSH) and a ledger key
    (Ed25519). Private keys are written 0600; existing files are kept."""
    try:
        result = D.create_keys(directory, nodes=nodes, sans=san or list(D.DEFAULT_SANS),
                               valid_days=days)
    except (D.DeployError, OSError) as exc:
        raise _refuse(exc) from None
    layout = D.KeyLayout(directory)
    console.print(f"created {len(result.created)} files, kept {len(result.kept)} in {directory}")
    sans = ", ".join(D.certificate_sans(layout.superlink_cert))
    console.print(f"SuperLink certificate for {sans}; CA: {layout.ca_cert}", highlight=False)


@deploy_app.command()
def up(
    workdir: WorkOption,
    keys: Annotated[Path, typer.Option(help="The folder poi deploy keys wrote.")],
    nodes: Annotated[int, typer.Option(help="SuperNodes to start.")] = 3,
    host: Annotated[str, typer.Option(help="Interface the SuperLink listens on.")] =
        "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink port (0: a free one).")] = 0,
    isolation: Annotated[str, typer.Option(
        help="process: we start each node's SuperExec (--superexec); subprocess: each "
             "SuperNode starts Flower's own.")] = "process",
    exec_poll: Annotated[float | None, typer.Option(
        help="SuperExec task polling interval in seconds "
             "(FLWR_SUPEREXEC_TASK_POLL_INTERVAL; Flower's default: 1).")] =
        D.DEFAULT_EXEC_POLL_SECONDS,
    node_poll: Annotated[float, typer.Option(
        help="Each SuperNode's first wait after an empty pull, growing by half to Flower's 3 s "
             "(python -m server.deploy.supernode); 0: Flower's flower-supernode as it is "
             "(a flat 3 s).")] = D.DEFAULT_NODE_POLL_SECONDS,
    partitioner: Annotated[str, typer.Option(help="iid or dirichlet (node data files).")] =
        "dirichlet",
    dirichlet_alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Partition seed.")] = 0,
    dataset: Annotated[str, typer.Option(
        help="digits or mnist1d: the pool the node data files come from (the task's "
             "run config names the same dataset).")] = "digits",
    dataset_size: Annotated[int, typer.Option(
        help="mnist1d: examples generated (0: 5,000).")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 120.0,
    superexec: Annotated[str, typer.Option(
        help="With --isolation process: the command serving as each node's SuperExec "
             "(default: ours, python -m server.deploy.superexec, which forks a warm "
             "interpreter per ClientApp; 'flower-superexec' for Flower's).")] = "",
) -> None:
    """Start the SuperLink and the SuperNodes; return once all are online.

    Each SuperNode has its own FLWR_HOME, data file and ledger key."""
    options = D.UpOptions(work=workdir, keys=keys, nodes=nodes, host=host, port=port,
                          partitioner=partitioner, dirichlet_alpha=dirichlet_alpha, seed=seed,
                          dataset=dataset, dataset_size=dataset_size,
                          isolation=isolation, exec_poll_seconds=exec_poll, timeout=timeout,
                          node_poll_seconds=node_poll,
                          superexec=tuple(str(Path(t).resolve()) if Path(t).is_file() else t
                                          for t in shlex.split(superexec)))
    try:
        state = D.up(options, echo=lambda line: console.print(line, highlight=False))
    except (D.DeployError, OSError) as exc:
        raise _refuse(exc) from None
    console.print(f"[green]up[/green]: SuperLink {state.address} (connection "
                  f"{D.CONNECTION!r} in {state.flwr_home}/config.toml), {len(state.nodes)} "
                  f"SuperNodes online; next: poi deploy run --workdir {state.work}",
                  highlight=False)


@deploy_app.command("add-node")
def add_node(
    workdir: WorkOption,
    data: Annotated[list[Path], typer.Option(help="A node's data file (.npz or .csv); "
                                             "repeat for several nodes.")],
    ledger_key: Annotated[list[Path], typer.Option(help="Its Ed25519 ledger key (PEM), "
                                                   "one per --data.")],
    name: Annotated[list[str] | None, typer.Option(
        help="Node names, one per --data (default node-<i>).")] = None,
) -> None:
    """Register and start more SuperNodes, each with a data file and ledger key.

    The next run's num-subscribers counts them."""
    names: list[str | None] = list(name) if name else [None] * len(data)
    try:
        if not len(data) == len(ledger_key) == len(names):
            raise D.DeployError(f"expected as many --ledger-key (and --name) as --data, got "
                                f"{len(data)} --data, {len(ledger_key)} --ledger-key, "
                                f"{len(name or [])} --name")
        records = D.add_nodes(workdir, [D.NewNode(d, k, n)
                                        for d, k, n in zip(data, ledger_key, names, strict=True)])
    except (D.DeployError, OSError) as exc:
        raise _refuse(exc) from None
    for record in records:
        console.print(f"SuperNode {record.name} ({record.node_id}) online", highlight=False)


@deploy_app.command()
def run(
    workdir: WorkOption,
    run_config: Annotated[str, typer.Option(help='Task knobs, "k=v k=v" (see README).')] = "",
    app: Annotated[Path, typer.Option(help="The Flower app to submit.")] = APP_DIR,
    out: Annotated[Path | None, typer.Option(
        help="Run folder (default WORK/run, then WORK/run-2, ...).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run.")] = 3600.0,
) -> None:
    """Submit the app and follow the run to its end; exit 0 only when completed.

    Submits with flwr run APP poi-deploy, follows flwr ls --run-id until the run is
    finished, and says where the ledger and report are."""
    from server.cli.common import parse_run_config

    try:
        state = D.load_state(workdir.expanduser().resolve())
        if not state.superlink or not D.running_records(state):
            raise D.DeployError(f"the deployment in {state.work} is not running "
                                "(poi deploy up)")
        out_dir = (out or D.next_out_dir(Path(state.work))).expanduser().resolve()
        mapping = parse_run_config(run_config)
        run_id = D.submit(state, app_dir=app.resolve(), run_config=mapping, out_dir=out_dir)
    except (D.DeployError, OSError, ValueError) as exc:
        raise _refuse(exc) from None
    console.print(f"submitted run {run_id}; writing to {out_dir}", highlight=False)
    report_path = out_dir / "report.json"
    shown: dict[str, Any] = {"rounds": 0, "status": ""}

    def on_poll(status: str) -> None:
        if status != shown["status"]:
            console.print(f"run {run_id}: {status}", highlight=False)
            shown["status"] = status
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            return
        done = len(report.get("rounds", []))
        if done > shown["rounds"]:
            last = report["rounds"][-1]
            console.print(f"round {done}/{report['config']['num-server-rounds']}: "
                          f"accuracy {last['accuracy']:.3f}, "
                          f"{last['round_seconds']:.1f} s", highlight=False)
            shown["rounds"] = done

    try:
        status = D.follow(state, run_id, timeout=timeout, on_poll=on_poll,
                          probe=lambda: report_path.stat().st_mtime_ns
                          if report_path.exists() else None)
    except D.DeployError as exc:
        console.print(f"[red]run {run_id}:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if status != "finished:completed" or not report_path.is_file():
        console.print(f"[red]run {run_id} {status}[/red]; its log ends:", highlight=False)
        console.print(D.run_log(state, run_id), highlight=False, markup=False)
        raise typer.Exit(1)
    report = json.loads(report_path.read_text())
    console.print(f"[green]run {run_id} {status}[/green]: final accuracy "
                  f"{report['final_accuracy']:.4f}; report {report_path}", highlight=False)
    if "ledger" in report:
        console.print(f"ledger {report['ledger']['path']} ({report['ledger']['size']} "
                      f"entries); check it with: poi ledger verify {out_dir} && poi audit "
                      f"{out_dir}", highlight=False)


@deploy_app.command()
def down(
    workdir: WorkOption,
    timeout: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] =
        10.0,
) -> None:
    """Stop every process the deployment started, by process group."""
    try:
        stopped = D.down(workdir, timeout=timeout)
    except (D.DeployError, OSError) as exc:
        raise _refuse(exc) from None
    console.print(f"stopped {len(stopped)} process groups"
                  + (f" ({', '.join(stopped)})" if stopped else ""), highlight=False)
