"""An independent tlog-tiles reader, written from https://c2sp.org/tlog-tiles,
c2sp.org/tlog-checkpoint, c2sp.org/signed-note and RFC 6962 section 2.1 alone.

It imports nothing of ours (only hashlib, base64 and ``cryptography`` for Ed25519), so
the tests can hold the served tiles to the specs rather than to our own code.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

Fetch = Callable[[str], bytes]


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(hashes: list[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash over leaf hashes (split at the largest power of 2 < n)."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(mth(hashes[:k]), mth(hashes[k:]))


def index_path(n: int) -> str:
    """"index 1234067 will be encoded as x001/x234/067"."""
    text = f"{n:d}"
    text = "0" * (-len(text) % 3) + text
    groups = [text[i : i + 3] for i in range(0, len(text), 3)]
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def tile_path(level: str, n: int, width: int) -> str:
    return f"tile/{level}/{index_path(n)}" + ("" if width == 256 else f".p/{width}")


def checkpoint_fields(note: str, vkey: str) -> tuple[str, int, bytes]:
    """Origin, size and root of a checkpoint note, after checking the signature of the
    key ``vkey`` (``name+hex4+base64(0x01 || key)``) on it."""
    name, key_hash, encoded = vkey.split("+", 2)  # base64 may hold "+"
    raw = base64.b64decode(encoded)
    assert raw[0] == 0x01 and len(raw) == 33, "an Ed25519 verifier key"
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    assert key_id.hex() == key_hash
    body, _, signatures = note.partition("\n\n")
    body += "\n"
    lines = body.split("\n")
    origin, size, root = lines[0], int(lines[1]), base64.b64decode(lines[2])
    for line in signatures.splitlines():
        assert line.startswith("\u2014 "), line
        signer, signature = line[2:].split(" ")
        blob = base64.b64decode(signature)
        if signer == name and blob[:4] == key_id:
            Ed25519PublicKey.from_public_bytes(raw[1:]).verify(blob[4:], body.encode())
            return origin, size, root
    raise AssertionError("no signature by the log key")


def read_log(fetch: Fetch, vkey: str) -> tuple[int, list[bytes]]:
    """Fetch the checkpoint, every entry bundle and every tile it implies; check each
    entry against its level-0 hash, each tile hash against the tile below, and the root
    against the checkpoint. Returns the size and the entries."""
    _, size, root = checkpoint_fields(fetch("checkpoint").decode(), vkey)
    entries: list[bytes] = []
    below: list[bytes] = []
    level = 0
    while size >> (8 * level):
        count = size >> (8 * level)  # hashes at this tile level
        hashes: list[bytes] = []
        for n in range((count + 255) // 256):
            width = min(256, count - 256 * n)
            data = fetch(tile_path(str(level), n, width))
            assert len(data) == 32 * width, (level, n, width, len(data))
            hashes += [data[i : i + 32] for i in range(0, len(data), 32)]
            if level == 0:
                bundle = fetch(tile_path("entries", n, width))
                offset, got = 0, []
                while offset < len(bundle):
                    length = int.from_bytes(bundle[offset : offset + 2], "big")
                    got.append(bundle[offset + 2 : offset + 2 + length])
                    offset += 2 + length
                assert offset == len(bundle) and len(got) == width
                entries += got
        if level == 0:
            assert [leaf_hash(e) for e in entries] == hashes, "bundles hash to the level-0 tiles"
        else:
            for i, digest in enumerate(hashes):  # a hash of a full tile below
                assert digest == mth(below[256 * i : 256 * i + 256]), (level, i)
        if level == 0:
            assert mth(hashes) == root, "the level-0 hashes give the checkpoint's root"
        below = hashes
        level += 1
    return size, entries
