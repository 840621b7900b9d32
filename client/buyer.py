"""The buyer SDK: encrypted predictions from a ``poi serve`` service (``poi buy``).

The buyer keeps its CKKS secret key (it never leaves this process: only the public
context is sent) and its Ed25519 key (``KEY``, a PEM file created by ``poi buyer fund``).
Per request it signs a cumulative voucher (``crypto/vouchers.py``): the nonce and the
running total it agrees to pay. A :class:`Buyer` may be shared by threads: each request
takes its nonce and its slice of the running total under a lock, so requests pipeline
(the service admits them in nonce order and charges each only after the earlier ones);
after any refusal the next request re-reads the account first. The charged total it
reports (:attr:`Buyer.charged`) never goes down. Before trusting the service it checks
that the served model is the one the task's ledger recorded: the ``model`` entry's
inclusion proof against the checkpoint's root, and the checkpoint's signature by the log key.

    buyer = Buyer("http://127.0.0.1:8000", Signer.load("buyer.pem"))
    logits = buyer.predict(x)  # x: (n, 64) float32 in [0, 1]
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from crypto import vouchers
from ledger.checkpoint import parse_checkpoint
from ledger.entries import parse_entry
from ledger.errors import LedgerError
from ledger.keys import Signer
from ledger.merkle import hash_leaf, verify_inclusion

API = "/v1"
SINGLE_UP_TO = 4  # rows; more go in the batch layout


class BuyerError(RuntimeError):
    """The service refused a request (status and its message) or could not be trusted."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, from the service's Retry-After


RETRY_STATUSES = (429, 503)  # busy: nothing was charged, the same request may come again
MAX_RETRY_WAIT = 30.0  # seconds; a longer Retry-After is capped


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the service sends delta-seconds), or None."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


@dataclass
class Buyer:
    url: str
    signer: Signer
    layout: str = "auto"  # "single", "batch" or "auto" (by the number of rows)
    timeout: float = 300.0
    log_key: str | None = None  # pin the ledger's log key (else trust the one served)
    retries: int = 3  # a 429 or 503 (busy, nothing charged) is retried after Retry-After
    client: httpx.Client | None = None
    sleep: Any = field(default=time.sleep, repr=False)
    _contexts: dict[str, Any] = field(default_factory=dict)  # layout -> (ctx, id)
    _model: dict[str, Any] | None = None
    _nonce: int | None = None
    _reserved: int = 0  # the running total of the vouchers signed so far
    _charged: int = 0  # the largest charged total the service confirmed
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "single", "batch"):
            raise ValueError(f"expected layout auto, single or batch, got {self.layout!r}")
        if self.client is None:
            self.client = httpx.Client(base_url=self.url.rstrip("/"), timeout=self.timeout)

    # ------------------------------------------------------------------ helpers
    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        assert self.client is not None
        try:
            response = self.client.request(method, f"{API}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise BuyerError(f"{method} {path}: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except (json.JSONDecodeError, AttributeError):
                detail = response.text
            raise BuyerError(f"{method} {path}: HTTP {response.status_code}: {detail}",
                             response.status_code, _retry_after(response))
        return response

    def model(self) -> dict[str, Any]:
        """The served model's description, checked against the ledger's inclusion proof."""
        if self._model is None:
            info = self._call("GET", "/model").json()
            verify_model_info(info, log_key=self.log_key)
            self._model = info
        return self._model

    def account(self) -> dict[str, Any]:
        return dict(self._call("GET", f"/accounts/{self.signer.key_id}").json())

    def _context(self, layout: str) -> tuple[Any, str]:
        from crypto.he import buyer_context

        with self._lock:
            if layout in self._contexts:
                return self._contexts[layout]
            ctx = buyer_context(layout)
            public = ctx.public_bytes()
            digest = hashlib.sha256(public).hexdigest()
            signature = self.signer.sign(vouchers.context_message(
                self.model()["task_id"], layout, digest))
            reply = self._call("POST", "/contexts", content=public, headers={
                "X-Poi-Layout": layout, "X-Poi-Buyer": self.signer.key_id,
                "X-Poi-Context-Sha256": digest,
                "X-Poi-Signature": base64.b64encode(signature).decode(),
                "Content-Type": "application/octet-stream"}).json()
            self._contexts[layout] = (ctx, str(reply["context_id"]))
            return self._contexts[layout]

    @property
    def charged(self) -> int:
        """What the service confirmed this buyer has been charged (never decreases)."""
        return self._charged

    def _next_voucher(self, price: int) -> tuple[int, int]:
        """(nonce, cumulative) for the next request, taken under the lock."""
        with self._lock:
            if self._nonce is None:
                account = self.account()
                self._nonce = int(account["next_nonce"])
                self._reserved = int(account["reserved"])
                self._charged = max(self._charged, int(account["charged"]))
            nonce, self._nonce = self._nonce, self._nonce + 1
            self._reserved += price
            return nonce, self._reserved

    # ---------------------------------------------------------------- predictions
    def shape(self) -> Any:
        """The served model's widths (``crypto.he.ModelShape``) from ``GET /v1/model``."""
        from crypto.he import HEError, ModelShape

        layers = self.model().get("architecture", {}).get("layers")
        try:
            features, hidden, classes = (int(v) for v in layers)  # type: ignore[union-attr]
            return ModelShape(features, classes, hidden).check()
        except (HEError, TypeError, ValueError) as exc:
            raise BuyerError(f"the service's model: expected layers [features, hidden, "
                             f"classes] within bounds, got {layers!r} ({exc})") from None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits (n, classes) for inputs ``x`` (n, features), encrypted end to end."""
        x = np.asarray(x, dtype=np.float32)
        shape = self.shape()
        if x.ndim != 2 or x.shape[1] != shape.features:
            raise ValueError(f"expected inputs of shape (n, {shape.features}) for this "
                             f"model, got {x.shape}")
        info = self.model()
        layout = self.layout
        if layout == "auto":
            layout = ("single" if len(x) <= SINGLE_UP_TO and "single" in info["layouts"]
                      else "batch")
        if layout not in info["layouts"]:
            raise ValueError(f"layout: expected one of {sorted(info['layouts'])} (the layouts "
                             f"that serve this model), got {layout!r}")
        step = int(info["layouts"][layout]["max_batch"])
        out: list[np.ndarray] = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            if layout == "single":
                out.extend(self._request(layout, row[None, :]) for row in chunk)
            else:
                out.append(self._request(layout, chunk))
        return np.concatenate(out, axis=0)

    def _request(self, layout: str, rows: np.ndarray) -> np.ndarray:
        """One prediction request; a busy service (429, 503: nothing charged) gets the
        request again after its Retry-After (at most ``retries`` times, backing off 1, 2,
        4 s when it names no wait), with a fresh voucher on the account as re-read."""
        for attempt in range(self.retries + 1):
            try:
                return self._request_once(layout, rows)
            except BuyerError as exc:
                if exc.status not in RETRY_STATUSES or attempt == self.retries:
                    raise
                wait = exc.retry_after if exc.retry_after is not None else 2.0 ** attempt
                self.sleep(min(wait, MAX_RETRY_WAIT))
        raise AssertionError("unreachable")  # pragma: no cover

    def _request_once(self, layout: str, rows: np.ndarray) -> np.ndarray:
        ctx, context_id = self._context(layout)
        shape = self.shape()
        body = ctx.encrypt(rows[0] if layout == "single" else rows, shape)
        fee = int(self.model()["fee"]["per_prediction"])
        nonce, cumulative = self._next_voucher(fee * len(rows))
        voucher = {"v": 1, "task_id": self.model()["task_id"], "buyer": self.signer.key_id,
                   "context_id": context_id, "nonce": nonce, "count": len(rows),
                   "cumulative": cumulative, "body_sha256": hashlib.sha256(body).hexdigest()}
        signature = self.signer.sign(vouchers.message(voucher))
        headers = {
            "X-Poi-Voucher": base64.b64encode(json.dumps(voucher).encode()).decode(),
            "X-Poi-Signature": base64.b64encode(signature).decode(),
            "Content-Type": "application/octet-stream",
        }
        try:
            response = self._call("POST", "/predict", content=body, headers=headers)
        except BuyerError as exc:
            with self._lock:
                self._nonce = None  # re-read the account before the next request
                if exc.status == 404:
                    self._contexts.pop(layout, None)  # evicted or expired: register again
            raise
        with self._lock:
            self._charged = max(self._charged, int(response.headers["x-poi-cumulative"]))
        return np.asarray(ctx.decrypt(response.content, len(rows), shape), dtype=np.float64)


def verify_model_info(info: dict[str, Any], *, log_key: str | None = None) -> None:
    """Check the served model against the ledger: the ``model`` entry names the digest,
    its leaf is included in the tree of the checkpoint (RFC 9162 proof), and the
    checkpoint note is signed by the log key it names (or by ``log_key``, when the buyer
    pinned one it got elsewhere). Raises :class:`BuyerError`."""
    from ledger.checkpoint import NoteVerifier

    ledger = info.get("ledger", {})
    try:
        leaf = base64.b64decode(ledger["entry"], validate=True)
        entry = parse_entry(leaf)
        if entry.kind != "model" or entry.fields.get("model_digest") != info["model_digest"]:
            raise BuyerError("the ledger entry does not record the served model's digest")
        if log_key is not None and ledger["log_key"] != log_key:
            raise BuyerError(f"expected the log key {log_key}, the service names "
                             f"{ledger['log_key']}")
        verifier = NoteVerifier.from_vkey(ledger["log_key"])
        checkpoint = parse_checkpoint(ledger["checkpoint"], verifier=verifier,
                                      origin=f"poi/task/{info['task_id']}")
        proof = [base64.b64decode(h, validate=True) for h in ledger["inclusion_proof"]]
        verify_inclusion(index=int(ledger["index"]), size=checkpoint.size,
                         leaf_hash=hash_leaf(leaf), proof=proof, root=checkpoint.root_hash)
    except BuyerError:
        raise
    except (KeyError, TypeError, ValueError, LedgerError) as exc:
        raise BuyerError(f"cannot verify the served model against the ledger: {exc}") from exc
