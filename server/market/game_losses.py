"""The round-game losses blob (docs/market.md, docs/ledger.md): what a round's payout
rule needs from the validation set, kept out of the Scientist's ``score`` entry.

A C2SP tlog-tiles entry bundle frames each entry with a big-endian uint16 length, so
no ledger leaf may exceed 65,535 bytes; every coalition's loss at 12 applied updates
(4,095 pairs) is already about 60 KB and rule v1 allows 16 (65,535 pairs). So the
Scientist publishes them as one content-addressed blob, RFC 8785 canonical JSON::

    {"coalitions_micro": {"<mask>": int, ...}, "prefix_losses_micro": [[int, ...], ...]}

(bit i of a mask = the round's i-th applied update; one row of prefix losses per
ordering drawn beyond ``exact_max``), and the ``score`` entry names it by its SHA-256
hex digest in ``game_losses_digest``. The replay reads it back with
:func:`decode_game_losses`, which accepts nothing but that exact encoding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger.entries import encode_payload
from ledger.errors import EntryError

__all__ = [
    "GAME_LOSSES_DIGEST",
    "GameLosses",
    "GameLossesError",
    "decode_game_losses",
    "encode_game_losses",
    "parse_coalitions",
    "parse_prefix_rows",
]

GAME_LOSSES_DIGEST = "game_losses_digest"  # the score entry's field naming the blob
_KEYS = ("coalitions_micro", "prefix_losses_micro")
_MASK = re.compile(r"[1-9][0-9]{0,15}")  # decimal, no leading zero (v1: at most 2**16 - 1)


class GameLossesError(ValueError):
    """A round-game losses blob that is not the canonical encoding of the expected shape."""


@dataclass(frozen=True)
class GameLosses:
    """A round's published round-game losses (micro loss units): bitmask -> the loss of
    that coalition of the applied updates, and per sampled ordering the loss after each
    of its prefixes. Both empty: the round has no game (fewer than two updates)."""

    coalitions_micro: dict[int, int] = field(default_factory=dict)
    prefix_losses_micro: list[list[int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.coalitions_micro or self.prefix_losses_micro)


def encode_game_losses(losses: GameLosses) -> bytes:
    """The blob's bytes: RFC 8785 canonical JSON (``ledger.entries.encode_payload``).
    Raises :class:`GameLossesError` for a mask < 1 or a number outside I-JSON's range."""
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1
           for m in losses.coalitions_micro):
        raise GameLossesError(f"expected coalition masks as integers >= 1, got "
                              f"{sorted(map(repr, losses.coalitions_micro))[:4]}")
    try:
        return encode_payload({
            "coalitions_micro": {str(m): v for m, v in losses.coalitions_micro.items()},
            "prefix_losses_micro": [list(row) for row in losses.prefix_losses_micro],
        })
    except EntryError as exc:
        raise GameLossesError(f"round-game losses: {exc}") from exc


def _reject_constant(name: str) -> None:
    raise GameLossesError(f"expected integers, got {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_game_losses(data: bytes) -> GameLosses:
    """The round-game losses in ``data``. Raises :class:`GameLossesError` unless ``data``
    is the RFC 8785 canonical JSON of exactly ``{"coalitions_micro": {mask: int},
    "prefix_losses_micro": [[int]]}`` with decimal masks >= 1 (no other key, no float,
    no duplicate key, no whitespace: re-encoding must give the same bytes)."""
    try:
        value: Any = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GameLossesError(f"expected canonical JSON, got undecodable bytes ({exc})") from None
    if not isinstance(value, dict) or sorted(value) != sorted(_KEYS):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise GameLossesError(f"expected an object with keys {list(_KEYS)}, got {got}")
    losses = GameLosses(coalitions_micro=parse_coalitions(value["coalitions_micro"]),
                        prefix_losses_micro=parse_prefix_rows(value["prefix_losses_micro"]))
    if encode_game_losses(losses) != data:
        raise GameLossesError("expected RFC 8785 canonical JSON, got another encoding of "
                              "the numbers (key order, whitespace, escapes or a duplicate key)")
    return losses


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_coalitions(value: object) -> dict[int, int]:
    """``{"<mask>": int}`` with decimal masks >= 1 (the blob's, and an old score entry's
    inline ``coalitions_micro``); :class:`GameLossesError` otherwise."""
    if not isinstance(value, Mapping):
        raise GameLossesError(f"expected coalitions_micro as an object, got "
                              f"{type(value).__name__}")
    out: dict[int, int] = {}
    for mask, loss in value.items():
        if not _MASK.fullmatch(mask):
            raise GameLossesError(f"expected coalition masks as decimal integers >= 1, "
                                  f"got {mask[:20]!r}")
        if not _is_integer(loss):
            raise GameLossesError(f"expected an integer loss for coalition {mask}, got "
                                  f"{type(loss).__name__}")
        out[int(mask)] = loss
    return out


def parse_prefix_rows(value: object) -> list[list[int]]:
    """A list of lists of integer losses; :class:`GameLossesError` otherwise."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise GameLossesError(f"expected prefix_losses_micro as a list, got "
                              f"{type(value).__name__}")
    rows = []
    for position, row in enumerate(value):
        if not isinstance(row, list) or not all(_is_integer(v) for v in row):
            raise GameLossesError(f"expected prefix_losses_micro[{position}] as a list of "
                                  "integers")
        rows.append(list(row))
    return rows
