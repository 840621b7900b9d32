"""Reading what a buyer sends, with a bound on everything: headers, voucher JSON, bodies.

Every refusal here is a :class:`ServiceError` with a 4xx status and a message naming what
was expected and what came, so a hostile request never reaches the HE workers or the
ledger and never costs the service more than a bounded amount of memory, disk and time:
the voucher header is size- and depth-checked before JSON parsing
(``crypto.vouchers.parse_json``); ``Content-Type`` must be ``application/octet-stream``;
a body is read in chunks against its limit (declared ``Content-Length`` first, then the
running total), each chunk within :data:`BODY_IDLE_SECONDS`, at least
:data:`MIN_BODY_BYTES_PER_SECOND` on average once :data:`BODY_GRACE_SECONDS` have passed,
and the whole body within :data:`BODY_SECONDS` (408 otherwise); bodies above
:data:`SPOOL_BYTES` go to a file under the run's ``inference/tmp`` instead of memory.
:class:`UploadGate` bounds what bodies hold: at most :data:`UPLOAD_SLOTS` spooled bodies
and :data:`SMALL_BODIES_BYTES` of in-memory ones, from the first byte read until the
body is discarded (so bodies waiting for admission or being computed count too; 429
after :data:`UPLOAD_WAIT_SECONDS`), and at most :data:`UPLOADS_PER_BUYER` uploads of one
buyer at once (429 at once above): one barely funded buyer trickling bytes into every
slot held them all for 300 s before.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import ClientDisconnect, Request

from crypto import vouchers

MAX_BODY_BYTES = {"single": 2 << 20, "batch": 64 << 20}
MAX_CONTEXT_BYTES = {"single": 96 << 20, "batch": 8 << 20}
MAX_HEADER_CHARS = 2048  # any X-Poi-* header; base64 of the largest voucher is 1,368
SPOOL_BYTES = 1 << 20  # bodies above this go to disk while they are read
UPLOAD_SLOTS = 8  # spooled uploads at once
UPLOAD_WAIT_SECONDS = 10.0  # a spooled upload waits this long for a slot, then 429
SMALL_BODIES_BYTES = 64 << 20  # total in-memory bodies at once (each <= SPOOL_BYTES)
BODY_IDLE_SECONDS = 15.0  # longest pause between two chunks of a body
BODY_SECONDS = 300.0  # longest time for a whole body (96 MiB at >= 330 KB/s)
BODY_GRACE_SECONDS = 10.0  # then a body must average MIN_BODY_BYTES_PER_SECOND
MIN_BODY_BYTES_PER_SECOND = 32 * 1024  # 256 kbit/s since the body's first wait
UPLOADS_PER_BUYER = 2  # bodies of one buyer being read at once
BINARY = "application/octet-stream"
KEY_ID = re.compile(r"[0-9a-f]{32}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ServiceError(Exception):
    """A refused request: HTTP status and a message naming expected vs got."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------- headers
def header(headers: Mapping[str, str], name: str) -> str:
    """The value of ``X-Poi-<name>`` (400 when missing, empty or longer than
    :data:`MAX_HEADER_CHARS`)."""
    value = headers.get(f"x-poi-{name.lower()}")
    if not value:
        raise ServiceError(400, f"expected header X-Poi-{name}, got none")
    if len(value) > MAX_HEADER_CHARS:
        raise ServiceError(400, f"expected X-Poi-{name} of at most {MAX_HEADER_CHARS} "
                                f"characters, got {len(value)}")
    return value


def b64(value: str, what: str) -> bytes:
    """Standard base64 with padding (RFC 4648 section 4), or 400."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ServiceError(400, f"expected {what} in standard base64 (RFC 4648 section 4, "
                                f"A-Z a-z 0-9 + /, '=' padding), got {value[:40]!r}") from None


def parse_voucher(headers: Mapping[str, str]) -> tuple[dict[str, Any], bytes]:
    """The voucher (fields checked) and the 64-byte signature from the headers."""
    raw = b64(header(headers, "Voucher"), "X-Poi-Voucher")
    signature = b64(header(headers, "Signature"), "X-Poi-Signature")
    try:
        voucher = vouchers.parse_json(raw)
    except vouchers.VoucherError as exc:
        raise ServiceError(400, str(exc)) from None
    if not SHA256_HEX.fullmatch(voucher["body_sha256"]):
        raise ServiceError(400, "voucher: expected body_sha256 as 64 lowercase hex digits, "
                                f"got {voucher['body_sha256'][:80]!r}")
    if not KEY_ID.fullmatch(voucher["buyer"]):
        raise ServiceError(400, f"voucher: expected buyer as a key id (32 lowercase hex "
                                f"digits), got {voucher['buyer'][:80]!r}")
    if len(signature) != 64:
        raise ServiceError(401, f"expected a 64-byte Ed25519 signature, got {len(signature)}")
    return voucher, signature


def require_binary(headers: Mapping[str, str]) -> None:
    """415 unless ``Content-Type`` is ``application/octet-stream`` (parameters allowed)."""
    value = headers.get("content-type", "")
    if value.split(";", 1)[0].strip().lower() != BINARY:
        raise ServiceError(415, f"expected Content-Type {BINARY}, got {value[:80]!r}")


def declared_length(headers: Mapping[str, str], limit: int) -> int | None:
    """``Content-Length`` if sent (400 when not a decimal integer, 413 above ``limit``)."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit() or len(declared) > 18:
        raise ServiceError(400, f"expected a decimal Content-Length, got {declared[:40]!r}")
    size = int(declared)
    if size > limit:
        raise ServiceError(413, f"body of {size} bytes exceeds the limit of {limit}")
    return size


# ------------------------------------------------------------------------------ bodies
@dataclass
class Body:
    """A request body read to the end: in memory (``data``) or in a spool file
    (``path``, deleted by :meth:`discard`), with its size and SHA-256."""

    sha256: str
    size: int
    data: bytes | None = None
    path: Path | None = None
    release: Callable[[], None] | None = None  # gives the body's share back to the gate

    @property
    def payload(self) -> bytes | str:
        """What an HE worker is given: the bytes, or the spool file's path."""
        return self.data if self.data is not None else str(self.path)

    def discard(self) -> None:
        """Delete the spool file and give the body's share back (idempotent)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self.data = None
        release, self.release = self.release, None
        if release is not None:
            release()


@dataclass(frozen=True)
class BodyTimes:
    """How fast a body must come: a chunk every ``idle_seconds``, on average at least
    ``min_bytes_per_second`` once ``grace_seconds`` have passed, all within
    ``total_seconds``."""

    idle_seconds: float = BODY_IDLE_SECONDS
    total_seconds: float = BODY_SECONDS
    grace_seconds: float = BODY_GRACE_SECONDS
    min_bytes_per_second: float = MIN_BODY_BYTES_PER_SECOND


class UploadGate:
    """Bounds what bodies cost: at most ``slots`` spooled bodies and ``memory_bytes`` of
    in-memory ones held at once, from the start of their upload until
    :meth:`Body.discard` (a request that cannot get its share within ``wait_seconds`` gets
    429 and a ``Retry-After``), and at most ``per_buyer`` uploads of one buyer being read
    at once (429 at once above)."""

    def __init__(self, *, slots: int = UPLOAD_SLOTS, memory_bytes: int = SMALL_BODIES_BYTES,
                 wait_seconds: float = UPLOAD_WAIT_SECONDS,
                 idle_seconds: float = BODY_IDLE_SECONDS,
                 total_seconds: float = BODY_SECONDS,
                 grace_seconds: float = BODY_GRACE_SECONDS,
                 min_bytes_per_second: float = MIN_BODY_BYTES_PER_SECOND,
                 per_buyer: int = UPLOADS_PER_BUYER) -> None:
        self.times = BodyTimes(idle_seconds, total_seconds, grace_seconds,
                               min_bytes_per_second)
        self.slots = asyncio.Semaphore(slots)
        self.memory_free = memory_bytes
        self.memory_changed = asyncio.Condition()
        self.wait_seconds = wait_seconds
        self.per_buyer = per_buyer
        self.reading: dict[str, int] = {}  # buyer -> uploads being read

    async def _acquire(self, spool: bool, size: int) -> None:
        try:
            if spool:
                await asyncio.wait_for(self.slots.acquire(), self.wait_seconds)
                return
            async with self.memory_changed:
                await asyncio.wait_for(self.memory_changed.wait_for(
                    lambda: self.memory_free >= size), self.wait_seconds)
                self.memory_free -= size
        except TimeoutError:
            raise ServiceError(429, "too many uploads at once: retry later",
                               {"Retry-After": "2"}) from None

    def _release(self, spool: bool, size: int) -> None:
        if spool:
            self.slots.release()
            return
        self.memory_free += size
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self.memory_changed:
            self.memory_changed.notify_all()

    async def read(self, request: Request, limit: int, spool_dir: Path, *, buyer: str,
                   spool: bool = False) -> Body:
        """The whole body of ``buyer``'s ``request``, at most ``limit`` bytes (in a file
        when ``spool``, when its length is not declared, or when it is above SPOOL_BYTES).
        The body holds its share of the gate until :meth:`Body.discard`."""
        declared = declared_length(request.headers, limit)
        if self.reading.get(buyer, 0) >= self.per_buyer:
            raise ServiceError(429, f"buyer {buyer[:16]} already has {self.per_buyer} "
                                    f"uploads in progress: at most {self.per_buyer} at once",
                               {"Retry-After": "1"})
        self.reading[buyer] = self.reading.get(buyer, 0) + 1
        try:
            spool = spool or declared is None or declared > SPOOL_BYTES
            share = 0 if spool else int(declared or 0)
            await self._acquire(spool, share)
            try:
                body = await _read(request, limit, spool_dir if spool else None, self.times)
            except BaseException:
                self._release(spool, share)
                raise
            body.release = lambda: self._release(spool, share)
            return body
        finally:
            self.reading[buyer] -= 1
            if not self.reading[buyer]:
                del self.reading[buyer]


async def _read(request: Request, limit: int, spool_dir: Path | None, times: BodyTimes
                ) -> Body:
    digest, total = hashlib.sha256(), 0
    chunks: list[bytes] = []
    handle = None
    if spool_dir is not None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=spool_dir, prefix="body-")
        handle = os.fdopen(fd, "wb")
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + times.total_seconds
    stream = request.stream().__aiter__()
    try:
        while True:
            # the moment the bytes so far fall below the minimum average rate
            slow = start + max(times.grace_seconds, total / times.min_bytes_per_second)
            now = loop.time()
            wait = min(times.idle_seconds, deadline - now, slow - now)
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.001))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ServiceError(408, f"body not received in time: {total} bytes came in "
                                        f"{loop.time() - start:.1f} s (expected a chunk at "
                                        f"least every {times.idle_seconds:g} s, on average "
                                        f"{times.min_bytes_per_second:g} bytes/s after "
                                        f"{times.grace_seconds:g} s, the whole body within "
                                        f"{times.total_seconds:g} s)") from None
            except ClientDisconnect:
                raise ServiceError(400, f"the client went away after {total} bytes") from None
            total += len(chunk)
            if total > limit:
                raise ServiceError(413, f"body exceeds the limit of {limit} bytes")
            digest.update(chunk)
            if handle is not None:
                handle.write(chunk)
            elif chunk:
                chunks.append(chunk)
    except BaseException:
        if handle is not None:
            handle.close()
            Path(name).unlink(missing_ok=True)
        raise
    if handle is not None:
        handle.close()
        return Body(digest.hexdigest(), total, path=Path(name))
    return Body(digest.hexdigest(), total, data=b"".join(chunks))
