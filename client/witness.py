"""The subscriber's side of the ledger: its Ed25519 identity, the checkpoint check it
runs before any work, its cosignature, and the entries it signs (candidates, ballots).

Before training or voting, a subscriber verifies the operator's signed checkpoint (C2SP
tlog-checkpoint) and an RFC 9162 consistency proof from the last tree it saw (kept in
``Context.state``), so the log operator cannot rewrite history behind its back; on
failure it refuses the work. The operator's key is pinned on first use. The check uses
``ledger.merkle`` and ``ledger.checkpoint`` only (well under a millisecond).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ledger.checkpoint import Checkpoint, NoteVerifier, cosign_checkpoint, parse_checkpoint
from ledger.entries import parse_entry, with_bulk
from ledger.errors import CheckpointError, LedgerError, ProofError, PublicKeyError
from ledger.keys import Signer
from ledger.merkle import hash_leaf, verify_consistency, verify_inclusion

MICRO = 1_000_000


class LedgerRefusal(ValueError):
    """The operator's checkpoint or proof does not hold: the subscriber refuses to work."""


@dataclass(frozen=True)
class SeenTree:
    """The largest tree this subscriber has verified, and the operator key it pinned."""

    log_key: str
    size: int
    root: bytes


def witness_name(signer: Signer) -> str:
    """The subscriber's key name on cosignature lines (C2SP key names: no spaces or +)."""
    return f"subscriber-{signer.key_id}"


def check_checkpoint(
    note: str,
    *,
    log_key: str,
    proof: Sequence[bytes],
    proof_from: int,
    seen: SeenTree | None,
    origin: str | None = None,
    alternatives: Sequence[tuple[int, Sequence[bytes]]] = (),
) -> Checkpoint:
    """Verify the checkpoint's signature and that it extends ``seen``.

    Raises :class:`LedgerRefusal` naming what was expected and what came: another
    operator key than the pinned one, a bad signature, another log's origin, a smaller
    tree (rollback), the same size with another root (a fork), no proof from the size it
    saw, or a consistency proof that does not verify. ``alternatives`` are further
    ``(from_size, proof)`` pairs; the one starting at the size it saw is used.
    """
    if seen is not None and log_key != seen.log_key:
        raise LedgerRefusal(f"ledger: expected the pinned log key {seen.log_key}, got {log_key}")
    try:
        checkpoint = parse_checkpoint(note, verifier=NoteVerifier.from_vkey(log_key),
                                      origin=origin)
    except (CheckpointError, PublicKeyError, ValueError) as exc:
        raise LedgerRefusal(f"ledger: checkpoint does not verify: {exc}") from exc
    if seen is None or seen.size == 0:
        return checkpoint
    if checkpoint.size < seen.size:
        raise LedgerRefusal(
            f"ledger: expected a tree of at least {seen.size} entries, got {checkpoint.size}"
        )
    if checkpoint.size == seen.size:
        if checkpoint.root_hash != seen.root:
            raise LedgerRefusal(f"ledger: two roots for tree size {seen.size} (a fork)")
        return checkpoint
    offered = [(proof_from, proof), *alternatives]
    matching = [p for start, p in offered if start == seen.size]
    if not matching:
        starts = sorted({start for start, _ in offered})
        raise LedgerRefusal(
            f"ledger: expected a consistency proof from size {seen.size}, got one from "
            f"{', '.join(map(str, starts))}"
        )
    proof = matching[0]
    try:
        verify_consistency(size1=seen.size, size2=checkpoint.size, proof=list(proof),
                           root1=seen.root, root2=checkpoint.root_hash)
    except ProofError as exc:
        raise LedgerRefusal(f"ledger: {exc}") from exc
    return checkpoint


def cosign(note: str, signer: Signer, *, timestamp: int | None = None) -> str:
    """The checkpoint note with this subscriber's cosignature/v1 line added."""
    return cosign_checkpoint(note, signer, name=witness_name(signer),
                             timestamp=int(time.time()) if timestamp is None else timestamp)


def notes_dir(key_path: str | os.PathLike[str]) -> Path:
    """Where a subscriber keeps every checkpoint it cosigned: beside its key,
    ``<key name>-notes/`` (in simulation ``<out-dir>/keys/partition-<id>-notes/``)."""
    key = Path(key_path)
    return key.with_name(f"{key.stem}-notes")


def store_note(directory: Path, cosigned: str, *, task_id: str) -> Path:
    """Keep a cosigned checkpoint as ``<task id>-<size, 12 digits>.note`` (atomically).

    These are the notes ``poi ledger verify --checkpoint`` and ``poi ledger
    witness-check --notes`` hold the log to: an operator who rewrites the log and
    re-signs it cannot match them."""
    size = Checkpoint.from_body(cosigned[: cosigned.rfind("\n\n") + 1]).size
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{task_id}-{size:012d}.note"
    temporary = target.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(cosigned)
    os.replace(temporary, target)
    return target


def check_settlement(leaf: bytes, *, index: int, proof: Sequence[bytes],
                     checkpoint: Checkpoint, task_id: str, author: str,
                     bulk: bytes | None = None) -> int:
    """Before cosigning the final checkpoint: the settlement is in that tree and is for
    this task. Returns this subscriber's payout line (0 when it has none: the
    settlement drops zero amounts), which the subscriber keeps beside its notes. A
    settlement that keeps its payout lines in a bulk blob comes with ``bulk``, which
    must hash to the digest the leaf signs.

    Raises :class:`LedgerRefusal` otherwise."""

    def blob(digest: str) -> bytes:
        if bulk is None:
            raise LedgerRefusal(f"ledger: settlement: expected its bulk blob {digest[:16]}, "
                                "got none")
        return bulk

    try:
        verify_inclusion(index=index, size=checkpoint.size, leaf_hash=hash_leaf(leaf),
                         proof=list(proof), root=checkpoint.root_hash)
        entry = with_bulk(parse_entry(leaf), blob)
    except LedgerError as exc:
        raise LedgerRefusal(f"ledger: settlement: {exc}") from exc
    payouts = entry.fields.get("payouts")
    if entry.kind != "settlement" or entry.fields.get("task_id") != task_id \
            or not isinstance(payouts, dict):
        raise LedgerRefusal(f"ledger: expected the settlement of task {task_id}, got a "
                            f"{entry.kind} entry")
    amount = payouts.get(author, 0)
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise LedgerRefusal(f"ledger: the settlement's payout line for {author} is {amount!r}")
    return amount


@functools.lru_cache(maxsize=64)
def load_or_create_key(path: str) -> Signer:
    """The subscriber's Ed25519 key at ``path``, created (mode 0600) on first use. The
    secret never leaves this file; its public half travels in the ``key`` entry."""
    target = Path(path)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process was first: use theirs
            Signer.generate().save(target, private=True)
    if target.stat().st_mode & 0o077:
        os.chmod(target, 0o600)
    return Signer.load(target)


def to_micro(value: float) -> int:
    """Losses on the ledger are integers: micro-units, rounded half to even."""
    return int(round(value * MICRO))


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
