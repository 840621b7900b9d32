"""The log operator's side of the rounds: what the ServerApp writes to the ledger.

One :class:`RoundLedger` per run wraps a :class:`ledger.Log` (SQLite, one writer) and
its blob store. It signs the operator's entries (task, rejection, selection, score,
model), admits the subscribers' own signed entries (candidates, votes) after checking
they say what the reply carried, hands every subscriber the latest checkpoint with a
consistency proof from the tree that subscriber last cosigned, and stores the
subscribers' cosignatures. The committee seed of a round is the ledger root at the
start of its vote, so anyone holding the ledger can recompute the committees.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from client import protocol as P
from ledger.blobs import BlobStore, sign_with_bulk
from ledger.checkpoint import ALG_COSIGNATURE_V1, Checkpoint, NoteVerifier, parse_note
from ledger.cosignatures import cosignature_fields
from ledger.entries import BULK_FIELD, Entry, make_key_entry, parse_entry
from ledger.errors import LedgerError
from ledger.keys import Signer, key_id, parse_public_key
from ledger.log import Log
from server.round.exchange import exchange
from server.round.validation import Rejected

LEDGER_FILE = "ledger.db"
OPERATOR_KEY_FILE = "operator.pem"


def load_or_create_signer(key_path: Path) -> Signer:
    """The key at ``key_path`` (``NAME.pem``), or a new one saved there (mode 0600) with
    its public half beside it (``NAME.pub``)."""
    if key_path.exists():
        return Signer.load(key_path)
    signer = Signer.generate()
    signer.save(key_path, private=True)
    signer.save(key_path.with_suffix(".pub"))
    return signer


@dataclass
class PendingEntries:
    """A subscriber's entries for one phase, checked, waiting for the group commit."""

    node_id: str
    author: str
    leaves: list[bytes]
    cosigned: str | None = None
    witness_key: bytes | None = None


@dataclass
class RoundLedger:
    log_: Log
    blobs: BlobStore
    operator: Signer
    task_id: str
    node_author: dict[str, str] = field(default_factory=dict)
    node_seen: dict[str, int] = field(default_factory=dict)  # last size it cosigned
    node_sent: dict[str, int] = field(default_factory=dict)  # last size we sent it
    cosignatures: int = 0
    size: int = 0
    root_hex: str = ""
    model_sizes: dict[int, int] = field(default_factory=dict)  # round -> size after `model`

    # ----------------------------------------------------------------- set-up
    @classmethod
    def create(cls, out_dir: Path, *, config: Mapping[str, Any],
               initial_model: bytes) -> RoundLedger:
        """Open (or create) ``out_dir/ledger.db`` with the operator key kept beside it,
        and record the task: the config's digest and the initial model's digest (both
        stored as blobs)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        operator = load_or_create_signer(out_dir / OPERATOR_KEY_FILE)
        config_bytes = json.dumps(dict(config), sort_keys=True).encode()
        task_id = hashlib.sha256(config_bytes + initial_model).hexdigest()[:32]
        ledger = Log.open(out_dir / LEDGER_FILE, operator, origin=f"poi/task/{task_id}")
        blobs = BlobStore.beside(out_dir / LEDGER_FILE)
        recorder = cls(ledger, blobs, operator, task_id)
        if ledger.next_seq(operator.key_id) == 0:
            ledger.append(make_key_entry(operator))
        if ledger.size <= 1:
            recorder.append_operator([("task", {
                "task_id": task_id,
                "config_digest": blobs.put(config_bytes),
                "model_digest": blobs.put(initial_model),
            })])
        return recorder

    def close(self) -> None:
        """Close the log, keeping its final size and root for the report."""
        self.size = self.log_.size
        self.root_hex = self.log_.root().hex()
        self.log_.close()

    # ------------------------------------------------------------- to nodes
    def message_config(self, node_id: str) -> dict[str, Any]:
        """Checkpoint, consistency proofs from the last tree we sent this node and from
        the last one it cosigned (they differ when a reply was lost or refused), and
        its next seq."""
        size = self.log_.size
        sent = self.node_sent.get(node_id, 0)
        seen = self.node_seen.get(node_id, 0)
        self.node_sent[node_id] = size
        author = self.node_author.get(node_id)
        return {
            P.TASK_ID: self.task_id,
            P.LEDGER_CHECKPOINT: self.log_.checkpoint(),
            P.LEDGER_LOG_KEY: self.log_.log_key,
            P.LEDGER_PROOF: self._proof(sent, size),
            P.LEDGER_PROOF_FROM: sent,
            P.LEDGER_ALT_PROOF: self._proof(seen, size),
            P.LEDGER_ALT_PROOF_FROM: seen,
            P.LEDGER_NEXT_SEQ: self.log_.next_seq(author) if author else -1,
        }

    def _proof(self, old_size: int, size: int) -> list[str]:
        if not 0 < old_size < size:
            return []
        return [base64.b64encode(h).decode() for h in self.log_.consistency_proof(old_size, size)]

    def apply_to(self, config: ConfigRecord, node_id: str) -> ConfigRecord:
        merged = ConfigRecord(dict(config))
        for key, value in self.message_config(node_id).items():
            merged[key] = value
        return merged

    # ----------------------------------------------------------- from nodes
    def check_reply(self, node_id: str, record: object, *, kind: str,
                    expected: Sequence[Mapping[str, Any]]) -> PendingEntries:
        """Check a reply's ledger record: entries that parse, one ``key`` entry at most
        (first, and only when the log has none from this node), then exactly the
        ``expected`` entries of ``kind`` (field by field), all by one author. Signatures
        are checked by the log at append time. Raises :class:`Rejected`."""
        if not isinstance(record, ConfigRecord):
            raise Rejected("ledger: expected a 'ledger' ConfigRecord in the reply, got none")
        raw = record.get(P.LEDGER_ENTRIES)
        if not isinstance(raw, list) or not all(isinstance(x, bytes) for x in raw):
            raise Rejected("ledger: expected a list of signed entries (bytes)")
        raw = [bytes(x) for x in raw if isinstance(x, bytes)]
        try:
            entries = [parse_entry(leaf) for leaf in raw]
        except LedgerError as exc:
            raise Rejected(f"ledger: {exc}") from exc
        author = self.node_author.get(node_id)
        if entries and entries[0].kind == "key":
            try:
                raw_key = base64.b64decode(str(entries[0].fields.get("public_key", "")),
                                           validate=True)
                parse_public_key(raw_key)
            except (LedgerError, ValueError) as exc:
                raise Rejected(f"ledger: key entry: {exc}") from exc
            if author is not None and author != key_id(raw_key):
                raise Rejected(f"ledger: node already signs as {author}, got a new key")
            author = key_id(raw_key)
            body = entries[1:]
        else:
            body = entries
        if author is not None and any(
                other != node_id and key == author for other, key in self.node_author.items()):
            raise Rejected(f"ledger: key {author} already belongs to another node")
        if author is None:
            raise Rejected("ledger: expected a key entry from a subscriber the log does not know")
        if len(body) != len(expected):
            raise Rejected(f"ledger: expected {len(expected)} {kind} entries, got {len(body)}")
        for entry, want in zip(body, expected, strict=True):
            self._match(entry, author=author, kind=kind, want=want)
        witness_key = record.get(P.LEDGER_WITNESS_KEY)
        cosigned = record.get(P.LEDGER_COSIGNED)
        return PendingEntries(
            node_id=node_id, author=author, leaves=list(raw),
            cosigned=str(cosigned) if isinstance(cosigned, str) else None,
            witness_key=witness_key if isinstance(witness_key, bytes) else None,
        )

    @staticmethod
    def _match(entry: Entry, *, author: str, kind: str, want: Mapping[str, Any]) -> None:
        if entry.author != author:
            raise Rejected(f"ledger: expected entries by {author}, got one by {entry.author}")
        if entry.kind != kind:
            raise Rejected(f"ledger: expected a {kind} entry, got {entry.kind}")
        for name, value in want.items():
            if entry.fields.get(name) != value:
                raise Rejected(
                    f"ledger: signed {kind} says {name}={entry.fields.get(name)!r}, "
                    f"the reply carried {value!r}"
                )

    def commit(self, pending: Sequence[PendingEntries]) -> dict[str, str]:
        """Append the subscribers' entries in one transaction (group commit); if the
        batch is refused, append author by author so one bad entry costs only its
        author. Stores cosignatures. Returns node id -> reason for what was refused."""
        refused: dict[str, str] = {}
        try:
            self.log_.append_many([leaf for p in pending for leaf in p.leaves])
            admitted = list(pending)
        except LedgerError:
            admitted = []
            for item in pending:
                try:
                    self.log_.append_many(item.leaves)
                    admitted.append(item)
                except LedgerError as exc:
                    refused[item.node_id] = f"ledger refused the entries: {exc}"
        for item in admitted:
            self.node_author[item.node_id] = item.author
        self.store_cosignatures(admitted)
        return refused

    def store_cosignatures(self, items: Sequence[PendingEntries]) -> None:
        """Record the subscribers' cosignatures as ``cosignature`` entries (one
        transaction; one that does not verify is left out with a warning)."""
        accepted: list[tuple[PendingEntries, str, NoteVerifier]] = []
        for item in items:
            if not item.cosigned or item.witness_key is None:
                continue
            if key_id(item.witness_key) != item.author:
                continue
            try:
                witness = NoteVerifier.for_key(
                    f"subscriber-{item.author}", item.witness_key, algorithm=ALG_COSIGNATURE_V1)
                cosignature_fields(item.cosigned, log=self.log_.verifier, witness=witness,
                                   origin=self.log_.origin)
            except (LedgerError, ValueError) as exc:
                log(WARNING, "cosignature from node %s refused: %s", item.node_id, exc)
                continue
            accepted.append((item, item.cosigned, witness))
        try:
            self.log_.add_cosignatures([(note, witness) for _, note, witness in accepted])
        except LedgerError:  # one by one, so one bad cosignature costs only itself
            kept = []
            for entry in accepted:
                try:
                    self.log_.add_cosignature(entry[1], witness=entry[2])
                    kept.append(entry)
                except LedgerError as exc:
                    log(WARNING, "cosignature from node %s refused: %s", entry[0].node_id, exc)
            accepted = kept
        for item, note, _ in accepted:
            size = Checkpoint.from_body(parse_note(note).body).size
            self.node_seen[item.node_id] = max(self.node_seen.get(item.node_id, 0), size)
            self.cosignatures += 1

    # ----------------------------------------------------- witnessed to the end
    def witness_final(self, grid: Any, *, timeout: float | None = 300.0) -> int:
        """After the settlement: send every subscriber the final checkpoint with its
        consistency proofs and the settlement's inclusion proof (``query.witness``);
        each checks and cosigns it and keeps the note, and the cosignatures are
        recorded. A node that does not answer within ``timeout`` seconds is left out
        (and the log then fails verify: not witnessed to the end). Returns how many
        subscribers cosigned."""
        settlements = list(self.log_.entries(kind="settlement", bulk=False))
        if not settlements or not self.node_author:
            return 0
        (index, stored), size = settlements[-1], self.log_.size
        # A settlement of many payout lines keeps them in a bulk blob: it travels with
        # the leaf, and each subscriber checks it against the signed digest.
        bulk = stored.fields.get(BULK_FIELD)
        bulk_bytes = self.blobs.get(bulk) if isinstance(bulk, str) else None
        proof = [base64.b64encode(h).decode() for h in self.log_.inclusion_proof(index, size)]
        messages = []
        for node_id in sorted(self.node_author):
            config = ConfigRecord(self.message_config(node_id))
            config[P.LEDGER_SETTLEMENT] = self.log_.entry(index)
            config[P.LEDGER_SETTLEMENT_INDEX] = index
            config[P.LEDGER_SETTLEMENT_PROOF] = proof
            if bulk_bytes is not None:
                config[P.LEDGER_SETTLEMENT_BULK] = bulk_bytes
            messages.append(Message(content=RecordDict({P.CONFIG: config}),
                                    message_type=P.WITNESS_MESSAGE_TYPE,
                                    dst_node_id=int(node_id)))
        pending = []
        for reply in exchange(grid, messages, timeout=timeout):
            node_id = str(reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "node %s did not witness the final checkpoint: %s", node_id,
                    reply.error.reason)
                continue
            record = reply.content.get(P.LEDGER)
            author = self.node_author.get(node_id)
            if not isinstance(record, ConfigRecord) or author is None:
                continue
            cosigned, witness_key = record.get(P.LEDGER_COSIGNED), record.get(P.LEDGER_WITNESS_KEY)
            pending.append(PendingEntries(
                node_id=node_id, author=author, leaves=[],
                cosigned=str(cosigned) if isinstance(cosigned, str) else None,
                witness_key=witness_key if isinstance(witness_key, bytes) else None))
        before = self.cosignatures
        self.store_cosignatures(pending)
        return self.cosignatures - before

    # ---------------------------------------------------------- operator
    def append_operator(self, entries: Sequence[tuple[str, Mapping[str, Any]]]) -> list[int]:
        """Sign and append the operator's own entries in one transaction; remembers the
        tree size right after each round's ``model`` entry (its root seeds the round's
        Shapley orderings)."""
        indices = self.append_signed(self.operator, entries)
        for (kind, fields), index in zip(entries, indices, strict=True):
            if kind == "model":
                self.model_sizes[int(fields["round"])] = index + 1
        return indices

    def append_signed(self, signer: Signer,
                      entries: Sequence[tuple[str, Mapping[str, Any]]]) -> list[int]:
        """Sign ``entries`` with ``signer`` (the operator, or the Scientist when it runs
        beside the operator) and append them in one transaction, registering the
        signer's key first when the log does not know it yet."""
        seq = self.log_.next_seq(signer.key_id)
        leaves = [] if seq > 0 else [make_key_entry(signer)]
        seq = max(seq, 1)
        leaves += [sign_with_bulk(signer, kind, seq=seq + i, fields=fields, blobs=self.blobs)
                   for i, (kind, fields) in enumerate(entries)]
        return self.log_.append_many(leaves)[-len(entries):] if entries else []

    def root(self, size: int | None = None) -> bytes:
        return self.log_.root(size)
