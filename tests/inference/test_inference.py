"""The encrypted prediction service and the buyer SDK, in process (FastAPI's TestClient
runs the app with its lifespan and worker processes): predictions match the plaintext
model, every prediction is charged, fees are settled on the ledger and audited, and
hostile requests get a 4xx while the service keeps answering valid ones."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from client.buyer import Buyer, BuyerError, verify_model_info
from client.task import digits_split, make_model, set_weights
from crypto import vouchers
from crypto.digests import parse_canonical_tensor_bytes
from ledger import LogReader, Signer
from ledger.blobs import BlobStore
from server.inference.service import create_app, fund_account
from server.market.audit import audit_run
from tests.conftest import set_task_identity
from tests.market.test_market import market_run

FEE = 10


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    set_task_identity()
    out = tmp_path_factory.mktemp("served")
    market_run(out, **{"num-subscribers": 4, "num-server-rounds": 2, "buyer-fee": FEE})
    return out


@pytest.fixture(scope="module")
def service(run_dir: Path) -> Iterator[TestClient]:
    app = create_app(run_dir, workers=1, settle_every=10**9, settle_seconds=3600)
    with TestClient(app) as client:
        yield client


def _buyer(run_dir: Path, tmp_path: Path, client: TestClient, amount: int,
           layout: str = "auto") -> Buyer:
    key = tmp_path / f"buyer-{random.getrandbits(32)}.pem"
    fund_account(run_dir, key, amount)  # the service re-reads the ledger when it must
    return Buyer(str(client.base_url), Signer.load(key), layout=layout, client=client)


def plaintext_logits(run_dir: Path, x: np.ndarray) -> np.ndarray:
    import torch

    info = json.loads((run_dir / "report.json").read_text())["config"]
    model = make_model(hidden_units=info["hidden-units"], activation=info["activation"], seed=0)
    with LogReader.open(run_dir / "ledger.db") as reader:
        digest = [e for _, e in reader.entries(kind="model")][-1].fields["model_digest"]
    set_weights(model, parse_canonical_tensor_bytes(BlobStore.beside(run_dir / "ledger.db")
                                                    .get(digest)))
    with torch.no_grad():
        return model.double()(torch.as_tensor(x, dtype=torch.float64)).numpy()


# ------------------------------------------------------------------------ the happy path
def test_the_served_model_is_the_one_the_ledger_recorded(service: TestClient) -> None:
    info = service.get("/v1/model").json()
    verify_model_info(info)
    assert info["fee"]["per_prediction"] == FEE
    assert set(info["layouts"]) == {"single", "batch"}
    forged = {**info, "model_digest": "0" * 64}
    with pytest.raises(BuyerError, match="digest"):
        verify_model_info(forged)
    moved = {**info, "ledger": {**info["ledger"], "index": info["ledger"]["index"] - 1}}
    with pytest.raises(BuyerError):
        verify_model_info(moved)


@pytest.mark.parametrize("layout", ["single", "batch"])
def test_decrypted_predictions_match_the_plaintext_model(
        run_dir: Path, service: TestClient, tmp_path: Path, layout: str) -> None:
    x = digits_split().test.x[:3 if layout == "single" else 40]
    buyer = _buyer(run_dir, tmp_path, service, FEE * 100, layout=layout)
    logits = buyer.predict(x)
    reference = plaintext_logits(run_dir, x)
    assert logits.shape == (len(x), 10)
    np.testing.assert_array_equal(logits.argmax(axis=1), reference.argmax(axis=1))
    assert np.max(np.abs(logits - reference)) < 0.05
    account = buyer.account()
    assert account["charged"] == FEE * len(x)
    assert account["balance"] == FEE * 100 - FEE * len(x)


def test_a_buyer_without_balance_gets_402_and_no_prediction(
        run_dir: Path, service: TestClient, tmp_path: Path) -> None:
    buyer = _buyer(run_dir, tmp_path, service, FEE * 2, layout="batch")
    x = digits_split().test.x[:3]
    with pytest.raises(BuyerError) as refused:
        buyer.predict(x)  # 3 predictions, balance for 2
    assert refused.value.status == 402
    assert buyer.account()["charged"] == 0
    assert buyer.predict(x[:2]).shape == (2, 10)  # what it can pay for still works
    assert buyer.account()["balance"] == 0


# ------------------------------------------------------------------------ hostile input
def _signed_headers(signer: Signer, voucher: dict[str, Any]) -> dict[str, str]:
    return {"X-Poi-Voucher": base64.b64encode(json.dumps(voucher).encode()).decode(),
            "X-Poi-Signature": base64.b64encode(signer.sign(vouchers.message(voucher))).decode()}


def context_headers(signer: Signer, task_id: str, layout: str, data: bytes
                    ) -> dict[str, str]:
    """The signed headers of a context registration."""
    digest = hashlib.sha256(data).hexdigest()
    signature = signer.sign(vouchers.context_message(task_id, layout, digest))
    return {"X-Poi-Layout": layout, "X-Poi-Buyer": signer.key_id,
            "X-Poi-Context-Sha256": digest, "Content-Type": "application/octet-stream",
            "X-Poi-Signature": base64.b64encode(signature).decode()}


def _raw_signed(signer: Signer, voucher: dict[str, Any]) -> dict[str, str]:
    """Signed over whatever the voucher holds (the SDK would refuse to sign it)."""
    import rfc8785

    signature = signer.sign(vouchers.DOMAIN + rfc8785.dumps(voucher))
    return {"X-Poi-Voucher": base64.b64encode(json.dumps(voucher).encode()).decode(),
            "X-Poi-Signature": base64.b64encode(signature).decode()}


def test_hostile_requests_get_4xx_and_the_service_keeps_serving(
        run_dir: Path, service: TestClient, tmp_path: Path) -> None:
    buyer = _buyer(run_dir, tmp_path, service, FEE * 10_000, layout="batch")
    x = digits_split().test.x[:2]
    buyer.predict(x)  # registers the context, syncs the nonce
    ctx, context_id = buyer._contexts["batch"]
    body = ctx.encrypt(x)
    task_id = buyer.model()["task_id"]
    rng = random.Random(7)

    def voucher(**change: Any) -> dict[str, Any]:
        account = buyer.account()
        base = {"v": 1, "task_id": task_id, "buyer": buyer.signer.key_id,
                "context_id": context_id, "nonce": account["next_nonce"], "count": 2,
                "cumulative": account["charged"] + 2 * FEE,
                "body_sha256": hashlib.sha256(body).hexdigest()}
        return {**base, **change}

    def post(content: bytes, headers: dict[str, str]) -> Any:
        return service.post("/v1/predict", content=content,
                            headers={**headers, "Content-Type": "application/octet-stream"})

    named = {
        "bad signature": (body, {**_signed_headers(buyer.signer, voucher()),
                                 "X-Poi-Signature": base64.b64encode(b"\0" * 64).decode()}, 401),
        "other signer": (body, _signed_headers(Signer.generate(), voucher()), 401),
        "unknown context": (body, _signed_headers(buyer.signer, voucher(context_id="ab" * 32)),
                            404),
        "unknown buyer": (body, _signed_headers(Signer.generate(), voucher(
            buyer=Signer.generate().key_id)), 403),
        "wrong cumulative": (body, _signed_headers(buyer.signer, voucher(cumulative=0)), 409),
        "body mismatch": (body[:-1] + bytes([body[-1] ^ 1]),
                          _signed_headers(buyer.signer, voucher()), 400),
        "count too big": (body, _signed_headers(buyer.signer, voucher(count=10**6)), 400),
        "no headers": (body, {}, 400),
        "not base64": (body, {"X-Poi-Voucher": "%%%", "X-Poi-Signature": "%%%"}, 400),
        "extra voucher field": (body, _raw_signed(buyer.signer, {**voucher(), "x": 1}), 400),
    }
    for name, (content, headers, status) in named.items():
        response = post(content, headers)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"], name
    # garbage ciphertexts, signed properly: refused by the HE checks (422)
    for garbage in (b"", b"\0" * 100, body[: len(body) // 2], bytes(rng.randbytes(5000))):
        v = voucher(body_sha256=hashlib.sha256(garbage).hexdigest())
        response = post(garbage, _signed_headers(buyer.signer, v))
        assert response.status_code == 422, response.text
    # a replayed nonce
    v = voucher()
    assert post(body, _signed_headers(buyer.signer, v)).status_code == 200
    replay = post(body, _signed_headers(buyer.signer, v))
    assert replay.status_code == 409 and "nonce" in replay.json()["error"]
    # an oversize body is refused before it is read
    big = service.post("/v1/predict", content=b"\0" * (65 << 20),
                       headers={**_signed_headers(buyer.signer, voucher()),
                                "Content-Type": "application/octet-stream"})
    assert big.status_code == 413
    # a context that keeps its secret key, and garbage contexts
    from crypto.he import buyer_context

    private = buyer_context("batch")
    private.save(tmp_path / "leaky.ctx", include_secret=True)
    leaked = (tmp_path / "leaky.ctx").read_bytes()  # a context that still holds its secret
    for data in (leaked, b"garbage", b""):
        response = service.post("/v1/contexts", content=data, headers=context_headers(
            buyer.signer, task_id, "batch", data))
        assert response.status_code == 422, response.text
    assert service.post("/v1/contexts", content=b"x", headers={
        **context_headers(buyer.signer, task_id, "batch", b"x"), "X-Poi-Layout": "nope"}
                        ).status_code == 400
    # ...and a valid request still works
    buyer._nonce = None
    assert buyer.predict(x).shape == (2, 10)


def test_fuzz_500_malformed_requests_then_a_valid_one(
        run_dir: Path, service: TestClient, tmp_path: Path) -> None:
    buyer = _buyer(run_dir, tmp_path, service, FEE * 10_000, layout="batch")
    x = digits_split().test.x[:1]
    buyer.predict(x)
    ctx, context_id = buyer._contexts["batch"]
    body = ctx.encrypt(x)
    rng = random.Random(11)
    statuses: dict[int, int] = {}
    for i in range(500):
        account_nonce = 10**6 + i
        v = {"v": 1, "task_id": buyer.model()["task_id"], "buyer": buyer.signer.key_id,
             "context_id": context_id, "nonce": account_nonce, "count": 1,
             "cumulative": 10**9, "body_sha256": hashlib.sha256(body).hexdigest()}
        headers = _signed_headers(buyer.signer, v)
        content = body
        mutation = i % 5
        if mutation == 0:  # flip bytes of the body
            data = bytearray(body)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            content = bytes(data)
        elif mutation == 1:  # truncate
            content = body[: rng.randrange(len(body))]
        elif mutation == 2:  # mangle the voucher header
            raw = bytearray(headers["X-Poi-Voucher"].encode())
            raw[rng.randrange(len(raw))] = rng.randrange(32, 127)
            headers["X-Poi-Voucher"] = raw.decode()
        elif mutation == 3:  # random field values
            key = rng.choice(sorted(v))
            v[key] = rng.choice([None, -1, 2**70, "x", [], {}, 1.5, True])
            headers["X-Poi-Voucher"] = base64.b64encode(json.dumps(v).encode()).decode()
        else:  # random bytes everywhere
            content = rng.randbytes(rng.randrange(0, 4096))
            headers["X-Poi-Signature"] = base64.b64encode(rng.randbytes(64)).decode()
        response = service.post("/v1/predict", content=content, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert 400 <= response.status_code < 500, (i, mutation, response.text)
    assert sum(statuses.values()) == 500
    buyer._nonce = None
    assert buyer.predict(x).shape == (1, 10)


# --------------------------------------------------------------------------------- fees
def test_fees_are_settled_on_the_ledger_conserved_and_audited(
        run_dir: Path, service: TestClient, tmp_path: Path) -> None:
    buyer = _buyer(run_dir, tmp_path, service, FEE * 50, layout="batch")
    buyer.predict(digits_split().test.x[:7])
    settle = service.app.state.service.settle
    indexes = service.portal.call(settle)  # in the app's event loop
    assert indexes
    with LogReader.open(run_dir / "ledger.db") as reader:
        mine = [e for _, e in reader.entries(kind="fee_settlement")
                if e.fields["buyer"] == buyer.signer.key_id]
    assert len(mine) == 1
    entry = mine[0].fields
    assert entry["amount"] == entry["cumulative"] == 7 * FEE
    assert sum(entry["payouts"].values()) == 7 * FEE
    audit = audit_run(run_dir)
    assert audit.ok, audit.mismatches
    assert audit.balances[buyer.signer.key_id] == FEE * 50 - 7 * FEE
    # a second settlement with nothing new writes nothing
    assert service.portal.call(settle) == []


def test_the_demo_buyer_script_end_to_end(run_dir: Path, tmp_path: Path) -> None:
    """poi buyer fund, poi serve (uvicorn, 2 workers), poi buy in both layouts, shutdown
    records the fee settlement, the audit passes."""
    import os
    import shutil
    import subprocess

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("inference"))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([str(root / "scripts" / "demo-buy.sh"), str(run), "3"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"row"')]
    assert len(rows) == 1 + 3 and all(0 <= r["class"] <= 9 for r in rows)
    assert rows[0]["class"] == rows[1]["class"]  # the same digit through both layouts
    with LogReader.open(run / "ledger.db") as reader:
        buyer = Signer.load(run / "buyer.pem").key_id
        (settled,) = [e.fields for _, e in reader.entries(kind="fee_settlement")
                      if e.fields["buyer"] == buyer]
    assert settled["amount"] == 4 * FEE and sum(settled["payouts"].values()) == 4 * FEE
    assert audit_run(run).ok


def test_a_settlement_records_the_snapshot_not_charges_that_land_meanwhile(
        run_dir: Path, service: TestClient, tmp_path: Path) -> None:
    svc = service.app.state.service
    buyer = _buyer(run_dir, tmp_path, service, FEE * 50, layout="batch")
    buyer.predict(digits_split().test.x[:3])
    snapshot = svc.pending()
    key = buyer.signer.key_id
    charged = snapshot[key][0]
    buyer.predict(digits_split().test.x[:2])  # lands while the settlement is "written"
    svc._write_settlements({key: snapshot[key]})
    assert svc.view.settled[key] == charged == 3 * FEE
    buyer.predict(digits_split().test.x[:1])
    service.portal.call(svc.settle)
    with LogReader.open(run_dir / "ledger.db") as reader:
        mine = [e.fields for _, e in reader.entries(kind="fee_settlement")
                if e.fields["buyer"] == key]
    assert [(m["amount"], m["cumulative"]) for m in mine] == [(3 * FEE, 3 * FEE),
                                                              (3 * FEE, 6 * FEE)]
    assert audit_run(run_dir).ok


def test_nothing_the_buyer_sends_holds_its_secret_key(
        run_dir: Path, service: TestClient, tmp_path: Path) -> None:
    from crypto import he

    buyer = _buyer(run_dir, tmp_path, service, FEE * 100)
    sent: list[bytes] = []
    request = buyer.client.request  # type: ignore[union-attr]

    def recording(method: str, url: str, **kwargs: Any) -> Any:
        sent.append(bytes(kwargs.get("content") or b""))
        sent.append(json.dumps(dict(kwargs.get("headers") or {})).encode())
        return request(method, url, **kwargs)

    buyer.client.request = recording  # type: ignore[union-attr,method-assign]
    buyer.predict(digits_split().test.x[:1])  # single layout
    buyer.predict(digits_split().test.x[:6])  # batch layout
    assert len(sent) >= 8
    for layout in ("single", "batch"):
        ctx, _ = buyer._contexts[layout]
        secret = he._save(ctx._secret_key)
        for blob in sent:
            assert secret not in blob and secret[4096:4160] not in blob


def test_openapi_docs_are_served(service: TestClient) -> None:
    assert service.get("/docs").status_code == 200
    paths = service.get("/openapi.json").json()["paths"]
    assert {"/v1/model", "/v1/contexts", "/v1/predict", "/v1/accounts/{buyer}"} <= set(paths)


class _Busy:
    """In front of the real service: the first ``refusals`` POST /predict get what a
    congested service answers (429, Retry-After 1, nothing charged)."""

    def __init__(self, inner: Any, refusals: int) -> None:
        self.inner, self.refusals, self.seen = inner, refusals, 0

    def handle_request(self, request: Any) -> Any:
        import httpx

        if request.url.path.endswith("/predict"):
            self.seen += 1
            if self.refusals:
                self.refusals -= 1
                return httpx.Response(429, headers={"Retry-After": "1"},
                                      json={"error": "too many uploads at once: retry later"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("refusals", [2, 5])
def test_the_buyer_retries_a_busy_service_after_retry_after_and_pays_once(
        run_dir: Path, service: TestClient, tmp_path: Path, refusals: int) -> None:
    import httpx

    busy = _Busy(service._transport, refusals)
    client = httpx.Client(base_url=str(service.base_url), transport=busy)  # type: ignore[arg-type]
    buyer = _buyer(run_dir, tmp_path, service, 10 * FEE, layout="single")
    buyer.client, slept = client, []
    buyer.sleep = slept.append
    x = digits_split().test.x[:1]
    if refusals <= buyer.retries:
        logits = buyer.predict(x)
        assert np.allclose(logits, plaintext_logits(run_dir, x), atol=1e-3)
        assert slept == [1.0] * refusals and busy.seen == refusals + 1
        assert buyer.charged == FEE
    else:
        with pytest.raises(BuyerError) as caught:
            buyer.predict(x)
        assert caught.value.status == 429 and caught.value.retry_after == 1.0
        assert slept == [1.0] * buyer.retries and busy.seen == buyer.retries + 1
    # never charged for a refused attempt: the service's own account says so
    account = buyer.account()
    paid = FEE if refusals <= buyer.retries else 0
    assert account["charged"] == paid and account["balance"] == 10 * FEE - paid
