"""Benchmark: a deployed round against a simulated one, PoI against FedAvg, and how long a
ClientApp takes to start (issue #17's targets).

Part ``startup``: from "a ClientApp process is asked for" to the subscriber's first DP-SGD
step (train) or to its reply (vote), on one node's data file, median of ``--repeats``:

- ``fresh``: a new interpreter that imports what ``flwr-clientapp`` imports and the app,
  then runs the handler (what Flower 1.41 does for every message);
- ``fresh, opacus eager``: the same with ``import opacus`` first, as the ClientApp did
  before Opacus was imported only where used (a vote needs no accountant);
- ``warm fork``: a child forked from an interpreter that preloaded
  ``server.deploy.superexec.DEFAULT_PRELOAD`` (what ``poi deploy``'s SuperExec does).

Part ``rounds``: the same run config and partitions, for N in ``--nodes``:
simulation (``poi simulate``, Ray) and deployment (``poi deploy up`` on loopback: TLS,
node authentication), PoI and FedAvg on the same deployment; for the smallest N also a
deployment with Flower's own launcher (``--isolation subprocess``, Flower's 1 s SuperExec
poll). Steady state is the median of ``round_seconds`` over rounds 2..R (round 1 pays
for start-up).

    python -m benchmarks.deploy --out benchmarks/results/deploy [--nodes 3,6] [--rounds 4]
        [--part all|startup|rounds] [--repeats 5]

Writes OUT/deploy.json and OUT/deploy.md; the runs, deployments and keys go to OUT/runs
(git-ignored, so that ``flwr run`` does not package them into the app).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD_FLAG = "--child"
PHASES = ("train", "validate", "vote", "select", "evaluate", "ledger", "score", "aggregate")


class _Console:
    """rich's console, imported on first use: the measured child processes run this
    module too and must not pay for rich."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        from rich.console import Console

        Console(stderr=True).print(*args, **kwargs)


console = _Console()


# ------------------------------------------------------------------------ startup
def _handler_run(phase: str, data_path: str, started: float) -> dict[str, float]:
    """In the measured process: import the app as a ClientApp process would, run one
    handler, and report seconds since ``started`` (a wall-clock time.time())."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401 - what flwr-clientapp imports
    from flwr.supercore.task_identity import TaskIdentity

    imported_flwr = time.time() - started
    import torch

    from client import client_app
    imported_app = time.time() - started
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 1
    first: list[float] = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.time() - started)
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = step  # type: ignore[method-assign]
    message, context = _request(phase, data_path)
    handler = client_app.train if phase == "train" else client_app.vote
    reply = handler(message, context)
    if reply.has_error():
        raise SystemExit(f"{phase}: {reply.error.reason}")
    done = time.time() - started
    return {"flwr_imported": imported_flwr, "app_imported": imported_app,
            "first_step": first[0] if first else done, "reply": done}


def _request(phase: str, data_path: str):  # type: ignore[no-untyped-def]
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client import protocol as P
    from client.task import get_weights, make_model
    from server.round.strategy import numpy_to_arrays

    context = Context(run_id=4242, node_id=1000, state=RecordDict(),
                      node_config={"data-path": data_path, "partition-id": 0},
                      run_config={"num-subscribers": 3})
    weights = get_weights(make_model(hidden_units=32, activation="square", seed=0))
    if phase == "train":
        config = ConfigRecord({P.SERVER_ROUND: 1, P.NOISE_MULTIPLIER: 1.0,
                               P.TARGET_EPSILON: 0.0, P.MAX_GRAD_NORM: 1.0,
                               P.TARGET_DELTA: 1e-5, P.PLANNED_ROUNDS: 5,
                               P.UPDATE_KIND: "delta"})
        return Message(RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: config}),
                       dst_node_id=1000, message_type="train"), context
    rng = np.random.default_rng(0)
    deltas = [{k: (rng.normal(size=v.shape) * 0.01).astype(v.dtype)
               for k, v in weights.items()} for _ in range(2)]
    content = RecordDict({P.ARRAYS: numpy_to_arrays(weights), P.CONFIG: ConfigRecord({
        P.SERVER_ROUND: 1, P.VOTE_RULE: "single", P.CANDIDATE_IDS: ["a", "b"],
        P.CANDIDATE_AUTHORS: ["1", "2"], P.VOTE_STEP: 1.0})})
    for cid, delta in zip(("a", "b"), deltas, strict=True):
        content[P.CANDIDATE_PREFIX + cid] = numpy_to_arrays(delta)
    return Message(content, dst_node_id=1000, message_type=P.VOTE_MESSAGE_TYPE), context


def _child_main(argv: list[str]) -> None:
    mode, phase, data_path, started = argv[0], argv[1], argv[2], float(argv[3])
    if mode == "fresh-eager":
        import opacus  # noqa: F401
    print(json.dumps(_handler_run(phase, data_path, started)), flush=True)


def _fresh(phase: str, data_path: Path, *, eager: bool) -> dict[str, float]:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "benchmarks.deploy", CHILD_FLAG,
                          "fresh-eager" if eager else "fresh", phase, str(data_path),
                          repr(started)], cwd=ROOT, check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


_WARM_SERVER = r"""
import importlib, json, os, sys, time
from server.deploy.superexec import DEFAULT_PRELOAD, THREAD_ENV
for name in THREAD_ENV:
    os.environ.setdefault(name, "1")
for module in DEFAULT_PRELOAD.split(","):
    importlib.import_module(module)
sys.path.insert(0, ".")
from benchmarks import deploy as bench
for line in sys.stdin:
    phase, data_path = line.split()
    read, write = os.pipe()
    started = time.time()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        result = bench._handler_run(phase, data_path, started)
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        payload = fh.read()
    os.waitpid(pid, 0)
    print(payload, flush=True)
"""


def _warm(phases: list[str], data_path: Path) -> list[dict[str, float]]:
    proc = subprocess.run([sys.executable, "-c", _WARM_SERVER], cwd=ROOT, check=True,
                          input="".join(f"{p} {data_path}\n" for p in phases),
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return [json.loads(line) for line in proc.stdout.strip().splitlines()]


def part_startup(out: Path, repeats: int) -> dict[str, Any]:
    from server.deploy.lifecycle import write_node_data

    (data_path,) = write_node_data(out / "runs" / "startup-data", nodes=1, partitioner="iid",
                                   dirichlet_alpha=0.5, seed=0)
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for repeat in range(repeats):  # interleaved, so drift hits every mode alike
        console.print(f"startup: repeat {repeat + 1}/{repeats}")
        warm = _warm(["train", "vote"], data_path)
        for phase, result in zip(("train", "vote"), warm, strict=True):
            samples.setdefault("warm fork", {}).setdefault(phase, []).append(result)
        for phase in ("train", "vote"):
            samples.setdefault("fresh", {}).setdefault(phase, []).append(
                _fresh(phase, data_path, eager=False))
            samples.setdefault("fresh, opacus eager", {}).setdefault(phase, []).append(
                _fresh(phase, data_path, eager=True))
    medians = {mode: {phase: {key: statistics.median(s[key] for s in runs)
                              for key in runs[0]}
                      for phase, runs in phases.items()}
               for mode, phases in samples.items()}
    return {"repeats": repeats, "medians": medians, "samples": samples}


# ------------------------------------------------------------------------- rounds
def _summary(report: dict[str, Any]) -> dict[str, Any]:
    rounds = report["rounds"]
    steady = rounds[1:] or rounds
    return {
        "round_seconds": statistics.median(r["round_seconds"] for r in steady),
        "phases": {p: statistics.median(r["phase_seconds"].get(p, 0.0) for r in steady)
                   for p in PHASES},
        "round_1_seconds": rounds[0]["round_seconds"],
        "rounds": len(rounds),
        "final_accuracy": report["final_accuracy"],
    }


def _simulate(out: Path, run_config: str) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--out", str(out),
                    "--run-config", run_config], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    return {**_summary(report), "wall_seconds": time.perf_counter() - started}


def _deployed(out: Path, keys: Path, nodes: int, rounds: int, strategies: list[str],
              **options: Any) -> dict[str, dict[str, Any]]:
    from server import deploy as D

    shutil.rmtree(out, ignore_errors=True)
    state = D.up(D.UpOptions(work=out, keys=keys, nodes=nodes, **options),
                 echo=lambda line: console.print(f"  {line}", highlight=False))
    results = {}
    try:
        for strategy in strategies:
            config = {"num-server-rounds": rounds, "strategy": strategy}
            run_out = out / f"run-{strategy}"
            started = time.perf_counter()
            run_id = D.submit(state, app_dir=ROOT, run_config=config, out_dir=run_out)
            status = D.follow(state, run_id, timeout=1800, poll_seconds=5.0)
            if status != "finished:completed":
                raise SystemExit(f"{out.name} {strategy}: run {run_id} {status}")
            report = json.loads((run_out / "report.json").read_text())
            results[strategy] = {**_summary(report),
                                 "wall_seconds": time.perf_counter() - started}
            console.print(f"  {strategy}: {results[strategy]['round_seconds']:.2f} s a round")
    finally:
        D.down(out)
    return results


def part_rounds(out: Path, node_counts: list[int], rounds: int) -> dict[str, Any]:
    from server import deploy as D

    out = out / "runs"  # git-ignored: flwr run packages the app folder minus .gitignore
    keys = out / "keys"
    D.create_keys(keys, nodes=max(node_counts))
    rows: dict[str, Any] = {}
    for nodes in node_counts:
        for strategy in ("poi", "fedavg"):
            console.print(f"simulation: {nodes} subscribers, {strategy}")
            rows[f"simulation/{nodes}/{strategy}"] = _simulate(
                out / f"sim-{nodes}-{strategy}",
                f"num-subscribers={nodes} num-server-rounds={rounds} strategy={strategy}")
        console.print(f"deployment (poi deploy defaults): {nodes} nodes")
        for strategy, res in _deployed(out / f"deploy-{nodes}", keys, nodes, rounds,
                                       ["poi", "fedavg"]).items():
            rows[f"deployed/{nodes}/{strategy}"] = res
    smallest = min(node_counts)
    console.print(f"deployment (Flower's launcher): {smallest} nodes")
    for strategy, res in _deployed(out / f"deploy-{smallest}-flower", keys, smallest, rounds,
                                   ["poi", "fedavg"], isolation="subprocess",
                                   exec_poll_seconds=None).items():
        rows[f"deployed-flower-launcher/{smallest}/{strategy}"] = res
    return rows


# ----------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Deployed and simulated rounds ({results['cpus']} CPUs)", ""]
    if "startup" in results:
        s = results["startup"]
        lines += [f"## ClientApp start (median of {s['repeats']})", "",
                  "| mode | train: flwr imported s | app imported s | first DP-SGD step s | "
                  "vote: reply s |", "|---|---|---|---|---|"]
        for mode, phases in s["medians"].items():
            t, v = phases["train"], phases["vote"]
            lines.append(f"| {mode} | {t['flwr_imported']:.2f} | {t['app_imported']:.2f} | "
                         f"{t['first_step']:.2f} | {v['reply']:.2f} |")
        fresh, warm = s["medians"]["fresh"], s["medians"]["warm fork"]
        eager = s["medians"]["fresh, opacus eager"]
        lines += ["", f"First train step, warm fork / fresh: "
                  f"{warm['train']['first_step'] / fresh['train']['first_step']:.3f}; vote "
                  f"reply, fresh / fresh with eager Opacus: "
                  f"{fresh['vote']['reply'] / eager['vote']['reply']:.2f}",
                  ""]
    if "rounds" in results:
        rows = results["rounds"]
        lines += ["## Rounds (median of rounds 2..R)", "",
                  "| mode | nodes | strategy | round s | train s | vote s | x simulation "
                  "(same strategy) | PoI / FedAvg | round 1 s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, res in rows.items():
            mode, nodes, strategy = key.split("/")
            sim = rows.get(f"simulation/{nodes}/{strategy}")
            other = rows.get(f"{mode}/{nodes}/fedavg")
            ratio = res["round_seconds"] / sim["round_seconds"] if sim else float("nan")
            versus = (f"{res['round_seconds'] / other['round_seconds']:.2f}"
                      if strategy == "poi" and other else "")
            lines.append(f"| {mode} | {nodes} | {strategy} | {res['round_seconds']:.2f} | "
                         f"{res['phases']['train']:.2f} | {res['phases']['vote']:.2f} | "
                         f"{ratio:.1f} | {versus} | {res['round_1_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
        _child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/deploy")
    parser.add_argument("--nodes", default="3,6")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("all", "startup", "rounds"), default="all")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "deploy.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["cpus"] = os.cpu_count()
    if args.part in ("all", "startup"):
        results["startup"] = part_startup(out, args.repeats)
        path.write_text(json.dumps(results, indent=2) + "\n")
    if args.part in ("all", "rounds"):
        results["rounds"] = part_rounds(out, [int(n) for n in args.nodes.split(",")],
                                        args.rounds)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "deploy.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
