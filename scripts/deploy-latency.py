#!/usr/bin/env python
"""Per-phase latency of one configuration: Flower's simulation against a deployment on
loopback (SuperLink with TLS and node authentication, N SuperNodes), in several
isolation and polling modes. Writes OUT/latency.json and OUT/latency.md.

  .venv/bin/python scripts/deploy-latency.py --out benchmarks/results/deploy \
      [--nodes 3] [--rounds 4] [--modes default,exec-poll,process,warm,warm-fast-poll]

Modes (docs/deployment.md explains each):
  default         --isolation subprocess, Flower's polling (what a plain deployment does)
  exec-poll       + FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 (the one interval Flower lets us set)
  process         --isolation process, our flower-superexec per node, exec poll 0.1
  warm            process isolation with scripts/warm-superexec.py (fork per task)
  warm-1s         the same with Flower's default SuperExec poll (1 s)
  warm-fast-poll  warm + the SuperNode's 3 s idle poll, the ServerApp grid's 3 s reply
                  poll and the 1 s object-pull backoff patched to 0.1 s (EXPERIMENT:
                  monkeypatches flwr internals through a sitecustomize on PYTHONPATH;
                  shows what the hard-coded waits cost)
Steady state is the median over rounds 2..R (round 1 pays for process start-up).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server import deploy as D  # noqa: E402

PHASES = ("train", "validate", "vote", "select", "evaluate", "ledger", "score")

FAST_POLL_SITECUSTOMIZE = '''\
"""EXPERIMENT (scripts/deploy-latency.py): shorten the waits Flower 1.41 hard-codes:
the SuperNode's 3 s idle wait between pulls, the ServerApp grid's 3 s wait between reply
pulls, and the 1 s initial backoff (doubling to 10 s) when an object is pulled before
its sender has pushed it. Only those modules see the patched values."""
import importlib.abc
import importlib.util
import os
import sys
import time as _time

_POLL = float(os.environ.get("POI_EXPERIMENT_POLL_SECONDS", "0.1"))


class _Clock:
    def __getattr__(self, name):
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds):
        _time.sleep(min(seconds, _POLL))


def _patch_clock(module):
    module.time = _Clock()


def _patch_backoff(module):
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        defaults = getattr(module, name).__kwdefaults__
        defaults["initial_backoff"] = _POLL
        defaults["backoff_cap"] = 1.0


_HOOKS = {
    "flwr.supernode.start_client_internal": _patch_clock,
    "flwr.superlink.grid.http_grid": _patch_clock,
    "flwr.supercore.inflatable.inflatable_utils": _patch_backoff,
}


class _Patcher(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _HOOKS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _HOOKS[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patcher())
'''


def mode_options(mode: str, out: Path) -> dict[str, Any]:
    warm = (sys.executable, str(ROOT / "scripts" / "warm-superexec.py"))
    if mode == "default":
        return {"isolation": "subprocess"}
    if mode == "exec-poll":
        return {"isolation": "subprocess", "exec_poll_seconds": 0.1}
    if mode == "process":
        return {"isolation": "process", "exec_poll_seconds": 0.1}
    if mode == "warm":
        return {"isolation": "process", "exec_poll_seconds": 0.1, "superexec": warm}
    if mode == "warm-1s":
        return {"isolation": "process", "superexec": warm}
    if mode == "warm-fast-poll":
        site = out / "fast-poll"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(FAST_POLL_SITECUSTOMIZE)
        return {"isolation": "process", "exec_poll_seconds": 0.1, "superexec": warm,
                "extra_env": {"PYTHONPATH": str(site), "POI_EXPERIMENT_POLL_SECONDS": "0.1"}}
    raise SystemExit(f"unknown mode {mode!r}")


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    rounds = report["rounds"]
    steady = rounds[1:] or rounds
    phases = {p: statistics.median(r["phase_seconds"].get(p, 0.0) for r in steady)
              for p in PHASES}
    return {
        "round_1_seconds": rounds[0]["round_seconds"],
        "round_1_phases": {p: rounds[0]["phase_seconds"].get(p, 0.0) for p in PHASES},
        "steady_round_seconds": statistics.median(r["round_seconds"] for r in steady),
        "steady_train_vote_seconds": statistics.median(
            r["phase_seconds"]["train"] + r["phase_seconds"]["vote"] for r in steady),
        "steady_phases": phases,
        "rounds": len(rounds),
        "final_accuracy": report["final_accuracy"],
    }


def run_simulation(out: Path, run_config: str) -> dict[str, Any]:
    target = out / "simulation"
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--out", str(target),
                    "--run-config", run_config], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    report = json.loads((target / "report.json").read_text())
    return {**summarize(report), "wall_seconds": time.perf_counter() - started}


def run_deployment(out: Path, keys: Path, mode: str, nodes: int,
                   config: dict[str, Any], app: Path) -> dict[str, Any]:
    work = out / f"deploy-{mode}"
    shutil.rmtree(work, ignore_errors=True)
    options = D.UpOptions(work=work, keys=keys, nodes=nodes, **mode_options(mode, out))
    started = time.perf_counter()
    state = D.up(options, echo=lambda line: print(f"  [{mode}] {line}", flush=True))
    up_seconds = time.perf_counter() - started
    try:
        run_id = D.submit(state, app_dir=app, run_config=config, out_dir=work / "run")
        status = D.follow(state, run_id, timeout=1800, poll_seconds=10.0)
        if status != "finished:completed":
            raise SystemExit(f"{mode}: run {run_id} {status}")
        report = json.loads((work / "run" / "report.json").read_text())
    finally:
        D.down(work)
    return {**summarize(report), "up_seconds": up_seconds,
            "wall_seconds": time.perf_counter() - started - up_seconds}


def markdown(results: dict[str, Any], config: dict[str, Any]) -> str:
    sim = results["simulation"]
    lines = [
        f"# Deployment latency vs simulation ({config['num-subscribers']} nodes, "
        f"{config['num-server-rounds']} rounds)",
        "",
        "Steady state: median over rounds 2..R of `phase_seconds` in report.json. Same run "
        "config and partitions in every row.",
        "",
        "| mode | train s | vote s | train+vote s | round s | x simulation round | "
        "round 1 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, res in results.items():
        ph = res["steady_phases"]
        ratio = res["steady_round_seconds"] / sim["steady_round_seconds"]
        lines.append(f"| {mode} | {ph['train']:.2f} | {ph['vote']:.2f} | "
                     f"{res['steady_train_vote_seconds']:.2f} | "
                     f"{res['steady_round_seconds']:.2f} | {ratio:.1f} | "
                     f"{res['round_1_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default="default,exec-poll,process,warm,warm-fast-poll")
    parser.add_argument("--run-config", default="", help='extra "k=v ..." for both sides')
    parser.add_argument("--app", type=Path, default=ROOT,
                        help="the Flower app to submit (e.g. a copy without tests/ and "
                             "benchmarks/, for a smaller FAB)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"num-subscribers": args.nodes,
                              "num-server-rounds": args.rounds}
    for token in args.run_config.split():
        key, value = token.split("=", 1)
        config[key] = json.loads(value) if value[:1].isdigit() else value
    run_config = " ".join(f"{k}={v}" for k, v in config.items())
    keys = out / "keys"
    D.create_keys(keys, nodes=args.nodes)

    results: dict[str, Any] = {}
    print("simulation", flush=True)
    results["simulation"] = run_simulation(out, run_config)
    for mode in args.modes.split(","):
        print(f"deployment: {mode}", flush=True)
        results[mode] = run_deployment(out, keys, mode, args.nodes,
                                       {k: v for k, v in config.items()
                                        if k != "num-subscribers"}, args.app.resolve())
        (out / "latency.json").write_text(json.dumps(
            {"config": config, "cpus": os.cpu_count(), "app": str(args.app.resolve()),
             "results": results},
            indent=2) + "\n")
    (out / "latency.md").write_text(markdown(results, config))
    print(markdown(results, config))


if __name__ == "__main__":
    main()
