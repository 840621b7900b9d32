"""The ledger in the C2SP tlog-tiles layout: tile paths, hash tiles and entry bundles.

https://c2sp.org/tlog-tiles serves a Merkle tree as static resources:

- ``tile/<L>/<N>[.p/<W>]``: the ``N``-th tile at level ``L`` holds the hashes
  ``MTH(D[(N*256 + i) * 256**L : (N*256 + i + 1) * 256**L])`` for ``i < W`` (``W`` = 256
  for a full tile; a partial tile has 1 to 255), concatenated, 32 bytes each. In our
  node numbering (:func:`ledger.log.node_id`) those are the stored subtree hashes at
  tree level ``8 * L``, indices ``256 * N .. 256 * N + W - 1``.
- ``tile/entries/<N>[.p/<W>]``: entry bundles, the leaves ``256 * N ..`` each prefixed
  by its length as a big-endian uint16 (so no leaf may exceed 65,535 bytes:
  :data:`MAX_ENTRY_SIZE`, which :class:`ledger.log.Log` enforces).
- ``<N>`` is written in 3-digit groups, every group but the last prefixed ``x``:
  1234067 is ``x001/x234/067``.

For a tree of ``s`` leaves, level ``L`` has ``s // 256**(L+1)`` full tiles and one
partial tile of width ``(s // 256**L) % 256`` when that is not 0 (:func:`tiles_for`).
This module is pure (paths, encodings, widths) plus :func:`read_tile`, which cuts a
resource out of a :class:`ledger.log.LogReader`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ledger.errors import StoreError

__all__ = [
    "HASH_SIZE",
    "MAX_ENTRY_SIZE",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "TileError",
    "TileRef",
    "decode_bundle",
    "count_tiles",
    "encode_bundle",
    "iter_tiles",
    "parse_tile_path",
    "split_hashes",
    "tile_width",
    "tiles_for",
]

TILE_HEIGHT = 8  # tree levels a tile spans
TILE_WIDTH = 1 << TILE_HEIGHT  # hashes in a full tile
HASH_SIZE = 32
MAX_ENTRY_SIZE = 0xFFFF  # an entry bundle's uint16 length prefix
MAX_TILE_LEVEL = 63
_GROUP = re.compile(r"x[0-9]{3}")
_LAST = re.compile(r"[0-9]{3}")
_WIDTH = re.compile(r"[1-9][0-9]{0,2}")
_LEVEL = re.compile(r"0|[1-9][0-9]?")
_LENGTH = struct.Struct(">H")


class TileError(StoreError):
    """A tile path, a tile or an entry bundle that is not what the spec allows."""


@dataclass(frozen=True, order=True)
class TileRef:
    """One resource: a hash tile (``level`` >= 0) or an entry bundle (``level`` = -1)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    @property
    def is_entries(self) -> bool:
        return self.level < 0

    @property
    def node_level(self) -> int:
        """The tree level of the hashes in this tile (0 for entry bundles)."""
        return max(self.level, 0) * TILE_HEIGHT

    @property
    def start(self) -> int:
        """Index of its first hash (or entry) at :attr:`node_level`."""
        return self.index * TILE_WIDTH

    @property
    def path(self) -> str:
        """``tile/<L>/<N>[.p/<W>]`` or ``tile/entries/<N>[.p/<W>]``."""
        level = "entries" if self.is_entries else str(self.level)
        partial = "" if self.width == TILE_WIDTH else f".p/{self.width}"
        return f"tile/{level}/{_index_path(self.index)}{partial}"

    @property
    def size(self) -> int:
        """Bytes of a hash tile (entry bundles vary)."""
        return self.width * HASH_SIZE


def _index_path(index: int) -> str:
    if index < 0:
        raise TileError(f"expected a tile index >= 0, got {index}")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(groups))


def parse_tile_path(path: str) -> TileRef:
    """The resource a ``tile/...`` path names; :class:`TileError` for anything the spec
    does not allow (leading zeroes, a width of 0 or 256, a level above 63, ...)."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TileError(f"expected tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>], got {path!r}")
    if parts[1] == "entries":
        level = -1
    elif _LEVEL.fullmatch(parts[1]) and int(parts[1]) <= MAX_TILE_LEVEL:
        level = int(parts[1])
    else:
        raise TileError(f"expected a tile level 0-63 or 'entries', got {parts[1]!r} in {path!r}")
    rest = parts[2:]
    width = TILE_WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        if not _WIDTH.fullmatch(rest[-1]) or int(rest[-1]) >= TILE_WIDTH:
            raise TileError(f"expected a partial width 1-255, got {rest[-1]!r} in {path!r}")
        width = int(rest[-1])
        rest = [*rest[:-2], rest[-2][: -len(".p")]]
    *groups, last = rest
    if not all(_GROUP.fullmatch(g) for g in groups) or not _LAST.fullmatch(last):
        raise TileError(f"expected a tile index as x000/.../000 groups, got {'/'.join(rest)!r}")
    if groups and groups[0] == "x000":
        raise TileError(f"expected no leading x000 group in the tile index of {path!r}")
    index = 0
    for group in [*groups, last]:
        index = index * 1000 + int(group.lstrip("x"))
    return TileRef(level, index, width)


def tile_width(level: int, index: int, size: int) -> int:
    """How many hashes (entries for ``level`` -1) tile ``index`` has in a tree of ``size``."""
    count = size >> (max(level, 0) * TILE_HEIGHT)  # complete nodes at the tile's level
    return max(0, min(TILE_WIDTH, count - index * TILE_WIDTH))


def iter_tiles(size: int, *, entries: bool = True) -> Iterator[TileRef]:
    """Every resource that represents the tree of ``size`` leaves, lazily: its entry
    bundles (``entries``), then each level's full tiles and partial tile, bottom up."""
    levels = [-1] if entries else []
    level = 0
    while size >> (level * TILE_HEIGHT):
        levels.append(level)
        level += 1
    for level in levels:
        count = size >> (max(level, 0) * TILE_HEIGHT)
        full, partial = divmod(count, TILE_WIDTH)
        yield from (TileRef(level, index) for index in range(full))
        if partial:
            yield TileRef(level, full, partial)


def tiles_for(size: int, *, entries: bool = True) -> list[TileRef]:
    """:func:`iter_tiles` as a list."""
    return list(iter_tiles(size, entries=entries))


def count_tiles(size: int, *, entries: bool = True) -> int:
    """``len(tiles_for(size))`` without listing them."""
    total, level = 0, 0
    while count := size >> (level * TILE_HEIGHT):
        total += -(-count // TILE_WIDTH) * (2 if level == 0 and entries else 1)
        level += 1
    return total


def encode_bundle(leaves: list[bytes]) -> bytes:
    """An entry bundle: each leaf prefixed by its big-endian uint16 length."""
    out = bytearray()
    for position, leaf in enumerate(leaves):
        if len(leaf) > MAX_ENTRY_SIZE:
            raise TileError(
                f"expected entries of at most {MAX_ENTRY_SIZE} bytes, entry {position} of the "
                f"bundle has {len(leaf)}"
            )
        out += _LENGTH.pack(len(leaf))
        out += leaf
    return bytes(out)


def decode_bundle(data: bytes, count: int) -> list[bytes]:
    """The ``count`` leaves of an entry bundle; :class:`TileError` when it holds more,
    fewer, or a length that runs past its end."""
    leaves: list[bytes] = []
    offset, end = 0, len(data)
    view = memoryview(data)
    while offset < end:
        if offset + 2 > end:
            raise TileError(f"expected a 2-byte length at offset {offset}, the bundle ends")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 2
        if offset + length > end:
            raise TileError(
                f"expected {length} bytes of entry {len(leaves)} at offset {offset}, "
                f"the bundle has {end - offset}"
            )
        leaves.append(bytes(view[offset : offset + length]))
        offset += length
        if len(leaves) > count:
            break
    if len(leaves) != count or offset != end:
        raise TileError(f"expected {count} entries in the bundle, got "
                        f"{'more' if len(leaves) > count else len(leaves)}")
    return leaves


def split_hashes(data: bytes, count: int) -> list[bytes]:
    """The ``count`` hashes of a hash tile; :class:`TileError` on a wrong length."""
    if len(data) != count * HASH_SIZE:
        raise TileError(
            f"expected {count} hashes ({count * HASH_SIZE} bytes), got {len(data)} bytes"
        )
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
