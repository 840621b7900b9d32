"""RFC 9162 Merkle proofs: transparency-dev vectors, a recursive reference, properties."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import merkle
from ledger.errors import ProofError

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "rfc6962"
LEAF_INPUTS = [
    bytes.fromhex(text)
    for text in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                 "606162636465666768696a6b6c6d6e6f"]
]  # fmt: skip
ROOT_OF_EIGHT = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


# --------------------------------------------------------------------------
# Reference: RFC 9162 section 2.1 definitions, written literally and recursively.
# --------------------------------------------------------------------------


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 section 2.1.1."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1."""
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 section 2.1.4.1."""
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1."""
    return ref_subproof(m, d, True)


def leaves_of(size: int) -> list[bytes]:
    return [index.to_bytes(4, "big") for index in range(size)]


# --------------------------------------------------------------------------
# transparency-dev/merkle test vectors: happy paths verify, every mutation fails.
# --------------------------------------------------------------------------


def _b64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _load(kind: str) -> list[Any]:
    cases = []
    for path in sorted((VECTORS / kind).rglob("*.json")):
        case = json.loads(path.read_text())
        folder = path.parent.relative_to(VECTORS / kind)
        cases.append(pytest.param(case, id=f"{folder}/{case['desc']}"))
    return cases


INCLUSION_CASES = _load("inclusion")
CONSISTENCY_CASES = _load("consistency")


def test_vectors_are_all_there() -> None:
    assert len(INCLUSION_CASES) > 80
    assert len(CONSISTENCY_CASES) > 80


@pytest.mark.parametrize("case", INCLUSION_CASES)
def test_inclusion_vector(case: dict[str, Any]) -> None:
    def check() -> None:
        merkle.verify_inclusion(
            index=case["leafIdx"],
            size=case["treeSize"],
            leaf_hash=_b64(case["leafHash"]),
            proof=[_b64(node) for node in case["proof"] or []],
            root=_b64(case["root"]),
        )

    if case["wantErr"]:
        with pytest.raises(ProofError, match="expected"):
            check()
    else:
        check()


@pytest.mark.parametrize("case", CONSISTENCY_CASES)
def test_consistency_vector(case: dict[str, Any]) -> None:
    def check() -> None:
        merkle.verify_consistency(
            size1=case["size1"],
            size2=case["size2"],
            proof=[_b64(node) for node in case["proof"] or []],
            root1=_b64(case["root1"]),
            root2=_b64(case["root2"]),
        )

    if case["wantErr"]:
        with pytest.raises(ProofError, match="expected"):
            check()
    else:
        check()


def test_known_roots() -> None:
    hashes = [merkle.hash_leaf(leaf) for leaf in LEAF_INPUTS]
    assert merkle.root_from_leaf_hashes(hashes).hex() == ROOT_OF_EIGHT
    assert merkle.root_from_leaf_hashes([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
    assert ref_mth(LEAF_INPUTS).hex() == ROOT_OF_EIGHT


def test_errors_say_what_was_expected_and_what_came() -> None:
    hashes = [merkle.hash_leaf(leaf) for leaf in LEAF_INPUTS]
    root = merkle.root_from_leaf_hashes(hashes)
    proof = merkle.inclusion_proof(2, 8, hashes)
    with pytest.raises(ProofError, match=r"expected 3 hashes .* got 2"):
        merkle.verify_inclusion(index=2, size=8, leaf_hash=hashes[2], proof=proof[:2], root=root)
    with pytest.raises(ProofError, match=rf"expected root {'00' * 32}, computed {root.hex()}"):
        merkle.verify_inclusion(index=2, size=8, leaf_hash=hashes[2], proof=proof, root=bytes(32))
    with pytest.raises(ProofError, match=r"expected 0 <= index < size, got index 8 and size 8"):
        merkle.inclusion_proof(8, 8, hashes)
    with pytest.raises(ProofError, match="got old_size 0 and new_size 8"):
        merkle.consistency_proof(0, 8, hashes)
    with pytest.raises(ProofError, match="from the empty tree is meaningless"):
        merkle.verify_consistency(size1=0, size2=8, proof=[], root1=merkle.EMPTY_ROOT, root2=root)
    with pytest.raises(ProofError, match=r"expected proof\[0\] to be a 32-byte hash, got 31"):
        merkle.verify_inclusion(
            index=0, size=2, leaf_hash=hashes[0], proof=[hashes[1][:31]], root=root
        )


# --------------------------------------------------------------------------
# Differential tests against the reference, every size up to 64.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(1, 65))
def test_every_proof_up_to_64_matches_the_reference(size: int) -> None:
    data = leaves_of(size)
    hashes = [merkle.hash_leaf(leaf) for leaf in data]
    root = merkle.root_from_leaf_hashes(hashes)
    assert root == ref_mth(data)
    for index in range(size):
        proof = merkle.inclusion_proof(index, size, hashes)
        assert proof == ref_path(index, data)
        merkle.verify_inclusion(
            index=index, size=size, leaf_hash=hashes[index], proof=proof, root=root
        )
    for old_size in range(1, size + 1):
        proof = merkle.consistency_proof(old_size, size, hashes)
        assert proof == (ref_proof(old_size, data) if old_size < size else [])
        merkle.verify_consistency(
            size1=old_size, size2=size, proof=proof, root1=ref_mth(data[:old_size]), root2=root
        )


def test_frontier_nodes_cover_the_tree() -> None:
    for size in range(0, 130):
        covered = 0
        for level, index in merkle.frontier_nodes(size):
            assert index << level == covered
            covered += 1 << level
        assert covered == size


# --------------------------------------------------------------------------
# Properties on random larger trees; a flipped bit anywhere is rejected.
# --------------------------------------------------------------------------


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(min_value=1, max_value=64) | st.integers(min_value=65, max_value=3000))
    return size, draw(st.integers(min_value=0, max_value=size - 1))


_HASH_CACHE: dict[int, list[bytes]] = {}


def hashes_of(size: int) -> list[bytes]:
    if size not in _HASH_CACHE:
        _HASH_CACHE[size] = [merkle.hash_leaf(leaf) for leaf in leaves_of(size)]
    return _HASH_CACHE[size]


@settings(max_examples=60, deadline=None)
@given(tree_and_index(), st.data())
def test_inclusion_proofs_verify_and_reject_any_flipped_bit(
    tree: tuple[int, int], data: st.DataObject
) -> None:
    size, index = tree
    hashes = hashes_of(size)
    root = merkle.root_from_leaf_hashes(hashes)
    proof = merkle.inclusion_proof(index, size, hashes)
    merkle.verify_inclusion(index=index, size=size, leaf_hash=hashes[index], proof=proof, root=root)
    if size <= 256:
        assert proof == ref_path(index, leaves_of(size))
    if proof:
        position = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        flipped = list(proof)
        flipped[position] = _flip(proof[position], bit)
        with pytest.raises(ProofError, match="expected root"):
            merkle.verify_inclusion(
                index=index, size=size, leaf_hash=hashes[index], proof=flipped, root=root
            )
    with pytest.raises(ProofError, match="expected root"):
        merkle.verify_inclusion(
            index=index, size=size, leaf_hash=_flip(hashes[index], 7), proof=proof, root=root
        )


@settings(max_examples=60, deadline=None)
@given(tree_and_index(), st.data())
def test_consistency_proofs_verify_and_reject_any_flipped_bit(
    tree: tuple[int, int], data: st.DataObject
) -> None:
    new_size, old_index = tree
    old_size = old_index + 1
    hashes = hashes_of(new_size)
    old_root = merkle.root_from_leaf_hashes(hashes[:old_size])
    new_root = merkle.root_from_leaf_hashes(hashes)
    proof = merkle.consistency_proof(old_size, new_size, hashes)
    merkle.verify_consistency(
        size1=old_size, size2=new_size, proof=proof, root1=old_root, root2=new_root
    )
    if new_size <= 256 and old_size < new_size:
        assert proof == ref_proof(old_size, leaves_of(new_size))
    if proof:
        position = data.draw(st.integers(0, len(proof) - 1))
        flipped = list(proof)
        flipped[position] = _flip(proof[position], data.draw(st.integers(0, 255)))
        with pytest.raises(ProofError, match="expected (old|new) root"):
            merkle.verify_consistency(
                size1=old_size, size2=new_size, proof=flipped, root1=old_root, root2=new_root
            )


def _flip(node: bytes, bit: int) -> bytes:
    flipped = bytearray(node)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)
