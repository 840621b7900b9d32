"""In-process progress hook: ``poi simulate`` / ``poi compare`` subscribe to round events
of a ServerApp running in the same process (Flower's simulation runs the ServerApp in a
thread). Under ``flwr run`` nobody subscribes and events go nowhere."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_listeners: list[Callable[[dict[str, Any]], None]] = []
_lock = threading.Lock()


def subscribe(listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Register ``listener``; returns a function that unregisters it."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(event: dict[str, Any]) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event)
