"""Benchmark: encrypted inference (issue targets), from the HE core to the running service.

1. A settled PoI run to serve (5 subscribers, 5 rounds; ``poi simulate``), made once under
   OUT/runs/run and reused afterwards.
2. HE core, in this process, on the run's final model: "single" server time per prediction
   (``EncryptedModel.predict`` alone), "batch" server time per request of 4,096 and the
   predictions/s of 1 process and of 2 worker processes (``ProcessPoolExecutor(2)``, each
   with its own model and context, two requests in flight); the plaintext torch model
   (float32, batches of 4,096) for comparison; context sizes and bytes per prediction.
3. End to end through ``poi serve RUN_DIR --workers 2`` (a subprocess, buyers funded on the
   ledger first): client-side latency of sequential "single" predictions and of batch
   requests of 4,096 (the SDK's ``Buyer.predict``: encryption, HTTP, decryption).
4. Load test: 16 funded buyers, one thread, ``Buyer`` and httpx client each, "single"
   layout, contexts registered before the clock starts; 60 s (``--quick``: 10 s). Then
   SIGINT, and a check that the ledger holds a ``fee_settlement`` per buyer matching what
   it was charged and that ``audit_run`` passes.

Targets (issue): single <= 100 ms server time; batch >= 8,000 predictions/s on 2 cores;
batch context <= 3 MB.

    .venv/bin/python -m benchmarks.inference --out benchmarks/results/inference [--quick]

Writes OUT/inference.json, OUT/inference.md and OUT/inference.png (``--report-only``
rewrites the last two from the JSON). Everything shares the 2 cores: the buyers' own
encryption and decryption compete with the service in parts 3 and 4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from server.round.report import write_json

SINGLE_MS_TARGET = 100.0
BATCH_RATE_TARGET = 8000.0
BATCH_CONTEXT_TARGET = 3_000_000  # bytes ("3 MB", decimal)
RUN_CONFIG = "num-subscribers=5 num-server-rounds=5"
FUND_PER_BUYER = 10**9  # minor units: far more than any part spends
LOAD_BUYERS = 16
CONTEXT_CACHE = 8  # parsed contexts a worker of server/inference/service.py keeps


@dataclass(frozen=True)
class Setup:
    single_runs: int
    batch_runs: int
    pair_rounds: int  # 2 requests in flight per round
    pair_trials: int  # repeats of the 2-process measurement (median reported)
    e2e_single: int
    e2e_batch: int
    e2e_batch_pair: int  # requests per buyer, 2 batch buyers at once
    load_seconds: float
    control_seconds: float  # load test with CONTEXT_CACHE buyers, for comparison
    load_buyers: int = LOAD_BUYERS

    @classmethod
    def of(cls, quick: bool) -> Setup:
        if quick:
            return cls(single_runs=30, batch_runs=3, pair_rounds=2, pair_trials=2, e2e_single=50,
                       e2e_batch=2, e2e_batch_pair=1, load_seconds=10.0,
                       control_seconds=5.0)
        return cls(single_runs=100, batch_runs=7, pair_rounds=4, pair_trials=3, e2e_single=200,
                   e2e_batch=5, e2e_batch_pair=3, load_seconds=60.0,
                   control_seconds=20.0)


class CpuSampler:
    """System-wide CPU use between construction and :meth:`busy_cores` (``/proc/stat``):
    shows whether anything besides the benchmark used the cores."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        try:
            with open("/proc/stat") as handle:
                fields = [float(v) for v in handle.readline().split()[1:]]
        except OSError:
            return float("nan"), time.perf_counter()
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.perf_counter()

    def busy_cores(self) -> float:
        busy, now = self._read()
        return (busy - self.start[0]) / max(now - self.start[1], 1e-9)


def background_load(seconds: float = 2.0) -> float:
    """Cores busy while this benchmark idles: other users of the machine."""
    sampler = CpuSampler()
    time.sleep(seconds)
    return sampler.busy_cores()


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _lat_summary(seconds: list[float]) -> dict[str, Any]:
    ms = [1e3 * s for s in seconds]
    return {"n": len(ms), "p50_ms": _pct(ms, 50), "p90_ms": _pct(ms, 90),
            "p99_ms": _pct(ms, 99), "mean_ms": float(np.mean(ms)) if ms else float("nan"),
            "min_ms": min(ms, default=float("nan")), "max_ms": max(ms, default=float("nan"))}


# ============================================================================ 1. the run
def poi_executable() -> str:
    beside = Path(sys.executable).parent / "poi"
    found = str(beside) if beside.is_file() else shutil.which("poi")
    if not found:
        raise SystemExit("expected the poi command beside the interpreter or on PATH")
    return found


def ensure_run(runs: Path, console: Console) -> dict[str, Any]:
    """A settled run: simulated once into ``runs/base`` (reused afterwards) and copied
    afresh to ``runs/run``, the one served, so that the ledger checks of this invocation
    (fee settlements, audit) see only its own buyers on top of the settled task."""
    from server.inference.service import read_task

    base, run_dir = runs / "base", runs / "run"
    reused = False
    if (base / "ledger.db").is_file() and (base / "report.json").is_file():
        try:
            read_task(base / "ledger.db")
            reused = True
        except Exception as exc:  # noqa: BLE001 - anything: make it again
            console.print(f"[yellow]{base} cannot be served ({exc}): making it again")
    seconds = 0.0
    if reused:
        console.print(f"reusing the settled run {base}")
    else:
        runs.mkdir(parents=True, exist_ok=True)
        console.print(f"poi simulate --run-config '{RUN_CONFIG}' -> {base}")
        start = time.perf_counter()
        done = subprocess.run([poi_executable(), "simulate", "--out", str(base), "--force",
                               "--run-config", RUN_CONFIG], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"poi simulate failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        read_task(base / "ledger.db")  # settled, servable
        seconds = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("*.lock", "inference"))
    return {"base": str(base), "path": str(run_dir), "reused": reused,
            "simulate_seconds": seconds}


def served_model(run_dir: Path) -> tuple[dict[str, np.ndarray], Any]:
    """The weights ``poi serve`` would serve, and the task view."""
    from crypto.digests import parse_canonical_tensor_bytes
    from ledger.blobs import BlobStore
    from server.inference.service import read_task

    db = run_dir / "ledger.db"
    view = read_task(db)
    weights = parse_canonical_tensor_bytes(BlobStore.beside(db).get(view.model_digest))
    return {k: np.asarray(v) for k, v in weights.items()}, view


def plaintext_model(weights: dict[str, np.ndarray], view: Any) -> Any:
    from client.task import make_model, set_weights

    model = make_model(hidden_units=view.hidden_units, activation=view.activation, seed=0)
    set_weights(model, {k: v.astype(np.float32) for k, v in weights.items()})
    return model.eval()


def reference_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    from client.task import functional_float64

    with torch.no_grad():
        return functional_float64(model)(torch.as_tensor(x, dtype=torch.float64)).numpy()


def full_batch(x: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.tile(x, (n // len(x) + 1, 1))[:n], dtype=np.float32)


# ============================================================================ 2. HE core
_POOL: dict[str, Any] = {}


def _pool_init(weights: dict[str, np.ndarray], activation: str, public: bytes,
               warm: bytes, n: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from crypto import he

    _POOL["model"] = he.EncryptedModel(weights, activation)
    _POOL["ctx"] = he.load_public_context(public, "batch", max_bytes=2**26)
    _POOL["model"].predict(_POOL["ctx"], warm, n)  # warm-up: encode the plaintext weights


def _pool_ready(pause: float) -> int:
    time.sleep(pause)
    return os.getpid()


def _pool_predict(request: bytes, n: int) -> tuple[float, float, int]:
    start, cpu = time.perf_counter(), time.process_time()
    reply = _POOL["model"].predict(_POOL["ctx"], request, n)
    return time.perf_counter() - start, time.process_time() - cpu, len(reply)


def he_core(weights: dict[str, np.ndarray], view: Any, x: np.ndarray, setup: Setup,
            progress: Progress) -> dict[str, Any]:
    from crypto import he

    model = he.EncryptedModel(weights, view.activation)
    torch_model = plaintext_model(weights, view)
    reference = reference_logits(torch_model, x)
    out: dict[str, Any] = {"params": {k: v.to_json() for k, v in he.PARAMS.items()}}

    # ------------------------------------------------------------------ single
    task = progress.add_task("HE core: single", total=setup.single_runs + 1)
    start = time.perf_counter()
    buyer = he.buyer_context("single")
    keygen_s = time.perf_counter() - start
    public = buyer.public_bytes()
    start = time.perf_counter()
    ctx = he.load_public_context(public, "single", max_bytes=2**27)
    load_s = time.perf_counter() - start
    model.predict(ctx, buyer.encrypt(x[0]), 1)  # warm-up (encodes the weight masks)
    progress.advance(task)
    times, cpus, enc, dec, errors, agree = [], [], [], [], [], []
    query = reply = b""
    for run in range(setup.single_runs):
        row = run % len(x)
        t = time.perf_counter()
        query = buyer.encrypt(x[row])
        enc.append(time.perf_counter() - t)
        t, c = time.perf_counter(), time.process_time()
        reply = model.predict(ctx, query, 1)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        t = time.perf_counter()
        got = buyer.decrypt(reply, 1)[0]
        dec.append(time.perf_counter() - t)
        errors.append(float(np.abs(got - reference[row]).max()))
        agree.append(bool(got.argmax() == reference[row].argmax()))
        progress.advance(task)
    out["single"] = {
        "n": setup.single_runs,
        "server_ms_median": 1e3 * _median(times), "server_ms_p90": 1e3 * _pct(times, 90),
        "server_ms_min": 1e3 * min(times), "server_cpu_ms_median": 1e3 * _median(cpus),
        "predictions_per_s_one_process": 1.0 / _median(times),
        "encrypt_ms_median": 1e3 * _median(enc), "decrypt_ms_median": 1e3 * _median(dec),
        "keygen_s": keygen_s, "context_load_ms": 1e3 * load_s,
        "context_bytes": len(public), "request_bytes": len(query), "reply_bytes": len(reply),
        "max_abs_logit_error": max(errors), "argmax_agreement": float(np.mean(agree)),
    }

    # ------------------------------------------------------------------ batch, 1 process
    task = progress.add_task("HE core: batch, 1 process", total=setup.batch_runs + 1)
    n = he.max_batch("batch")
    xs = full_batch(x, n)
    start = time.perf_counter()
    buyer = he.buyer_context("batch")
    keygen_s = time.perf_counter() - start
    public = buyer.public_bytes()
    start = time.perf_counter()
    ctx = he.load_public_context(public, "batch", max_bytes=2**26)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    request = buyer.encrypt(xs)
    encrypt_s = time.perf_counter() - start
    request_100 = buyer.encrypt(xs[:100])
    reply_100 = model.predict(ctx, request_100, 100)  # warm-up, and the n = 100 sizes
    progress.advance(task)
    times, cpus = [], []
    for _ in range(setup.batch_runs):
        t, c = time.perf_counter(), time.process_time()
        reply = model.predict(ctx, request, n)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        progress.advance(task)
    start = time.perf_counter()
    got = buyer.decrypt(reply, n)
    decrypt_s = time.perf_counter() - start
    ref = np.tile(reference, (n // len(x) + 1, 1))[:n]
    out["batch"] = {
        "n_requests": setup.batch_runs, "batch_size": n,
        "server_s_per_request_median": _median(times), "server_s_min": min(times),
        "server_cpu_s_median": _median(cpus),
        "predictions_per_s_one_process": n / _median(times),
        "encrypt_s": encrypt_s, "decrypt_s": decrypt_s, "keygen_s": keygen_s,
        "context_load_ms": 1e3 * load_s, "context_bytes": len(public),
        "request_bytes": len(request), "reply_bytes": len(reply),
        "request_bytes_n100": len(request_100), "reply_bytes_n100": len(reply_100),
        "max_abs_logit_error": float(np.abs(got - ref).max()),
        "argmax_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
    }

    # ------------------------------------------------------------------ batch, 2 processes
    per_trial = 2 * setup.pair_rounds
    task = progress.add_task("HE core: batch, 2 processes", total=setup.pair_trials * per_trial + 1)
    pool = ProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init,
        initargs=(weights, view.activation, public, request_100, 100))
    trials: list[dict[str, Any]] = []
    try:
        pids: set[int] = set()
        for _ in range(10):  # until both workers are up (spawned on demand) and warm
            pids |= {f.result() for f in [pool.submit(_pool_ready, 0.5) for _ in range(2)]}
            if len(pids) == 2:
                break
        progress.advance(task)
        for _ in range(setup.pair_trials):
            busy = CpuSampler()
            start = time.perf_counter()
            futures = [pool.submit(_pool_predict, request, n) for _ in range(per_trial)]
            for future in futures:
                future.add_done_callback(lambda _: progress.advance(task))
            wait(futures)
            wall = time.perf_counter() - start
            results = [f.result() for f in futures]
            trials.append({
                "requests": per_trial, "wall_s": wall,
                "predictions_per_s": per_trial * n / wall,
                "server_s_per_request_median": _median([r[0] for r in results]),
                "cpu_s_per_request_median": _median([r[1] for r in results]),
                "worker_cpu_share": _median([r[1] / r[0] for r in results]),
                "system_busy_cores": busy.busy_cores(),
            })
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    rates = [t["predictions_per_s"] for t in trials]
    out["batch"].update({
        "two_process_workers": len(pids), "two_process_trials": trials,
        "two_process_requests": per_trial * len(trials),
        "two_process_server_s_per_request_median": _median(
            [t["server_s_per_request_median"] for t in trials]),
        "two_process_worker_cpu_share": _median([t["worker_cpu_share"] for t in trials]),
        "predictions_per_s_two_processes": _median(rates),
        "predictions_per_s_two_processes_min": min(rates),
        "predictions_per_s_two_processes_max": max(rates),
    })

    # ------------------------------------------------------------------ plaintext torch
    task = progress.add_task("plaintext torch", total=2)
    out["plaintext"] = {"batch_size": n, **plaintext_rates(torch_model, xs, progress, task)}
    he_2 = out["batch"]["predictions_per_s_two_processes"]
    he_1 = out["batch"]["predictions_per_s_one_process"]
    out["plaintext"]["slowdown_he_2proc_vs_torch_default_threads"] = (
        out["plaintext"]["predictions_per_s"] / he_2)
    out["plaintext"]["slowdown_he_1proc_vs_torch_1_thread"] = (
        out["plaintext"]["predictions_per_s_1_thread"] / he_1)
    out["plaintext"]["ratio_he_2proc_over_torch"] = he_2 / out["plaintext"]["predictions_per_s"]

    single, batch = out["single"], out["batch"]
    out["bytes_per_prediction"] = {
        "single": {"up": single["request_bytes"], "down": single["reply_bytes"]},
        "batch_n4096": {"up": batch["request_bytes"] / n, "down": batch["reply_bytes"] / n},
        "batch_n100": {"up": batch["request_bytes_n100"] / 100,
                       "down": batch["reply_bytes_n100"] / 100},
        "plaintext_float32": {"up": 64 * 4, "down": 10 * 4},
    }
    out["context_bytes"] = {"single": single["context_bytes"], "batch": batch["context_bytes"]}
    return out


def plaintext_rates(model: Any, xs: np.ndarray, progress: Progress, task: Any
                    ) -> dict[str, Any]:
    import torch

    batch = torch.as_tensor(xs, dtype=torch.float32)
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"torch_threads": threads}

    def rate() -> tuple[float, int]:
        with torch.no_grad():
            for _ in range(5):
                model(batch)
            times: list[float] = []
            deadline = time.perf_counter() + 1.5
            while time.perf_counter() < deadline or len(times) < 30:
                t = time.perf_counter()
                model(batch)
                times.append(time.perf_counter() - t)
        return len(xs) / _median(times), len(times)

    out["predictions_per_s"], out["n"] = rate()
    progress.advance(task)
    try:
        torch.set_num_threads(1)
        out["predictions_per_s_1_thread"], _ = rate()
    finally:
        torch.set_num_threads(threads)
    progress.advance(task)
    return out


# ============================================================================ 3-4. service
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``poi serve`` as a subprocess in its own process group."""

    def __init__(self, run_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [poi_executable(), "serve", str(run_dir), "--port", str(self.port),
             "--workers", "2"], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pgid = self.proc.pid  # leader of its own session and group
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        self.leftovers = False
        self.left_behind: list[str] = []

    def worker_count(self) -> int:
        """HE worker processes the server runs now (ProcessPoolExecutor starts them on
        demand)."""
        return sum("spawn_main" in m for m in self.live_members())

    def live_members(self) -> list[str]:
        """Processes of the server's group that are not zombies ("pid state cmdline")."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[2]) != self.pgid or stat[0] in ("Z", "X"):
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name} {stat[0]} {cmd[:120]}")
            except (OSError, IndexError, ValueError):
                continue
        return found

    def wait_ready(self, timeout: float = 180.0) -> float:
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"poi serve exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/model", timeout=5).status_code == 200:
                    return time.perf_counter() - start
            time.sleep(0.2)
        raise RuntimeError(f"poi serve not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 120.0) -> None:
        """SIGINT to the server (it settles the fees and stops its workers), then make
        sure nothing of its process group is left."""
        if self.proc.poll() is None:
            start = time.perf_counter()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.exit_code = self.proc.wait(timeout=timeout)
                self.stop_seconds = time.perf_counter() - start
            except subprocess.TimeoutExpired:
                self.exit_code = None
        else:
            self.exit_code = self.proc.returncode
        # orphaned children (multiprocessing's resource tracker) may linger a moment as
        # zombies until init reaps them: wait for the group to hold no live process
        deadline = time.monotonic() + 15.0
        while self.live_members() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.left_behind = self.live_members()
        self.leftovers = bool(self.left_behind)
        if self.leftovers or self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.log.close()


def make_buyers(run_dir: Path, names: list[str]) -> dict[str, Any]:
    """Fresh Ed25519 keys under RUN_DIR/bench-buyers, funded on the ledger."""
    from ledger.keys import Signer
    from server.inference.service import fund_account

    folder = run_dir / "bench-buyers"
    shutil.rmtree(folder, ignore_errors=True)
    signers = {}
    for name in names:
        path = folder / f"{name}.pem"
        fund_account(run_dir, path, FUND_PER_BUYER)
        signers[name] = Signer.load(path)
    return signers


def new_buyer(url: str, signer: Any, layout: str) -> Any:
    import httpx

    from client.buyer import Buyer

    return Buyer(url, signer, layout=layout,
                 client=httpx.Client(base_url=url, timeout=600.0))


def register(buyer: Any, layout: str) -> float:
    """Model check, context registration and account sync: what precedes the first
    prediction. Returns the registration time (context upload and check)."""
    buyer.model()
    start = time.perf_counter()
    buyer._context(layout)
    seconds = time.perf_counter() - start
    buyer.account()
    return seconds


def e2e(server: Server, signers: dict[str, Any], x: np.ndarray, reference: np.ndarray,
        setup: Setup, progress: Progress) -> dict[str, Any]:
    out: dict[str, Any] = {}
    task = progress.add_task("service: single, sequential", total=setup.e2e_single + 3)
    buyer = new_buyer(server.url, signers["e2e-single"], "single")
    out["single_register_s"] = register(buyer, "single")
    for i in range(3):  # warm-up: each worker loads the context once
        buyer.predict(x[i:i + 1])
        progress.advance(task)
    times, errors, agree = [], [], []
    for run in range(setup.e2e_single):
        row = run % len(x)
        start = time.perf_counter()
        got = buyer.predict(x[row:row + 1])[0]
        times.append(time.perf_counter() - start)
        errors.append(float(np.abs(got - reference[row]).max()))
        agree.append(bool(got.argmax() == reference[row].argmax()))
        progress.advance(task)
    out["single"] = {**_lat_summary(times), "max_abs_logit_error": max(errors),
                     "argmax_agreement": float(np.mean(agree))}
    out["buyers"] = {"e2e-single": buyer}

    n = 4096
    xs = full_batch(x, n)
    ref = np.tile(reference, (n // len(x) + 1, 1))[:n]
    task = progress.add_task("service: batch 4,096, sequential", total=setup.e2e_batch + 1)
    buyer = new_buyer(server.url, signers["e2e-batch"], "batch")
    out["batch_register_s"] = register(buyer, "batch")
    buyer.predict(xs)  # warm-up
    progress.advance(task)
    times = []
    got = np.zeros((0, 10))
    for _ in range(setup.e2e_batch):
        start = time.perf_counter()
        got = buyer.predict(xs)
        times.append(time.perf_counter() - start)
        progress.advance(task)
    out["batch"] = {"n_requests": len(times), "batch_size": n,
                    "s_per_request_median": _median(times), "s_min": min(times),
                    "predictions_per_s": n / _median(times),
                    "max_abs_logit_error": float(np.abs(got - ref).max()),
                    "argmax_agreement": float(np.mean(got.argmax(1) == ref.argmax(1)))}
    out["buyers"]["e2e-batch"] = buyer

    # two batch buyers at once: both workers busy, as in the 2-process core figure
    task = progress.add_task("service: batch 4,096, 2 buyers at once",
                             total=2 * setup.e2e_batch_pair)
    pair = {name: new_buyer(server.url, signers[name], "batch")
            for name in ("e2e-batch-a", "e2e-batch-b")}
    for buyer in pair.values():
        register(buyer, "batch")
    out["server_workers_before_pair"] = server.worker_count()
    # warm-up, both at once: ProcessPoolExecutor starts its second worker process only
    # when two calls overlap, so this is where the service's second worker starts
    start = time.perf_counter()
    warm = [threading.Thread(target=b.predict, args=(xs[:100],)) for b in pair.values()]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    out["batch_two_buyers_warmup_s"] = time.perf_counter() - start
    out["server_workers_after_pair_warmup"] = server.worker_count()
    failures: list[str] = []

    def loop(b: Any) -> None:
        for _ in range(setup.e2e_batch_pair):
            try:
                b.predict(xs)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures.append(repr(exc))
            progress.advance(task)

    threads = [threading.Thread(target=loop, args=(b,)) for b in pair.values()]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = 2 * setup.e2e_batch_pair - len(failures)
    out["batch_two_buyers"] = {"requests": 2 * setup.e2e_batch_pair, "errors": len(failures),
                               "error_samples": failures[:5], "wall_s": wall,
                               "predictions_per_s": done * n / wall}
    out["buyers"].update(pair)
    return out


def register_load_buyers(server: Server, signers: dict[str, Any], x: np.ndarray,
                         count: int, progress: Progress) -> dict[str, Any]:
    """``count`` single-layout buyers: model check, context registration and one warm-up
    prediction each (none of it timed)."""
    names = [f"load-{i:02d}" for i in range(count)]
    task = progress.add_task("load test: registering buyers", total=len(names))
    buyers = {}
    for i, name in enumerate(names):
        buyer = new_buyer(server.url, signers[name], "single")
        register(buyer, "single")
        buyer.predict(x[i:i + 1])
        buyers[name] = buyer
        progress.advance(task)
    return buyers


def load_test(server: Server, buyers: dict[str, Any], x: np.ndarray, seconds: float,
              progress: Progress) -> dict[str, Any]:
    """Every buyer in its own thread sends single-layout predictions back to back for
    ``seconds``; client-side latency of each."""
    names = list(buyers)
    latencies: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    failures: dict[str, list[str]] = {name: [] for name in names}
    gate = threading.Barrier(len(names) + 1)
    deadline = [0.0]

    def loop(name: str, offset: int) -> None:
        buyer, row = buyers[name], offset
        gate.wait()
        while time.perf_counter() < deadline[0]:
            start = time.perf_counter()
            try:
                buyer.predict(x[row:row + 1])
                latencies[name].append((start, time.perf_counter() - start))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures[name].append(f"{type(exc).__name__}: {exc}"[:300])
            row = (row + 1) % len(x)

    threads = [threading.Thread(target=loop, args=(name, 7 * i), daemon=True)
               for i, name in enumerate(names)]
    for thread in threads:
        thread.start()
    task = progress.add_task(f"load test: {len(names)} buyers", total=seconds)
    busy = CpuSampler()
    deadline[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    gate.wait()
    while any(t.is_alive() for t in threads):
        time.sleep(0.25)
        progress.update(task, completed=min(time.perf_counter() - start, seconds))
    wall = time.perf_counter() - start
    samples = [(s - start, d) for name in names for s, d in latencies[name]]
    durations = [d for _, d in samples]
    errors = [m for name in names for m in failures[name]]
    per_buyer = [len(latencies[name]) for name in names]
    return {
        "buyers": len(names), "duration_s": seconds, "wall_s": wall,
        "requests": len(durations) + len(errors), "ok": len(durations),
        "errors": len(errors), "error_samples": errors[:5],
        "throughput_req_per_s": len(durations) / wall,
        **_lat_summary(durations),
        "per_buyer_requests_min": min(per_buyer), "per_buyer_requests_max": max(per_buyer),
        "system_busy_cores": busy.busy_cores(),
        "server_workers": server.worker_count(),
        "latencies_ms": [round(1e3 * d, 2) for d in durations],
        "starts_s": [round(s, 3) for s, _ in samples],
    }


def check_ledger(run_dir: Path, size_before: int, buyers: dict[str, Any]) -> dict[str, Any]:
    """Each benchmark buyer's fee settlements recorded after ``size_before``: their last
    cumulative must equal what the buyer's SDK was charged."""
    from ledger import LogReader
    from server.market.audit import audit_run

    with LogReader.open(run_dir / "ledger.db") as reader:
        settlements = [(i, e) for i, e in reader.entries(kind="fee_settlement")
                       if i >= size_before]
        size_after = int(reader.checkpoint().split("\n")[1])
    last: dict[str, int] = {}
    count: dict[str, int] = {}
    chain_errors = []  # amount != cumulative - the buyer's previous settled cumulative
    for index, entry in settlements:
        buyer = str(entry.fields["buyer"])
        cumulative, amount = int(entry.fields["cumulative"]), int(entry.fields["amount"])
        if amount != cumulative - last.get(buyer, 0):
            chain_errors.append(f"entry {index} (buyer {buyer[:12]}): amount {amount}, "
                                f"cumulative {cumulative}, previously settled "
                                f"{last.get(buyer, 0)}")
        last[buyer] = max(last.get(buyer, 0), cumulative)
        count[buyer] = count.get(buyer, 0) + 1
    rows = []
    for name, buyer in buyers.items():
        key = buyer.signer.key_id
        rows.append({"name": name, "key_id": key, "charged": buyer.charged,
                     "settlements": count.get(key, 0), "settled_cumulative": last.get(key),
                     "match": last.get(key) == buyer.charged})
    audit = audit_run(run_dir)
    return {
        "ledger_size_before": size_before, "ledger_size_after": size_after,
        "fee_settlement_entries": len(settlements),
        "buyers": len(rows), "buyers_with_settlement": sum(r["settlements"] > 0 for r in rows),
        "buyers_settled_in_full": sum(r["match"] for r in rows),
        "amount_chain_errors": chain_errors,
        "per_buyer": rows,
        "audit_ok": bool(audit.ok), "audit_mismatches": list(audit.mismatches)[:20],
        "audit_findings": list(audit.findings)[:20],
        "audit_fee_payouts_total": sum(audit.fee_payouts.values()),
    }


def service_part(run_dir: Path, out: Path, x: np.ndarray, reference: np.ndarray,
                 setup: Setup, progress: Progress, console: Console) -> dict[str, Any]:
    from ledger import LogReader

    names = ["e2e-single", "e2e-batch", "e2e-batch-a", "e2e-batch-b"]
    names += [f"load-{i:02d}" for i in range(setup.load_buyers)]
    task = progress.add_task("funding buyers", total=1)
    signers = make_buyers(run_dir, names)
    progress.advance(task)
    with LogReader.open(run_dir / "ledger.db") as reader:
        size_before = int(reader.checkpoint().split("\n")[1])
    result: dict[str, Any] = {}
    server = Server(run_dir, out / "runs" / "serve.log")
    buyers: dict[str, Any] = {}
    try:
        result["startup_s"] = server.wait_ready()
        console.print(f"poi serve ready on {server.url} in {result['startup_s']:.1f} s")
        e2e_result = e2e(server, signers, x, reference, setup, progress)
        buyers.update(e2e_result.pop("buyers"))
        result["e2e"] = e2e_result
        load_buyers = register_load_buyers(server, signers, x, setup.load_buyers, progress)
        buyers.update(load_buyers)
        result["load"] = load_test(server, load_buyers, x, setup.load_seconds, progress)
        # control: as many buyers as a worker caches contexts (8), same service
        control = dict(list(load_buyers.items())[:CONTEXT_CACHE])
        result["load_control"] = load_test(server, control, x, setup.control_seconds,
                                           progress)
    finally:
        server.stop()
        for buyer in buyers.values():
            with contextlib.suppress(Exception):
                buyer.client.close()
    log_text = server.log_path.read_text(errors="replace")
    result["server"] = {
        "exit_code": server.exit_code, "stop_s": server.stop_seconds,
        "process_group_left_behind": server.leftovers,
        "left_behind": server.left_behind,
        "log_warnings": [line for line in log_text.splitlines()
                         if "WARNING" in line or "ERROR" in line or "Traceback" in line][:20],
        "log_settlement_lines": sum("fee settlement for" in line
                                    for line in log_text.splitlines()),
    }
    result["ledger"] = check_ledger(run_dir, size_before, buyers)
    return result


# ============================================================================ 5. report
def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    core = results["core"]
    return [
        {"figure": "single: server time per prediction (median)",
         "value": core["single"]["server_ms_median"], "unit": "ms",
         "target": f"<= {SINGLE_MS_TARGET:g} ms",
         "met": core["single"]["server_ms_median"] <= SINGLE_MS_TARGET},
        {"figure": "batch: predictions/s, 2 worker processes on 2 cores",
         "value": core["batch"]["predictions_per_s_two_processes"], "unit": "/s",
         "target": f">= {BATCH_RATE_TARGET:,.0f} /s",
         "met": core["batch"]["predictions_per_s_two_processes"] >= BATCH_RATE_TARGET},
        {"figure": "batch: public context size",
         "value": core["context_bytes"]["batch"] / 1e6, "unit": "MB",
         "target": f"<= {BATCH_CONTEXT_TARGET / 1e6:g} MB",
         "met": core["context_bytes"]["batch"] <= BATCH_CONTEXT_TARGET},
    ]


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def _kb(value: float) -> str:
    return f"{value / 1e3:.1f} KB" if value >= 1000 else f"{value:.0f} B"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    core, env = results["core"], results["environment"]
    single, batch, plain = core["single"], core["batch"], core["plaintext"]
    setup = results["setup"]
    lines = [
        "# Encrypted inference benchmark",
        "",
        f"`{results['command']}` ({'quick smoke run' if results['quick'] else 'full run'}; "
        f"{results['seconds']:.0f} s in all).",
        "",
        "## Setup",
        "",
        f"- Machine: {env['cpus']} CPU cores, {env['platform']}, Python {env['python']}; "
        "the benchmark, the service and its buyers share the cores.",
        f"- Model: the final model of a settled PoI run ({RUN_CONFIG}; "
        f"{'reused from' if results['run']['reused'] else 'simulated into'} `OUT/runs/base`, "
        "served from a fresh copy in `OUT/runs/run`): "
        f"64 -> {results['model']['hidden_units']} -> 10, activation "
        f"`{results['model']['activation']}`, buyer fee {results['model']['buyer_fee']} "
        "per prediction.",
        "- CKKS (both layouts): N = 8192, primes [50, 38, 38, 38, 50] bits, scale 2^38, "
        ">= 128-bit security (`crypto/he/`).",
        f"- HE core: `EncryptedModel.predict` alone in this process (single: n = "
        f"{single['n']}; batch of 4,096: n = {batch['n_requests']}); 2 processes: "
        f"`ProcessPoolExecutor(2)` (spawn), each worker with its own model and context, "
        f"{batch['two_process_requests']} requests submitted at once (two in flight).",
        f"- Plaintext: the same weights in torch, float32, batches of 4,096, "
        f"{plain['torch_threads']} torch threads (and 1 thread).",
    ]
    if "service" in results:
        svc = results["service"]
        lines += [
            f"- Service: `poi serve RUN_DIR --port <free> --workers 2` as a subprocess; "
            f"buyers funded with `fund_account` first; latencies are client side "
            f"(`Buyer.predict`: encryption + HTTP + server + decryption). Sequential single: "
            f"n = {svc['e2e']['single']['n']}; sequential batch of 4,096: n = "
            f"{svc['e2e']['batch']['n_requests']}.",
            f"- Load test: {svc['load']['buyers']} funded buyers, one thread + `Buyer` + "
            f"httpx client each, single layout, {setup['load_seconds']:.0f} s; context "
            "registration and one warm-up prediction per buyer before the clock starts. "
            "Then SIGINT; the service writes its fee settlements on shutdown.",
        ]
    lines += ["", "## Targets (issue)", "", "| figure | measured | target | met |",
              "|---|---|---|---|"]
    for row in results["targets"]:
        lines.append(f"| {row['figure']} | {row['value']:,.2f} {row['unit']} | "
                     f"{row['target']} | {'met' if row['met'] else '**missed**'} |")
    bpp = core["bytes_per_prediction"]
    trial_rates = ", ".join(f"{t['predictions_per_s']:,.0f}" for t in batch["two_process_trials"])
    lines += [
        "", "## HE core (medians)", "", "| figure | value |", "|---|---|",
        f"| single: server time / prediction (n = {single['n']}) | "
        f"{single['server_ms_median']:.1f} ms (p90 {single['server_ms_p90']:.1f}, min "
        f"{single['server_ms_min']:.1f}; CPU {single['server_cpu_ms_median']:.1f} ms) |",
        f"| single: predictions/s, 1 process | "
        f"{single['predictions_per_s_one_process']:,.0f} |",
        f"| single: buyer encrypt / decrypt | {single['encrypt_ms_median']:.1f} ms / "
        f"{single['decrypt_ms_median']:.1f} ms |",
        f"| batch: server time / request of 4,096 (n = {batch['n_requests']}) | "
        f"{batch['server_s_per_request_median']:.3f} s (min {batch['server_s_min']:.3f}; "
        f"CPU {batch['server_cpu_s_median']:.3f} s) |",
        f"| batch: predictions/s, 1 process | {batch['predictions_per_s_one_process']:,.0f} |",
        f"| batch: predictions/s, 2 processes on 2 cores (median of "
        f"{len(batch['two_process_trials'])} trials of "
        f"{batch['two_process_trials'][0]['requests']} requests) | "
        f"**{batch['predictions_per_s_two_processes']:,.0f}** (trials "
        f"{trial_rates}"
        f"; {batch['two_process_server_s_per_request_median']:.3f} s per request, workers "
        f"on CPU {batch['two_process_worker_cpu_share']:.0%} of it) |",
        f"| batch: buyer encrypt / decrypt of 4,096 | {batch['encrypt_s']:.3f} s / "
        f"{batch['decrypt_s']:.3f} s |",
        f"| plaintext torch float32, batch 4,096: predictions/s ({plain['torch_threads']} "
        f"threads / 1 thread) | {plain['predictions_per_s']:,.0f} / "
        f"{plain['predictions_per_s_1_thread']:,.0f} |",
        f"| HE / plaintext (2 processes vs {plain['torch_threads']} threads) | "
        f"{plain['ratio_he_2proc_over_torch']:.2e} (plaintext is "
        f"{plain['slowdown_he_2proc_vs_torch_default_threads']:,.0f}x faster; 1 core vs 1 "
        f"core: {plain['slowdown_he_1proc_vs_torch_1_thread']:,.0f}x) |",
        f"| public context: single / batch | {_mb(core['context_bytes']['single'])} / "
        f"{_mb(core['context_bytes']['batch'])} |",
        f"| context parse on the server: single / batch | {single['context_load_ms']:.0f} ms"
        f" / {batch['context_load_ms']:.0f} ms |",
        f"| bytes up / down per prediction: single | {_kb(bpp['single']['up'])} / "
        f"{_kb(bpp['single']['down'])} |",
        f"| bytes up / down per prediction: batch, n = 4,096 | "
        f"{_kb(bpp['batch_n4096']['up'])} / {_kb(bpp['batch_n4096']['down'])} "
        f"(request {_mb(batch['request_bytes'])}, reply {_mb(batch['reply_bytes'])}) |",
        f"| bytes up / down per prediction: batch, n = 100 | "
        f"{_kb(bpp['batch_n100']['up'])} / {_kb(bpp['batch_n100']['down'])} "
        f"(request {_mb(batch['request_bytes_n100'])}, reply "
        f"{_mb(batch['reply_bytes_n100'])}) |",
        f"| max abs logit error vs float64 plaintext: single / batch | "
        f"{single['max_abs_logit_error']:.1e} / {batch['max_abs_logit_error']:.1e} "
        f"(argmax agreement {single['argmax_agreement']:.0%} / "
        f"{batch['argmax_agreement']:.0%}) |",
    ]
    if "service" in results:
        svc = results["service"]
        e2e_res, load, ledger, server = svc["e2e"], svc["load"], svc["ledger"], svc["server"]
        ctl = svc["load_control"]
        es, eb, pair = e2e_res["single"], e2e_res["batch"], e2e_res["batch_two_buyers"]
        lines += [
            "", "## Through the service (client side)", "", "| figure | value |", "|---|---|",
            f"| service start-up (until `GET /v1/model` answers) | {svc['startup_s']:.1f} s |",
            f"| context registration: single / batch | {e2e_res['single_register_s']:.2f} s "
            f"/ {e2e_res['batch_register_s']:.2f} s |",
            f"| single, sequential (n = {es['n']}): p50 / p99 | **{es['p50_ms']:.1f} ms** / "
            f"{es['p99_ms']:.1f} ms (mean {es['mean_ms']:.1f}, max {es['max_ms']:.1f}) |",
            f"| batch 4,096, sequential (n = {eb['n_requests']}): per request | "
            f"{eb['s_per_request_median']:.2f} s (min {eb['s_min']:.2f}) = "
            f"{eb['predictions_per_s']:,.0f} predictions/s |",
            f"| batch 4,096, 2 buyers at once ({pair['requests']} requests, "
            f"{pair['errors']} errors) | {pair['predictions_per_s']:,.0f} predictions/s |",
            f"| first overlapping requests (2 x 100 rows; the service starts its 2nd worker, "
            f"{e2e_res['server_workers_before_pair']} -> "
            f"{e2e_res['server_workers_after_pair_warmup']} workers) | "
            f"{e2e_res['batch_two_buyers_warmup_s']:.1f} s |",
            f"| decrypted logits vs plaintext: single / batch | max abs error "
            f"{es['max_abs_logit_error']:.1e} / {eb['max_abs_logit_error']:.1e}, argmax "
            f"agreement {es['argmax_agreement']:.0%} / {eb['argmax_agreement']:.0%} |",
            "", f"## Load test: {load['buyers']} concurrent buyers, single layout, "
            f"{load['duration_s']:.0f} s", "", "| figure | value |", "|---|---|",
            f"| requests (ok + errors) | {load['requests']:,} ({load['ok']:,} + "
            f"{load['errors']}) |",
            f"| errors | **{load['errors']}** (target 0) |",
            f"| throughput | **{load['throughput_req_per_s']:.1f} req/s** (= predictions/s) |",
            f"| latency p50 / p90 / p99 | **{load['p50_ms']:.0f} ms** / {load['p90_ms']:.0f} "
            f"ms / **{load['p99_ms']:.0f} ms** (max {load['max_ms']:.0f}) |",
            f"| requests per buyer (min / max) | {load['per_buyer_requests_min']} / "
            f"{load['per_buyer_requests_max']} |",
            f"| CPU busy (whole machine, of {env['cpus']} cores) | "
            f"{load['system_busy_cores']:.2f} |",
            f"| control: {ctl['buyers']} buyers ({ctl['duration_s']:.0f} s, same service) | "
            f"{ctl['throughput_req_per_s']:.1f} req/s, p50 {ctl['p50_ms']:.0f} ms, p99 "
            f"{ctl['p99_ms']:.0f} ms, {ctl['errors']} errors |",
            f"| server stop on SIGINT | exit code {server['exit_code']} after "
            f"{server['stop_s'] or float('nan'):.1f} s; processes left behind: "
            f"{'yes' if server['process_group_left_behind'] else 'none'} |",
            f"| fee_settlement entries written (this run) | {ledger['fee_settlement_entries']}"
            f" for {ledger['buyers_with_settlement']} of {ledger['buyers']} buyers; last "
            f"cumulative = SDK's charged total for {ledger['buyers_settled_in_full']} of "
            f"{ledger['buyers']} |",
            f"| `fee_settlement` amounts = cumulative - previously settled | "
            f"{ledger['fee_settlement_entries'] - len(ledger['amount_chain_errors'])} of "
            f"{ledger['fee_settlement_entries']} entries"
            + (f" (**not**: {'; '.join(ledger['amount_chain_errors'][:3])})"
               if ledger["amount_chain_errors"] else "") + " |",
            f"| `audit_run(run_dir).ok` | **{ledger['audit_ok']}** "
            f"({len(ledger['audit_mismatches'])} mismatches"
            + (f": {'; '.join(ledger['audit_mismatches'][:3])}"
               if ledger["audit_mismatches"] else "") + ") |",
        ]
    notes = results.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")


def make_notes(results: dict[str, Any]) -> list[str]:
    core, env = results["core"], results["environment"]
    single, batch = core["single"], core["batch"]
    notes = []
    scale = batch["predictions_per_s_two_processes"] / batch["predictions_per_s_one_process"]
    share = batch["two_process_worker_cpu_share"]
    notes.append(
        f"Two worker processes give {scale:.2f}x the batch rate of one (trials "
        f"{batch['predictions_per_s_two_processes_min']:,.0f} to "
        f"{batch['predictions_per_s_two_processes_max']:,.0f}/s): SEAL runs single-threaded "
        "and holds the GIL, so the service scales by processes, one per core. The workers "
        f"were on a CPU {share:.0%} of the time they spent in `predict`"
        + (" (the cores were not all theirs: the figure is a lower bound)." if share < 0.9
           else ".")
        + f" Machine CPU busy before / after the run while the benchmark idled: "
        f"{env['background_busy_cores_before']:.2f} / "
        f"{env.get('background_busy_cores_after', float('nan')):.2f} cores (other sessions "
        "share this machine; the figures are noisy by a few percent).")
    notes.append(
        f"Batch bytes per prediction depend on n: a request is "
        f"{_mb(batch['request_bytes'])} whatever the number of rows (64 ciphertexts), so "
        f"100 rows cost {_kb(core['bytes_per_prediction']['batch_n100']['up'])} up per "
        f"prediction against {_kb(core['bytes_per_prediction']['batch_n4096']['up'])} at "
        "4,096. The single layout's context is "
        f"{_mb(core['context_bytes']['single'])} (12 Galois keys), sent once per buyer; "
        f"the batch one {_mb(core['context_bytes']['batch'])}.")
    if "service" not in results:
        return notes
    svc = results["service"]
    e2e_res, load, ctl = svc["e2e"], svc["load"], svc["load_control"]
    es, eb, pair = e2e_res["single"], e2e_res["batch"], e2e_res["batch_two_buyers"]
    notes.append(
        f"End-to-end single latency (p50 {es['p50_ms']:.0f} ms) is the server's "
        f"{single['server_ms_median']:.0f} ms of HE plus the buyer's encryption "
        f"({single['encrypt_ms_median']:.0f} ms) and decryption "
        f"({single['decrypt_ms_median']:.0f} ms), a {_kb(single['request_bytes'])} upload, "
        "the voucher (hash, signature, verification) and the hop to a worker process.")
    notes.append(
        f"Batch through the service: {eb['predictions_per_s']:,.0f} predictions/s for one "
        f"buyer (a request of 4,096 takes {eb['s_per_request_median']:.2f} s: "
        f"{batch['server_s_per_request_median']:.2f} s of HE, the buyer's "
        f"{batch['encrypt_s']:.2f} s of encryption, a {_mb(batch['request_bytes'])} upload "
        f"and its copy to the worker), {pair['predictions_per_s']:,.0f}/s for two buyers at "
        "once: the buyers' encryption runs on the same 2 cores as the 2 workers. The "
        f"{BATCH_RATE_TARGET:,.0f}/s target is about the HE itself (the core figure).")
    if e2e_res["server_workers_before_pair"] < 2:
        notes.append(
            f"`poi serve --workers 2` ran {e2e_res['server_workers_before_pair']} worker "
            "process until two requests overlapped: Python's ProcessPoolExecutor (spawn) "
            "starts workers on demand, so the first overlap pays a worker start (import, "
            f"model, context): the first 2 overlapping requests took "
            f"{e2e_res['batch_two_buyers_warmup_s']:.1f} s against "
            f"{eb['s_per_request_median']:.1f} s for one request alone.")
    ideal = 2 / (single["server_ms_median"] / 1e3)
    drop = ctl["throughput_req_per_s"] / max(load["throughput_req_per_s"], 1e-9)
    notes.append(
        f"Load test: {load['throughput_req_per_s']:.1f} req/s with {load['buyers']} buyers, "
        f"p50 {load['p50_ms']:.0f} ms, against {ctl['throughput_req_per_s']:.1f} req/s and "
        f"p50 {ctl['p50_ms']:.0f} ms with {ctl['buyers']} buyers on the same service "
        f"({drop:.1f}x); the HE alone would allow about {ideal:.0f}/s on 2 cores. Each "
        f"worker keeps at most {CONTEXT_CACHE} parsed contexts "
        "(`server/inference/service.py::_worker_context`, evicting the oldest inserted, not the "
        f"least recently used); with {load['buyers']} buyers' contexts spread over 2 workers "
        "most requests find theirs evicted and re-read and parse the "
        f"{_mb(single['context_bytes'])} file (~{single['context_load_ms']:.0f} ms measured "
        f"here, {single['context_load_ms'] / single['server_ms_median']:.1f}x a prediction's "
        "HE). The buyers' threads (encryption, decryption, signing) share the 2 cores too.")
    ledger, server = svc["ledger"], svc["server"]
    ok = (load["errors"] == 0 and ctl["errors"] == 0 and ledger["audit_ok"]
          and ledger["buyers_settled_in_full"] == ledger["buyers"]
          and not ledger["amount_chain_errors"]
          and not server["process_group_left_behind"] and server["exit_code"] == 0)
    if ok:
        notes.append(
            "0 errors in the load tests. On SIGINT the service exited 0 after writing its fee "
            f"settlements: each of the {ledger['buyers']} buyers of this run has "
            "`fee_settlement` entries whose last cumulative equals what its SDK was charged, "
            "and `audit_run` passes. No process of the service was left behind.")
    else:
        notes.append(
            f"Problems: {load['errors']} + {ctl['errors']} load-test errors (samples: "
            f"{(load['error_samples'] + ctl['error_samples'])[:2]}); server exit code "
            f"{server['exit_code']}; buyers settled in full "
            f"{ledger['buyers_settled_in_full']}/{ledger['buyers']}; audit ok "
            f"{ledger['audit_ok']} (mismatches: {ledger['audit_mismatches'][:3]}); processes "
            f"left behind: {server['left_behind'][:3]}.")
    if ledger["amount_chain_errors"]:
        notes.append(
            "A `fee_settlement` amount short of its cumulative minus the previous settlement "
            "(the audit's mismatch) comes from a race in `server/inference/service.py`: "
            "`InferenceService._write_settlements` runs in a thread (`asyncio.to_thread`) "
            "and reads the live `BuyerState` objects that `predict` keeps updating on the "
            "event loop; after appending the entries it sets `view.settled[buyer] = "
            "state.cumulative`, the value at that later moment. A prediction completing "
            "during the write makes the service believe more is settled than the ledger "
            "says, and that buyer's next settlement comes short by the difference (it can "
            "also record an amount computed from an older cumulative than the one it "
            "records). Seen only under concurrent load with a settlement in progress (the "
            "30 s tick). A snapshot of (cumulative, voucher, signature) per buyer taken on "
            "the event loop, and `settled` set from it, would close it. `audit_run` then "
            "also flags that buyer's later settlements: it does not advance the settled "
            "total past an entry it refused (`server/market/audit.py::"
            "check_fee_settlements`), so one short entry gives several mismatches.")
    if server["log_warnings"]:
        notes.append(f"Server log warnings/errors: {server['log_warnings'][:3]}")
    return notes


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    core = results["core"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.4))
    svc = results.get("service")
    if svc and svc["load"]["latencies_ms"]:
        load = svc["load"]
        values = np.asarray(load["latencies_ms"])
        ctl = svc["load_control"]
        bins = np.linspace(0, max(values.max(), max(ctl["latencies_ms"], default=0)), 61)
        left.hist(values, bins=bins, color="tab:blue", alpha=0.7,
                  label=f"{load['buyers']} buyers")
        left.hist(ctl["latencies_ms"], bins=bins, color="tab:orange", alpha=0.6,
                  label=f"control, {ctl['buyers']} buyers ({ctl['duration_s']:.0f} s)")
        seq = svc["e2e"]["single"]
        for q, style in (("p50_ms", "-"), ("p99_ms", "--")):
            left.axvline(load[q], color="black", linestyle=style, linewidth=1,
                         label=f"load {q[:3]} {load[q]:.0f} ms")
        left.axvline(seq["p50_ms"], color="tab:green", linewidth=1.5,
                     label=f"sequential p50 {seq['p50_ms']:.0f} ms")
        left.set_xlabel("client-side latency of one single-layout prediction (ms)")
        left.set_ylabel("requests")
        left.set_title(f"Load test: {load['ok']} requests, "
                       f"{load['throughput_req_per_s']:.1f} req/s, {load['errors']} errors")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "service part not run", ha="center", va="center")
        left.set_axis_off()
    bars = [
        ("HE single\n1 process", core["single"]["predictions_per_s_one_process"]),
        ("HE batch\n1 process", core["batch"]["predictions_per_s_one_process"]),
        ("HE batch\n2 processes", core["batch"]["predictions_per_s_two_processes"]),
    ]
    if svc:
        bars += [(f"service single\n{svc['load']['buyers']} buyers",
                  svc["load"]["throughput_req_per_s"]),
                 (f"service single\n{svc['load_control']['buyers']} buyers",
                  svc["load_control"]["throughput_req_per_s"]),
                 ("service batch\n1 buyer", svc["e2e"]["batch"]["predictions_per_s"]),
                 ("service batch\n2 buyers", svc["e2e"]["batch_two_buyers"]["predictions_per_s"])]
    bars.append(("plaintext torch\nfloat32", core["plaintext"]["predictions_per_s"]))
    labels, values = zip(*bars, strict=True)
    colors = ["tab:orange"] * 3 + ["tab:blue"] * (len(bars) - 4) + ["tab:gray"]
    right.bar(range(len(bars)), values, color=colors)
    right.set_yscale("log")
    right.axhline(BATCH_RATE_TARGET, color="red", linestyle="--", linewidth=1,
                  label=f"target {BATCH_RATE_TARGET:,.0f}/s (batch, 2 cores)")
    for i, value in enumerate(values):
        right.text(i, value * 1.1, f"{value:,.0f}", ha="center", fontsize=8)
    right.set_xticks(range(len(bars)), labels, fontsize=8, rotation=30, ha="right")
    right.set_ylabel("predictions / s (log)")
    right.set_title("Predictions per second on 2 cores, by configuration")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict[str, Any], out: Path) -> None:
    results["targets"] = targets(results)
    results["notes"] = make_notes(results)
    write_json(out / "inference.json", results)
    write_markdown(results, out / "inference.md")
    plot(results, out / "inference.png")


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer repetitions, a 10 s load test")
    parser.add_argument("--core-only", action="store_true",
                        help="skip the service (parts 3 and 4)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite inference.md and inference.png from the JSON")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_reports(json.loads((out / "inference.json").read_text()), out)
        return
    console = Console()
    setup = Setup.of(args.quick)
    began = time.perf_counter()
    command = "python -m benchmarks.inference " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {
        "command": command.strip(), "quick": args.quick, "setup": setup.__dict__,
        "environment": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "background_busy_cores_before": background_load()},
    }
    console.rule("1. the settled run")
    results["run"] = {"config": RUN_CONFIG, **ensure_run(out / "runs", console)}
    run_dir = Path(results["run"]["path"])
    weights, view = served_model(run_dir)
    results["model"] = {"digest": view.model_digest, "activation": view.activation,
                        "hidden_units": view.hidden_units, "buyer_fee": view.buyer_fee}

    from client.task import digits_split

    x = np.asarray(digits_split().test.x, dtype=np.float32)
    reference = reference_logits(plaintext_model(weights, view), x)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        console.rule("2. HE core")
        results["core"] = he_core(weights, view, x, setup, progress)
        if not args.core_only:
            console.rule("3-4. the service: end to end and load test")
            results["service"] = service_part(run_dir, out, x, reference, setup, progress,
                                              console)
    results["seconds"] = time.perf_counter() - began
    results["environment"]["background_busy_cores_after"] = background_load()
    write_reports(results, out)
    for row in results["targets"]:
        console.print(f"{row['figure']}: {row['value']:,.2f} {row['unit']} "
                      f"(target {row['target']}: {'met' if row['met'] else 'MISSED'})")
    if "service" in results:
        load, ledger = results["service"]["load"], results["service"]["ledger"]
        console.print(f"load test: {load['requests']} requests, {load['errors']} errors, "
                      f"{load['throughput_req_per_s']:.1f} req/s, p50 {load['p50_ms']:.0f} "
                      f"ms, p99 {load['p99_ms']:.0f} ms; settled in full "
                      f"{ledger['buyers_settled_in_full']}/{ledger['buyers']}, audit ok "
                      f"{ledger['audit_ok']}")
    console.print(f"wrote {out / 'inference.md'}, .json and .png in "
                  f"{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
