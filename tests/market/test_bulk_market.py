"""A whole task whose round, Scientist and settlement entries keep their lists in bulk
blobs (the form they take past 16 KiB, at hundreds of subscribers; forced here with a
tiny threshold on a small federation): it settles, every subscriber witnesses its payout
line from the settlement's blob, the audit passes; an altered bulk blob fails it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ledger import LogReader
from ledger.blobs import BlobStore
from ledger.entries import BULK_FIELD
from server.market.audit import audit_run
from tests.conftest import set_task_identity
from tests.market.test_market import market_run


@pytest.fixture(scope="module")
def spilled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    set_task_identity()
    out = tmp_path_factory.mktemp("bulk")
    patch = pytest.MonkeyPatch()
    patch.setattr("ledger.entries.BULK_THRESHOLD", 300)
    try:
        report = market_run(out, **{"num-server-rounds": 2})
    finally:
        patch.undo()
    return out, report


def _stored(out: Path) -> dict[str, list[Any]]:
    with LogReader.open(out / "ledger.db") as reader:
        kinds: dict[str, list[Any]] = {}
        for _, entry in reader.entries(bulk=False):
            kinds.setdefault(entry.kind, []).append(entry)
    return kinds


def test_the_growing_entries_are_spilled_and_the_task_settles(spilled) -> None:
    out, report = spilled
    kinds = _stored(out)
    for kind in ("selection", "validation_marginals", "settlement"):
        assert all(BULK_FIELD in e.fields for e in kinds[kind]), kind
    assert "payouts" not in kinds["settlement"][0].fields
    # subscribers' own entries are never spilled
    assert not any(BULK_FIELD in e.fields for e in kinds["ballot"] + kinds["candidate"])
    market = report["market"]
    assert market["audit_ok"] is True and market["forfeited"] is False
    assert sum(market["payouts"].values()) + market["scientist_refund"] == market["escrow"]
    # every subscriber cosigned the final checkpoint after checking its line in the blob
    assert report["ledger"]["cosignatures"] >= 5
    with LogReader.open(out / "ledger.db") as reader:
        (_, settlement), = reader.entries(kind="settlement")
    assert dict(settlement.fields["payouts"]) == market["payouts"]


def test_the_subscribers_kept_the_payout_line_the_blob_says(spilled) -> None:
    out, report = spilled
    notes = sorted(out.glob("keys/*/*.payout")) or sorted(out.rglob("*.payout"))
    assert len(notes) == 5
    lines = sorted(int(p.read_text()) for p in notes)
    paid = sorted(report["market"]["payouts"].get(s["key_id"], 0)
                  for s in report["subscribers"])
    assert lines == paid


@pytest.mark.parametrize("kind", ["selection", "settlement", "validation_marginals"])
def test_an_altered_bulk_blob_fails_the_audit(spilled, tmp_path, kind) -> None:
    out, _ = spilled
    run = tmp_path / "run"
    shutil.copytree(out, run)
    digest = _stored(run)[kind][0].fields[BULK_FIELD]
    blobs = BlobStore.beside(run / "ledger.db")
    data = json.loads(blobs.get(digest))
    name = sorted(data)[0]
    data[name] = data[name][1:] if isinstance(data[name], list) else {}
    blobs.path(digest).write_bytes(json.dumps(data).encode())
    audit = audit_run(run)
    assert not audit.ok
    assert any("bulk blob" in m or "hashing" in m for m in audit.mismatches), audit.mismatches


def test_a_missing_bulk_blob_fails_the_audit(spilled, tmp_path) -> None:
    out, _ = spilled
    run = tmp_path / "run"
    shutil.copytree(out, run)
    digest = _stored(run)["settlement"][0].fields[BULK_FIELD]
    BlobStore.beside(run / "ledger.db").path(digest).unlink()
    audit = audit_run(run)
    assert not audit.ok and any("found none" in m for m in audit.mismatches)


def test_the_inference_index_reads_a_spilled_fee_settlement(spilled, tmp_path) -> None:
    """400+ contributors make a fee settlement pass 16 KiB: the service's incremental
    index must see its voucher and payout lines as every other reader does."""
    from ledger import Log, Signer
    from ledger.blobs import sign_with_bulk
    from server.inference.accounts import LedgerIndex

    out, _ = spilled
    run = tmp_path / "run"
    shutil.copytree(out, run)
    index = LedgerIndex(run / "ledger.db")
    view = index.view
    operator = Signer.load(run / "operator.pem")
    buyer = "b" * 32
    voucher = {"v": 1, "task_id": view.task_id, "buyer": buyer, "context_id": "c" * 64,
               "nonce": 3, "count": 1, "cumulative": 10, "body_sha256": "d" * 64}
    fields = {"task_id": view.task_id, "buyer": buyer, "voucher": voucher,
              "voucher_signature": "s", "amount": 10, "cumulative": 10,
              "payouts": {f"{i:032x}": 1 for i in range(600)}}
    with LogReader.open(run / "ledger.db") as reader:
        origin = reader.origin
    with Log.open(run / "ledger.db", operator, origin) as log:
        leaf = sign_with_bulk(operator, "fee_settlement", seq=log.next_seq(operator.key_id),
                              fields=fields, blobs=BlobStore.beside(run / "ledger.db"))
        log.append_many([leaf])
    assert index.refresh(force=True)
    assert view.settled[buyer] == 10 and view.settled_voucher[buyer][0] == 3
