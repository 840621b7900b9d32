"""The wire container of :mod:`crypto.he`: a bounds-checked reader, packing and unpacking of
requests and replies (ciphertext blobs behind a magic, version, layout, ``n`` and count)
and of contexts (tagged sections in a fixed order), the PARM section's check against the
pinned parameters, and the loading of a context's public, relinearization and Galois keys
with every check of :data:`PARAMS` they must pass. The formats are in the package docstring.
"""

from __future__ import annotations

import struct
from typing import Any

import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import (
    _CTX_MAGIC,
    _LAYOUT_CODE,
    WIRE_VERSION,
    CkksParams,
    HEError,
    _blob_limit,
    _key_raw,
)
from crypto.he.seal import _check_blob, _load, _SealState


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what
        self.offset = 0

    def take(self, count: int, field: str) -> bytes:
        if count < 0 or self.offset + count > len(self.data):
            raise HEError(
                f"{self.what}: expected {count} bytes of {field} at offset {self.offset}, "
                f"only {len(self.data) - self.offset} left")
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def header(self, magic: bytes, layout: str | None) -> str:
        got = self.take(len(magic), "magic")
        if got != magic:
            raise HEError(f"{self.what}: expected magic {magic!r}, got {got!r}")
        version = self.u8("version")
        if version != WIRE_VERSION:
            raise HEError(f"{self.what}: expected wire version {WIRE_VERSION}, got {version}")
        code = self.u8("layout")
        names = {v: k for k, v in _LAYOUT_CODE.items()}
        if code not in names:
            raise HEError(f"{self.what}: expected a layout code in {sorted(names)}, got {code}")
        if layout is not None and names[code] != layout:
            raise HEError(f"{self.what}: expected layout {layout!r}, got {names[code]!r}")
        return names[code]

    def end(self) -> None:
        if self.offset != len(self.data):
            raise HEError(
                f"{self.what}: expected {self.offset} bytes, got {len(self.data)} "
                f"({len(self.data) - self.offset} trailing)")


def _pack_cts(magic: bytes, layout: str, n: int, blobs: list[bytes]) -> bytes:
    parts = [magic, struct.pack(">BBII", WIRE_VERSION, _LAYOUT_CODE[layout], n, len(blobs))]
    for blob in blobs:
        parts += [struct.pack(">I", len(blob)), blob]
    return b"".join(parts)


def _unpack_cts(data: bytes, magic: bytes, layout: str, n: int, count: int, what: str,
                blob_raw: int) -> list[bytes]:
    reader = _Reader(data, what)
    reader.header(magic, layout)
    got_n = reader.u32("n")
    if got_n != n:
        raise HEError(f"{what}: expected n = {n}, got n = {got_n} in the {what}")
    got_count = reader.u32("ciphertext count")
    if got_count != count:
        raise HEError(f"{what}: expected {count} ciphertexts for layout {layout!r}, "
                      f"got {got_count}")
    blobs = []
    for index in range(count):
        size = reader.u32(f"length of ciphertext {index}")
        if size > _blob_limit(blob_raw):
            raise HEError(f"{what}: ciphertext {index}: expected at most "
                          f"{_blob_limit(blob_raw)} bytes, got {size}")
        blob = reader.take(size, f"ciphertext {index}")
        _check_blob(blob, f"{what}: ciphertext {index}", blob_raw)
        blobs.append(blob)
    reader.end()
    return blobs


def _parm_body(params: CkksParams, state: _SealState) -> bytes:
    primes = state.primes
    return (struct.pack(">IB", params.poly_modulus_degree, len(primes))
            + b"".join(struct.pack(">Q", p) for p in primes)
            + struct.pack(">B", params.scale_bits))


def _pack_context(layout: str, sections: list[tuple[bytes, bytes]]) -> bytes:
    parts = [_CTX_MAGIC, struct.pack(">BBB", WIRE_VERSION, _LAYOUT_CODE[layout], len(sections))]
    for tag, body in sections:
        parts += [tag, struct.pack(">I", len(body)), body]
    return b"".join(parts)


def _unpack_context(data: bytes, layout: str | None, what: str
                    ) -> tuple[str, dict[bytes, bytes]]:
    reader = _Reader(data, what)
    got_layout = reader.header(_CTX_MAGIC, layout)
    count = reader.u8("section count")
    sections: dict[bytes, bytes] = {}
    order = (b"PARM", b"PKEY", b"RLKY", b"GLKY", b"SKEY")
    last = -1
    for _ in range(count):
        tag = reader.take(4, "section tag")
        if tag not in order:
            raise HEError(f"{what}: expected a section tag in {[t.decode() for t in order]}, "
                          f"got {tag!r}")
        if order.index(tag) <= last:
            raise HEError(f"{what}: expected sections in the order "
                          f"{[t.decode() for t in order]} without repeats, got {tag!r} late")
        last = order.index(tag)
        sections[tag] = reader.take(reader.u32(f"{tag.decode()} length"), tag.decode())
    reader.end()
    for tag in (b"PARM", b"PKEY", b"RLKY"):
        if tag not in sections:
            raise HEError(f"{what}: expected a {tag.decode()} section, got none")
    return got_layout, sections


def _check_parm(body: bytes, params: CkksParams, state: _SealState, what: str) -> None:
    reader = _Reader(body, f"{what}: PARM")
    degree = reader.u32("poly modulus degree")
    if degree != params.poly_modulus_degree:
        raise HEError(f"{what}: expected poly_modulus_degree {params.poly_modulus_degree}, "
                      f"got {degree}")
    count = reader.u8("prime count")
    primes = tuple(reader.u64(f"prime {i}") for i in range(count))
    bits = tuple(p.bit_length() for p in primes)
    if bits != params.coeff_mod_bit_sizes:
        raise HEError(f"{what}: expected coeff modulus bit sizes "
                      f"{list(params.coeff_mod_bit_sizes)}, got {list(bits)}")
    if primes != state.primes:
        raise HEError(f"{what}: expected coeff modulus primes {list(state.primes)}, "
                      f"got {list(primes)}")
    scale_bits = reader.u8("scale bits")
    if scale_bits != params.scale_bits:
        raise HEError(f"{what}: expected scale 2^{params.scale_bits}, got 2^{scale_bits}")
    reader.end()


def _load_keys(sections: dict[bytes, bytes], params: CkksParams, state: _SealState,
               what: str) -> tuple[Any, Any, Any]:
    """Public key, relinearization keys and Galois keys (None for no steps), checked."""
    total = len(params.coeff_mod_bit_sizes)
    _check_blob(sections[b"PKEY"], f"{what}: public key",
                16 * total * params.poly_modulus_degree + 1024)
    public_key = _load(_seal.PublicKey(), state, sections[b"PKEY"], f"{what}: public key")
    _check_blob(sections[b"RLKY"], f"{what}: relinearization key", _key_raw(params, 1))
    relin = _load(_seal.RelinKeys(), state, sections[b"RLKY"], f"{what}: relinearization key")
    if not relin.has_key(2) or relin.size() != 1:
        raise HEError(f"{what}: expected one relinearization key (degree 2), "
                      f"got {relin.size()}")
    steps = params.galois_steps
    if not steps:
        if b"GLKY" in sections:
            raise HEError(f"{what}: expected no Galois keys for layout {params.layout!r}, "
                          f"got {len(sections[b'GLKY'])} bytes of them")
        return public_key, relin, None
    if b"GLKY" not in sections:
        raise HEError(f"{what}: expected Galois keys for steps {list(steps)}, got none")
    _check_blob(sections[b"GLKY"], f"{what}: Galois keys", _key_raw(params, len(steps)))
    galois = _load(_seal.GaloisKeys(), state, sections[b"GLKY"], f"{what}: Galois keys")
    missing = [s for s in steps if not galois.has_key(state.galois_elt(s))]
    if missing or galois.size() != len(steps):
        raise HEError(f"{what}: expected Galois keys for exactly steps {list(steps)}, got "
                      f"{galois.size()} keys, missing steps {missing}")
    return public_key, relin, galois
