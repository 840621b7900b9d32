"""One message phase of a round: push the requests, then pull the replies, polling fast.

Flower's ``Grid.send_and_receive`` pushes and then pulls every **3 s** on a deployed
SuperLink (``HttpGrid`` in flwr 1.41 and 1.42; 0.1 s in simulation). A PoI round has two
message phases (train, vote), so that fixed wait cost a deployed round up to 6 s whatever
the subscribers did. :func:`exchange` pulls after ``first_poll`` seconds, backs off by
``backoff`` to at most ``max_poll`` while nothing comes (the first pull is at once), returns to ``first_poll`` as soon
as a reply arrives, and stops at the first complete set of replies or at the timeout.

Lost replies are handled as Flower handles them: a node that went away gets an error
reply from the SuperLink (which counts as an answer), a node that never answers is
waited for until ``timeout``, and whatever came by then is returned. A second reply to
the same request (never sent by Flower) is dropped, not returned twice.

:class:`PollingGrid` wraps a ``Grid`` so that code we do not own (Flower's ``FedAvg.start``,
used by the baselines) gets the same loop from ``send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

FIRST_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 0.2
BACKOFF = 1.5


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
             first_poll: float = FIRST_POLL_SECONDS, max_poll: float = MAX_POLL_SECONDS,
             backoff: float = BACKOFF, clock: Callable[[], float] | None = None,
             sleep: Callable[[float], None] | None = None) -> list[Message]:
    """Push ``messages`` and return their replies (at most one per request), in arrival
    order. ``timeout`` None waits for every reply, as ``send_and_receive`` does.

    ``clock`` and ``sleep`` default to the grid's own ``clock`` and ``sleep`` where it has
    them (a grid that keeps simulated time, as the tests' in-process grid does), else to
    ``time.monotonic`` and ``time.sleep``."""
    clock = clock or getattr(grid, "clock", None) or time.monotonic
    sleep = sleep or getattr(grid, "sleep", None) or time.sleep
    if not 0 < first_poll <= max_poll or backoff < 1:
        raise ValueError(f"expected 0 < first_poll <= max_poll and backoff >= 1, got "
                         f"first_poll={first_poll}, max_poll={max_poll}, backoff={backoff}")
    deadline = None if timeout is None else clock() + timeout
    pending = {str(i) for i in grid.push_messages(messages) if i}
    replies: list[Message] = []
    interval = first_poll
    while pending:
        # Positional: flwr 1.43 renames the parameter (``reply_to_message_ids``).
        pulled = list(grid.pull_messages(set(pending)))
        for reply in pulled:
            request = reply.metadata.reply_to_message_id
            if request in pending:
                pending.discard(request)
                replies.append(reply)
            else:
                log(WARNING, "dropped a reply from node %s to request %s: not awaited "
                    "(a second reply, or not ours)", reply.metadata.src_node_id, request)
        if not pending:
            break
        interval = first_poll if pulled else min(max_poll, interval * backoff)
        wait = interval if deadline is None else min(interval, deadline - clock())
        if wait <= 0:
            break
        sleep(wait)
    return replies


class PollingGrid(Grid):
    """``grid`` with :func:`exchange` as its ``send_and_receive``; everything else is
    delegated unchanged."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    @property
    def run(self):  # type: ignore[no-untyped-def]  # flwr's Run
        return self._grid.run

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    def create_message(self, content, message_type, dst_node_id, group_id,  # type: ignore[no-untyped-def]
                       ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return exchange(self._grid, messages, timeout=timeout)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)  # e.g. get_nodes, close (newer flwr)
