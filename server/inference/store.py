"""What the service keeps across restarts, in ``RUN_DIR/inference/``: each buyer's charged
total, last nonce and latest served voucher, and the registered public contexts.

SQLite with ``synchronous=FULL`` (a charge is durable before its reply leaves); context
files named by their SHA-256. One service at a time: the store holds an exclusive
``flock`` on ``inference/serve.lock`` while it is open (:class:`StoreBusy` otherwise), so
two ``poi serve`` of one run cannot each admit the same voucher from their own copy of
the charged totals. Contexts are owned by the buyers who registered them (a
signed registration, ``crypto.vouchers.context_message``): each buyer keeps at most
:data:`CONTEXTS_PER_BUYER` (registering one more evicts its least recently used) and a
context unused for :data:`CONTEXT_TTL_SECONDS` expires; a file goes when no buyer holds
it any more. So storage is bounded by the funded buyers, not by whoever can connect.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTEXTS_PER_BUYER = 4
CONTEXT_TTL_SECONDS = 7 * 24 * 3600.0


class StoreBusy(OSError):
    """Another process (a second ``poi serve`` of the run) holds the store."""


@dataclass
class Held:
    layout: str
    last_used: float


class Store:
    """Buyers' accepted vouchers and the registered contexts, durable across restarts."""

    def __init__(self, folder: Path, *, contexts_per_buyer: int = CONTEXTS_PER_BUYER,
                 context_ttl: float = CONTEXT_TTL_SECONDS) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._lock = os.open(folder / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise StoreBusy(f"{folder} is in use by another poi serve of this run: expected "
                            "one service per run (stop the other first)") from None
        self.contexts_dir = folder / "contexts"
        self.contexts_dir.mkdir(exist_ok=True)
        self.spool_dir = folder / "tmp"
        self.spool_dir.mkdir(exist_ok=True)
        for stale in self.spool_dir.iterdir():  # bodies of requests cut by a restart
            stale.unlink(missing_ok=True)
        self.contexts_per_buyer = contexts_per_buyer
        self.context_ttl = context_ttl
        self.db = sqlite3.connect(folder / "state.db", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS buyers (key_id TEXT PRIMARY KEY, "
                        "cumulative INTEGER, last_nonce INTEGER, voucher TEXT, signature TEXT)")
        columns = [row[1] for row in self.db.execute("PRAGMA table_info(contexts)")]
        if columns and "owner" not in columns:  # before contexts had owners: start afresh
            self.db.execute("DROP TABLE contexts")
        self.db.execute("CREATE TABLE IF NOT EXISTS contexts (owner TEXT, id TEXT, "
                        "layout TEXT, size INTEGER, last_used REAL, PRIMARY KEY (owner, id))")
        self.held: dict[str, dict[str, Held]] = {}  # owner -> context id -> held
        for owner, context_id, layout, last_used in self.db.execute(
                "SELECT owner, id, layout, last_used FROM contexts"):
            self.held.setdefault(owner, {})[context_id] = Held(layout, last_used)
        self.expire()

    # ------------------------------------------------------------------- buyers
    def buyers(self) -> dict[str, tuple[int, int, dict[str, Any] | None, str]]:
        return {key: (cumulative, nonce, json.loads(voucher) if voucher else None, signature)
                for key, cumulative, nonce, voucher, signature in self.db.execute(
                    "SELECT key_id, cumulative, last_nonce, voucher, signature FROM buyers")}

    def save_buyer(self, key: str, charged: int, last_nonce: int,
                   voucher: dict[str, Any] | None, signature: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO buyers VALUES (?, ?, ?, ?, ?)",
                        (key, charged, last_nonce, json.dumps(voucher) if voucher else None,
                         signature))

    # ----------------------------------------------------------------- contexts
    def layout(self, owner: str, context_id: str) -> str | None:
        """The layout of ``owner``'s context (marking it used), or None."""
        held = self.held.get(owner, {}).get(context_id)
        if held is None:
            return None
        held.last_used = time.time()
        return held.layout

    def known_layout(self, context_id: str) -> str | None:
        """The layout some buyer registered (and the workers checked) this context with."""
        for mine in self.held.values():
            if context_id in mine:
                return mine[context_id].layout
        return None

    def count(self) -> int:
        return sum(len(h) for h in self.held.values())

    def add(self, owner: str, context_id: str, layout: str, spooled: Path, size: int
            ) -> list[str]:
        """Keep ``spooled`` (a checked context file) as ``owner``'s context; returns the
        ids this evicted from ``owner``'s quota."""
        path = self.contexts_dir / context_id
        if path.exists():
            spooled.unlink(missing_ok=True)
        else:
            os.replace(spooled, path)
        mine = self.held.setdefault(owner, {})
        evicted: list[str] = []
        if context_id not in mine:
            while len(mine) >= self.contexts_per_buyer:
                oldest = min(mine, key=lambda c: mine[c].last_used)
                self._drop(owner, oldest)
                evicted.append(oldest)
        mine[context_id] = Held(layout, time.time())
        self.db.execute("INSERT OR REPLACE INTO contexts VALUES (?, ?, ?, ?, ?)",
                        (owner, context_id, layout, size, mine[context_id].last_used))
        return evicted

    def _drop(self, owner: str, context_id: str) -> None:
        self.held.get(owner, {}).pop(context_id, None)
        if not self.held.get(owner):
            self.held.pop(owner, None)
        self.db.execute("DELETE FROM contexts WHERE owner = ? AND id = ?", (owner, context_id))
        if not any(context_id in h for h in self.held.values()):
            (self.contexts_dir / context_id).unlink(missing_ok=True)

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Drop contexts unused for the TTL and record the others' last use."""
        now = time.time() if now is None else now
        gone = [(owner, cid) for owner, mine in self.held.items() for cid, held in mine.items()
                if now - held.last_used > self.context_ttl]
        for owner, context_id in gone:
            self._drop(owner, context_id)
        self.db.executemany("UPDATE contexts SET last_used = ? WHERE owner = ? AND id = ?",
                            [(held.last_used, owner, cid) for owner, mine in self.held.items()
                             for cid, held in mine.items()])
        return gone

    def close(self) -> None:
        """Close the database and release the run for another service (idempotent)."""
        self.db.close()
        if self._lock >= 0:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = -1
