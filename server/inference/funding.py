"""Buyer funding and the ledger writer the service shares with it: ``poi buyer fund``
records a payment received outside the system as the buyer's ``key`` entry (once,
signed by the buyer) and the operator's ``fund`` entry; the service reads balances from
those entries (``accounts.LedgerIndex``) and appends its fee settlements through
:func:`open_writer`.
"""

from __future__ import annotations

import time
from pathlib import Path

from crypto import vouchers
from ledger import LogReader
from ledger.entries import make_key_entry, sign_entry
from ledger.errors import StoreError
from ledger.keys import Signer
from ledger.log import Log


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
