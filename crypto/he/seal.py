"""The SEAL plumbing under :mod:`crypto.he`: serialization through anonymous in-memory
files (``tenseal.sealapi`` reads and writes only file paths), loading a SEAL object so that
any SEAL refusal becomes an :class:`HEError`, the check of a SEAL blob's 16-byte header
and the walk of its zstd frames that bounds the decompressed size before SEAL sees it, and
:class:`_SealState`, the per-process SEAL objects (context, encoder, evaluator, exact
scales along the circuit) of one parameter set.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

from crypto.he.params import _OUTPUT_SCALE_BITS, CkksParams, HEError, _blob_limit


# sealapi serializes only to and from file paths: use an anonymous in-memory file.
@contextlib.contextmanager
def _scratch_path() -> Iterator[tuple[str, int]]:
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("poi-he", getattr(os, "MFD_CLOEXEC", 0))
        try:
            yield f"/proc/self/fd/{fd}", fd
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="poi-he-")
    try:
        yield path, fd
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


def _save(obj: Any) -> bytes:
    with _scratch_path() as (path, fd):
        obj.save(path)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)


_SEAL_ERRORS = (ValueError, RuntimeError, TypeError, IndexError, OverflowError, MemoryError)


def _load(obj: Any, state: _SealState, data: bytes, what: str) -> Any:
    with _scratch_path() as (path, fd):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        try:
            obj.load(state.context, path)
        except _SEAL_ERRORS as exc:
            raise HEError(
                f"{what}: expected a SEAL object valid for the pinned parameters, "
                f"got one SEAL refuses ({exc})") from None
    return obj


def _check_blob(blob: bytes, what: str, raw_limit: int) -> None:
    """Read SEAL's 16-byte header and bound the decompressed size before SEAL sees it."""
    if len(blob) < 16:
        raise HEError(f"{what}: expected a SEAL object (16-byte header), got {len(blob)} bytes")
    magic, header_size, major, _minor, mode, _res, size = struct.unpack("<HBBBBHQ", blob[:16])
    if magic != 0xA15E or header_size != 16 or major != 4:
        raise HEError(
            f"{what}: expected a SEAL 4.x header (magic 0xa15e), got magic {magic:#06x}, "
            f"header size {header_size}, version {major}")
    if size != len(blob):
        raise HEError(f"{what}: SEAL header says {size} bytes, got {len(blob)}")
    if len(blob) > _blob_limit(raw_limit):
        raise HEError(f"{what}: expected at most {_blob_limit(raw_limit)} bytes, got {len(blob)}")
    if mode == 0:
        return
    if mode != 2:
        raise HEError(f"{what}: expected compression none (0) or zstd (2), got mode {mode}")
    bound = _zstd_bound(memoryview(blob)[16:], what, 2 * raw_limit + (1 << 18))
    if bound > 2 * raw_limit + (1 << 18):
        raise HEError(f"{what}: decompresses to up to {bound} bytes, expected <= {raw_limit}")


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 * 1024


def _zstd_bound(data: memoryview, what: str, limit: int) -> int:
    """Upper bound of the decompressed size of zstd frames, from block headers only."""
    pos, total, end = 0, 0, len(data)

    def need(count: int) -> None:
        if pos + count > end:
            raise HEError(f"{what}: truncated zstd data (needs {count} bytes at {pos})")

    while pos < end:
        need(4)
        (magic,) = struct.unpack_from("<I", data, pos)
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
            need(8)
            pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
            need(0)
            continue
        if magic != _ZSTD_MAGIC:
            raise HEError(f"{what}: expected a zstd frame (magic {_ZSTD_MAGIC:#x}), got {magic:#x}")
        need(5)
        descriptor = data[pos + 4]
        pos += 5
        single_segment = (descriptor >> 5) & 1
        if descriptor & 0x08 or descriptor & 0x03:
            raise HEError(f"{what}: expected a plain zstd frame, got descriptor {descriptor:#x}")
        pos += (0 if single_segment else 1) + (
            1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        while True:
            need(3)
            header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            pos += 3
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3 or size > _ZSTD_BLOCK_MAX:
                raise HEError(f"{what}: invalid zstd block (type {kind}, size {size})")
            total += _ZSTD_BLOCK_MAX if kind == 2 else size
            pos += 1 if kind == 1 else size
            need(0)
            if total > limit:
                return total
            if last:
                break
        if (descriptor >> 2) & 1:
            pos += 4
            need(0)
    return total


class _SealState:
    """Per-process SEAL objects for one parameter set (built once, shared by contexts)."""

    def __init__(self, params: CkksParams) -> None:
        parms = _seal.EncryptionParameters(_seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        try:
            parms.set_coeff_modulus(
                _seal.CoeffModulus.Create(params.poly_modulus_degree,
                                          list(params.coeff_mod_bit_sizes)))
            context = _seal.SEALContext(parms, True, _seal.SEC_LEVEL_TYPE.TC128)
        except _SEAL_ERRORS as exc:
            raise HEError(f"parameters {params}: SEAL refuses them ({exc})") from None
        if not context.parameters_set():
            raise HEError(
                f"parameters: expected a valid 128-bit-secure CKKS set, got "
                f"{params.poly_modulus_degree} / {list(params.coeff_mod_bit_sizes)} "
                f"({context.parameters_error_message()})")
        self.params = params
        self.context = context
        self.primes = tuple(int(m.value()) for m in parms.coeff_modulus())
        self.encoder = _seal.CKKSEncoder(context)
        self.evaluator = _seal.Evaluator(context)
        levels = []
        data = context.first_context_data()
        while data is not None:
            levels.append(data.parms_id())
            data = data.next_context_data()
        self.levels = levels  # parms_id at level 0 (all data primes), 1, 2, ...
        scale = 2.0**params.scale_bits
        data_primes = [float(p) for p in self.primes[:-1]]
        # Exact scales along the circuit (the same double operations SEAL performs).
        self.w1_scale = data_primes[-1]
        self.hidden_scale = scale * self.w1_scale / data_primes[-1]
        self.square_scale = self.hidden_scale * self.hidden_scale / data_primes[-2]
        self.w2_scale = 2.0**_OUTPUT_SCALE_BITS * data_primes[-3] / self.square_scale
        self.output_scale = self.square_scale * self.w2_scale / data_primes[-3]

    def encode(self, values: np.ndarray | float, level: int, scale: float) -> Any:
        plain = _seal.Plaintext()
        if isinstance(values, np.ndarray):
            self.encoder.encode(values.astype(np.float64).tolist(), self.levels[level], scale,
                                plain)
        else:
            self.encoder.encode(float(values), self.levels[level], scale, plain)
        return plain

    def galois_elt(self, step: int) -> int:
        return pow(3, step, 2 * self.params.poly_modulus_degree)


@functools.lru_cache(maxsize=8)
def _state(params: CkksParams) -> _SealState:
    return _SealState(params)
