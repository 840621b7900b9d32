"""RFC 9162 section 2.1 Merkle tree hashing, inclusion and consistency proofs.

Names and structure follow transparency-dev/merkle (``proof/verify.go``) and its
Python port in sigstore-python (``_internal/merkle.py``): ``LEAF_PREFIX``,
``NODE_PREFIX``, ``_chain_inner``, ``_chain_inner_right``, ``_chain_border_right``,
``_decomp_incl_proof``. Indexes are 0-based; a tree of ``size`` leaves holds
indexes ``0 .. size - 1``. Stdlib only, no storage and no keys, so a subscriber can
verify with this file alone.

Proof *generation* works against any :class:`SubtreeSource` (an object that returns
``MTH(D[start:end])`` for the aligned ranges a proof needs): the SQLite log answers
from its stored complete-subtree hashes in O(log n); :class:`LeafHashes` answers
from an in-memory list of leaf hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ledger.errors import ProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "LeafHashes",
    "SubtreeSource",
    "consistency_proof",
    "consistency_ranges",
    "frontier_append",
    "frontier_nodes",
    "hash_children",
    "hash_leaf",
    "inclusion_proof",
    "inclusion_ranges",
    "root_from_consistency_proof",
    "root_from_frontier",
    "root_from_inclusion_proof",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

# RFC 9162 section 2.1.1: domain separation between leaves and interior nodes.
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_SIZE = 32
# RFC 9162 section 2.1.1: MTH({}) = SHA-256().
EMPTY_ROOT = hashlib.sha256(b"").digest()


def hash_leaf(data: bytes) -> bytes:
    """MTH({d(0)}) = SHA-256(0x00 || d(0)) (RFC 9162 section 2.1.1)."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right), the interior node hash (RFC 9162 section 2.1.1)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 9162 section 2.1.1: the largest power of two smaller than n. Requires n > 1."""
    assert n > 1, n
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) from already hashed leaves, iteratively (RFC 9162 section 2.1.1).

    Any sequence (including empty, giving ``EMPTY_ROOT``) is accepted. Runs in O(n)
    time and O(log n) memory by folding complete subtrees, as a log appends.
    """
    frontier: list[bytes] = []
    for size, leaf_hash in enumerate(leaf_hashes):
        frontier, _ = frontier_append(frontier, size=size, leaf_hash=leaf_hash)
    return root_from_frontier(frontier)


# --------------------------------------------------------------------------
# Frontier (compact range [0, size)): the hashes of the complete subtrees that
# make up a tree of `size` leaves, largest (leftmost) first. A log appends in
# O(1) amortized and computes its root in O(log n) from it.
# --------------------------------------------------------------------------


def frontier_nodes(size: int) -> list[tuple[int, int]]:
    """The (level, index) of each complete subtree in the frontier of a tree of ``size``.

    Level 0 holds leaves; node (level, index) covers leaves
    ``[index * 2**level, (index + 1) * 2**level)``. Requires size >= 0.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    nodes = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


def frontier_append(
    frontier: Sequence[bytes], *, size: int, leaf_hash: bytes
) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """Append one leaf to the frontier of a tree of ``size`` leaves.

    Requires ``len(frontier) == popcount(size)`` (the frontier of exactly that
    tree). Returns the new frontier and every complete subtree the append created,
    as (level, index, hash), the leaf itself first.
    """
    assert len(frontier) == size.bit_count(), (len(frontier), size)
    new_frontier = list(frontier)
    created = [(0, size, leaf_hash)]
    node, level, index = leaf_hash, 0, size
    while index & 1:
        node = hash_children(new_frontier.pop(), node)
        level, index = level + 1, index >> 1
        created.append((level, index, node))
    new_frontier.append(node)
    return new_frontier, created


def root_from_frontier(frontier: Sequence[bytes]) -> bytes:
    """MTH of the tree whose frontier is given, folding right to left (RFC 9162 2.1.1)."""
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for node in reversed(frontier[:-1]):
        root = hash_children(node, root)
    return root


# --------------------------------------------------------------------------
# Proof generation (RFC 9162 sections 2.1.3.1 and 2.1.4.1), written as the
# ranges of leaves whose subtree hashes make up the proof, bottom up.
# --------------------------------------------------------------------------


class SubtreeSource(Protocol):
    """Anything that returns MTH(D[start:end]) for the ranges a proof asks for.

    Every range a proof asks for is aligned: ``start`` is a multiple of the
    smallest power of two >= ``end - start``, so it decomposes into O(log n)
    complete subtrees.
    """

    def subtree_hash(self, start: int, end: int) -> bytes: ...


@dataclass(frozen=True)
class LeafHashes:
    """A :class:`SubtreeSource` over an in-memory list of leaf hashes (O(n) per call)."""

    leaf_hashes: Sequence[bytes]

    def subtree_hash(self, start: int, end: int) -> bytes:
        if not 0 <= start < end <= len(self.leaf_hashes):
            raise ValueError(f"range [{start}, {end}) is not inside [0, {len(self.leaf_hashes)})")
        return root_from_leaf_hashes(self.leaf_hashes[start:end])


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges of PATH(index, D[size]) (RFC 9162 section 2.1.3.1), bottom up.

    Requires 0 <= index < size.
    """
    if not 0 <= index < size:
        raise ProofError(f"expected 0 <= index < size, got index {index} and size {size}")
    siblings = []  # top down
    low, high = 0, size
    while high - low > 1:
        k = _largest_power_of_two_below(high - low)
        if index - low < k:
            siblings.append((low + k, high))
            high = low + k
        else:
            siblings.append((low, low + k))
            low = low + k
    return siblings[::-1]


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Leaf ranges of PROOF(old_size, D[new_size]) (RFC 9162 section 2.1.4.1), bottom up.

    Requires 0 < old_size <= new_size; the proof between equal sizes is empty. A
    proof from the empty tree is meaningless (transparency-dev/merkle refuses it too).
    """
    if not 0 < old_size <= new_size:
        raise ProofError(
            f"expected 0 < old_size <= new_size, got old_size {old_size} and new_size {new_size}"
        )
    if old_size == new_size:
        return []
    siblings = []  # top down: SUBPROOF appends its sibling after the recursive part
    low, high, m, complete = 0, new_size, old_size, True
    while m != high - low:
        k = _largest_power_of_two_below(high - low)
        if m <= k:
            siblings.append((low + k, high))
            high = low + k
        else:
            siblings.append((low, low + k))
            low, m, complete = low + k, m - k, False
    # SUBPROOF(m, D[m], b) is {} when b is true (the old root is known), else {MTH(D[m])}.
    head = [] if complete else [(low, high)]
    return head + siblings[::-1]


def _as_source(source: Sequence[bytes] | SubtreeSource) -> SubtreeSource:
    if hasattr(source, "subtree_hash"):
        return source  # type: ignore[return-value]
    return LeafHashes(source)  # type: ignore[arg-type]


def inclusion_proof(index: int, size: int, source: Sequence[bytes] | SubtreeSource) -> list[bytes]:
    """The inclusion proof PATH(index, D[size]) (RFC 9162 section 2.1.3.1), bottom up.

    ``source`` is a list of leaf hashes or a :class:`SubtreeSource` holding at least
    ``size`` leaves. Requires 0 <= index < size.
    """
    tree = _as_source(source)
    return [tree.subtree_hash(start, end) for start, end in inclusion_ranges(index, size)]


def consistency_proof(
    old_size: int, new_size: int, source: Sequence[bytes] | SubtreeSource
) -> list[bytes]:
    """The consistency proof PROOF(old_size, D[new_size]) (RFC 9162 section 2.1.4.1).

    ``source`` is a list of leaf hashes or a :class:`SubtreeSource` holding at least
    ``new_size`` leaves. Requires 0 < old_size <= new_size.
    """
    tree = _as_source(source)
    return [tree.subtree_hash(start, end) for start, end in consistency_ranges(old_size, new_size)]


# --------------------------------------------------------------------------
# Verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2), in the bit-twiddling
# form of transparency-dev/merkle.
# --------------------------------------------------------------------------


def _inner_proof_size(index: int, size: int) -> int:
    return (index ^ (size - 1)).bit_length()


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    """Split an inclusion proof into its inner and border parts; returns their lengths.

    The split is where the paths to ``index`` and ``size - 1`` diverge.
    Requires 0 <= index < size.
    """
    inner = _inner_proof_size(index, size)
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    """Hash ``seed`` up the tree below the right border; ``proof`` is ordered bottom up."""
    for i, node in enumerate(proof):
        seed = hash_children(seed, node) if (index >> i) & 1 == 0 else hash_children(node, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    """Like :func:`_chain_inner`, but only with left-hand siblings: the older tree's hash."""
    for i, node in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = hash_children(node, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    """Hash along the right border, where every sibling is on the left."""
    for node in proof:
        seed = hash_children(node, seed)
    return seed


def _check_hashes(proof: Sequence[bytes]) -> None:
    for position, node in enumerate(proof):
        if len(node) != HASH_SIZE:
            raise ProofError(
                f"expected proof[{position}] to be a {HASH_SIZE}-byte hash, got {len(node)} bytes"
            )


def root_from_inclusion_proof(
    *, index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes]
) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 section 2.1.3.2).

    Requires 0 <= index < size, a 32-byte ``leaf_hash`` and exactly as many 32-byte
    proof hashes as PATH(index, D[size]) has; raises :class:`ProofError` otherwise.
    """
    if not 0 <= index < size:
        raise ProofError(f"expected 0 <= index < size, got index {index} and size {size}")
    if len(leaf_hash) != HASH_SIZE:
        raise ProofError(f"expected a {HASH_SIZE}-byte leaf hash, got {len(leaf_hash)} bytes")
    inner, border = _decomp_incl_proof(index, size)
    if len(proof) != inner + border:
        raise ProofError(
            f"expected {inner + border} hashes in the inclusion proof for index {index} "
            f"in a tree of size {size}, got {len(proof)}"
        )
    _check_hashes(proof)
    node = _chain_inner(leaf_hash, proof[:inner], index)
    return _chain_border_right(node, proof[inner:])


def verify_inclusion(
    *, index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``.

    Requires 0 <= index < size. Raises :class:`ProofError` naming the expected and
    the computed root when the proof does not verify (RFC 9162 section 2.1.3.2).
    """
    computed = root_from_inclusion_proof(index=index, size=size, leaf_hash=leaf_hash, proof=proof)
    if computed != root:
        raise ProofError(
            f"inclusion proof for index {index} in a tree of size {size}: "
            f"expected root {root.hex()}, computed {computed.hex()}"
        )


def root_from_consistency_proof(
    *, size1: int, size2: int, proof: Sequence[bytes], root1: bytes
) -> bytes:
    """The root of the tree of ``size2`` implied by a consistency proof from ``root1``.

    Requires 0 < size1 <= size2 and, when size1 == size2, an empty proof; checks that
    the proof also reproduces ``root1`` (RFC 9162 section 2.1.4.2). Raises
    :class:`ProofError` otherwise.
    """
    if size2 < size1:
        raise ProofError(f"expected size1 <= size2, got size1 {size1} and size2 {size2}")
    if size1 == 0:
        raise ProofError(
            "expected size1 > 0: a consistency proof from the empty tree is meaningless"
        )
    if size1 == size2:
        if proof:
            raise ProofError(f"expected an empty proof for equal sizes {size1}, got {len(proof)}")
        return root1
    if not proof:
        raise ProofError(
            f"expected a non-empty consistency proof from {size1} to {size2}, got none"
        )

    inner, border = _decomp_incl_proof(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1  # trailing zeros of size1
    inner -= shift  # shift < inner when size1 < size2
    # The proof starts with the hash of the subtree of size 2**shift that ends at
    # size1, unless size1 is that very subtree, whose hash is root1.
    if size1 == 1 << shift:
        seed, start = root1, 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        raise ProofError(
            f"expected {start + inner + border} hashes in the consistency proof from "
            f"{size1} to {size2}, got {len(proof)}"
        )
    _check_hashes(proof)
    path = proof[start:]
    mask = (size1 - 1) >> shift  # chain from level `shift` up
    hash1 = _chain_inner_right(seed, path[:inner], mask)
    hash1 = _chain_border_right(hash1, path[inner:])
    if hash1 != root1:
        raise ProofError(
            f"consistency proof from {size1} to {size2}: expected old root {root1.hex()}, "
            f"computed {hash1.hex()}"
        )
    hash2 = _chain_inner(seed, path[:inner], mask)
    return _chain_border_right(hash2, path[inner:])


def verify_consistency(
    *, size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree (size2, root2) extends the tree (size1, root1).

    Requires 0 < size1 <= size2. Raises :class:`ProofError` naming what was expected
    and what was computed (RFC 9162 section 2.1.4.2).
    """
    computed = root_from_consistency_proof(size1=size1, size2=size2, proof=proof, root1=root1)
    if computed != root2:
        raise ProofError(
            f"consistency proof from {size1} to {size2}: expected new root {root2.hex()}, "
            f"computed {computed.hex()}"
        )
