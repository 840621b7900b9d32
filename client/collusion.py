"""The colluders' side channel for model poisoning (Baruch et al. 2019; Xie et al. 2020;
Shejwalkar & Houmansadr 2021): the attackers pool the honest updates of all their
partitions, craft one malicious update from them (``client.model_poisoning.craft``) and
each submits it.

In simulation the channel is a bounded in-process cache: Flower runs every ClientApp of
a Ray actor in one process, so the first colluder to train in a round trains every
attacker partition once (``train_partition``) and the others read the pool. With
several actors each process fills its own cache: the same pool, computed more than once
(training is seeded per partition and round). Entries are keyed by the caller's
``ChannelKey`` (run scope, config digest, round, base-model digest); the oldest are
dropped beyond ``max_entries``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from client.model_poisoning import craft, flatten, unflatten

ChannelKey = tuple[str, str, int, str]
MAX_ENTRIES = 4


@dataclass(frozen=True)
class HonestUpdate:
    """One attacker partition's honest round: its update and what its DP accountant
    records for that training (``steps`` steps at ``noise_multiplier``, ``sample_rate``)."""

    delta: dict[str, np.ndarray]
    train_loss: float
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class _Entry:
    honest: dict[int, HonestUpdate]
    crafted: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pool:
    """What a colluder reads from the channel: every partition's honest update and the
    crafted update all colluders submit."""

    honest: Mapping[int, HonestUpdate]
    crafted: dict[str, np.ndarray]


class CollusionChannel:
    """A bounded, thread-safe cache of pooled honest updates, one entry per key."""

    def __init__(self, *, max_entries: int = MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"expected max_entries >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[ChannelKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def pool(
        self,
        key: ChannelKey,
        *,
        kind: str,
        partition_ids: Sequence[int],
        train_partition: Callable[[int], HonestUpdate],
        num_clients: int,
        num_byzantine: int,
    ) -> Pool:
        """The pool for ``key``: trains each of ``partition_ids`` (``train_partition``)
        the first time the key is asked for, then crafts ``kind`` once from their
        updates stacked in partition order.

        Raises ValueError for no partitions and as ``craft``; whatever
        ``train_partition`` raises propagates and nothing is cached."""
        if not partition_ids:
            raise ValueError("expected at least one colluding partition, got none")
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry({pid: train_partition(pid) for pid in sorted(partition_ids)})
                self._entries[key] = entry
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
            if kind not in entry.crafted:
                entry.crafted[kind] = craft_update(kind, entry.honest, num_clients=num_clients,
                                                   num_byzantine=num_byzantine)
            return Pool(entry.honest, entry.crafted[kind])


def craft_update(kind: str, honest: Mapping[int, HonestUpdate], *, num_clients: int,
                 num_byzantine: int) -> dict[str, np.ndarray]:
    """``craft(kind, ...)`` of the honest updates (in partition order), cut back into the
    model's arrays and dtypes.

    Raises ValueError for no updates and as ``craft``."""
    if not honest:
        raise ValueError("expected at least one honest update, got none")
    updates = [honest[pid].delta for pid in sorted(honest)]
    like = updates[0]
    vector = craft(kind, flatten(updates, list(like)), num_clients=num_clients,
                   num_byzantine=num_byzantine)
    return unflatten(vector, like)


def extend_history(history: Sequence[tuple[float, float, int]], *, noise_multiplier: float,
                   sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
    """The accountant history after ``steps`` more steps, merged as Opacus'
    ``RDPAccountant.step`` / ``PRVAccountant.step`` merge them (a run of equal noise and
    sample rate is one entry), so a colluder whose round was trained by another keeps
    the history its own training would have left."""
    out = [tuple(h) for h in history]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        last = out.pop()
        out.append((last[0], last[1], int(last[2]) + steps))
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out  # type: ignore[return-value]


CHANNEL = CollusionChannel()
