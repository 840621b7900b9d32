"""The service's endpoints as plain async methods (the HTTP wiring is ``service.py``):
the model's description, context registration, account look-ups, paid predictions and
the periodic fee settlements on the ledger.

A prediction is checked in the order that keeps the cost of a refusal lowest: headers
and the voucher (400), the buyer's key from the ledger index (403), the voucher's
signature (401), the buyer's context (404), ``count``, a used nonce (409), the balance
(402) — all before a byte of the body is read — then the body, bounded and timed
(413/408/429), its hash (400), the atomic reservation (409/402, ``accounts``), the HE
work (422 releases the reservation) and the charge, in nonce order. Every amount is in
minor units; the charged total of a buyer is always the cumulative of a voucher it
signed, which the operator copies into the ``fee_settlement`` entries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures.process import BrokenProcessPool
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log
from starlette.requests import Request

from crypto import vouchers
from ledger import LogReader
from ledger.blobs import BlobStore, sign_with_bulk
from ledger.errors import LedgerError
from ledger.keys import Signer
from server.inference.accounts import Account, Accounts, LedgerIndex, Reservation
from server.inference.funding import open_writer
from server.inference.requests import (
    BODY_IDLE_SECONDS,
    KEY_ID,
    MAX_BODY_BYTES,
    MAX_CONTEXT_BYTES,
    SHA256_HEX,
    Body,
    ServiceError,
    UploadGate,
    b64,
    header,
    parse_voucher,
    require_binary,
)
from server.inference.store import Store
from server.inference.workers import WorkerPool
from server.market.fees import split_fee

API = "/v1"
SETTLE_EVERY = 1000  # unsettled predictions per buyer before a fee settlement
SETTLE_SECONDS = 30.0  # and at least this often while anything is unsettled

Compute = Callable[[str, str, "bytes | str", int], Awaitable[bytes]]


class InferenceService:
    def __init__(self, run_dir: Path, *, workers: int = 2, settle_every: int = SETTLE_EVERY,
                 settle_seconds: float = SETTLE_SECONDS, pipeline_wait: float | None = None,
                 store: Store | None = None, body_idle_seconds: float = BODY_IDLE_SECONDS
                 ) -> None:
        from crypto.he import PARAMS, ModelShape, max_batch, max_request_bytes

        self.run_dir = Path(run_dir)
        self.db = self.run_dir / "ledger.db"
        if not self.db.is_file():
            raise ServiceError(503, f"expected a ledger at {self.db}, found none")
        self.index = LedgerIndex(self.db)
        view = self.index.view
        # The served model's widths: a layout that cannot carry them is not offered
        # (the single layout's block of slots must hold every feature).
        self.shape = ModelShape(view.features, view.classes, view.hidden_units).check()
        self.layouts = {name: {**PARAMS[name].to_json(self.shape), "max_batch": max_batch(name)}
                        for name in self.shape.layouts}
        self.max_batch = {name: max_batch(name) for name in self.shape.layouts}
        # A request is one ciphertext a feature: a wide model's need more than the
        # digits model's bound.
        self.body_bytes = {name: max(MAX_BODY_BYTES[name], max_request_bytes(name, self.shape))
                           for name in self.shape.layouts}
        self.store = store or Store(self.run_dir / "inference")  # StoreBusy: one service
        try:
            extra = {} if pipeline_wait is None else {"pipeline_wait": pipeline_wait}
            # the ledger's settlements win over a lost or older state.db
            settled = {buyer: (self.view.settled[buyer], *voucher)
                       for buyer, voucher in self.view.settled_voucher.items()}
            self.accounts = Accounts(self.store.buyers(), self._persist, settled=settled,
                                     **extra)
            self.gate = UploadGate(idle_seconds=body_idle_seconds)
            self.settle_every = settle_every
            self.settle_seconds = settle_seconds
            self.settle_lock = asyncio.Lock()
            self.predictions = 0
            self.model_blob = BlobStore.beside(self.db).get(self.view.model_digest)
            self._check_model_widths()
            self.pool = WorkerPool(workers, self.model_blob, self.view.activation,
                                   self.store.contexts_dir, MAX_CONTEXT_BYTES)
        except BaseException:
            self.store.close()  # release the run for the next try
            raise
        self.compute: Compute = self.pool.predict  # tests swap in a fake
        self.check_context: Callable[[bytes | str, str], Awaitable[None]] = \
            self.pool.check_context

    def _check_model_widths(self) -> None:
        """The model the ledger names must have the widths the offer says (and the
        buyers are told): a single-layout reply packed for other widths would decrypt to
        noise that buyers pay for."""
        from crypto.digests import parse_canonical_tensor_bytes

        weights = parse_canonical_tensor_bytes(self.model_blob)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        features, classes, hidden = self.shape.features, self.shape.classes, \
            self.shape.hidden_units
        expected = {"fc1.weight": (hidden, features), "fc1.bias": (hidden,),
                    "fc2.weight": (classes, hidden), "fc2.bias": (classes,)}
        if shapes != expected:
            raise ServiceError(503, f"the ledger's model {self.view.model_digest[:16]} has "
                                    f"tensors {shapes}, the offer's architecture says "
                                    f"{expected}: refusing to serve it")

    @property
    def view(self) -> Any:
        return self.index.view

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.pool.start()

    async def stop(self) -> None:
        """Settle, then end the workers whatever the settlement did."""
        try:
            await self.settle()
        except Exception as exc:  # noqa: BLE001 - the workers must end regardless
            log(WARNING, "poi serve: final fee settlement failed: %s", exc)
        finally:
            self.pool.stop()
            with contextlib.suppress(Exception):  # the run folder may be gone
                self.store.expire()
            self.store.close()

    async def _persist(self, buyer: str, charged: int, last_nonce: int,
                       voucher: dict[str, Any] | None, signature: str) -> None:
        await asyncio.to_thread(self.store.save_buyer, buyer, charged, last_nonce, voucher,
                                signature)

    # ------------------------------------------------------------------ look-ups
    def _key(self, buyer: str) -> bytes:
        raw = self.view.keys.get(buyer)
        if raw is None and self.index.refresh():
            raw = self.view.keys.get(buyer)
        if raw is None:
            raise ServiceError(403, f"buyer {buyer[:16]} has no key on the ledger: fund the "
                                    "account first (poi buyer fund)")
        return bytes(raw)

    def _spendable(self, buyer: str, needed: int = 0) -> int:
        """The highest cumulative ``buyer``'s money covers: its ledger balance as the audit
        computes it (escrow and other debits taken off) plus what it settled here
        already; the ledger is re-read first if that is below ``needed``."""
        spendable = int(self.view.spendable.get(buyer, 0))
        if spendable < needed and self.index.refresh():
            spendable = int(self.view.spendable.get(buyer, 0))
        return spendable

    def account(self, buyer: str) -> dict[str, Any]:
        if not KEY_ID.fullmatch(buyer):
            raise ServiceError(400, f"expected a key id (32 lowercase hex digits), "
                                    f"got {buyer[:80]!r}")
        spendable = self._spendable(buyer, 1)
        state = self.accounts.peek(buyer) or Account()
        settled = self.view.settled.get(buyer, 0)
        return {"buyer": buyer, "funded": int(self.view.funded.get(buyer, 0)),
                "charged": state.charged, "reserved": state.reserved, "settled": settled,
                "balance": spendable - max(state.charged, settled),
                "next_nonce": state.last_nonce + 1, "fee": self.view.buyer_fee}

    def model_info(self) -> dict[str, Any]:
        try:
            with LogReader.open(self.db) as reader:
                checkpoint = reader.checkpoint()
                size = int(checkpoint.split("\n")[1])
                proof = reader.inclusion_proof(self.view.model_index, size)
                root = reader.root(size).hex()
                leaf = reader.entry(self.view.model_index)
                log_key = reader.log_key
        except LedgerError as exc:
            raise ServiceError(503, f"the ledger cannot be read: {exc}",
                               {"Retry-After": "5"}) from None
        return {
            "task_id": self.view.task_id,
            "model_digest": self.view.model_digest,
            "ledger": {"index": self.view.model_index, "size": size, "root": root,
                       "entry": base64.b64encode(leaf).decode(),
                       "inclusion_proof": [base64.b64encode(h).decode() for h in proof],
                       "checkpoint": checkpoint, "log_key": log_key},
            "architecture": {"kind": "PolyMLP",
                             "layers": [self.shape.features, self.view.hidden_units,
                                        self.shape.classes],
                             "activation": self.view.activation},
            "input": {"shape": [self.shape.features], "dtype": "float32", "range": [0.0, 1.0],
                      "encoding": ("8x8 digit image, row-major, pixel / 16"
                                   if self.shape.features == 64 else
                                   "the task's features, scaled to [0, 1]")},
            "output": {"shape": [self.shape.classes],
                       "meaning": f"logits of classes 0..{self.shape.classes - 1}"},
            "layouts": self.layouts,
            "fee": {"per_prediction": self.view.buyer_fee, "unit": "minor units",
                    "scientist_share_ppm": self.view.share_ppm},
            "limits": {"context_bytes": MAX_CONTEXT_BYTES, "body_bytes": self.body_bytes,
                       "contexts_per_buyer": self.store.contexts_per_buyer,
                       "context_idle_seconds": int(self.store.context_ttl)},
        }

    # ------------------------------------------------------------------ contexts
    async def register_context(self, request: Request) -> dict[str, Any]:
        headers = request.headers
        require_binary(headers)
        layout = header(headers, "Layout")
        if layout not in self.layouts:
            raise ServiceError(400, f"expected X-Poi-Layout in {sorted(self.layouts)} (the "
                                    f"layouts that serve this model), "
                                    f"got {layout[:40]!r}")
        buyer = header(headers, "Buyer")
        if not KEY_ID.fullmatch(buyer):
            raise ServiceError(400, f"expected X-Poi-Buyer as a key id (32 lowercase hex "
                                    f"digits), got {buyer[:80]!r}")
        declared = header(headers, "Context-Sha256")
        if not SHA256_HEX.fullmatch(declared):
            raise ServiceError(400, f"expected X-Poi-Context-Sha256 as 64 lowercase hex "
                                    f"digits, got {declared[:80]!r}")
        signature = b64(header(headers, "Signature"), "X-Poi-Signature")
        raw = self._key(buyer)
        try:
            vouchers.verify_message(raw, vouchers.context_message(
                self.view.task_id, layout, declared), signature)
        except vouchers.VoucherError as exc:
            raise ServiceError(401, f"context registration: {exc}") from None
        body = await self.gate.read(request, MAX_CONTEXT_BYTES[layout], self.store.spool_dir,
                                    buyer=buyer, spool=True)
        try:
            if body.sha256 != declared:
                raise ServiceError(400, f"expected a body with SHA-256 {declared} "
                                        f"(X-Poi-Context-Sha256), got {body.sha256}")
            if self.store.known_layout(declared) != layout:
                from crypto.he import HEError

                try:
                    await self.check_context(body.payload, layout)
                except HEError as exc:
                    raise ServiceError(422, f"context refused: {exc}") from None
            assert body.path is not None
            evicted = self.store.add(buyer, declared, layout, body.path, body.size)
        finally:
            body.discard()
        return {"context_id": declared, "layout": layout, "evicted": evicted}

    # ---------------------------------------------------------------- predictions
    async def predict(self, request: Request) -> tuple[bytes, dict[str, str]]:
        headers = request.headers
        require_binary(headers)
        voucher, signature = parse_voucher(headers)
        if voucher["task_id"] != self.view.task_id:
            raise ServiceError(400, f"voucher: expected task {self.view.task_id}, "
                                    f"got {voucher['task_id'][:80]!r}")
        buyer, count = voucher["buyer"], voucher["count"]
        raw = self._key(buyer)
        try:
            vouchers.verify(raw, voucher, signature)
        except vouchers.VoucherError as exc:
            raise ServiceError(401, str(exc)) from None
        context_id = voucher["context_id"]
        layout = self.store.layout(buyer, context_id)
        if layout is None:
            raise ServiceError(404, f"unknown context id {context_id[:64]!r} for buyer "
                                    f"{buyer[:16]}: register it with POST {API}/contexts "
                                    "(contexts expire and are evicted: see limits)")
        if not 1 <= count <= self.max_batch[layout]:
            raise ServiceError(400, f"expected 1 <= count <= {self.max_batch[layout]} for the "
                                    f"{layout} layout, got {count}")
        self.accounts.precheck(buyer, voucher)
        price = count * self.view.buyer_fee
        spendable = self._spendable(buyer, voucher["cumulative"])
        if spendable < voucher["cumulative"]:
            raise ServiceError(402, f"insufficient balance: your ledger balance covers a "
                                    f"cumulative of {spendable}, the voucher's is "
                                    f"{voucher['cumulative']}")
        body = await self.gate.read(request, self.body_bytes[layout], self.store.spool_dir,
                                    buyer=buyer)
        handed_over = False
        try:
            if body.sha256 != voucher["body_sha256"]:
                raise ServiceError(400, "voucher: body_sha256 does not match the request body")
            reservation = await self.accounts.admit(
                buyer, voucher, base64.b64encode(signature).decode(), price,
                lambda needed: self._spendable(buyer, needed))
            # From here the reservation is resolved whatever happens to this request
            # (a client that goes away does not leave its chain hanging).
            handed_over = True
            served = asyncio.ensure_future(self._serve(reservation, layout, body, count))
            return await asyncio.shield(served)
        finally:
            if not handed_over:
                body.discard()

    async def _serve(self, reservation: Reservation, layout: str, body: Body, count: int
                     ) -> tuple[bytes, dict[str, str]]:
        from crypto.he import HEError

        failure: ServiceError | None = None
        reply, computed = b"", False
        try:
            reply = await self.compute(reservation.voucher["context_id"], layout,
                                       body.payload, count)
            computed = True
        except HEError as exc:
            failure = ServiceError(422, f"ciphertext refused: {exc}; nothing charged")
        except FileNotFoundError:
            failure = ServiceError(404, "the context was evicted or expired meanwhile: "
                                        "register it again; nothing charged")
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            log(WARNING, "poi serve: HE worker failed: %s", exc)
            failure = ServiceError(503, "the HE worker failed; nothing charged: retry",
                                   {"Retry-After": "2"})
        except Exception as exc:  # noqa: BLE001 - a fault of ours: released, not charged
            log(WARNING, "poi serve: prediction failed: %r", exc)
            failure = ServiceError(503, "the prediction failed; nothing charged: retry",
                                   {"Retry-After": "2"})
        finally:
            body.discard()
            # only a computed reply is charged (also when this task is cancelled)
            served = await self.accounts.resolve(reservation, computed)
        if failure is not None:
            raise failure
        if not served:
            account = self.accounts.get(reservation.buyer)
            raise ServiceError(409, f"an earlier request of your pipeline was not served, so "
                                    f"this one (nonce {reservation.nonce}) was not either; "
                                    f"nothing charged: continue from cumulative "
                                    f"{account.reserved} + price with a nonce above "
                                    f"{account.last_nonce}")
        self.predictions += count
        buyer = reservation.buyer
        spendable = self._spendable(buyer)
        if reservation.end - self.view.settled.get(buyer, 0) >= self.settle_every * max(
                self.view.buyer_fee, 1):
            asyncio.ensure_future(self.settle())
        return reply, {"X-Poi-Charged": str(reservation.end - reservation.start),
                       "X-Poi-Cumulative": str(reservation.end),
                       "X-Poi-Balance": str(spendable - reservation.end)}

    # ------------------------------------------------------------------ settlement
    def pending(self) -> dict[str, tuple[int, dict[str, Any], str]]:
        """A snapshot of every buyer with unsettled charges: (charged, voucher,
        signature); requests that finish while the settlement is written must not
        change what it records."""
        return {k: (a.charged, dict(a.voucher), a.signature)
                for k, a in self.accounts.accounts.items()
                if a.voucher is not None and a.charged > self.view.settled.get(k, 0)}

    async def settle(self) -> list[int]:
        """Record a ``fee_settlement`` for every buyer with unsettled charges."""
        async with self.settle_lock:
            pending = self.pending()
            if not pending:
                return []
            indexes = await asyncio.to_thread(self._write_settlements, pending)
            if indexes:  # the balances the audit computes now take the fees off
                self.index.refresh(force=True)
            return indexes

    def _write_settlements(self, pending: Mapping[str, tuple[int, dict[str, Any], str]]
                           ) -> list[int]:
        view = self.view
        entries = []
        for buyer, (charged, voucher, signature) in sorted(pending.items()):
            assert voucher["cumulative"] == charged, "the charge is the signed cumulative"
            amount = charged - view.settled.get(buyer, 0)
            entries.append(("fee_settlement", {
                "task_id": view.task_id, "buyer": buyer, "voucher": voucher,
                "voucher_signature": signature, "amount": amount, "cumulative": charged,
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
            blobs = BlobStore.beside(self.db)
            leaves = [sign_with_bulk(signer, kind, seq=seq + i, fields=fields, blobs=blobs)
                      for i, (kind, fields) in enumerate(entries)]
            indexes = writer.append_many(leaves)
        finally:
            writer.close()
        for buyer, (charged, _, _) in pending.items():
            view.settled[buyer] = max(view.settled.get(buyer, 0), charged)
        log(INFO, "poi serve: fee settlement for %s buyer(s) at ledger index %s",
            len(entries), indexes)
        return indexes

    async def settle_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settle_seconds)
            try:
                await self.settle()
                self.store.expire()
            except Exception as exc:  # noqa: BLE001 - keep serving; retried next period
                log(WARNING, "poi serve: fee settlement failed: %s", exc)
