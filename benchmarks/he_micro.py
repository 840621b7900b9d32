"""Micro-benchmark of crypto/he/: latency, throughput, sizes and logit error.

    .venv/bin/python -m benchmarks.he_micro [--single-runs 30] [--batch-runs 5] [--out FILE]

Trains the 64 -> 32 -> 10 square model for 5 epochs on the digits pool (as tests/crypto/test_he.py
does), then reports medians: "single" server time per prediction, "batch" predictions/s of
one process on full batches of 4,096 and of 2 worker processes at once, context / request /
reply sizes, and the max abs logit error against the float64 plaintext model on the 359 test
digits. Times are noisy on a shared 2-core machine: re-run when it is idle; the CPU-time
figures (``time.process_time``) are less sensitive to other load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import warnings
from typing import Any

import numpy as np


def _trained(activation: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    import torch

    from client.task import digits_split, functional_float64, get_weights, make_model, train_plain

    model = make_model(hidden_units=32, activation=activation, seed=0)
    train_plain(model, digits_split().pool, epochs=5, batch_size=32, learning_rate=0.1, seed=0)
    with torch.no_grad():
        logits = functional_float64(model)(
            torch.as_tensor(digits_split().test.x, dtype=torch.float64)).numpy()
    return get_weights(model), logits


def _worker(args: tuple[bytes, bytes, dict[str, np.ndarray], int, Any, Any]) -> None:
    public, request, weights, runs, barrier, results = args
    from crypto import he

    ctx = he.load_public_context(public, "batch", max_bytes=2**26)
    model = he.EncryptedModel(weights, "square")
    model.predict(ctx, request, he.max_batch("batch"))  # warm-up
    barrier.wait()
    for _ in range(runs):
        model.predict(ctx, request, he.max_batch("batch"))
    results.put(time.perf_counter())


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single-runs", type=int, default=30)
    parser.add_argument("--batch-runs", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from client.task import digits_split
    from crypto import he

    x = digits_split().test.x
    weights, reference = _trained("square")
    model = he.EncryptedModel(weights, "square")
    report: dict[str, Any] = {}

    buyer = he.buyer_context("single")
    ctx = he.load_public_context(buyer.public_bytes(), "single", max_bytes=2**26)
    times, cpu_times, encrypt_times, errors = [], [], [], []
    for run in range(args.single_runs):
        start = time.perf_counter()
        query = buyer.encrypt(x[run % len(x)])
        encrypt_times.append(time.perf_counter() - start)
        start, cpu = time.perf_counter(), time.process_time()
        reply = model.predict(ctx, query, 1)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        errors.append(np.abs(buyer.decrypt(reply, 1)[0] - reference[run % len(x)]).max())
    report["single"] = {
        "server_ms_median": 1e3 * statistics.median(times),
        "server_ms_min": 1e3 * min(times),
        "server_cpu_ms_median": 1e3 * statistics.median(cpu_times),
        "encrypt_ms_median": 1e3 * statistics.median(encrypt_times),
        "context_bytes": len(buyer.public_bytes()),
        "request_bytes": len(query), "reply_bytes": len(reply),
        "max_abs_logit_error": float(max(errors)), "runs": args.single_runs,
    }

    buyer = he.buyer_context("batch")
    ctx = he.load_public_context(buyer.public_bytes(), "batch", max_bytes=2**26)
    full = np.tile(x, (he.max_batch("batch") // len(x) + 1, 1))[:he.max_batch("batch")]
    start = time.perf_counter()
    request = buyer.encrypt(full)
    encrypt_s = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(args.batch_runs):
        start, cpu = time.perf_counter(), time.process_time()
        reply = model.predict(ctx, request, len(full))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    got = buyer.decrypt(reply, len(full))[:len(x)]
    per_request = statistics.median(times)
    report["batch"] = {
        "server_s_per_request_median": per_request,
        "predictions_per_s_one_process": len(full) / per_request,
        "predictions_per_cpu_s": len(full) / statistics.median(cpu_times),
        "encrypt_s": encrypt_s,
        "context_bytes": len(buyer.public_bytes()),
        "request_bytes": len(request), "reply_bytes": len(reply),
        "max_abs_logit_error": float(np.abs(got - reference).max()),
        "argmax_equal": bool((got.argmax(1) == reference.argmax(1)).all()),
        "runs": args.batch_runs,
    }

    spawn = mp.get_context("spawn")
    barrier, results = spawn.Barrier(3), spawn.Queue()
    workers = [spawn.Process(target=_worker, args=((buyer.public_bytes(), request, weights,
                                                    args.batch_runs, barrier, results),))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    ends = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    wall = max(ends) - start
    report["batch"]["predictions_per_s_two_processes"] = (
        2 * args.batch_runs * len(full) / wall)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
