"""Flower's hard-coded waits that ``poi deploy``'s own launchers shorten, in one place.

Flower 1.41 pulls a message's objects (its arrays) with a backoff that starts at **1 s**
and doubles to 10 s whenever an object is not there yet
(``flwr.supercore.inflatable.inflatable_utils``). In a deployment it is often not there
yet, by design of the order Flower does things in:

- a SuperNode creates the ClientApp's task *before* it has pulled the message's objects
  from the SuperLink, so a ClientApp that starts quickly asks for them too early and
  sleeps 1 s, then 2 s;
- a SuperNode sees a message as soon as the ServerApp registered it, before the arrays
  were pushed, and sleeps 1 s.

Measured on a deployed 3-node PoI round (``benchmarks/deploy.py``, trace in
docs/deployment.md): 3.5 of a 4.3 s vote phase. :func:`fast_object_pulls` makes the
first retry 0.05 s, doubling to at most 1 s (Flower's ±20 % jitter kept), in the process
that calls it: the SuperNode launcher, each ClientApp (cap 0.2 s: it asks its own
SuperNode on 127.0.0.1) and the ServerApp (it sees a reply as soon as the SuperNode
registered it, before the arrays are pushed). Never the SuperLink.

These are flwr internals, not settings: :func:`unchecked_reason` says why not to touch
them on a release they were not checked against.
"""

from __future__ import annotations

CHECKED_FLWR = ("1.41.0", "1.42.0")  # 1.42.0's files for these are 1.41.0's
OBJECT_PULL_FIRST = 0.05
OBJECT_PULL_CAP = 1.0


def unchecked_reason() -> str | None:
    """None when the installed flwr is one these patches were checked against, else
    why not."""
    import flwr

    if flwr.__version__ not in CHECKED_FLWR:
        return f"flwr {flwr.__version__} is not one of {CHECKED_FLWR}"
    return None


def fast_object_pulls(first: float = OBJECT_PULL_FIRST, cap: float = OBJECT_PULL_CAP) -> None:
    """Retry a missing object after ``first`` seconds, doubling to ``cap`` (Flower: 1 s
    doubling to 10 s), for every later pull in this process. Flower also gives up after
    500 tries; with shorter waits that would come 10 to 50 times sooner (100 s at a
    0.2 s cap), so the try limit is lifted and Flower's own time limit (``max_time``,
    2 hours) is the only one, as long as it was. Raises ImportError or KeyError when the
    functions are not what Flower 1.41 has."""
    if not 0 < first <= cap:
        raise ValueError(f"expected 0 < first <= cap, got first={first}, cap={cap}")
    from flwr.supercore.inflatable import inflatable_utils as utils

    for function in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        wanted = ("initial_backoff", "backoff_cap", "max_tries_per_object", "max_time")
        if not defaults or any(name not in defaults for name in wanted):
            raise KeyError(f"{function.__name__} has no {'/'.join(wanted)}")
        if defaults["max_time"] is None:
            raise KeyError(f"{function.__name__}: no time limit to fall back on")
        defaults["initial_backoff"] = first
        defaults["backoff_cap"] = cap
        defaults["max_tries_per_object"] = None
