"""Encrypted inference for the market's model: CKKS via TenSEAL's SEAL bindings.

The buyer encrypts digits features under its own key; the server evaluates the trained
:class:`client.task.PolyMLP` (64 -> H -> 10, activation ``square`` or ``poly2``) on the
ciphertext and returns encrypted logits only the buyer can decrypt. This is the ONLY
module of the repository that imports ``tenseal``. It drives SEAL through
``tenseal.sealapi`` (TenSEAL 0.3.18 ships SEAL 4.3) rather than TenSEAL's tensor classes,
because TenSEAL resets a ciphertext's scale label after every rescale and rescales after
every product; with SEAL directly every scale is tracked exactly (no systematic bias, so a
bias can be added as a plaintext) and a sum of ciphertext x scalar products is rescaled
once (the deferred rescale: 4,700 batch predictions/s per process against the 1,860/s of
TenSEAL's ``ckks_tensor(...).mm`` measured in ``HE_DP_NOTES.md``). The price is reliance
on ``tenseal.sealapi``: TenSEAL is pinned, and the tests compare with the plaintext model.

Parameters (both layouts, :data:`PARAMS`)
    CKKS, ring degree N = 8192 (4,096 slots), coefficient modulus primes of
    [50, 38, 38, 38, 50] bits = 214 bits in total, input scale 2^38. The HE security
    standard (homomorphicencryption.org, 2018; SEAL's ``sec_level_type.tc128`` table)
    allows at most 218 bits of total coefficient modulus at N = 8192 for 128-bit classical
    security with a ternary secret, so 214 bits give >= 128-bit security; SEAL itself
    re-checks the bound whenever a context is built here. These are the parameters
    measured in ``HE_DP_NOTES.md``.

Depth budget: 3 multiplicative levels
    The last 50-bit prime is the key-switching prime; of the data primes q0 (50 bits),
    q1, q2, q3 (38 bits each) three rescales drop q3, q2, q1:
    layer 1 (plaintext weights encoded at scale q3, so the result is back at exactly
    2^38), square (+ relinearization, result at 2^76 / q2), layer 2 (weights encoded so
    that the logits land at scale 2^34). The logits then sit modulo q0 alone: every value
    in the final ciphertext must stay below 2^15 = 32,768 in magnitude (q0 / 2 / 2^34);
    trained digits models give logits of a few tens. ``poly2`` costs no extra level:
    x/2 + x^2/8 = (x + 2)^2 / 8 - 1/2, so 2 is added to the first-layer bias, the second-
    layer weights are divided by 8 and its bias lowered by half the weight row sums;
    both activations are evaluated as one square. A hidden unit whose incoming weights are
    all zero is a constant and is folded into the output bias.

Layout "single" (one sample per request, low latency)
    The buyer appends a constant 1 to x (65 values) and replicates it: slot 32 i + j
    holds x_i for i in 0..64 and j in 0..31 (2,080 slots; slots 2,080..4,095 are 0).
    The server multiplies by the plaintext mask with slot 32 i + j = W1[j, i] (the first
    bias as column i = 64, H padded to 32 with zero rows; so H <= 32), rescales, and
    rotate-and-sums by 32, 64, ..., 2048 (7 rotations): slot j + 32 m then holds h_j.
    Square, relinearize, rescale. Multiply by the mask with slot 32 k + j = W2[k, j],
    rotate-and-sum by 1, 2, 4, 8, 16 (5 rotations), then rescale (rotating before this
    rescale divides the key-switching noise by q1 too: 20x smaller logit error than
    rotating at the last level): slot 32 k holds logit k before its bias. Last, one
    plaintext is added: the output bias at slots 32 k and, at every other slot, fresh
    uniform noise in [-2^12, 2^12) from ``os.urandom``, so the partial sums the rotations
    leave there do not hand the buyer the model's intermediate terms. 12 rotations, so
    the context carries Galois keys for exactly these 12 steps
    (:attr:`CkksParams.galois_steps`) and nothing else.
Layout "batch" (throughput, up to 4,096 samples per request, no rotations)
    Column packing: ciphertext i (i = 0..63) holds feature i of sample s in slot s
    (slots n..4,095 are 0). Hidden unit j = rescale(sum_i W1[j, i] * ct_i) + b1[j]: 64
    ciphertext x scalar products summed at scale 2^38 * q3 and rescaled once; the bias
    is a plaintext added at the exact scale, so the buyer sends 64 ciphertexts, not 65
    with a constant-1 column. Then square, relinearize, rescale; logit k =
    rescale(sum_j W2[k, j] * a_j) + b2[k]. Ten logit ciphertexts come back. No Galois
    keys: the public context is the public key and the relinearization key only.

Wire formats (integers big-endian; "blob" is a SEAL object as SEAL 4.3 serializes it,
zstd-compressed, with SEAL's own 16-byte header)
    public context  b"PHEC" | u8 version (1) | u8 layout (1 single, 2 batch) | u8 count
                    | count x (4-byte tag | u32 length | body), tags in this order:
                    PARM (u32 N | u8 k | k x u64 prime | u8 scale bits), PKEY (public
                    key blob), RLKY (relinearization key blob), GLKY (Galois keys blob;
                    "single" only) and, only in a buyer's file saved with its secret,
                    SKEY (secret key blob). A context with SKEY is refused as public.
    request         b"PHEQ" | u8 version | u8 layout | u32 n | u32 count (1 single, 64
                    batch) | count x (u32 length | ciphertext blob)
    reply           b"PHER" | u8 version | u8 layout | u32 n | u32 count (1 single, 10
                    batch) | count x (u32 length | ciphertext blob)
    Buyers encrypt with their secret key (symmetric CKKS), so SEAL sends the request's
    second polynomial as a seed: half the bytes of a public-key encryption.

Checks (every refusal is an :class:`HEError` naming what was expected and what came)
    Size limits come before any parsing; each SEAL blob's header is read here first and
    its zstd frames walked to bound the decompressed size (a tiny zstd "bomb" could
    otherwise expand to gigabytes inside SEAL). Contexts: no secret key, the pinned
    degree, primes and scale, exactly the layout's Galois steps, keys valid for the
    parameters. Ciphertexts: valid for the parameters, fresh (2 polynomials, top level),
    not transparent, scale exactly 2^38, the right count for the layout, and ``n``
    matching. A ciphertext encrypted under ANOTHER buyer's key cannot be detected: it is
    accepted and the reply decrypts to garbage for everyone (ciphertexts carry no
    integrity), which is why the service authenticates requests.

Sizes and speed measured on the 2-core development machine, idle (``python -m
benchmarks.he_micro``; medians of 30 to 40 "single" and 5 "batch" runs)
    public context: single 14.2 MB (public key, relinearization key, 12 seeded Galois
    keys), batch 1.58 MB (public key 0.53 MB + relinearization key 1.05 MB).
    request: single 205 KB; batch 13.1 MB whatever n (64 seeded ciphertexts: 3.2 KB per
    prediction at n = 4,096). reply: single 118 KB; batch 1.18 MB (288 B per prediction
    at n = 4,096). Buyer-side encryption: 4 ms (single), 0.24 s per batch request.
    single: 30 ms of server time per prediction. batch: 0.87 s per request of 4,096,
    i.e. 4,700 predictions/s per worker process and 9,400/s with 2 worker processes on the
    2 cores (SEAL calls hold the GIL: scale with processes, one loaded context each).

Tolerance: against the float64 plaintext model the decrypted logits differ by at most
about 1e-5 (single) and 6e-7 (batch) on the trained digits models of the tests (logits up
to about +-21). ``tests/test_he.py`` asserts max abs error <= 1e-4 x max |logit| (about
2e-3 there, a margin of 200x) and the same argmax on all 359 test digits for both layouts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as _seal  # type: ignore[import-untyped]

LAYOUTS = ("single", "batch")
NUM_FEATURES = 64
NUM_CLASSES = 10
ACTIVATIONS = ("square", "poly2")
WIRE_VERSION = 1

_LAYOUT_CODE = {"single": 1, "batch": 2}
_CTX_MAGIC = b"PHEC"
_REQ_MAGIC = b"PHEQ"
_REP_MAGIC = b"PHER"
_BLOCK = 32  # single layout: slots per input feature (max hidden units)
_L1_STEPS = (32, 64, 128, 256, 512, 1024, 2048)
_L2_STEPS = (1, 2, 4, 8, 16)
_OUTPUT_SCALE_BITS = 34
_JUNK_NOISE = 2.0**12
_BATCH_INPUTS = NUM_FEATURES  # ciphertexts per batch request (bias is a plaintext)
_MAX_FILE_BYTES = 256 * 2**20


class HEError(ValueError):
    """A refusal: bad parameters, context, ciphertext or argument (says expected vs got)."""


@dataclass(frozen=True)
class CkksParams:
    """The pinned CKKS parameters of one layout."""

    layout: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    galois_steps: tuple[int, ...]  # rotation steps whose Galois keys the layout needs

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def to_json(self) -> dict[str, Any]:
        """What a buyer needs to know about the encryption (for ``GET /v1/model``)."""
        return {
            "scheme": "CKKS",
            "layout": self.layout,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "galois_steps": list(self.galois_steps),
            "slots": self.slots,
            "max_batch": max_batch(self.layout),
            "features": NUM_FEATURES,
            "classes": NUM_CLASSES,
            "security_bits": 128,
            "wire_version": WIRE_VERSION,
        }


_BITS = (50, 38, 38, 38, 50)
PARAMS: dict[str, CkksParams] = {
    "single": CkksParams("single", 8192, _BITS, 38, _L1_STEPS + _L2_STEPS),
    "batch": CkksParams("batch", 8192, _BITS, 38, ()),
}


def _check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise HEError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    return str(layout)


def max_batch(layout: str) -> int:
    """Samples per request: the slot count for "batch", 1 for "single"."""
    params = PARAMS[_check_layout(layout)]
    return params.slots if layout == "batch" else 1


def _ct_count(layout: str) -> tuple[int, int]:
    """(ciphertexts in a request, ciphertexts in a reply)."""
    return (1, 1) if layout == "single" else (_BATCH_INPUTS, NUM_CLASSES)


def _raw_ct_bytes(params: CkksParams, primes: int) -> int:
    """Upper bound of one uncompressed SEAL ciphertext of 2 polynomials over ``primes``."""
    return 16 * primes * params.poly_modulus_degree + 1024


def _blob_limit(raw: int) -> int:
    # zstd on incompressible data adds a few bytes per 128 KiB block.
    return raw + raw // 64 + 1024


def max_request_bytes(layout: str) -> int:
    """The largest request :meth:`EncryptedModel.predict` parses for ``layout``."""
    params = PARAMS[_check_layout(layout)]
    count, _ = _ct_count(layout)
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    return 14 + count * (4 + _blob_limit(_raw_ct_bytes(params, data_primes)))


def max_reply_bytes(layout: str) -> int:
    params = PARAMS[_check_layout(layout)]
    _, count = _ct_count(layout)
    return 14 + count * (4 + _blob_limit(_raw_ct_bytes(params, 1)))


def context_id(public_bytes: bytes) -> str:
    """Hex SHA-256 of a public context's bytes (the id the service registers it under)."""
    return hashlib.sha256(bytes(public_bytes)).hexdigest()


# ------------------------------------------------------------------ SEAL plumbing
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


# ------------------------------------------------------------- container helpers
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


def _check_n(layout: str, n: object) -> int:
    top = max_batch(layout)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= int(n) <= top:
        raise HEError(f"n: expected an integer in 1..{top} for layout {layout!r}, got {n!r}")
    return int(n)


def _parm_body(params: CkksParams, state: _SealState) -> bytes:
    primes = state.primes
    return (struct.pack(">IB", params.poly_modulus_degree, len(primes))
            + b"".join(struct.pack(">Q", p) for p in primes)
            + struct.pack(">B", params.scale_bits))


def _key_raw(params: CkksParams, keys: int) -> int:
    """Upper bound of an uncompressed SEAL key-switching key set of ``keys`` keys."""
    total = len(params.coeff_mod_bit_sizes)
    per_key = (total - 1) * (16 * total * params.poly_modulus_degree + 1024)
    return keys * per_key + 4096


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


# ---------------------------------------------------------------------- buyer side
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

    def encrypt(self, x: np.ndarray) -> bytes:
        """A request: "single" takes x of shape (64,) (or (1, 64)); "batch" (n, 64) with
        n <= :func:`max_batch`. Features must be finite and in [0, 1]."""
        array = np.asarray(x, dtype=np.float64)
        st = self._state
        if self.layout == "single":
            if array.shape not in ((NUM_FEATURES,), (1, NUM_FEATURES)):
                raise HEError(f"x: expected shape ({NUM_FEATURES},) for layout 'single', "
                              f"got {array.shape}")
            array = array.reshape(1, NUM_FEATURES)
        elif array.ndim != 2 or array.shape[1] != NUM_FEATURES or not (
                1 <= array.shape[0] <= max_batch("batch")):
            raise HEError(f"x: expected shape (n, {NUM_FEATURES}) with 1 <= n <= "
                          f"{max_batch('batch')} for layout 'batch', got {array.shape}")
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise HEError(f"x: expected finite features in [0, 1] (digits pixels / 16), got "
                          f"range [{np.nanmin(array)}, {np.nanmax(array)}]")
        n = array.shape[0]
        scale = 2.0**self.params.scale_bits
        if self.layout == "single":
            slots = np.zeros(st.params.slots)
            with_one = np.append(array[0], 1.0)
            slots[:with_one.size * _BLOCK] = np.repeat(with_one, _BLOCK)
            columns = [slots]
        else:
            columns = [array[:, i] for i in range(NUM_FEATURES)]
        blobs = [self._encrypt_one(st.encode(col, 0, scale)) for col in columns]
        return _pack_cts(_REQ_MAGIC, self.layout, n, blobs)

    def _encrypt_one(self, plain: Any) -> bytes:
        if self._secret_key is not None:
            return _save(self._encryptor.encrypt_symmetric(plain))  # seeded: half size
        ct = _seal.Ciphertext()
        self._encryptor.encrypt(plain, ct)
        return _save(ct)

    def decrypt(self, reply: bytes, n: int) -> np.ndarray:
        """The logits of a reply as float64, shape (n, 10) (n = 1 for "single")."""
        if self._decryptor is None:
            raise HEError("decrypt: expected a context holding the secret key, got a "
                          "public-only one")
        n = _check_n(self.layout, n)
        data = bytes(reply)
        if len(data) > max_reply_bytes(self.layout):
            raise HEError(f"reply: expected at most {max_reply_bytes(self.layout)} bytes, "
                          f"got {len(data)}")
        st = self._state
        _, count = _ct_count(self.layout)
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
            logits = outputs[0][0:NUM_CLASSES * _BLOCK:_BLOCK].reshape(1, NUM_CLASSES)
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


# --------------------------------------------------------------------- server side
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


class EncryptedModel:
    """The trained model, ready to evaluate on ciphertexts of either layout."""

    def __init__(self, weights: Mapping[str, np.ndarray], activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise HEError(f"activation: expected one of {list(ACTIVATIONS)}, "
                          f"got {activation!r}")
        w1, b1, w2, b2 = (_weight(weights, k) for k in
                          ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        hidden = w1.shape[0] if w1.ndim == 2 else -1
        expected = {"fc1.weight": (hidden, NUM_FEATURES), "fc1.bias": (hidden,),
                    "fc2.weight": (NUM_CLASSES, hidden), "fc2.bias": (NUM_CLASSES,)}
        for (name, shape), array in zip(expected.items(), (w1, b1, w2, b2), strict=True):
            if hidden < 1 or array.shape != shape:
                raise HEError(f"weights {name}: expected shape {shape} (H >= 1), "
                              f"got {array.shape}")
        self.activation = activation
        self.hidden_units = hidden
        if activation == "poly2":  # x/2 + x^2/8 = (x + 2)^2 / 8 - 1/2
            b1 = b1 + 2.0
            b2 = b2 - 0.5 * w2.sum(axis=1)
            w2 = w2 / 8.0
        dead = ~np.any(w1 != 0.0, axis=1)  # constant units: fold into the output bias
        b2 = b2 + w2[:, dead] @ (b1[dead] ** 2)
        w2 = np.where(dead[None, :], 0.0, w2)
        self._w1, self._b1, self._w2, self._b2 = w1, b1, w2, b2
        self._plain: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # SEAL plaintexts do not pickle
        return {**self.__dict__, "_plain": {}}

    def predict(self, ctx: ServerContext, ciphertext: bytes, n: int) -> bytes:
        """Evaluate the model on a request from :meth:`BuyerContext.encrypt`; returns the
        serialized encrypted logits (see the module docstring for both formats)."""
        if not isinstance(ctx, ServerContext):
            raise HEError(f"ctx: expected a ServerContext, got {type(ctx).__name__}")
        layout = ctx.layout
        n = _check_n(layout, n)
        if not isinstance(ciphertext, bytes | bytearray | memoryview):
            raise HEError(f"ciphertext: expected bytes, got {type(ciphertext).__name__}")
        limit = max_request_bytes(layout)
        if len(ciphertext) > limit:
            raise HEError(f"request: expected at most {limit} bytes, got {len(ciphertext)}")
        if layout == "single" and self.hidden_units > _BLOCK:
            raise HEError(f"layout 'single': expected a model with at most {_BLOCK} hidden "
                          f"units, got {self.hidden_units}")
        st = ctx._state
        count, _ = _ct_count(layout)
        data_primes = len(ctx.params.coeff_mod_bit_sizes) - 1
        blobs = _unpack_cts(bytes(ciphertext), _REQ_MAGIC, layout, n, count, "request",
                            _raw_ct_bytes(ctx.params, data_primes))
        cts = [_checked_input(st, blob, index) for index, blob in enumerate(blobs)]
        try:
            outputs = (self._single(ctx, cts[0]) if layout == "single"
                       else self._batch(ctx, cts))
        except _SEAL_ERRORS as exc:
            raise HEError(f"request: expected ciphertexts SEAL can evaluate, got an error "
                          f"({exc})") from None
        return _pack_cts(_REP_MAGIC, layout, n, [_save(ct) for ct in outputs])

    def _single_plain(self, st: _SealState) -> tuple[Any, Any]:
        if "single" not in self._plain:
            slots = st.params.slots
            w1 = np.zeros((_BLOCK, NUM_FEATURES + 1))
            w1[:self.hidden_units] = np.concatenate([self._w1, self._b1[:, None]], axis=1)
            mask1 = np.zeros(slots)
            mask1[:w1.size] = w1.T.reshape(-1)  # slot 32 i + j = W1[j, i]
            w2 = np.zeros((NUM_CLASSES, _BLOCK))
            w2[:, :self.hidden_units] = self._w2
            mask2 = np.zeros(slots)
            mask2[:w2.size] = w2.reshape(-1)  # slot 32 k + j = W2[k, j]
            self._plain["single"] = (st.encode(mask1, 0, st.w1_scale),
                                     st.encode(mask2, 2, st.w2_scale))
        return self._plain["single"]

    def _single(self, ctx: ServerContext, ct: Any) -> list[Any]:
        st = ctx._state
        ev = st.evaluator
        out_bias = np.zeros(st.params.slots)
        noise = np.frombuffer(os.urandom(8 * out_bias.size), dtype=np.uint64)
        out_bias[:] = (noise / 2.0**64 * 2.0 - 1.0) * _JUNK_NOISE
        out_bias[0:NUM_CLASSES * _BLOCK:_BLOCK] = self._b2
        if not np.any(self._w2):  # every logit is a constant
            result = ctx._zero(3, st.output_scale)
        else:
            mask1, mask2 = self._single_plain(st)
            rotated = _seal.Ciphertext()
            ev.multiply_plain_inplace(ct, mask1)
            ev.rescale_to_next_inplace(ct)
            for step in _L1_STEPS:
                ev.rotate_vector(ct, step, ctx._galois, rotated)
                ev.add_inplace(ct, rotated)
            ev.square_inplace(ct)
            ev.relinearize_inplace(ct, ctx._relin)
            ev.rescale_to_next_inplace(ct)
            ev.multiply_plain_inplace(ct, mask2)
            for step in _L2_STEPS:  # before the rescale: it divides the rotation noise too
                ev.rotate_vector(ct, step, ctx._galois, rotated)
                ev.add_inplace(ct, rotated)
            ev.rescale_to_next_inplace(ct)
            result = ct
        ev.add_plain_inplace(result, st.encode(out_bias, 3, result.scale))
        return [result]

    def _batch(self, ctx: ServerContext, cts: list[Any]) -> list[Any]:
        st = ctx._state
        ev, enc = st.evaluator, st.encoder
        plain, product = _seal.Plaintext(), _seal.Ciphertext()
        level0, level2 = st.levels[0], st.levels[2]
        live = [j for j in range(self.hidden_units) if np.any(self._w2[:, j])]
        hidden: dict[int, Any] = {}
        for j in live:
            acc = None
            for i in np.flatnonzero(self._w1[j]):
                enc.encode(float(self._w1[j, i]), level0, st.w1_scale, plain)
                if acc is None:
                    acc = _seal.Ciphertext()
                    ev.multiply_plain(cts[i], plain, acc)
                else:
                    ev.multiply_plain(cts[i], plain, product)
                    ev.add_inplace(acc, product)
            assert acc is not None  # dead units were folded away in __init__
            ev.rescale_to_next_inplace(acc)
            if self._b1[j] != 0.0:
                ev.add_plain_inplace(acc, st.encode(float(self._b1[j]), 1, acc.scale))
            ev.square_inplace(acc)
            ev.relinearize_inplace(acc, ctx._relin)
            ev.rescale_to_next_inplace(acc)
            hidden[j] = acc
        outputs = []
        for k in range(NUM_CLASSES):
            acc = None
            for j in live:
                weight = float(self._w2[k, j])
                if weight == 0.0:
                    continue
                enc.encode(weight, level2, st.w2_scale, plain)
                if acc is None:
                    acc = _seal.Ciphertext()
                    ev.multiply_plain(hidden[j], plain, acc)
                else:
                    ev.multiply_plain(hidden[j], plain, product)
                    ev.add_inplace(acc, product)
            if acc is None:
                acc = ctx._zero(3, st.output_scale)
            else:
                ev.rescale_to_next_inplace(acc)
            ev.add_plain_inplace(acc, st.encode(float(self._b2[k]), 3, acc.scale))
            outputs.append(acc)
        return outputs


def _weight(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in weights:
        raise HEError(f"weights: expected a {name!r} entry, got {sorted(weights)}")
    array = np.asarray(weights[name], dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise HEError(f"weights {name}: expected finite values, got NaN or infinity")
    return array


def _checked_input(st: _SealState, blob: bytes, index: int) -> Any:
    what = f"request: ciphertext {index}"
    ct = _load(_seal.Ciphertext(), st, blob, what)
    if ct.parms_id() != st.levels[0] or ct.size() != 2 or not ct.is_ntt_form():
        raise HEError(f"{what}: expected a fresh ciphertext (2 polynomials, top level, NTT "
                      f"form), got size {ct.size()}"
                      + ("" if ct.parms_id() == st.levels[0] else " at a lower level"))
    if ct.is_transparent():
        raise HEError(f"{what}: expected an encryption, got a transparent ciphertext")
    expected = 2.0**st.params.scale_bits
    if ct.scale != expected:
        raise HEError(f"{what}: expected scale 2^{st.params.scale_bits}, got {ct.scale!r}")
    return ct
