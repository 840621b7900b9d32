"""The buyer's side of :mod:`crypto.he`: :class:`BuyerContext` generates the keys of one
layout (the secret key stays here), encrypts queries in the layout's packing, decrypts
and unpacks replies into logits, and saves or loads its context file (the secret key only
when asked, mode 0600); :func:`buyer_context` makes fresh keys for a pinned layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import (
    _MAX_FILE_BYTES,
    _REP_MAGIC,
    _REQ_MAGIC,
    DIGITS_SHAPE,
    PARAMS,
    CkksParams,
    HEError,
    ModelShape,
    _check_layout,
    _check_n,
    _ct_count,
    _raw_ct_bytes,
    context_id,
    max_batch,
    max_reply_bytes,
)
from crypto.he.seal import _check_blob, _load, _save, _SealState, _state
from crypto.he.wire import (
    _check_parm,
    _load_keys,
    _pack_context,
    _pack_cts,
    _parm_body,
    _unpack_context,
    _unpack_cts,
)


class BuyerContext:
    """A buyer's keys for one layout: encrypts queries and decrypts replies."""

    def __init__(self, params: CkksParams, secret_key: Any, public_key: Any,
                 sections: list[tuple[bytes, bytes]]) -> None:
        self.params = params
        self.layout = params.layout
        self._state = _state(params)
        self._secret_key = secret_key
        self._public = _pack_context(self.layout, sections)
        st = self._state
        if secret_key is not None:
            self._encryptor = _seal.Encryptor(st.context, secret_key)
            self._decryptor: Any = _seal.Decryptor(st.context, secret_key)
        else:
            self._encryptor = _seal.Encryptor(st.context, public_key)
            self._decryptor = None

    @classmethod
    def _generate(cls, params: CkksParams) -> BuyerContext:
        """Fresh keys for ``params`` (pinned ones via :func:`buyer_context`; tests use
        others to check refusals)."""
        st = _state(params)
        keygen = _seal.KeyGenerator(st.context)
        public_key = _seal.PublicKey()
        keygen.create_public_key(public_key)
        sections = [(b"PARM", _parm_body(params, st)), (b"PKEY", _save(public_key)),
                    (b"RLKY", _save(keygen.create_relin_keys()))]
        if params.galois_steps:
            elts = [st.galois_elt(s) for s in params.galois_steps]
            sections.append((b"GLKY", _save(keygen.create_galois_keys(elts))))
        return cls(params, keygen.secret_key(), public_key, sections)

    @property
    def has_secret(self) -> bool:
        return self._secret_key is not None

    @property
    def context_id(self) -> str:
        return context_id(self._public)

    def public_bytes(self) -> bytes:
        """The public context (no secret key): register it with the service."""
        return self._public

    def encrypt(self, x: np.ndarray, shape: ModelShape = DIGITS_SHAPE) -> bytes:
        """A request for a model of ``shape`` (the service's ``GET /v1/model`` names it;
        default: the digits model): "single" takes x of shape (F,) (or (1, F)); "batch"
        (n, F) with n <= :func:`max_batch`. Features must be finite and in [0, 1]."""
        array = np.asarray(x, dtype=np.float64)
        st = self._state
        features = shape.check().features
        shape.check_layout(self.layout)
        if self.layout == "single":
            if array.shape not in ((features,), (1, features)):
                raise HEError(f"x: expected shape ({features},) for layout 'single', "
                              f"got {array.shape}")
            array = array.reshape(1, features)
        elif array.ndim != 2 or array.shape[1] != features or not (
                1 <= array.shape[0] <= max_batch("batch")):
            raise HEError(f"x: expected shape (n, {features}) with 1 <= n <= "
                          f"{max_batch('batch')} for layout 'batch', got {array.shape}")
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise HEError(f"x: expected finite features in [0, 1], got "
                          f"range [{np.nanmin(array)}, {np.nanmax(array)}]")
        n = array.shape[0]
        scale = 2.0**self.params.scale_bits
        if self.layout == "single":
            slots = np.zeros(st.params.slots)
            with_one = np.append(array[0], 1.0)
            slots[:with_one.size * shape.block] = np.repeat(with_one, shape.block)
            columns = [slots]
        else:
            columns = [array[:, i] for i in range(features)]
        blobs = [self._encrypt_one(st.encode(col, 0, scale)) for col in columns]
        return _pack_cts(_REQ_MAGIC, self.layout, n, blobs)

    def _encrypt_one(self, plain: Any) -> bytes:
        if self._secret_key is not None:
            return _save(self._encryptor.encrypt_symmetric(plain))  # seeded: half size
        ct = _seal.Ciphertext()
        self._encryptor.encrypt(plain, ct)
        return _save(ct)

    def decrypt(self, reply: bytes, n: int, shape: ModelShape = DIGITS_SHAPE) -> np.ndarray:
        """The logits of a reply from a model of ``shape`` as float64, shape (n, classes)
        (n = 1 for "single")."""
        if self._decryptor is None:
            raise HEError("decrypt: expected a context holding the secret key, got a "
                          "public-only one")
        n = _check_n(self.layout, n)
        shape.check().check_layout(self.layout)
        data = bytes(reply)
        limit = max_reply_bytes(self.layout, shape)
        if len(data) > limit:
            raise HEError(f"reply: expected at most {limit} bytes, got {len(data)}")
        st = self._state
        _, count = _ct_count(self.layout, shape)
        blobs = _unpack_cts(data, _REP_MAGIC, self.layout, n, count, "reply",
                            _raw_ct_bytes(self.params, 1))
        outputs = []
        for index, blob in enumerate(blobs):
            ct = _load(_seal.Ciphertext(), st, blob, f"reply: ciphertext {index}")
            if ct.parms_id() != st.levels[-1] or ct.size() != 2:
                raise HEError(f"reply: ciphertext {index}: expected a 2-polynomial ciphertext "
                              f"at the last level, got size {ct.size()} at another level")
            plain = _seal.Plaintext()
            self._decryptor.decrypt(ct, plain)
            outputs.append(np.asarray(st.encoder.decode_double(plain), dtype=np.float64))
        if self.layout == "single":
            block, classes = shape.block, shape.classes
            logits = outputs[0][0:classes * block:block].reshape(1, classes)
        else:
            logits = np.stack([o[:n] for o in outputs], axis=1)
        return np.ascontiguousarray(logits, dtype=np.float64)

    def save(self, path: str | Path, *, include_secret: bool = False) -> None:
        """Write the context to ``path``; the secret key only when asked (file mode 0600)."""
        sections = list(_unpack_context(self._public, self.layout, "context")[1].items())
        if include_secret:
            if self._secret_key is None:
                raise HEError("save: expected a context holding the secret key, got a "
                              "public-only one")
            sections.append((b"SKEY", _save(self._secret_key)))
        data = _pack_context(self.layout, sections)
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    @classmethod
    def load(cls, path: str | Path) -> BuyerContext:
        """Read a file written by :meth:`save` (with or without the secret key)."""
        p = Path(path)
        size = p.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise HEError(f"{p.name}: expected at most {_MAX_FILE_BYTES} bytes, got {size}")
        data = p.read_bytes()
        layout, sections = _unpack_context(data, None, p.name)
        params = PARAMS[layout]
        st = _state(params)
        _check_parm(sections[b"PARM"], params, st, p.name)
        public_key, _, _ = _load_keys(sections, params, st, p.name)
        secret_key = None
        if b"SKEY" in sections:
            _check_blob(sections[b"SKEY"], f"{p.name}: secret key",
                        8 * len(params.coeff_mod_bit_sizes) * params.poly_modulus_degree + 1024)
            secret_key = _load(_seal.SecretKey(), st, sections[b"SKEY"], f"{p.name}: secret key")
            _check_key_pair(st, public_key, secret_key, p.name)
        public = [(t, b) for t, b in sections.items() if t != b"SKEY"]
        return cls(params, secret_key, public_key, public)


def _check_key_pair(st: _SealState, public_key: Any, secret_key: Any, what: str) -> None:
    ct = _seal.Ciphertext()
    _seal.Encryptor(st.context, public_key).encrypt_zero(st.levels[0], ct)
    ct.scale = 2.0**st.params.scale_bits
    plain = _seal.Plaintext()
    _seal.Decryptor(st.context, secret_key).decrypt(ct, plain)
    if np.max(np.abs(st.encoder.decode_double(plain))) > 1e-3:
        raise HEError(f"{what}: expected a secret key matching the public key, got another")


def buyer_context(layout: str) -> BuyerContext:
    """Fresh buyer keys for ``layout``: secret key kept, Galois keys only for its steps."""
    return BuyerContext._generate(PARAMS[_check_layout(layout)])
