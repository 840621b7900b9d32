"""``flower-supernode`` whose idle wait backs off instead of sleeping a flat 3 s.

Flower 1.41's SuperNode loop pulls one message, waits for its ClientApp's reply
(checking every 0.5 s), pushes it, and pulls again; whenever a pull finds nothing it
sleeps **3 s**, a constant in ``flwr.supernode.start_client_internal``. A subscriber's
SuperNode always finds nothing right after pushing a reply (the ServerApp is still
waiting for the others), so every message phase of every round started up to 3 s late:
for PoI's two phases, most of a deployed round on a small task.

This launcher runs Flower's own ``flower-supernode`` entry point (same arguments, same
behaviour otherwise) with three waits changed:

- the idle wait after an empty pull starts at ``--idle-poll`` seconds (0.1) and grows by
  half (:data:`IDLE_GROWTH`) on every further empty pull up to Flower's 3 s (each wait
  jittered by ±20 %, so that
  many nodes do not pull in step), and returns to the start as soon as a message
  arrives: a node polls fast while a round is under way and as Flower does when idle
  (7 pulls in the 3.2 s after a reply instead of 1: a message that comes 0.75 s
  after the reply is seen at 0.81 s, where doubling would see it at 1.5 s);
- the wait for the ClientApp's reply is checked every ``--reply-poll`` seconds (0.05)
  instead of 0.5 s (a local lookup in the SuperNode's own state, no network);
- a message's arrays that are not on the SuperLink yet are asked for again after 0.05 s
  doubling to 1 s, not 1 s doubling to 10 s (:mod:`server.deploy.waits`).

Only ``flwr.supernode.start_client_internal`` sees the changed clock. Like
:mod:`server.deploy.superexec` this touches flwr internals: on a flwr release it was not
checked against (:data:`server.deploy.waits.CHECKED_FLWR`), or when those internals are
missing, it changes nothing, says so, and runs Flower's SuperNode as it is.

  python -m server.deploy.supernode [--idle-poll 0.1] [--reply-poll 0.05] -- \\
      --superlink HOST:PORT --root-certificates ca.crt ...   (flower-supernode's arguments)
"""

from __future__ import annotations

import argparse
import random
import sys
import time as _time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from server.deploy.waits import fast_object_pulls, unchecked_reason

FLOWER_IDLE_WAIT = 3  # the literal in start_client_internal's loop
FLOWER_REPLY_WAIT = 0.5  # the literal in _push_messages / yield_object_contents
DEFAULT_IDLE_POLL = 0.1
IDLE_GROWTH = 1.5
DEFAULT_REPLY_POLL = 0.05


class BackoffClock:
    """Stands in for the ``time`` module inside ``start_client_internal``: every other
    attribute is the real one; ``sleep`` maps Flower's two waits to ours."""

    def __init__(self, idle_poll: float, reply_poll: float,
                 sleep: Callable[[float], None] = _time.sleep,
                 jitter: Callable[[], float] = lambda: random.uniform(-0.2, 0.2)) -> None:
        if not 0 < idle_poll <= FLOWER_IDLE_WAIT or not 0 < reply_poll <= FLOWER_REPLY_WAIT:
            raise ValueError(f"expected 0 < idle-poll <= {FLOWER_IDLE_WAIT} and 0 < "
                             f"reply-poll <= {FLOWER_REPLY_WAIT}, got {idle_poll}, {reply_poll}")
        self.idle_poll, self.reply_poll = idle_poll, reply_poll
        self._sleep, self._jitter = sleep, jitter
        self.next_idle = idle_poll

    def message_arrived(self) -> None:
        self.next_idle = self.idle_poll

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_WAIT:
            wait = self.next_idle * (1 + self._jitter())
            self.next_idle = min(FLOWER_IDLE_WAIT, self.next_idle * IDLE_GROWTH)
        elif seconds == FLOWER_REPLY_WAIT:
            wait = self.reply_poll
        else:
            wait = seconds
        self._sleep(wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def install(module: ModuleType, clock: BackoffClock) -> None:
    """Give ``module`` (``flwr.supernode.start_client_internal``) the clock, and reset
    the backoff whenever its pull returns a message."""
    pull = getattr(module, "_pull_and_store_message")  # noqa: B009 - a private name

    def pull_and_reset(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.message_arrived()
        return run_id

    setattr(module, "time", clock)  # noqa: B010
    setattr(module, "_pull_and_store_message", pull_and_reset)  # noqa: B010


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, flower = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m server.deploy.supernode",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--idle-poll", type=float, default=DEFAULT_IDLE_POLL)
    parser.add_argument("--reply-poll", type=float, default=DEFAULT_REPLY_POLL)
    args = parser.parse_args(ours)
    clock = BackoffClock(args.idle_poll, args.reply_poll)  # refuses bad values first

    reason = unchecked_reason()
    if reason is None:
        try:
            from flwr.supernode import start_client_internal as internal

            if not callable(getattr(internal, "_pull_and_store_message", None)) or \
                    getattr(internal, "time", None) is not _time:
                raise ImportError("start_client_internal has no _pull_and_store_message "
                                  "or time")
            fast_object_pulls()
            install(internal, clock)
        except (ImportError, KeyError) as exc:
            reason = f"flwr internals missing ({exc})"
    if reason:
        print(f"poi supernode: {reason}; Flower's waits unchanged", file=sys.stderr, flush=True)
    else:
        print(f"poi supernode: idle poll {args.idle_poll:g} s growing by half to "
              f"{FLOWER_IDLE_WAIT} s, reply poll {args.reply_poll:g} s, object pulls retried "
              "after 0.05 s doubling to 1 s", flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower]
    flower_supernode()


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options before ``--``, flower-supernode's after it (all of them if no ``--``)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return [], argv


if __name__ == "__main__":
    main()
