"""The encrypted prediction service over HTTP (FastAPI, served by uvicorn): ``poi serve
RUN_DIR``. Wiring only: the endpoints' logic is ``engine.InferenceService``.

Buyers register a public CKKS context once, then send encrypted inputs with a signed,
cumulative voucher (``crypto/vouchers.py``) and get encrypted logits back that only
they can decrypt. The model never leaves the service; the service never sees an input.
Every refusal, including FastAPI's and Starlette's own (unknown path, wrong method), is
a 4xx with the JSON body ``{"error": "..."}``. The OpenAPI document (``/openapi.json``)
is written out here by hand, so it says exactly what is served: every header, status and
body; ``tests/inference/test_inference_openapi.py`` checks it with schemathesis against
the live app. Formats: ``docs/buyer-api.md``. The run's ledger is mounted read-only at
``/ledger/`` as C2SP tiles (``ledger.http``, outside that document; its refusals are
plain-text 404s, as static tile servers give).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger.http import ledger_http_app
from server.inference.accounts import TaskView, read_task
from server.inference.engine import API, SETTLE_EVERY, SETTLE_SECONDS, InferenceService
from server.inference.funding import fund_account, open_writer
from server.inference.requests import (
    BODY_IDLE_SECONDS,
    MAX_BODY_BYTES,
    MAX_CONTEXT_BYTES,
    MAX_HEADER_CHARS,
    ServiceError,
)

__all__ = ["API", "MAX_BODY_BYTES", "MAX_CONTEXT_BYTES", "InferenceService", "ServiceError",
           "TaskView", "create_app", "fund_account", "open_writer", "read_task"]


def create_app(run_dir: Path, *, workers: int = 2, settle_every: int = SETTLE_EVERY,
               settle_seconds: float = SETTLE_SECONDS, pipeline_wait: float | None = None,
               body_idle_seconds: float = BODY_IDLE_SECONDS) -> FastAPI:
    service = InferenceService(run_dir, workers=workers, settle_every=settle_every,
                               settle_seconds=settle_seconds, pipeline_wait=pipeline_wait,
                               body_idle_seconds=body_idle_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            service.start()
            ticker = asyncio.create_task(service.settle_periodically())
            try:
                yield
            finally:
                ticker.cancel()
        finally:
            await service.stop()

    app = FastAPI(title="Proof-of-Intelligence encrypted inference", version="1",
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def refused(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.message},
                            headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": f"invalid request: "
                                                               f"{exc.errors()!s:.300}"})

    @app.get(f"{API}/model")
    async def model() -> JSONResponse:
        """The served model: digest, its ledger entry with an inclusion proof, the
        architecture, input encoding, CKKS parameters per layout, fee and limits."""
        return JSONResponse(await asyncio.to_thread(service.model_info))

    @app.post(f"{API}/contexts")
    async def contexts(request: Request) -> JSONResponse:
        """Register a public CKKS context (signed by a funded buyer); returns its id."""
        return JSONResponse(await service.register_context(request))

    @app.get(f"{API}/accounts/{{buyer}}")
    async def account(request: Request) -> JSONResponse:
        """A buyer's funded, charged, reserved and settled totals, balance, next nonce."""
        return JSONResponse(service.account(str(request.path_params["buyer"])))

    @app.post(f"{API}/predict")
    async def predict(request: Request) -> Response:
        """Encrypted logits for an encrypted input, charged the buyer fee per prediction."""
        reply, headers = await service.predict(request)
        return Response(content=reply, media_type="application/octet-stream", headers=headers)

    # The run's ledger, read-only, as C2SP tiles (ledger.http): buyers and auditors
    # check the served model's entry and the fee settlements against it.
    app.mount("/ledger", ledger_http_app(run_dir))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema.setdefault("components", {}).pop("schemas", None)
            schema["components"] = {"schemas": SCHEMAS}
            for path, operations in OPERATIONS.items():
                for method, spec in operations.items():
                    operation = schema["paths"][path][method]
                    for key in ("parameters", "requestBody", "responses"):
                        operation.pop(key, None)
                    operation.update(spec)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ------------------------------------------------------------------ the OpenAPI document
DESCRIPTION = ("Send CKKS-encrypted inputs, get encrypted logits; pay per prediction with "
               "signed cumulative vouchers. Every error is JSON {\"error\": \"...\"}, except "
               "the HTTP layer's plain-text 431 (request line and headers over 32 KiB) and "
               "408 (headers not complete within 10 s). Formats, rules and limits: "
               "docs/buyer-api.md.")
ERROR = {"$ref": "#/components/schemas/Error"}
MODEL = {"$ref": "#/components/schemas/Model"}
HEX32 = "^[0-9a-f]{32}$"
HEX64 = "^[0-9a-f]{64}$"
B64 = "^(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
B64_SIGNATURE = "^[A-Za-z0-9+/]{86}==$"
DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
              "properties": {"error": {"type": "string",
                                       "description": "what was expected and what came"}}},
    "Model": {"type": "object", "required": [
        "task_id", "model_digest", "ledger", "architecture", "input", "output", "layouts",
        "fee", "limits"], "properties": {
        "task_id": {"type": "string"}, "model_digest": {"type": "string", "pattern": HEX64},
        "ledger": {"type": "object", "required": [
            "index", "size", "root", "entry", "inclusion_proof", "checkpoint", "log_key"]},
        "architecture": {"type": "object"}, "input": {"type": "object"},
        "output": {"type": "object"}, "layouts": {"type": "object"}, "fee": {"type": "object"},
        "limits": {"type": "object"}}},
    "Context": {"type": "object", "required": ["context_id", "layout", "evicted"],
                "additionalProperties": False, "properties": {
        "context_id": {"type": "string", "pattern": HEX64},
        "layout": {"type": "string", "enum": ["single", "batch"]},
        "evicted": {"type": "array", "items": {"type": "string", "pattern": HEX64},
                    "description": "your contexts dropped to keep within your quota"}}},
    "Account": {"type": "object", "additionalProperties": False, "required": [
        "buyer", "funded", "charged", "reserved", "settled", "balance", "next_nonce", "fee"],
        "properties": {"buyer": {"type": "string", "pattern": HEX32},
                       **{k: {"type": "integer"} for k in (
                           "funded", "charged", "reserved", "settled", "balance",
                           "next_nonce", "fee")}}},
}


def _header(name: str, description: str, pattern: str | None = None, *,
            enum: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": MAX_HEADER_CHARS}
    if pattern:
        schema["pattern"] = pattern
    if enum:
        schema = {"type": "string", "enum": enum}
    return {"name": name, "in": "header", "required": True, "description": description,
            "schema": schema}


def _errors(statuses: dict[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, why in statuses.items():
        response: dict[str, Any] = {"description": why,
                                    "content": {"application/json": {"schema": ERROR}}}
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"schema": DIGITS,
                                                   "description": "seconds"}}
        out[str(status)] = response
    return out


CONTENT_TYPE = "body sent with another Content-Type than application/octet-stream (415)"
BODY_ERRORS = {
    408: "the body did not arrive in time (15 s without a byte, under 32 KiB/s on average "
         "after 10 s, or 300 s in all)",
    413: "the body (declared Content-Length or bytes sent) is over the layout's limit",
    415: "Content-Type is not application/octet-stream",
    429: "too many uploads at once (yours: at most 2; everyone's: 8 spooled bodies and "
         "64 MiB of small ones held); retry after Retry-After seconds",
}
BINARY_BODY = {"type": "string", "format": "binary"}
OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    f"{API}/model": {"get": {"responses": {
        "200": {"description": "the served model",
                "content": {"application/json": {"schema": MODEL}}},
        **_errors({503: "the ledger cannot be read"})}}},
    f"{API}/accounts/{{buyer}}": {"get": {
        "parameters": [{"name": "buyer", "in": "path", "required": True,
                        "description": "the buyer's key id", "schema": {
                            "type": "string", "pattern": HEX32}}],
        "responses": {
            "200": {"description": "the account (all zero for an id the ledger does not know)",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Account"}}}},
            **_errors({400: "not a key id (32 lowercase hex digits)"})}}},
    f"{API}/contexts": {"post": {
        "parameters": [
            _header("X-Poi-Layout", "the context's layout", enum=["single", "batch"]),
            _header("X-Poi-Buyer", "the registering buyer's key id", HEX32),
            _header("X-Poi-Context-Sha256", "SHA-256 of the body, lowercase hex", HEX64),
            _header("X-Poi-Signature", "base64 Ed25519 signature of the buyer over "
                    "'poi/context/v1\\n' + task_id + '\\n' + layout + '\\n' + sha256 hex",
                    B64_SIGNATURE),
        ],
        "requestBody": {"required": True, "description": (
            "the public context in the PHEC container format of docs/buyer-api.md (not a "
            "TenSEAL serialization); at most 96 MiB (single) or 8 MiB (batch)"),
            "content": {"application/octet-stream": {"schema": BINARY_BODY}}},
        "responses": {
            "200": {"description": "registered (or already registered: the same id)",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Context"}}}},
            **_errors({
                400: "a header missing or malformed, or the body's SHA-256 is not the "
                     "declared one",
                401: "the signature does not verify with the buyer's ledger key",
                403: "the buyer has no key on the ledger",
                **BODY_ERRORS,
                422: "the context is refused (secret key, other parameters, Galois steps, ...)",
            })}}},
    f"{API}/predict": {"post": {
        "parameters": [
            _header("X-Poi-Voucher", "base64 of the voucher JSON (docs/buyer-api.md)", B64),
            _header("X-Poi-Signature", "base64 Ed25519 signature over 'poi/voucher/v1\\n' + "
                    "RFC 8785 canonical JSON of the voucher", B64_SIGNATURE),
        ],
        "requestBody": {"required": True, "description": (
            "the encrypted input (PHEQ format); at most 2 MiB (single) or 64 MiB (batch) "
            "for models of up to 64 features, more for wider ones (GET /v1/model: "
            "limits.body_bytes)"),
            "content": {"application/octet-stream": {"schema": BINARY_BODY}}},
        "responses": {
            "200": {"description": "the encrypted logits (PHER format), charged",
                    "headers": {
                        "X-Poi-Charged": {"schema": DIGITS, "required": True,
                                          "description": "this request's price, minor units"},
                        "X-Poi-Cumulative": {"schema": DIGITS, "required": True,
                                             "description": "your charged total after it"},
                        "X-Poi-Balance": {"schema": {"type": "string",
                                                     "pattern": "^-?[0-9]+$"},
                                          "required": True,
                                          "description": "funded minus charged"}},
                    "content": {"application/octet-stream": {"schema": BINARY_BODY}}},
            **_errors({
                400: "headers or voucher malformed, wrong task, count out of range, "
                     "body_sha256 mismatch",
                401: "the signature does not verify with the buyer's ledger key",
                402: "the balance does not cover the voucher's cumulative",
                403: "the buyer has no key on the ledger",
                404: "the context id is not one of this buyer's registered contexts (before "
                     "admission: nothing spent), or it was evicted while the request "
                     "computed (released: the nonce is spent, nothing charged)",
                409: "nonce already used or cumulative not reserved + price (before "
                     "admission: nothing spent), or an earlier pipelined request was not "
                     "served (released: the nonce is spent, nothing charged)",
                **BODY_ERRORS,
                422: "the ciphertext is refused (garbage, truncated, other parameters; "
                     "released: the nonce is spent, nothing charged)",
                503: "the admission could not be recorded (nothing spent), or an HE worker "
                     "failed, the prediction failed or the charge could not be recorded "
                     "(released: the nonce is spent); nothing charged",
            })}}},
}
