"""The warm SuperExec (``server.deploy.superexec``): each forked ClientApp forgets our
own modules so the app comes from the FAB, an unchecked flwr release falls back to
Flower's ``flower-superexec`` with the same arguments, and the flwr internals it relies
on are where it expects them (so a flwr upgrade fails here, not in a deployment).
End to end it runs in tests/deploy/test_deploy.py (``poi deploy up``'s default)."""

from __future__ import annotations

import inspect
import tomllib
import types
from pathlib import Path

import flwr
import pytest

from server.deploy import superexec as S


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
    assert flwr.__version__ in S.CHECKED_FLWR


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
