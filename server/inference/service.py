"""The encrypted prediction service (FastAPI, served by uvicorn): ``poi serve RUN_DIR``.

Buyers register a public CKKS context once, then send encrypted inputs with a signed,
cumulative voucher (``crypto/vouchers.py``) and get encrypted logits back that only
they can decrypt. The model never leaves the service; the service never sees an input.
Every prediction is charged the task's buyer fee against the buyer's balance on the
ledger (``fund`` entries); the operator records periodic ``fee_settlement`` entries that
split the fees between the Scientist and the subscribers (``server/market/fees.py``).

HE work runs in worker processes (TenSEAL holds the GIL), each with the model and a
cache of parsed contexts. Request and response formats: ``docs/buyer-api.md``.

State that must survive a restart (each buyer's last nonce, accepted cumulative amount
and latest voucher; registered contexts) lives in ``RUN_DIR/inference/`` (SQLite with
``synchronous=FULL``, context files named by their SHA-256).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from flwr.common import log

from crypto import vouchers
from ledger import LogReader
from ledger.blobs import BlobStore
from ledger.entries import make_key_entry, sign_entry
from ledger.errors import LedgerError, StoreError
from ledger.keys import Signer
from ledger.log import Log
from server.market.fees import split_fee
from server.market.replay import read_market
from server.market.scientist import MarketError

API = "/v1"
MAX_BODY_BYTES = {"single": 2 << 20, "batch": 64 << 20}
MAX_CONTEXT_BYTES = {"single": 96 << 20, "batch": 8 << 20}
CONTEXT_CACHE = 32  # parsed contexts per worker, least recently used evicted
SETTLE_EVERY = 1000  # unsettled predictions per buyer before a fee settlement
SETTLE_SECONDS = 30.0  # and at least this often while anything is unsettled
HEADER_PREFIX = "x-poi-"


class ServiceError(Exception):
    """A refused request: HTTP status and a message naming expected vs got."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ worker processes
_WORKER: dict[str, Any] = {}


def _init_worker(weights_blob: bytes, activation: str, contexts_dir: str) -> None:
    from crypto.digests import parse_canonical_tensor_bytes
    from crypto.he import EncryptedModel

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["model"] = EncryptedModel(parse_canonical_tensor_bytes(weights_blob), activation)
    _WORKER["dir"] = Path(contexts_dir)
    _WORKER["contexts"] = OrderedDict()


def _worker_context(context_id: str, layout: str) -> Any:
    from crypto.he import load_public_context

    cache: OrderedDict[str, Any] = _WORKER["contexts"]
    if context_id in cache:
        cache.move_to_end(context_id)  # least recently used goes first
    else:
        if len(cache) >= CONTEXT_CACHE:
            cache.popitem(last=False)
        data = (_WORKER["dir"] / context_id).read_bytes()
        cache[context_id] = load_public_context(data, layout,
                                                max_bytes=MAX_CONTEXT_BYTES[layout])
    return cache[context_id]


def _worker_ready(seconds: float) -> int:
    time.sleep(seconds)  # long enough that every worker process gets one
    return os.getpid()


def _worker_check_context(data: bytes, layout: str) -> None:
    from crypto.he import load_public_context

    load_public_context(data, layout, max_bytes=MAX_CONTEXT_BYTES[layout])


def _worker_predict(context_id: str, layout: str, body: bytes, count: int) -> bytes:
    model = _WORKER["model"]
    return bytes(model.predict(_worker_context(context_id, layout), body, count))


# ------------------------------------------------------------------------- ledger side
@dataclass
class TaskView:
    """What the service needs from the ledger, re-read when it may have changed."""

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
    keys: dict[str, bytes] = field(default_factory=dict)  # key id -> raw public key
    funded: dict[str, int] = field(default_factory=dict)
    settled: dict[str, int] = field(default_factory=dict)  # buyer -> settled cumulative


def read_task(db: Path) -> TaskView:
    """Read the settled task from the ledger; :class:`ServiceError` (503) when the task
    cannot be served yet (no settlement: fees could not be split)."""
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
    digest = record.models.get(last, record.initial_model_digest)
    view = TaskView(
        task_id=record.task_id, origin=origin, operator=record.operator,
        scientist=record.scientist, buyer_fee=int(record.offer["buyer_fee"]),
        share_ppm=int(record.offer["scientist_fee_share_ppm"]),
        contributions={str(k): int(v) for k, v in record.settlement["payouts"].items()},
        model_digest=digest, model_index=model_index,
        activation=str(record.offer["architecture"]["activation"]),
        hidden_units=int(record.offer["architecture"]["hidden_units"]),
    )
    for _, entry in entries:
        if entry.kind == "key":
            view.keys[entry.author] = base64.b64decode(str(entry.fields["public_key"]))
        elif entry.kind == "fund" and entry.author == record.operator:
            account = str(entry.fields["account"])
            view.funded[account] = view.funded.get(account, 0) + int(entry.fields["amount"])
        elif (entry.kind == "fee_settlement" and entry.author == record.operator
              and entry.fields["task_id"] == record.task_id):
            buyer = str(entry.fields["buyer"])
            view.settled[buyer] = max(view.settled.get(buyer, 0), int(entry.fields["cumulative"]))
    return view


def open_writer(run_dir: Path, origin: str, *, wait: float = 15.0) -> Log:
    """The log as its single writer, waiting for a moment if another writer (``poi buyer
    fund``) holds it."""
    operator = Signer.load(run_dir / "operator.pem")
    deadline = time.monotonic() + wait
    while True:
        try:
            return Log.open(run_dir / "ledger.db", operator, origin=origin, full_check=False)
        except StoreError as exc:
            if "another writer" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ------------------------------------------------------------------------ service state
@dataclass
class BuyerState:
    cumulative: int = 0  # accepted (charged) so far, minor units
    last_nonce: int = -1
    voucher: dict[str, Any] | None = None
    signature: str = ""


class Store:
    """Buyers' accepted vouchers and the registered contexts, durable across restarts."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.contexts_dir = folder / "contexts"
        self.contexts_dir.mkdir(exist_ok=True)
        self.db = sqlite3.connect(folder / "state.db", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS buyers (key_id TEXT PRIMARY KEY, "
                        "cumulative INTEGER, last_nonce INTEGER, voucher TEXT, signature TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS contexts (id TEXT PRIMARY KEY, "
                        "layout TEXT, size INTEGER)")

    def buyers(self) -> dict[str, BuyerState]:
        out = {}
        for key, cumulative, nonce, voucher, signature in self.db.execute(
                "SELECT key_id, cumulative, last_nonce, voucher, signature FROM buyers"):
            out[key] = BuyerState(cumulative, nonce, json.loads(voucher) if voucher else None,
                                  signature)
        return out

    def save_buyer(self, key: str, state: BuyerState) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO buyers VALUES (?, ?, ?, ?, ?)",
            (key, state.cumulative, state.last_nonce,
             json.dumps(state.voucher) if state.voucher else None, state.signature))

    def contexts(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT id, layout FROM contexts").fetchall())

    def save_context(self, context_id: str, layout: str, data: bytes) -> None:
        path = self.contexts_dir / context_id
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.db.execute("INSERT OR REPLACE INTO contexts VALUES (?, ?, ?)",
                        (context_id, layout, len(data)))


# ----------------------------------------------------------------------------- service
class InferenceService:
    def __init__(self, run_dir: Path, *, workers: int = 2, settle_every: int = SETTLE_EVERY,
                 settle_seconds: float = SETTLE_SECONDS) -> None:
        from crypto.he import LAYOUTS, PARAMS, max_batch

        self.run_dir = Path(run_dir)
        self.db = self.run_dir / "ledger.db"
        if not self.db.is_file():
            raise ServiceError(503, f"expected a ledger at {self.db}, found none")
        self.view = read_task(self.db)
        self.layouts = {name: {**PARAMS[name].to_json(), "max_batch": max_batch(name)}
                        for name in LAYOUTS}
        self.max_batch = {name: max_batch(name) for name in LAYOUTS}
        self.store = Store(self.run_dir / "inference")
        self.buyers = self.store.buyers()
        self.contexts = self.store.contexts()
        self.workers = workers
        self.settle_every = settle_every
        self.settle_seconds = settle_seconds
        self.lock = asyncio.Lock()
        self.settle_lock = asyncio.Lock()
        self.pool: ProcessPoolExecutor | None = None
        self.predictions = 0
        self.model_blob = BlobStore.beside(self.db).get(self.view.model_digest)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.model_blob, self.view.activation, str(self.store.contexts_dir)))
        # Python starts pool processes on demand: start them all now, so the first
        # concurrent requests do not wait for a worker to boot.
        warm = [self.pool.submit(_worker_ready, 0.2) for _ in range(self.workers)]
        for future in warm:
            future.result()

    async def stop(self) -> None:
        await self.settle()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        assert self.pool is not None, "service not started"
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------ endpoints
    def model_info(self) -> dict[str, Any]:
        with LogReader.open(self.db) as reader:
            checkpoint = reader.checkpoint()
            size = int(checkpoint.split("\n")[1])
            proof = reader.inclusion_proof(self.view.model_index, size)
            root = reader.root(size).hex()
            leaf = reader.entry(self.view.model_index)
            log_key = reader.log_key
        return {
            "task_id": self.view.task_id,
            "model_digest": self.view.model_digest,
            "ledger": {"index": self.view.model_index, "size": size, "root": root,
                       "entry": base64.b64encode(leaf).decode(),
                       "inclusion_proof": [base64.b64encode(h).decode() for h in proof],
                       "checkpoint": checkpoint, "log_key": log_key},
            "input": {"shape": [64], "dtype": "float32", "range": [0.0, 1.0],
                      "encoding": "8x8 digit image, row-major, pixel / 16"},
            "output": {"shape": [10], "meaning": "logits of classes 0..9"},
            "layouts": self.layouts,
            "fee": {"per_prediction": self.view.buyer_fee, "unit": "minor units",
                    "scientist_share_ppm": self.view.share_ppm},
            "limits": {"context_bytes": MAX_CONTEXT_BYTES, "body_bytes": MAX_BODY_BYTES},
        }

    async def register_context(self, layout: str, data: bytes) -> dict[str, Any]:
        if layout not in self.layouts:
            raise ServiceError(400, f"expected X-Poi-Layout in {sorted(self.layouts)}, "
                                    f"got {layout!r}")
        from crypto.he import HEError

        try:
            await self._run(_worker_check_context, data, layout)
        except HEError as exc:
            raise ServiceError(422, f"context refused: {exc}") from None
        context_id = hashlib.sha256(data).hexdigest()
        if context_id not in self.contexts:
            await asyncio.to_thread(self.store.save_context, context_id, layout, data)
            self.contexts[context_id] = layout
        return {"context_id": context_id, "layout": layout}

    def account(self, key: str) -> dict[str, Any]:
        state = self.buyers.get(key, BuyerState())
        funded = self.view.funded.get(key, 0)
        return {"buyer": key, "funded": funded, "charged": state.cumulative,
                "settled": self.view.settled.get(key, 0), "balance": funded - state.cumulative,
                "next_nonce": state.last_nonce + 1, "fee": self.view.buyer_fee}

    async def predict(self, headers: Mapping[str, str], body: bytes
                      ) -> tuple[bytes, dict[str, str]]:
        voucher, signature = _parse_voucher(headers)
        context_id = voucher["context_id"]
        layout = self.contexts.get(context_id)
        if layout is None:
            raise ServiceError(404, f"unknown context id {context_id[:16]}: register it with "
                                    f"POST {API}/contexts first")
        count = voucher["count"]
        if not 1 <= count <= self.max_batch[layout]:
            raise ServiceError(400, f"expected 1 <= count <= {self.max_batch[layout]} for the "
                                    f"{layout} layout, got {count}")
        if voucher["task_id"] != self.view.task_id:
            raise ServiceError(400, f"voucher: expected task {self.view.task_id}, "
                                    f"got {voucher['task_id']}")
        if voucher["body_sha256"] != hashlib.sha256(body).hexdigest():
            raise ServiceError(400, "voucher: body_sha256 does not match the request body")
        buyer = voucher["buyer"]
        if buyer not in self.view.keys:
            self.view = await asyncio.to_thread(read_task, self.db)
        raw = self.view.keys.get(buyer)
        if raw is None:
            raise ServiceError(403, f"buyer {buyer[:16]} has no key on the ledger: fund the "
                                    "account first (poi buyer fund)")
        try:
            vouchers.verify(raw, voucher, signature)
        except vouchers.VoucherError as exc:
            raise ServiceError(401, str(exc)) from None
        price = count * self.view.buyer_fee
        async with self.lock:
            state = self.buyers.setdefault(buyer, BuyerState())
            if voucher["nonce"] <= state.last_nonce:
                raise ServiceError(409, f"replayed nonce: expected > {state.last_nonce}, "
                                        f"got {voucher['nonce']}")
            if voucher["cumulative"] != state.cumulative + price:
                raise ServiceError(
                    409, f"voucher: expected cumulative {state.cumulative + price} "
                         f"({state.cumulative} + {count} x {self.view.buyer_fee}), "
                         f"got {voucher['cumulative']}")
            if self.view.funded.get(buyer, 0) < voucher["cumulative"]:
                self.view = await asyncio.to_thread(read_task, self.db)
            funded = self.view.funded.get(buyer, 0)
            if funded < voucher["cumulative"]:
                raise ServiceError(402, f"insufficient balance: {funded - state.cumulative} "
                                        f"left, this request costs {price}")
            state.last_nonce = voucher["nonce"]  # spent even if the ciphertext is refused
            await asyncio.to_thread(self.store.save_buyer, buyer, state)
        from crypto.he import HEError

        try:
            reply = await self._run(_worker_predict, context_id, layout, body, count)
        except HEError as exc:
            raise ServiceError(422, f"ciphertext refused: {exc}") from None
        async with self.lock:
            state.cumulative = voucher["cumulative"]
            state.voucher, state.signature = voucher, base64.b64encode(signature).decode()
            await asyncio.to_thread(self.store.save_buyer, buyer, state)
            self.predictions += count
        if state.cumulative - self.view.settled.get(buyer, 0) >= self.settle_every * max(
                self.view.buyer_fee, 1):
            asyncio.create_task(self.settle())
        return reply, {"X-Poi-Charged": str(price), "X-Poi-Cumulative": str(state.cumulative),
                       "X-Poi-Balance": str(funded - state.cumulative)}

    # ------------------------------------------------------------------ settlement
    def pending(self) -> dict[str, BuyerState]:
        """A snapshot (copies) of every buyer with unsettled charges: requests that
        finish while the settlement is written must not change what it records."""
        return {k: BuyerState(s.cumulative, s.last_nonce, dict(s.voucher), s.signature)
                for k, s in self.buyers.items()
                if s.voucher is not None and s.cumulative > self.view.settled.get(k, 0)}

    async def settle(self) -> list[int]:
        """Record a ``fee_settlement`` for every buyer with unsettled charges."""
        async with self.settle_lock:
            async with self.lock:
                pending = self.pending()
            if not pending:
                return []
            return await asyncio.to_thread(self._write_settlements, pending)

    def _write_settlements(self, pending: Mapping[str, BuyerState]) -> list[int]:
        view = self.view
        entries = []
        for buyer, state in sorted(pending.items()):
            amount = state.cumulative - view.settled.get(buyer, 0)
            entries.append(("fee_settlement", {
                "task_id": view.task_id, "buyer": buyer, "voucher": state.voucher,
                "voucher_signature": state.signature, "amount": amount,
                "cumulative": state.cumulative,
                "payouts": split_fee(amount, scientist=view.scientist, share_ppm=view.share_ppm,
                                     contributions=view.contributions),
            }))
        try:
            writer = open_writer(self.run_dir, view.origin)
        except LedgerError as exc:
            log(WARNING, "poi serve: fee settlement postponed: %s", exc)
            return []
        try:
            signer = Signer.load(self.run_dir / "operator.pem")
            seq = writer.next_seq(signer.key_id)
            leaves = [sign_entry(signer, kind, seq=seq + i, fields=fields)
                      for i, (kind, fields) in enumerate(entries)]
            indexes = writer.append_many(leaves)
        finally:
            writer.close()
        for buyer, state in pending.items():
            view.settled[buyer] = state.cumulative
        log(INFO, "poi serve: fee settlement for %s buyer(s) at ledger index %s",
            len(entries), indexes)
        return indexes

    async def settle_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settle_seconds)
            try:
                await self.settle()
            except Exception as exc:  # noqa: BLE001 - keep serving; retried next period
                log(WARNING, "poi serve: fee settlement failed: %s", exc)


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(HEADER_PREFIX + name)
    if value is None:
        raise ServiceError(400, f"expected header X-Poi-{name.title()}, got none")
    return value


def _parse_voucher(headers: Mapping[str, str]) -> tuple[dict[str, Any], bytes]:
    try:
        voucher = json.loads(base64.b64decode(_header(headers, "voucher"), validate=True))
        signature = base64.b64decode(_header(headers, "signature"), validate=True)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, f"expected base64 JSON in X-Poi-Voucher and base64 in "
                                f"X-Poi-Signature: {exc}") from None
    try:
        voucher = vouchers.check_fields(voucher)
    except vouchers.VoucherError as exc:
        raise ServiceError(400, str(exc)) from None
    if len(signature) != 64:
        raise ServiceError(401, f"expected a 64-byte Ed25519 signature, got {len(signature)}")
    return voucher, signature


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ServiceError(400, f"expected an integer Content-Length, got {declared!r}"
                               ) from None
        if size > limit:
            raise ServiceError(413, f"body of {size} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServiceError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------- app
def create_app(run_dir: Path, *, workers: int = 2, settle_every: int = SETTLE_EVERY,
               settle_seconds: float = SETTLE_SECONDS) -> FastAPI:
    service = InferenceService(run_dir, workers=workers, settle_every=settle_every,
                               settle_seconds=settle_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        ticker = asyncio.create_task(service.settle_periodically())
        try:
            yield
        finally:
            ticker.cancel()
            await service.stop()

    app = FastAPI(
        title="Proof-of-Intelligence encrypted inference",
        version="1",
        description="Send CKKS-encrypted inputs, get encrypted logits; pay per prediction "
                    "with signed cumulative vouchers. Formats: docs/buyer-api.md.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def refused(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    @app.get(f"{API}/model")
    async def model() -> dict[str, Any]:
        """The served model: digest, its ledger entry with an inclusion proof, input
        encoding, CKKS parameters per layout, and the fee."""
        return await asyncio.to_thread(service.model_info)

    @app.post(f"{API}/contexts", openapi_extra=_binary_body("A serialized public TenSEAL "
              "context (no secret key), for the layout named in X-Poi-Layout."))
    async def contexts(request: Request) -> dict[str, Any]:
        """Register a public CKKS context once; returns its id (SHA-256 of the bytes)."""
        layout = request.headers.get("x-poi-layout", "")
        limit = MAX_CONTEXT_BYTES.get(layout, max(MAX_CONTEXT_BYTES.values()))
        data = await _read_body(request, limit)
        return await service.register_context(layout, data)

    @app.get(f"{API}/accounts/{{buyer}}")
    async def account(buyer: str) -> dict[str, Any]:
        """A buyer's funded total, charged total, balance and next nonce."""
        if buyer not in service.view.funded:
            service.view = await asyncio.to_thread(read_task, service.db)
        return service.account(buyer)

    @app.post(f"{API}/predict", response_class=Response, openapi_extra=_binary_body(
        "The encrypted input (wire format of the context's layout); headers X-Poi-Voucher "
        "(base64 canonical JSON voucher) and X-Poi-Signature (base64 Ed25519)."))
    async def predict(request: Request) -> Response:
        """Encrypted logits for an encrypted input, charged the buyer fee per prediction."""
        layout = service.contexts.get(_peek_context(request.headers), "batch")
        body = await _read_body(request, MAX_BODY_BYTES[layout])
        reply, headers = await service.predict(request.headers, body)
        return Response(content=reply, media_type="application/octet-stream", headers=headers)

    return app


def _peek_context(headers: Mapping[str, str]) -> str:
    try:
        voucher = json.loads(base64.b64decode(headers.get(HEADER_PREFIX + "voucher", ""),
                                              validate=True))
        return str(voucher.get("context_id", "")) if isinstance(voucher, dict) else ""
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return ""


def _binary_body(description: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


# ------------------------------------------------------------------------ buyer funding
def fund_account(run_dir: Path, key_path: Path, amount: int) -> tuple[str, int]:
    """Record a payment received outside the system: the buyer's ``key`` entry (once,
    signed by the buyer; the key file is created, mode 0600, if it does not exist) and
    the operator's ``fund`` entry. Returns (buyer key id, ledger index of the fund)."""
    if isinstance(amount, bool) or not 0 < amount <= vouchers.MAX_INT:
        raise ValueError(f"expected an amount in 1..{vouchers.MAX_INT} minor units, "
                         f"got {amount}")
    db = Path(run_dir) / "ledger.db"
    if not db.is_file():
        raise ValueError(f"expected a ledger at {db}, found none")
    if key_path.exists():
        signer = Signer.load(key_path)
    else:
        signer = Signer.generate()
        key_path.parent.mkdir(parents=True, exist_ok=True)
        signer.save(key_path, private=True)
    with LogReader.open(db) as reader:
        origin = reader.checkpoint().split("\n", 1)[0]
    writer = open_writer(Path(run_dir), origin)
    try:
        operator = Signer.load(Path(run_dir) / "operator.pem")
        leaves = [] if writer.next_seq(signer.key_id) else [make_key_entry(signer)]
        leaves.append(sign_entry(operator, "fund", seq=writer.next_seq(operator.key_id), fields={
            "account": signer.key_id, "amount": amount,
            "memo": "buyer payment received outside the ledger"}))
        index = writer.append_many(leaves)[-1]
    finally:
        writer.close()
    return signer.key_id, index
