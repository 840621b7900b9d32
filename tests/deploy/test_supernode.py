"""The SuperNode launcher (``server.deploy.supernode``): Flower's flat 3 s idle wait
becomes a backoff from 0.1 s that restarts whenever a message arrives, the reply wait is
checked every 0.05 s, every other wait is Flower's, and on a flwr release it was not
checked against it changes nothing. End to end it runs in tests/deploy/test_deploy.py
(``poi deploy up``'s default)."""

from __future__ import annotations

import inspect
import time
import types

import flwr
import pytest

from server.deploy import supernode as S
from server.deploy.waits import CHECKED_FLWR


def _clock() -> tuple[S.BackoffClock, list[float]]:
    slept: list[float] = []
    return S.BackoffClock(0.1, 0.05, sleep=slept.append, jitter=lambda: 0.0), slept


def test_idle_waits_are_jittered_by_at_most_a_fifth_and_the_backoff_is_not() -> None:
    slept: list[float] = []
    clock = S.BackoffClock(0.1, 0.05, sleep=slept.append)  # the real jitter
    for _ in range(200):
        clock.message_arrived()
        clock.sleep(3)
        clock.sleep(3)
    firsts, seconds = slept[0::2], slept[1::2]
    assert all(0.08 <= w <= 0.12 for w in firsts) and all(0.12 <= w <= 0.18 for w in seconds)
    assert len(set(firsts)) > 100  # not in step across nodes


def test_idle_waits_back_off_from_the_first_poll_to_flowers_three_seconds() -> None:
    clock, slept = _clock()
    for _ in range(10):
        clock.sleep(3)
    assert slept == pytest.approx([0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.1390625,
                                   1.70859375, 2.562890625, 3])
    assert sum(slept[:7]) == pytest.approx(3.2171875)  # 7 pulls in 3.2 s, not one


def test_a_message_restarts_the_backoff_and_other_waits_are_flowers() -> None:
    clock, slept = _clock()
    clock.sleep(3)
    clock.sleep(3)
    clock.message_arrived()
    clock.sleep(3)
    clock.sleep(0.5)  # waiting for the ClientApp's reply
    clock.sleep(1.25)  # anything else: unchanged
    assert slept == pytest.approx([0.1, 0.15, 0.1, 0.05, 1.25])
    assert clock.time is time.time and clock.monotonic is time.monotonic


def test_install_patches_only_that_module_and_resets_on_a_pulled_message() -> None:
    clock, slept = _clock()
    answers = iter([None, None, 7, None])
    module = types.SimpleNamespace(time=time, _pull_and_store_message=lambda *a, **k: next(answers))
    S.install(module, clock)  # type: ignore[arg-type]
    assert module.time is clock and time.sleep is not clock.sleep
    for _ in range(4):  # Flower's loop: pull, sleep 3 s when nothing came
        if module._pull_and_store_message() is None:
            module.time.sleep(3)
    assert slept == pytest.approx([0.1, 0.15, 0.1])


def test_bad_polls_are_refused() -> None:
    for idle, reply in ((0, 0.05), (4, 0.05), (0.1, 0), (0.1, 0.6)):
        with pytest.raises(ValueError, match="expected 0 < idle-poll"):
            S.BackoffClock(idle, reply)


def test_the_flwr_internals_it_patches_are_where_it_expects_them() -> None:
    from flwr.supernode import start_client_internal as internal

    assert flwr.__version__ in CHECKED_FLWR
    assert internal.time is time and callable(internal._pull_and_store_message)
    source = inspect.getsource(internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source


@pytest.mark.parametrize("version", ["9.9.9"])
def test_an_unchecked_flwr_release_runs_flowers_supernode_unchanged(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], version: str) -> None:
    from flwr.supernode import cli
    from flwr.supernode import start_client_internal as internal

    ran = []
    monkeypatch.setattr(flwr, "__version__", version)
    monkeypatch.setattr(cli, "flower_supernode", lambda: ran.append(list(S.sys.argv)))
    monkeypatch.setattr(S.sys, "argv", list(S.sys.argv))
    S.main(["--idle-poll", "0.2", "--", "--superlink", "h:1", "--insecure"])
    assert ran == [["flower-supernode", "--superlink", "h:1", "--insecure"]]
    assert internal.time is time  # not patched
    assert "Flower's waits unchanged" in capsys.readouterr().err


def test_on_a_checked_release_it_patches_and_runs_flowers_entry_point(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import cli
    from flwr.supernode import start_client_internal as internal

    # monkeypatch restores both attributes after the test
    monkeypatch.setattr(internal, "time", internal.time)
    monkeypatch.setattr(internal, "_pull_and_store_message", internal._pull_and_store_message)
    monkeypatch.setattr(S.sys, "argv", list(S.sys.argv))
    ran = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: ran.append(list(S.sys.argv)))
    S.main(["--idle-poll", "0.2", "--", "--superlink", "h:1"])
    assert ran == [["flower-supernode", "--superlink", "h:1"]]
    assert isinstance(internal.time, S.BackoffClock) and internal.time.idle_poll == 0.2
