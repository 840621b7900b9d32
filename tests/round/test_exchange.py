"""The reply loop that replaces ``grid.send_and_receive``: it stops at the first complete
set of replies, polls fast while replies flow and backs off while none do, never sleeps
past its timeout, counts error replies (a node that went away) as answers, and drops
replies it did not ask for."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from server.round.exchange import PollingGrid, exchange


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedGrid:
    """Replies become available at given (fake) times after the push; ``extra`` are
    replies nobody asked for, offered at every pull."""

    def __init__(self, clock: Clock, ready_at: dict[int, float | None],
                 errors: frozenset[int] = frozenset()) -> None:
        self.clock, self.ready_at, self.errors = clock, ready_at, errors
        self.requests: dict[str, Message] = {}
        self.pulls: list[float] = []
        self.extra: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for n, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"id-{msg.metadata.dst_node_id}-{n}"
            self.requests[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls.append(self.clock.now)
        out = []
        for mid in message_ids:
            msg = self.requests[mid]
            node = msg.metadata.dst_node_id
            at = self.ready_at[node]
            if at is not None and self.clock.now >= at:
                if node in self.errors:
                    out.append(Message(Error(code=1, reason="node offline"), reply_to=msg))
                else:
                    out.append(Message(RecordDict({"c": ConfigRecord({"node": node})}),
                                       reply_to=msg))
        return out + self.extra


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]


def test_stops_at_the_first_complete_set_and_polls_fast_while_replies_flow() -> None:
    clock = Clock()
    grid = ScriptedGrid(clock, {1: 0.3, 2: 0.31, 3: 0.32})
    replies = exchange(grid, _messages([1, 2, 3]), timeout=30, clock=clock, sleep=clock.sleep)
    assert sorted(r.content["c"]["node"] for r in replies) == [1, 2, 3]
    assert clock.now < 0.3 + 0.2 + 1e-9  # done within one max poll of the last reply
    assert grid.pulls[0] == 0.0  # the first pull is at once
    # backs off while nothing comes (x1.5 from 0.05, capped at 0.2) ...
    assert clock.sleeps[:3] == pytest.approx([0.075, 0.1125, 0.16875])
    assert max(clock.sleeps) <= 0.2 + 1e-12
    # ... and once a reply came, the next pull is 0.05 s later
    first_reply_pull = next(i for i, t in enumerate(grid.pulls) if t >= 0.3)
    if first_reply_pull + 1 < len(grid.pulls):
        assert grid.pulls[first_reply_pull + 1] - grid.pulls[first_reply_pull] == \
            pytest.approx(0.05)


def test_flowers_send_and_receive_would_have_waited_three_seconds() -> None:
    """The difference this module makes on a deployed SuperLink, in fake time."""
    clock = Clock()
    grid = ScriptedGrid(clock, {1: 0.4})
    exchange(grid, _messages([1]), timeout=30, clock=clock, sleep=clock.sleep)
    assert clock.now <= 0.6
    # Flower's HttpGrid loop: pull, sleep 3 s, pull: 3.0 s for the same reply.


def test_timeout_returns_what_came_and_never_sleeps_past_it() -> None:
    clock = Clock()
    grid = ScriptedGrid(clock, {1: 0.1, 2: None, 3: 5.0})
    replies = exchange(grid, _messages([1, 2, 3]), timeout=2.0, clock=clock, sleep=clock.sleep)
    assert [r.content["c"]["node"] for r in replies] == [1]
    assert clock.now == pytest.approx(2.0)


def test_an_error_reply_from_a_lost_node_is_an_answer_and_does_not_stall_the_round() -> None:
    clock = Clock()
    grid = ScriptedGrid(clock, {1: 0.2, 2: 0.25}, errors=frozenset({2}))
    replies = exchange(grid, _messages([1, 2]), timeout=300, clock=clock, sleep=clock.sleep)
    assert len(replies) == 2 and sum(r.has_error() for r in replies) == 1
    assert clock.now < 1.0


def test_replies_not_asked_for_and_second_replies_are_dropped() -> None:
    clock = Clock()
    grid = ScriptedGrid(clock, {1: 0.0, 2: 0.3})
    stranger = Message(RecordDict(), dst_node_id=9, message_type="train")
    stranger.metadata.__dict__["_message_id"] = "not-ours"
    grid.extra = [Message(RecordDict(), reply_to=stranger)]
    replies = exchange(grid, _messages([1, 2]), timeout=30, clock=clock, sleep=clock.sleep)
    # node 1's reply is offered at every pull after its first; it is returned once
    assert sorted(r.content["c"]["node"] for r in replies) == [1, 2]
    assert all(r.metadata.reply_to_message_id != "not-ours" for r in replies)


def test_messages_the_grid_did_not_accept_are_not_waited_for() -> None:
    clock = Clock()

    class Refusing(ScriptedGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            ids = super().push_messages(messages)
            return [ids[0], ""]  # Flower's push returns no id for a message it dropped

    grid = Refusing(clock, {1: 0.1, 2: None})
    replies = exchange(grid, _messages([1, 2]), timeout=None, clock=clock, sleep=clock.sleep)
    assert len(replies) == 1 and clock.now < 0.5


def test_bad_polling_parameters_are_refused() -> None:
    grid = ScriptedGrid(Clock(), {})
    for kwargs in ({"first_poll": 0}, {"first_poll": 0.5, "max_poll": 0.2}, {"backoff": 0.5}):
        with pytest.raises(ValueError, match="expected 0 < first_poll"):
            exchange(grid, [], timeout=1, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 20)), min_size=1, max_size=8),
       st.floats(0.5, 15))
def test_property_every_ready_reply_is_returned_once_and_time_is_bounded(
        ready: list[float | None], timeout: float) -> None:
    clock = Clock()
    nodes = list(range(1, len(ready) + 1))
    grid = ScriptedGrid(clock, dict(zip(nodes, ready, strict=True)))
    replies = exchange(grid, _messages(nodes), timeout=timeout, clock=clock, sleep=clock.sleep)
    got = [r.content["c"]["node"] for r in replies]
    assert len(got) == len(set(got))
    in_time = {n for n, at in zip(nodes, ready, strict=True) if at is not None and at <= timeout}
    # every reply ready before the deadline minus one poll is collected; nothing later
    assert {n for n, at in zip(nodes, ready, strict=True)
            if at is not None and at <= timeout - 0.2} <= set(got) <= in_time
    assert clock.now <= timeout + 1e-9
    everything = [at for at in ready if at is not None]
    if len(everything) == len(ready) and max(everything) <= timeout - 0.2:
        assert clock.now <= max(everything) + 0.2 + 1e-9  # stopped at the complete set


def test_polling_grid_delegates_and_uses_the_fast_loop() -> None:
    clock = Clock()
    inner = ScriptedGrid(clock, {1: 0.0})
    inner.get_node_ids = lambda: [1]  # type: ignore[attr-defined]
    inner.get_nodes = lambda: ["node-info"]  # type: ignore[attr-defined]
    inner.close = lambda: "closed"  # type: ignore[attr-defined]
    grid = PollingGrid(inner)  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [1]
    assert list(grid.get_nodes()) == ["node-info"]  # a concrete Grid method: delegated too
    assert grid.close() == "closed"  # anything else reaches the wrapped grid
    replies = list(grid.send_and_receive(_messages([1]), timeout=10))
    assert len(replies) == 1 and len(inner.pulls) == 1


def _as_if_from(node: int, request: Message, *, error: bool) -> Message:
    """A reply to ``request`` whose sender is ``node`` (1: the SuperLink)."""
    twin = Message(RecordDict(), dst_node_id=node, message_type=request.metadata.message_type)
    twin.metadata.__dict__["_message_id"] = request.metadata.message_id
    if error:
        return Message(Error(code=3, reason="node offline"), reply_to=twin)
    return Message(RecordDict({"c": ConfigRecord({"node": node})}), reply_to=twin)


class ForgingGrid(ScriptedGrid):
    """Also offers, first at every pull while the request to ``victim`` is pending, a
    reply to it from ``sender``: an error (the SuperLink answering for an offline node)
    or content (an impostor)."""

    def __init__(self, clock: Clock, ready_at: dict[int, float | None], *, victim: int,
                 sender: int, error: bool) -> None:
        super().__init__(clock, ready_at)
        self.victim, self.sender, self.error = victim, sender, error

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = super().pull_messages(message_ids)
        request = next(m for m in self.requests.values()
                       if m.metadata.dst_node_id == self.victim)
        if request.metadata.message_id in set(message_ids):
            out.insert(0, _as_if_from(self.sender, request, error=self.error))
        return out


def test_an_error_the_superlink_made_for_a_node_is_that_nodes_error() -> None:
    """Flower's SuperLink answers for an offline node with its own node id (1) as the
    sender; the strategy must record the failure against the node asked, not node 1."""
    clock = Clock()
    grid = ForgingGrid(clock, {1: 0.0, 2: None}, victim=2, sender=1, error=True)
    replies = exchange(grid, _messages([1, 2]), timeout=30, clock=clock, sleep=clock.sleep)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert set(by_node) == {1, 2}
    assert by_node[2].has_error() and by_node[2].error.reason == "node offline"
    assert by_node[2].error.code == 3
    assert not by_node[1].has_error()
    assert clock.now < 1  # an answer, not a wait for the timeout


def test_a_reply_claiming_another_sender_is_dropped() -> None:
    clock = Clock()
    grid = ForgingGrid(clock, {1: 0.0, 2: 0.3}, victim=2, sender=7, error=False)
    replies = exchange(grid, _messages([1, 2]), timeout=30, clock=clock, sleep=clock.sleep)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert all(r.content["c"]["node"] == r.metadata.src_node_id for r in replies)


def test_the_timeout_counts_from_the_end_of_the_push() -> None:
    clock = Clock()

    class SlowPush(ScriptedGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            clock.now += 5.0  # a push that takes longer than the timeout
            return super().push_messages(messages)

    grid = SlowPush(clock, {1: 5.5})
    replies = exchange(grid, _messages([1]), timeout=2.0, clock=clock, sleep=clock.sleep)
    assert len(replies) == 1 and clock.now <= 7.0


def test_a_long_phase_is_polled_at_most_once_a_second() -> None:
    clock = Clock()
    grid = ScriptedGrid(clock, {1: 100.0})
    exchange(grid, _messages([1]), timeout=200, clock=clock, sleep=clock.sleep)
    late = [b - a for a, b in zip(grid.pulls, grid.pulls[1:], strict=False) if a > 40]
    assert late and max(late) == pytest.approx(1.0)
    early = [b - a for a, b in zip(grid.pulls, grid.pulls[1:], strict=False) if b < 29]
    assert max(early) <= 0.2 + 1e-9


def test_a_grid_that_does_not_stamp_message_ids_is_refused() -> None:
    class Unstamped(ScriptedGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            return [f"id-{n}" for n, _ in enumerate(messages)]  # ids not on the messages

    with pytest.raises(RuntimeError, match="cannot tell which node a reply answers"):
        exchange(Unstamped(Clock(), {1: 0.0}), _messages([1]), timeout=1)
