"""C2SP signed notes, tlog-checkpoint and tlog-cosignature."""

from __future__ import annotations

import base64

import pytest

from ledger import merkle
from ledger.checkpoint import (
    ALG_COSIGNATURE_V1,
    Checkpoint,
    NoteVerifier,
    cosign_checkpoint,
    parse_checkpoint,
    parse_note,
    sign_checkpoint,
    verify_cosignature,
)
from ledger.errors import CheckpointError
from ledger.keys import Signer, verify_signature

# golang.org/x/mod/sumdb/note documentation example (known answer for key ids and format).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_NOTE = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
    "\n"
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfq"
    "dngotpRZb6KE6RyyBwJnAM=\n"
)
ORIGIN = "poi.example/log"


@pytest.fixture
def operator() -> Signer:
    return Signer.from_seed(b"o" * 32)


@pytest.fixture
def note(operator: Signer) -> str:
    return sign_checkpoint(Checkpoint(ORIGIN, 5, bytes(range(32))), operator)


def verifier_of(signer: Signer, name: str = ORIGIN) -> NoteVerifier:
    return NoteVerifier.for_key(name, signer.public_key_bytes)


def test_known_answer_from_the_go_note_package() -> None:
    verifier = NoteVerifier.from_vkey(GO_VKEY)
    assert verifier.key_id.hex() == "c74f20a3"
    assert verifier.vkey() == GO_VKEY
    parsed = parse_note(GO_NOTE)
    (signature,) = parsed.signatures
    assert signature.key_id == verifier.key_id
    assert verify_signature(verifier.public_key, signature.signature, parsed.body.encode())
    assert parsed.text() == GO_NOTE


def test_checkpoint_round_trip(operator: Signer, note: str) -> None:
    body = f"{ORIGIN}\n5\n{base64.b64encode(bytes(range(32))).decode()}\n"
    assert note.startswith(body + "\n\u2014 " + ORIGIN + " ")
    checkpoint = parse_checkpoint(note, verifier=verifier_of(operator), origin=ORIGIN)
    assert checkpoint == Checkpoint(ORIGIN, 5, bytes(range(32)))


def test_extension_lines_round_trip(operator: Signer) -> None:
    checkpoint = Checkpoint(ORIGIN, 1, merkle.EMPTY_ROOT, extensions=("ext one",))
    note = sign_checkpoint(checkpoint, operator)
    assert parse_checkpoint(note, verifier=verifier_of(operator)) == checkpoint


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda n: n.replace("\n5\n", "\n6\n"), "does not verify"),
        (lambda n: n.replace("\n5\n", "\n05\n"), "does not verify|leading zeros"),
        (lambda n: n.replace(ORIGIN, "other.example/log", 1), "does not verify"),
        (lambda n: n.replace("\n\n", "\n"), "no blank line"),
        (lambda n: n[:-1], "end with a newline"),
        (lambda n: n.replace("\u2014", "-"), "signature line"),
        (lambda n: n + "\x07", "control characters"),
        (lambda n: n.replace(f"\u2014 {ORIGIN}", "\u2014 someone.else"), "expected a signature by"),
    ],
    ids=["size", "leading-zero", "origin", "no-blank", "no-newline", "dash", "control", "name"],
)
def test_tampered_notes_are_rejected(operator: Signer, note: str, mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError, match=match):
        parse_checkpoint(mutate(note), verifier=verifier_of(operator))


def test_wrong_key_and_wrong_origin(operator: Signer, note: str) -> None:
    with pytest.raises(CheckpointError, match="expected a signature by"):
        parse_checkpoint(note, verifier=verifier_of(Signer.from_seed(b"x" * 32)))
    with pytest.raises(CheckpointError, match="expected origin 'elsewhere', got"):
        parse_checkpoint(note, verifier=verifier_of(operator), origin="elsewhere")


def test_unknown_signatures_are_ignored(operator: Signer, note: str) -> None:
    stranger = Signer.from_seed(b"s" * 32)
    cosigned = cosign_checkpoint(note, stranger, name="stranger.example", timestamp=1)
    assert parse_checkpoint(cosigned, verifier=verifier_of(operator)).size == 5


def test_verifier_key_parsing() -> None:
    signer = Signer.from_seed(b"v" * 32)
    vkey = verifier_of(signer, "log.example").vkey()
    assert NoteVerifier.from_vkey(vkey).raw_key == signer.public_key_bytes
    name, key_hex, material = vkey.split("+")
    with pytest.raises(CheckpointError, match="expected key id"):
        NoteVerifier.from_vkey(f"{name}+00000000+{material}")
    with pytest.raises(CheckpointError, match="name\\+keyid\\+key"):
        NoteVerifier.from_vkey(f"{name}+{key_hex}")
    small_order = base64.b64encode(b"\x01" + bytes(32)).decode()
    with pytest.raises(CheckpointError, match="small-order"):
        NoteVerifier.from_vkey(f"{name}+00000000+{small_order}")


def test_cosignature_round_trip(note: str) -> None:
    witness = Signer.from_seed(b"w" * 32)
    verifier = NoteVerifier.for_key(
        "witness.example/w1", witness.public_key_bytes, algorithm=ALG_COSIGNATURE_V1
    )
    cosigned = cosign_checkpoint(note, witness, name="witness.example/w1", timestamp=1679315147)
    assert cosigned.startswith(note)
    assert verify_cosignature(cosigned, witness=verifier) == 1679315147
    with pytest.raises(CheckpointError, match="expected a cosignature by"):
        verify_cosignature(note, witness=verifier)
    tampered = cosigned.replace("\n5\n", "\n6\n")
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_cosignature(tampered, witness=verifier)
    with pytest.raises(CheckpointError, match="expected a cosignature/v1"):
        verify_cosignature(cosigned, witness=verifier_of(witness, "witness.example/w1"))
    with pytest.raises(CheckpointError, match="timestamp"):
        cosign_checkpoint(note, witness, name="w", timestamp=2**63)


def test_cosignature_signed_message_is_the_c2sp_one(note: str) -> None:
    witness = Signer.from_seed(b"w" * 32)
    cosigned = cosign_checkpoint(note, witness, name="w.example", timestamp=42)
    line = parse_note(cosigned).signatures[-1]
    assert line.signature[:8] == (42).to_bytes(8, "big")
    message = b"cosignature/v1\ntime 42\n" + parse_note(note).body.encode()
    assert verify_signature(witness.public_key, line.signature[8:], message)


def test_checkpoint_field_checks() -> None:
    with pytest.raises(CheckpointError, match="32-byte root hash, got 3 bytes"):
        Checkpoint(ORIGIN, 1, b"abc")
    with pytest.raises(CheckpointError, match="tree size >= 0"):
        Checkpoint(ORIGIN, -1, bytes(32))
    with pytest.raises(CheckpointError, match="origin, size and root hash lines"):
        Checkpoint.from_body("only\n")
