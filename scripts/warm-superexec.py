#!/usr/bin/env python
"""EXPERIMENT: a warm SuperExec for ``flower-supernode --isolation process``.

Flower 1.41 runs every message in a fresh ``flwr-clientapp`` interpreter (it serves one
task token and exits), so each train or vote re-imports flwr, torch and opacus: about
5 CPU-seconds per message here. Flower has no long-running ClientApp process in this
version. This SuperExec imports the heavy modules once and forks one child per ClientApp
task; the child runs Flower's own ``run_clientapp`` (same Runtime API, same token
protocol, same error replies), so the ClientApp still runs in a process of its own.

It reuses Flower's SuperExec loop (``run_superexec``) with a fork-based executor, which
are internals of flwr 1.41.0, not a public API: measured in docs/deployment.md, not
used by ``poi deploy`` unless asked (``--superexec``).

  python scripts/warm-superexec.py --runtime-api-address 127.0.0.1:9094 --insecure \
      [--parent-pid PID] [--preload torch,opacus,numpy]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
import traceback

DEFAULT_PRELOAD = "numpy,torch,opacus,flwr.app,flwr.clientapp,flwr.supernode.runtime.run_clientapp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--preload", default=DEFAULT_PRELOAD,
                        help="comma-separated modules to import once, before any fork")
    args = parser.parse_args()

    # One thread per child at most: forking after BLAS or OpenMP started threads is unsafe.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    started = time.perf_counter()
    for module in filter(None, args.preload.split(",")):
        importlib.import_module(module.strip())
    print(f"warm-superexec: preloaded {args.preload} in {time.perf_counter() - started:.1f} s",
          flush=True)

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec as superexec
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    certificates = (open(args.root_certificates, "rb").read()  # noqa: SIM115
                    if args.root_certificates else None)
    parent = args.parent_pid

    class ForkExecutor(SubprocessExecutor):
        """Fork the warm interpreter for each ClientApp task; other task types as
        Flower does (a subprocess)."""

        def launch(self, spec):  # type: ignore[no-untyped-def]
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            if threading.active_count() > 1:
                return super().launch(spec)  # never fork a threaded process
            pid = os.fork()
            if pid:
                return LaunchResult.accepted()
            code = 1
            try:
                run_clientapp(spec.runtime_api_address, spec.token, spec.insecure,
                              certificates, parent_pid=None, runtime_dependency_install=False)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - a child must never return into the loop
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

        def reconcile(self) -> None:
            # Reap finished children; stop when the SuperNode is gone (no monitor thread:
            # threads and fork do not mix).
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
            if parent is not None:
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    raise SystemExit(0) from None

    superexec.get_executor = lambda *a, **k: ForkExecutor()  # type: ignore[assignment]
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates_path=args.root_certificates, parent_pid=None,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
