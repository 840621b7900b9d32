"""The HE worker processes: TenSEAL holds the GIL, so encrypted predictions and context
checks run in a pool of spawned processes, each with the model and a cache of parsed
contexts.

Workers end on every exit path of ``poi serve``: :meth:`WorkerPool.stop` terminates (then
kills) them without waiting for the work in hand, and it runs whatever else the shutdown
does (a fee settlement against a ledger that vanished must not leave them behind); each
worker also asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``) and
watches its parent id, so a ``SIGKILL`` of the service orphans nothing either. Workers
ignore ``SIGINT``: a Ctrl-C in a terminal reaches the whole process group, and the
service, not its workers, decides how to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CONTEXT_CACHE = 32  # parsed contexts per worker, least recently used evicted
PR_SET_PDEATHSIG = 1

_WORKER: dict[str, Any] = {}


def _die_with(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watcher still works
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="poi-parent-watch").start()


def _init_worker(parent: int, weights_blob: bytes, activation: str, contexts_dir: str,
                 max_context_bytes: dict[str, int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    from crypto.digests import parse_canonical_tensor_bytes
    from crypto.he import EncryptedModel

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["model"] = EncryptedModel(parse_canonical_tensor_bytes(weights_blob), activation)
    _WORKER["dir"] = Path(contexts_dir)
    _WORKER["contexts"] = OrderedDict()
    _WORKER["limits"] = max_context_bytes


def _payload(payload: bytes | str) -> bytes:
    return payload if isinstance(payload, bytes) else Path(payload).read_bytes()


def _worker_context(context_id: str, layout: str) -> Any:
    from crypto.he import load_public_context

    cache: OrderedDict[str, Any] = _WORKER["contexts"]
    if context_id in cache:
        cache.move_to_end(context_id)  # least recently used goes first
    else:
        if len(cache) >= CONTEXT_CACHE:
            cache.popitem(last=False)
        data = (_WORKER["dir"] / context_id).read_bytes()
        cache[context_id] = load_public_context(data, layout,
                                                max_bytes=_WORKER["limits"][layout])
    return cache[context_id]


def _worker_ready(seconds: float) -> int:
    time.sleep(seconds)  # long enough that every worker process gets one
    return os.getpid()


def _worker_check_context(payload: bytes | str, layout: str) -> None:
    from crypto.he import load_public_context

    load_public_context(_payload(payload), layout, max_bytes=_WORKER["limits"][layout])


def _worker_predict(context_id: str, layout: str, payload: bytes | str, count: int) -> bytes:
    model = _WORKER["model"]
    return bytes(model.predict(_worker_context(context_id, layout), _payload(payload), count))


class WorkerPool:
    """``workers`` spawned HE processes holding the model (``weights_blob``)."""

    def __init__(self, workers: int, weights_blob: bytes, activation: str,
                 contexts_dir: Path, max_context_bytes: dict[str, int]) -> None:
        self.workers = workers
        self.initargs = (os.getpid(), weights_blob, activation, str(contexts_dir),
                         dict(max_context_bytes))
        self.pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=self.initargs)
        # Python starts pool processes on demand: start them all now, so the first
        # concurrent requests do not wait for a worker to boot.
        warm = [self.pool.submit(_worker_ready, 0.2) for _ in range(self.workers)]
        for future in warm:
            future.result()

    def pids(self) -> list[int]:
        processes = getattr(self.pool, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.pid is not None]

    def stop(self, grace: float = 3.0) -> None:
        """Terminate the workers now (then kill those still alive after ``grace``)."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.01))
            if process.is_alive():
                process.kill()
                process.join(1.0)

    async def run(self, fn: Any, *args: Any) -> Any:
        assert self.pool is not None, "service not started"
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def check_context(self, payload: bytes | str, layout: str) -> None:
        await self.run(_worker_check_context, payload, layout)

    async def predict(self, context_id: str, layout: str, payload: bytes | str,
                      count: int) -> bytes:
        return bytes(await self.run(_worker_predict, context_id, layout, payload, count))
