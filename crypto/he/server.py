"""The server's hold on a buyer's keys in :mod:`crypto.he`: :func:`load_public_context`
parses a registered public context under a size limit and refuses a secret key, any
parameter other than the layout's pinned ones and missing or extra Galois keys;
:class:`ServerContext` keeps the checked relinearization and Galois keys and encrypts the
zeros that stand for constant logits.
"""

from __future__ import annotations

from typing import Any

import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import PARAMS, HEError, _check_layout, context_id
from crypto.he.seal import _state
from crypto.he.wire import _check_parm, _load_keys, _unpack_context


class ServerContext:
    """A buyer's public context, checked against the pinned parameters of its layout."""

    def __init__(self, layout: str, public_key: Any, relin_keys: Any, galois_keys: Any,
                 context_hash: str) -> None:
        self.layout = layout
        self.params = PARAMS[layout]
        self.context_id = context_hash
        self._state = _state(self.params)
        self._relin = relin_keys
        self._galois = galois_keys
        self._zero_encryptor = _seal.Encryptor(self._state.context, public_key)

    def is_private(self) -> bool:
        """Always False: :func:`load_public_context` refuses contexts with a secret key."""
        return False

    def _zero(self, level: int, scale: float) -> Any:
        ct = _seal.Ciphertext()
        self._zero_encryptor.encrypt_zero(self._state.levels[level], ct)
        ct.scale = scale
        return ct


def load_public_context(data: bytes, layout: str, *, max_bytes: int) -> ServerContext:
    """Parse a buyer's public context for ``layout``: size limit first, then refuse a secret
    key, any parameter other than ``PARAMS[layout]``, missing or extra Galois keys."""
    layout = _check_layout(layout)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HEError(f"context: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise HEError(f"context: expected at most {max_bytes} bytes, got {len(data)}")
    raw = bytes(data)
    _, sections = _unpack_context(raw, layout, "context")
    if b"SKEY" in sections:
        raise HEError("context: expected a public context, got one holding a secret key")
    params = PARAMS[layout]
    st = _state(params)
    _check_parm(sections[b"PARM"], params, st, "context")
    public_key, relin, galois = _load_keys(sections, params, st, "context")
    return ServerContext(layout, public_key, relin, galois, context_id(raw))
