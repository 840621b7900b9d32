"""One message phase of a round: push the requests, then pull the replies, polling fast.

Flower's ``Grid.send_and_receive`` pushes and then pulls every **3 s** on a deployed
SuperLink (``HttpGrid`` in flwr 1.41 and 1.42; 0.1 s in simulation). A PoI round has two
message phases (train, vote), so that fixed wait cost a deployed round up to 6 s whatever
the subscribers did. :func:`exchange` pulls after ``first_poll`` seconds, backs off by
``backoff`` to at most ``max_poll`` while nothing comes (the first pull is at once),
returns to ``first_poll`` as soon
as a reply arrives, and stops at the first complete set of replies or at the timeout.

A node that registers its reply but never uploads the reply's arrays holds
``pull_messages`` (Flower downloads a reply's arrays before returning it) until the
SuperLink gives up on the upload, whatever ``timeout`` says; ``send_and_receive`` has
the same limit. Lost replies are handled as Flower handles them: a node that went away gets an error
reply from the SuperLink (which counts as an answer), a node that never answers is
waited for until ``timeout``, and whatever came by then is returned. A second reply to
the same request (never sent by Flower) is dropped, not returned twice; an error the
SuperLink made for a node is returned as that node's error (Flower's carries the
SuperLink's node id as its sender, which the strategy would have blamed on node 1).

:class:`PollingGrid` wraps a ``Grid`` so that code we do not own (Flower's ``FedAvg.start``,
used by the baselines) gets the same loop from ``send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import Error, Message
from flwr.common import log
from flwr.serverapp import Grid

FIRST_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 0.2
BACKOFF = 1.5
SLOW_PHASE_SECONDS = 30.0


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
             first_poll: float = FIRST_POLL_SECONDS, max_poll: float = MAX_POLL_SECONDS,
             backoff: float = BACKOFF, clock: Callable[[], float] | None = None,
             sleep: Callable[[float], None] | None = None) -> list[Message]:
    """Push ``messages`` and return their replies (at most one per request), in arrival
    order. ``timeout`` (counted from the end of the push, as Flower does) None waits for
    every reply, as ``send_and_receive`` does.

    Every reply returned comes from the node its request was sent to: an error reply
    the SuperLink or the grid made on a node's behalf (sender: the SuperLink) is re-made
    as that node's error, with the same code and reason, so that the node is the one
    it is recorded against; any other reply whose sender is not the node asked is
    dropped and logged.

    ``clock`` and ``sleep`` default to the grid's own ``clock`` and ``sleep`` where it has
    them (a grid that keeps simulated time, as the tests' in-process grid does), else to
    ``time.monotonic`` and ``time.sleep``."""
    if not 0 < first_poll <= max_poll or backoff < 1:
        raise ValueError(f"expected 0 < first_poll <= max_poll and backoff >= 1, got "
                         f"first_poll={first_poll}, max_poll={max_poll}, backoff={backoff}")
    clock = clock or getattr(grid, "clock", None) or time.monotonic
    sleep = sleep or getattr(grid, "sleep", None) or time.sleep
    messages = list(messages)
    accepted = {str(i) for i in grid.push_messages(messages) if i}
    # The grid stamps each message with its id as it pushes it (flwr 1.41/1.42 do).
    requests = {m.metadata.message_id: m for m in messages if m.metadata.message_id in accepted}
    if len(requests) != len(accepted):
        raise RuntimeError(f"the grid accepted {len(accepted)} messages but stamped "
                           f"{len(requests)} of them with those ids: cannot tell which "
                           "node a reply answers")
    pending = set(requests)
    started = clock()
    deadline = None if timeout is None else started + timeout
    replies: list[Message] = []
    interval = first_poll
    while pending:
        # Positional: flwr 1.43 renames the parameter (``reply_to_message_ids``).
        pulled = list(grid.pull_messages(set(pending)))
        taken = 0
        for reply in pulled:
            answer = _answer(reply, requests, pending)
            if answer is not None:
                pending.discard(answer.metadata.reply_to_message_id)
                replies.append(answer)
                taken += 1
        if not pending:
            break
        # Replies come in bursts: poll fast while they flow. A phase that has run for
        # long (slow subscribers) is polled at most once a second.
        cap = max_poll if clock() - started < SLOW_PHASE_SECONDS else max(max_poll, 1.0)
        interval = first_poll if taken else min(cap, interval * backoff)
        wait = interval if deadline is None else min(interval, deadline - clock())
        if wait <= 0:
            break
        sleep(wait)
    return replies


def _answer(reply: Message, requests: dict[str, Message], pending: set[str]) -> Message | None:
    """The reply as the strategy should see it, or None to drop it (logged)."""
    request_id = reply.metadata.reply_to_message_id
    if request_id not in pending:
        log(WARNING, "dropped a reply from node %s to request %s: not awaited (a second "
            "reply, or not ours)", reply.metadata.src_node_id, request_id)
        return None
    request = requests[request_id]
    node = request.metadata.dst_node_id
    if reply.metadata.src_node_id == node:
        return reply
    if reply.has_error():  # made by the SuperLink or the grid for this node
        return Message(Error(code=reply.error.code, reason=reply.error.reason),
                       reply_to=request)
    log(WARNING, "dropped a reply to request %s: sent by node %s, but the request went to "
        "node %s", request_id, reply.metadata.src_node_id, node)
    return None


class PollingGrid(Grid):
    """``grid`` with :func:`exchange` as its ``send_and_receive``; everything else is
    delegated unchanged."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    @property
    def run(self):  # type: ignore[no-untyped-def]  # flwr's Run
        return self._grid.run

    def set_run(self, run):  # type: ignore[no-untyped-def]  # flwr's Run
        self._grid.set_run(run)

    def create_message(self, content, message_type, dst_node_id, group_id,  # type: ignore[no-untyped-def]
                       ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]  # flwr's NodeInfo list
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return exchange(self._grid, messages, timeout=timeout)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._grid, name)  # e.g. close, and whatever newer flwr adds
