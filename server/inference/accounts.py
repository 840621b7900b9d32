"""Buyers' money: the ledger index the service reads balances from, and the voucher chain
that reserves a request's price at admission so nothing is served beyond what is paid.

:class:`LedgerIndex` reads the settled task once and then only the entries appended since
(keys, funds, fee settlements), when the ledger files' size or mtime changed: a look-up
of an unknown account costs a ``stat``, not a ledger re-read. What a buyer may spend is
its ledger balance exactly as the audit computes it (``server.market.replay.balances``:
funds minus escrow and settled fees, plus payouts received), recomputed when entries
were appended, plus what it already settled to this service: the Scientist's escrowed
reward, for one, buys nothing.

:class:`Accounts` keeps, per buyer, the charged total (what served requests cost), the
reserved total (charged + requests admitted and still computing), the last admitted nonce
and the latest served voucher. Admission is one step under the buyer's lock: nonce above
the last one, ``cumulative == reserved + price``, ``cumulative <= funded``; then
``reserved = cumulative``. A buyer may pipeline: a voucher whose cumulative is ahead of
``reserved + price`` waits up to ``pipeline_wait`` seconds for its predecessors to be
admitted. Requests are settled in nonce order: a request is charged (``charged =
cumulative``) only after every earlier one was resolved; when a computation fails, its
reservation and those of every later request of the same chain are released
(``reserved`` goes back to ``charged``), so the charged total is always the cumulative of
a voucher the buyer signed, equal to the sum of the prices of the requests served, and
never decreases.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from ledger import LogReader
from ledger.blobs import BlobStore
from ledger.entries import Entry, parse_entry, with_bulk
from server.inference.requests import ServiceError
from server.market.replay import balances, read_market
from server.market.scientist import MarketError

PIPELINE_WAIT_SECONDS = 2.0  # a voucher ahead of the chain waits this long for the rest
MAX_WAITING = 16  # vouchers of one buyer waiting for their predecessors at once


# ------------------------------------------------------------------------ ledger index
@dataclass
class TaskView:
    """What the service needs from the ledger, kept current by :class:`LedgerIndex`."""

    task_id: str
    origin: str
    operator: str
    scientist: str
    buyer_fee: int
    share_ppm: int
    contributions: dict[str, int]
    model_digest: str
    model_index: int
    activation: str
    hidden_units: int
    features: int
    classes: int
    keys: dict[str, bytes] = field(default_factory=dict)  # key id -> raw public key
    funded: dict[str, int] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)  # buyer -> settled cumulative
    # buyer -> (nonce, voucher, signature) of the settlement with the highest cumulative
    settled_voucher: dict[str, tuple[int, dict[str, Any], str]] = field(default_factory=dict)
    # buyer -> the highest cumulative its money covers: ledger balance + settled cumulative
    # (replaced as a whole by LedgerIndex, never updated in place)
    spendable: dict[str, int] = field(default_factory=dict)

    def apply(self, entry: Entry) -> None:
        """Take one ledger entry into the accounts (entries in log order)."""
        if entry.kind == "key":
            self.keys[entry.author] = base64.b64decode(str(entry.fields["public_key"]))
        elif entry.kind == "fund" and entry.author == self.operator:
            account = str(entry.fields["account"])
            self.funded[account] = self.funded.get(account, 0) + int(entry.fields["amount"])
        elif (entry.kind == "fee_settlement" and entry.author == self.operator
              and entry.fields["task_id"] == self.task_id):
            buyer = str(entry.fields["buyer"])
            cumulative = int(entry.fields["cumulative"])
            if cumulative >= self.settled.get(buyer, 0):
                voucher = dict(entry.fields["voucher"])  # type: ignore[call-overload]
                self.settled_voucher[buyer] = (int(voucher["nonce"]), voucher,
                                               str(entry.fields["voucher_signature"]))
            self.settled[buyer] = max(self.settled.get(buyer, 0), cumulative)


def read_task(db: Path) -> TaskView:
    """Read the settled task from the ledger; :class:`ServiceError` (503) when the task
    cannot be served yet (no settlement: fees could not be split)."""
    return _read_task(db)[0]


def _read_task(db: Path) -> tuple[TaskView, list[tuple[int, Entry]]]:
    with LogReader.open(db) as reader:
        entries = list(reader.entries())
        origin = reader.checkpoint().split("\n", 1)[0]
    try:
        record = read_market(entries)
    except MarketError as exc:
        raise ServiceError(503, f"the ledger holds no market to serve: {exc}") from exc
    if record.settlement_index is None:
        raise ServiceError(503, "the task is not settled yet: fees cannot be split")
    last = max(record.models, default=0)
    model_index = next((i for i, e in entries if e.kind == "model"
                        and e.author == record.operator and e.fields["round"] == last), -1)
    view = TaskView(
        task_id=record.task_id, origin=origin, operator=record.operator,
        scientist=record.scientist, buyer_fee=int(record.offer["buyer_fee"]),
        share_ppm=int(record.offer["scientist_fee_share_ppm"]),
        contributions={str(k): int(v) for k, v in record.settlement["payouts"].items()},
        model_digest=record.models.get(last, record.initial_model_digest),
        model_index=model_index,
        activation=str(record.offer["architecture"]["activation"]),
        hidden_units=int(record.offer["architecture"]["hidden_units"]),
        features=int(record.offer["architecture"]["input_dim"]),
        classes=int(record.offer["architecture"]["num_classes"]),
    )
    for _, entry in entries:
        view.apply(entry)
    _update_spendable(view, entries)
    return view, entries


def _update_spendable(view: TaskView, entries: list[tuple[int, Entry]]) -> None:
    balance, _ = balances(entries, operator=view.operator)
    view.spendable = {account: amount + view.settled.get(account, 0)
                      for account, amount in balance.items()}


class LedgerIndex:
    """The task view, refreshed from the entries appended since the last read."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._token = self._stat()
        self.view, self.entries = _read_task(db)
        self.size = len(self.entries)
        self.refreshes = 0

    def _stat(self) -> tuple[int, ...]:
        out: list[int] = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(f"{self.db}{suffix}")
                out += [st.st_size, st.st_mtime_ns]
            except OSError:
                out += [-1, -1]
        return tuple(out)

    def refresh(self, *, force: bool = False) -> bool:
        """Read the entries appended since the last read, if the ledger files changed (or
        ``force``); returns whether any were. Call it from one thread only."""
        token = self._stat()
        if token == self._token and not force:
            return False
        self._token = token
        with LogReader.open(self.db) as reader:
            rows = reader.connection.execute(
                "SELECT idx, CAST(leaf AS BLOB) FROM entries WHERE idx >= ? ORDER BY idx",
                (self.size,)).fetchall()
        blobs = BlobStore.beside(self.db)
        for index, leaf in rows:
            # a large fee settlement keeps its voucher and payout lines in a bulk blob
            entry = with_bulk(parse_entry(bytes(leaf)), blobs.get)
            self.view.apply(entry)
            self.entries.append((int(index), entry))
            self.size = int(index) + 1
        if rows:
            _update_spendable(self.view, self.entries)
        self.refreshes += 1
        return bool(rows)


# --------------------------------------------------------------------- voucher chains
@dataclass
class Reservation:
    """One admitted request: the amount [start, end) of the buyer's chain it reserves."""

    buyer: str
    nonce: int
    start: int
    end: int
    epoch: int
    prev: Reservation | None
    voucher: dict[str, Any]
    signature: str
    served: asyncio.Future[bool]


@dataclass
class Account:
    charged: int = 0  # served requests' prices, = the cumulative of the latest served voucher
    last_nonce: int = -1
    voucher: dict[str, Any] | None = None
    signature: str = ""
    reserved: int = 0  # charged + admitted requests still computing
    epoch: int = 0  # bumped when a failure releases the chain's tail
    tail: Reservation | None = None
    waiting: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


# (buyer, charged, last nonce, latest served voucher, its signature): durable before the
# account changes in memory; any exception means nothing was recorded
Persist = Callable[[str, int, int, "dict[str, Any] | None", str], Awaitable[None]]


class Accounts:
    """Per-buyer voucher chains; ``persist`` makes an account's nonce and charge durable
    (called under the buyer's lock with the new values, before the account changes in
    memory: a failed write leaves the account as it was and answers 503)."""

    def __init__(self, saved: dict[str, tuple[int, int, dict[str, Any] | None, str]],
                 persist: Persist, *, pipeline_wait: float = PIPELINE_WAIT_SECONDS,
                 settled: dict[str, tuple[int, int, dict[str, Any], str]] | None = None
                 ) -> None:
        """``saved``: buyer -> (charged, last nonce, voucher, signature) from the store;
        ``settled``: buyer -> (cumulative, nonce, voucher, signature) of its latest
        ``fee_settlement`` on the ledger. The ledger wins where the store is behind it
        (a lost or restored ``state.db``): charged = reserved = max(saved, settled) and the
        last nonce at least the settled voucher's, so no settled voucher is admitted
        again."""
        self.accounts: dict[str, Account] = {}
        for key, (charged, nonce, voucher, signature) in saved.items():
            self.accounts[key] = Account(charged, nonce, voucher, signature, reserved=charged)
        for key, (cumulative, nonce, voucher, signature) in (settled or {}).items():
            account = self.get(key)
            account.last_nonce = max(account.last_nonce, nonce)
            if cumulative > account.charged:
                account.charged = account.reserved = cumulative
                account.voucher, account.signature = voucher, signature
        self.persist = persist
        self.pipeline_wait = pipeline_wait

    def get(self, buyer: str) -> Account:
        account = self.accounts.get(buyer)
        if account is None:
            account = self.accounts[buyer] = Account()
        return account

    def peek(self, buyer: str) -> Account | None:
        return self.accounts.get(buyer)

    def precheck(self, buyer: str, voucher: dict[str, Any]) -> None:
        """409 for a nonce already used (before the body is read; admission re-checks)."""
        account = self.accounts.get(buyer)
        if account is not None and voucher["nonce"] <= account.last_nonce:
            raise ServiceError(409, f"replayed nonce: expected > {account.last_nonce}, "
                                    f"got {voucher['nonce']}")

    async def admit(self, buyer: str, voucher: dict[str, Any], signature: str, price: int,
                    funded: Callable[[int], int]) -> Reservation:
        """Reserve ``price`` for this voucher (409 nonce or cumulative, 402 balance, 429
        too many waiting); ``funded(cumulative)`` gives the buyer's funded total."""
        account = self.get(buyer)
        nonce, cumulative = voucher["nonce"], voucher["cumulative"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pipeline_wait
        async with account.changed:
            while True:
                if nonce <= account.last_nonce:
                    raise ServiceError(409, f"replayed nonce: expected > {account.last_nonce}, "
                                            f"got {nonce}")
                expected = account.reserved + price
                if cumulative == expected:
                    break
                left = deadline - loop.time()
                if cumulative < expected or left <= 0 or account.waiting >= MAX_WAITING:
                    raise ServiceError(409, _chain_message(account, price, cumulative))
                account.waiting += 1
                try:
                    await asyncio.wait_for(account.changed.wait(), left)
                except TimeoutError:
                    pass
                finally:
                    account.waiting -= 1
            available = funded(cumulative)
            if available < cumulative:
                raise ServiceError(402, f"insufficient balance: {available - account.reserved} "
                                        f"left (funded {available}, charged {account.charged}, "
                                        f"in flight {account.reserved - account.charged}), this "
                                        f"request costs {price}")
            prev = account.tail if account.tail is not None else None
            reservation = Reservation(buyer, nonce, account.reserved, cumulative, account.epoch,
                                      prev, voucher, signature, loop.create_future())
            await self._durably(buyer, account.charged, nonce, account.voucher,
                                account.signature, "admitted")
            # the nonce is spent from here on
            account.reserved, account.last_nonce, account.tail = cumulative, nonce, reservation
            account.changed.notify_all()
        return reservation

    async def resolve(self, reservation: Reservation, ok: bool) -> bool:
        """Charge the reservation if its computation succeeded (``ok``) and every earlier
        request of its chain was served; else release it. Returns whether it is served;
        raises :class:`ServiceError` (503) when the charge cannot be recorded (then it is
        released like a failed computation). The reservation's ``served`` future is set
        on every path, so later requests of the chain never wait for ever."""
        served = False
        try:
            previous_ok = True
            if reservation.prev is not None:
                previous_ok = await asyncio.shield(reservation.prev.served)
            account = self.get(reservation.buyer)
            async with account.changed:
                try:
                    if ok and previous_ok and reservation.epoch == account.epoch:
                        assert account.charged == reservation.start, "chain out of order"
                        await self._durably(reservation.buyer, reservation.end,
                                            account.last_nonce, reservation.voucher,
                                            reservation.signature, "served")
                        account.charged = reservation.end
                        account.voucher = reservation.voucher
                        account.signature = reservation.signature
                        served = True
                        if account.tail is reservation:  # nothing in flight any more
                            account.tail = None
                finally:
                    if not served and reservation.epoch == account.epoch:
                        # the first failure of this chain releases it and every later
                        # request of it
                        assert account.charged == reservation.start, "chain out of order"
                        account.reserved = account.charged
                        account.epoch += 1
                        account.tail = None
                    account.changed.notify_all()
        finally:
            if not reservation.served.done():
                reservation.served.set_result(served)
        return served

    async def _durably(self, buyer: str, charged: int, last_nonce: int,
                       voucher: dict[str, Any] | None, signature: str, what: str) -> None:
        try:
            await self.persist(buyer, charged, last_nonce, voucher, signature)
        except Exception as exc:  # noqa: BLE001 - any failure to record: nothing happened
            log(WARNING, "poi serve: could not record buyer %s: %s", buyer[:16], exc)
            raise ServiceError(503, f"the service could not record this request ({what}); "
                                    "nothing charged: retry", {"Retry-After": "2"}) from None


def _chain_message(account: Account, price: int, cumulative: int) -> str:
    return (f"voucher: expected cumulative {account.reserved + price} ({account.charged} "
            f"charged + {account.reserved - account.charged} in flight + this request's "
            f"{price}), got {cumulative}")
