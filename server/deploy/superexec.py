"""A warm SuperExec for ``flower-supernode --isolation process``: ClientApps start in
milliseconds instead of seconds.

Flower 1.41 runs every message in a fresh ``flwr-clientapp`` interpreter that serves one
task token and exits, so each train or vote message re-imports flwr, NumPy and torch
(and Opacus for training): about 2.5 CPU-seconds a message on these machines, before a
single example is touched. Flower has no long-running ClientApp in this version.

This SuperExec imports those modules once and **forks one child per ClientApp task**; the
child runs Flower's own ``run_clientapp`` (same Runtime API, same token protocol, same
error replies, the app loaded from the run's FAB as Flower loads it), so each ClientApp
still runs in a process of its own and nothing of one message survives into the next.
Only third-party modules are preloaded, and each child forgets every module of ours
(``client``, ``crypto``, ``ledger``, ``server``) before it loads the app
(:func:`forget_packages`): the app's code
always comes from the FAB that was submitted, not from whatever this interpreter has
installed.

It reuses Flower's SuperExec loop (``run_superexec``) with a fork-based executor. Those
are internals of flwr, not a public API: on a flwr release other than the ones it was
checked against (:data:`server.deploy.waits.CHECKED_FLWR`), or where the internals are
missing, it does not guess: it replaces itself with Flower's own ``flower-superexec``
(same arguments) and says so. Tasks other than ClientApps, and any task while this
process holds a second thread (forking a threaded process is unsafe), go through
Flower's subprocess launcher.

Each child starts with default signal handlers and none of Flower's exit handlers of the
SuperExec, watches the SuperExec as Flower's ClientApps do (``parent_pid``), and retries
a message's arrays after 0.05 s instead of 1 s (:mod:`server.deploy.waits`: the child
often asks before its SuperNode has them). The SuperExec itself exits within a second
of its SuperNode (checked by a timer signal, not a thread). A child inherits the
SuperExec's open sockets (the Runtime API on 127.0.0.1, which any local process can
reach anyway), a copy of its memory (which holds no secret of its own, but may hold the
task tokens it fetched for other ClientApps running at the same time: run one tenant's
tasks per SuperNode, as ``poi deploy`` does) and its preloaded NumPy, torch and Opacus:
an app that ships other versions of those gets these, as it would with runtime
dependency installation off.

  python -m server.deploy.superexec --runtime-api-address 127.0.0.1:9094 --insecure \\
      [--parent-pid PID] [--preload numpy,torch,opacus,...]

``poi deploy up`` uses it by default (``--isolation process``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import sys
import threading
import time
import traceback

from server.deploy.waits import fast_object_pulls, unchecked_reason

PARENT_CHECK_SECONDS = 1.0
CHILD_OBJECT_PULL_CAP = 0.2
DEFAULT_PRELOAD = ("numpy,torch,opacus,flwr.app,flwr.clientapp,"
                   "flwr.supernode.runtime.run_clientapp")
# Set by --threads before anything imports NumPy or torch.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# The app's top-level packages (pyproject.toml [tool.setuptools.packages.find]); the FAB
# ships the same ones.
APP_PACKAGES = ("client", "crypto", "ledger", "server")


def forget_packages(packages: tuple[str, ...] = APP_PACKAGES,
                    modules: dict[str, object] | None = None) -> list[str]:
    """Drop ``packages`` and their submodules from ``sys.modules`` (this interpreter's
    own, installed copy of our code, imported to run this file), so that the app loaded
    next imports them from the FAB. By name, not by path: an installed copy lives in
    site-packages beside torch, which must stay. Returns the names dropped."""
    table: dict[str, object] = sys.modules if modules is None else modules  # type: ignore[assignment]
    dropped = sorted(name for name in table if name.partition(".")[0] in packages)
    for name in dropped:
        del table[name]
    return dropped


def _fall_back(reason: str, argv: list[str]) -> None:
    """Become Flower's own SuperExec with the same arguments (never returns)."""
    print(f"poi superexec: {reason}; running Flower's flower-superexec instead",
          file=sys.stderr, flush=True)
    exe = shutil.which("flower-superexec") or os.path.join(os.path.dirname(sys.executable),
                                                           "flower-superexec")
    os.execv(exe, [exe, *argv])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.deploy.superexec",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--preload", default=DEFAULT_PRELOAD,
                        help="comma-separated third-party modules to import once, before "
                             "any fork")
    parser.add_argument("--threads", type=int, default=0,
                        help="OpenMP/BLAS threads per ClientApp (0: the libraries' default; "
                             "poi deploy, which puts every node on one machine, uses 1)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads: expected 0 or more, got {args.threads}")
    return args


def parent_gone(pid: int | None) -> bool:
    """Whether the SuperNode ``pid`` is gone (as Flower's own monitor judges: any error
    from signal 0 counts as gone)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return False


def reset_inherited_state() -> None:
    """In a fresh child: Flower's process-wide exit handlers and signal handlers belong
    to the SuperExec, not to this ClientApp (run_clientapp registers its own)."""
    for name in ("SIGINT", "SIGTERM", "SIGQUIT", "SIGALRM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        from flwr.supercore.exit import exit_handler
    except ImportError:
        return
    handlers = getattr(exit_handler, "registered_exit_handlers", None)
    if isinstance(handlers, list):
        handlers.clear()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:  # before anything imports NumPy (flwr does)
        for name in THREAD_ENV:
            os.environ[name] = str(args.threads)
    flower_argv = ["--runtime-api-address", args.runtime_api_address]
    flower_argv += ["--insecure"] if args.insecure else []
    flower_argv += ["--root-certificates", args.root_certificates] if args.root_certificates else []
    flower_argv += ["--parent-pid", str(args.parent_pid)] if args.parent_pid else []
    reason = unchecked_reason()
    if reason:
        _fall_back(reason, flower_argv)
    try:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec import run_superexec as superexec
        from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        # Inherited by every child. The child asks its own SuperNode (127.0.0.1), so a
        # short cap costs nothing; it usually asks before the SuperNode has the arrays.
        fast_object_pulls(cap=CHILD_OBJECT_PULL_CAP)
    except (ImportError, KeyError) as exc:
        _fall_back(f"flwr internals missing ({exc})", flower_argv)

    started = time.perf_counter()
    for module in filter(None, (m.strip() for m in args.preload.split(","))):
        importlib.import_module(module)
    print(f"poi superexec: preloaded {args.preload} in {time.perf_counter() - started:.1f} s; "
          "forking one child per ClientApp task", flush=True)

    certificates = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as fh:
            certificates = fh.read()
    parent = args.parent_pid

    class ForkExecutor(SubprocessExecutor):  # type: ignore[misc,valid-type]
        """Fork this warm interpreter for each ClientApp task; other task types, or a
        threaded moment, as Flower does (a subprocess)."""

        def launch(self, spec):  # type: ignore[no-untyped-def]
            if spec.task_type != TaskType.CLIENT_APP or threading.active_count() > 1:
                return super().launch(spec)
            pid = os.fork()
            if pid:
                return LaunchResult.accepted()
            code = 1
            try:
                reset_inherited_state()
                forget_packages()
                # parent_pid: Flower's monitor ends this ClientApp if the SuperExec dies
                run_clientapp(spec.runtime_api_address, spec.token, spec.insecure,
                              certificates, parent_pid=os.getppid(),
                              runtime_dependency_install=False)
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
            while True:  # reap finished children
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break

    # The SuperNode is watched by a timer signal, not a thread (threads and fork do not
    # mix): it fires even while the loop is stuck retrying a call to a dead SuperNode.
    def watch(signum: int, frame: object) -> None:
        if parent_gone(parent):  # os.write: print is not reentrant in a signal handler
            os.write(2, f"poi superexec: SuperNode {parent} is gone; exiting\n".encode())
            os._exit(0)

    if parent is not None:
        signal.signal(signal.SIGALRM, watch)
        signal.setitimer(signal.ITIMER_REAL, PARENT_CHECK_SECONDS, PARENT_CHECK_SECONDS)
    superexec.get_executor = lambda *a, **k: ForkExecutor()  # type: ignore[assignment]
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates_path=args.root_certificates, parent_pid=None,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
