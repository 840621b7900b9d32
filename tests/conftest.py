"""Shared fixtures: Flower's task identity (Messages need a run id outside a runtime) and an
in-process Grid that delivers messages straight to the real ClientApp handlers, so the
strategy and the subscriber are tested together without Ray."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
warnings.filterwarnings("ignore")


def set_task_identity() -> None:
    """Flower's message constructors read this process-wide identity (set for
    module-scoped fixtures too, which run before the autouse one)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 4242
    TaskIdentity.node_id = 1


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    set_task_identity()


Handler = Callable[[Any, Any], Any]


class InProcessGrid:
    """A Flower ``Grid`` whose nodes are ClientApp handler functions in this process.

    ``tamper`` may rewrite any reply (node id, reply) -> reply, to inject bad input; a
    reply it turns into None is lost, and the reply loop then waits out its timeout in
    this grid's simulated time (``clock``/``sleep``), not in real time."""

    def __init__(self, contexts: dict[int, Any], handlers: dict[str, Handler],
                 tamper: Callable[[int, Any], Any] | None = None) -> None:
        self.contexts = contexts
        self.handlers = handlers
        self.tamper = tamper
        self.sent: list[Any] = []
        self._replies: list[Any] = []
        self._count = 0
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        """Deliver each message now (as Flower's grid would, under a fresh message id);
        the replies wait for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._count}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            handler = self.handlers.get(msg.metadata.message_type)
            if handler is None and msg.metadata.message_type == "query.witness":
                from client.client_app import witness  # every subscriber witnesses the end

                handler = witness
            assert handler is not None, msg.metadata.message_type
            reply = handler(msg, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            ids.append(msg.metadata.message_id)
            if reply is not None:
                self._replies.append(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        wanted = set(message_ids)
        out = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in out]
        return out

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        from server.round.exchange import exchange

        return exchange(self, messages, timeout=timeout)


def reply_tensors(record: Any, hidden_units: int = 32, activation: str = "square") -> dict[str, Any]:
    """The tensors of a reply's ArrayRecord: packed (``client.wire``, laid out as the task
    model) as PoI's subscribers send them, or one Array per tensor."""
    from client.task import get_weights, make_model
    from client.wire import is_packed, unpack
    from server.round.strategy import arrays_to_numpy

    if is_packed(record):
        layout = get_weights(make_model(hidden_units=hidden_units, activation=activation, seed=0))
        return unpack(record, layout)
    return arrays_to_numpy(record)


def make_contexts(run_config: dict[str, Any], num_nodes: int, **node_extra: Any) -> dict[int, Any]:
    from flwr.app import Context, RecordDict

    return {
        1000 + pid: Context(
            run_id=4242, node_id=1000 + pid,
            node_config={"partition-id": pid, "num-partitions": num_nodes, **node_extra},
            state=RecordDict(), run_config=dict(run_config),
        )
        for pid in range(num_nodes)
    }
