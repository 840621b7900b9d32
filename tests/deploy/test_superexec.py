"""The warm SuperExec (``server.deploy.superexec``): each forked ClientApp forgets our
own modules so the app comes from the FAB, an unchecked flwr release falls back to
Flower's ``flower-superexec`` with the same arguments, and the flwr internals it relies
on are where it expects them (so a flwr upgrade fails here, not in a deployment).
End to end it runs in tests/deploy/test_deploy.py (``poi deploy up``'s default)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import tomllib
import types
from pathlib import Path

import flwr
import pytest

from server.deploy import superexec as S
from server.deploy.waits import CHECKED_FLWR


def test_each_child_forgets_our_packages_and_keeps_everything_else() -> None:
    modules = {name: types.ModuleType(name) for name in (
        "client", "client.client_app", "ledger.log", "server", "server.deploy.superexec",
        "crypto.he", "torch", "numpy", "clientlib", "serverless.x", "sys")}
    dropped = S.forget_packages(modules=modules)  # type: ignore[arg-type]
    assert dropped == ["client", "client.client_app", "crypto.he", "ledger.log", "server",
                       "server.deploy.superexec"]
    assert set(modules) == {"torch", "numpy", "clientlib", "serverless.x", "sys"}


def test_our_packages_are_the_ones_pyproject_installs() -> None:
    pyproject = tomllib.loads((Path(S.__file__).parents[2] / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(S.APP_PACKAGES)


def test_an_unchecked_flwr_release_runs_flowers_superexec_with_the_same_arguments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Exec(Exception):
        pass

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append((path, argv))
        raise Exec

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    monkeypatch.setattr(S.os, "execv", fake_execv)
    with pytest.raises(Exec):
        S.main(["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--parent-pid", "42"])
    (path, argv), = calls
    assert path.endswith("flower-superexec")
    assert argv[1:] == ["--runtime-api-address", "127.0.0.1:9094", "--insecure",
                        "--parent-pid", "42"]


def test_the_installed_flwr_is_one_it_was_checked_against() -> None:
    assert flwr.__version__ in CHECKED_FLWR


def test_the_flwr_internals_it_uses_are_where_it_expects_them() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    assert TaskType.CLIENT_APP
    assert callable(run_superexec.get_executor)  # replaced by the fork executor
    assert {"runtime_api_address", "insecure", "root_certificates_path", "parent_pid",
            "runtime_dependency_install"} <= set(
        inspect.signature(run_superexec.run_superexec).parameters)
    assert callable(SubprocessExecutor.launch) and callable(SubprocessExecutor.reconcile)
    assert callable(LaunchResult.accepted)
    params = list(inspect.signature(run_clientapp).parameters)
    assert params[:4] == ["runtime_api_address", "token", "insecure", "certificates"]
    assert {"parent_pid", "runtime_dependency_install"} <= set(params)


def test_parent_gone_as_flowers_monitor_judges_it() -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert S.parent_gone(proc.pid)  # exited and reaped
    assert not S.parent_gone(os.getpid())
    assert not S.parent_gone(None)  # no SuperNode named: nothing to watch


def test_a_forked_child_starts_with_default_signals_and_no_superexec_exit_handlers() -> None:
    from flwr.supercore.exit import exit_handler

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    exit_handler.add_exit_handler(lambda: None)
    read, write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: what ForkExecutor.launch does first
            try:
                S.reset_inherited_state()
                state = {"sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                         "exit_handlers": len(exit_handler.registered_exit_handlers)}
                os.write(write, json.dumps(state).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as fh:
            state = json.loads(fh.read())
        os.waitpid(pid, 0)
        assert state == {"sigterm_default": True, "exit_handlers": 0}
        assert exit_handler.registered_exit_handlers  # the parent keeps its own
    finally:
        signal.signal(signal.SIGTERM, previous)
        exit_handler.registered_exit_handlers.pop()


def test_threads_are_set_before_numpy_is_imported_and_refused_below_zero() -> None:
    import subprocess

    with pytest.raises(SystemExit):
        S.parse_args(["--runtime-api-address", "a:1", "--threads", "-1"])
    code = (
        "import os, sys\n"
        "from server.deploy import superexec as S\n"
        "def probe():\n"
        "    print('numpy' in sys.modules, os.environ.get('OMP_NUM_THREADS'))\n"
        "    sys.exit(0)\n"
        "S.unchecked_reason = probe\n"
        "S.main(['--runtime-api-address', 'a:1', '--threads', '3'])\n")
    env = {k: v for k, v in os.environ.items() if k not in S.THREAD_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "3"]  # set, and NumPy not loaded yet


def test_fast_object_pulls_shorten_the_waits_but_keep_flowers_time_limit() -> None:
    from flwr.supercore.inflatable import inflatable_utils as utils

    from server.deploy.waits import fast_object_pulls

    functions = (utils.pull_objects, utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    try:
        fast_object_pulls(cap=0.2)
        for function in functions:
            defaults = function.__kwdefaults__
            assert defaults["initial_backoff"] == 0.05 and defaults["backoff_cap"] == 0.2
            assert defaults["max_tries_per_object"] is None  # 500 tries would be 100 s now
            assert defaults["max_time"] == 7200  # Flower's own limit stays
        with pytest.raises(ValueError, match="expected 0 < first <= cap"):
            fast_object_pulls(first=2, cap=1)
    finally:
        for function, defaults in zip(functions, saved, strict=True):
            function.__kwdefaults__.update(defaults)
