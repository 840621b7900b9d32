"""Encrypted inference for the market's model: CKKS via TenSEAL's SEAL bindings.

The buyer encrypts features under its own key; the server evaluates the trained
:class:`client.task.PolyMLP` (F -> H -> C, activation ``square`` or ``poly2``; the digits
task is 64 -> H -> 10, and :class:`ModelShape` carries any task's widths) on the
ciphertext and returns encrypted logits only the buyer can decrypt. This is the ONLY
package of the repository that imports ``tenseal``. It drives SEAL through
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
    Described for the digits model (F = 64, C = 10, H <= 32: a block of B = 32 slots per
    feature). In general B is H rounded up to a power of two, at least 32; the layout
    serves a model when (F + 1) B and C B fit the 4,096 slots (F <= 127 at B = 32), and
    :meth:`ModelShape.check_layout` names the layouts that can serve it otherwise. The
    rotations are then B, 2B, ..., 2048 and 1, 2, ..., B/2: still every power of two
    below 4,096, the same 12 Galois keys whatever the model.
    The buyer appends a constant 1 to x (65 values) and replicates it: slot 32 i + j
    holds x_i for i in 0..64 and j in 0..31 (2,080 slots; slots 2,080..4,095 are 0).
    The server multiplies by the plaintext mask with slot 32 i + j = W1[j, i] (the first
    bias as column i = 64, H padded to 32 with zero rows), rescales, and
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
Layout "batch" (throughput, up to 4,096 samples per request, no rotations; any width:
one ciphertext a feature in, one a class out, with the same 128-bit parameters)
    Column packing: ciphertext i (i = 0..63) holds feature i of sample s in slot s
    (slots n..4,095 are 0). Hidden unit j = rescale(sum_i W1[j, i] * ct_i) + b1[j]: 64
    ciphertext x scalar products summed at scale 2^38 * q3 and rescaled once; the bias
    is a plaintext added at the exact scale, so the buyer sends 64 ciphertexts, not 65
    with a constant-1 column. Then square, relinearize, rescale; logit k =
    rescale(sum_j (W2[k, j] m_n) * a_j) + b2[k], where the plaintext W2[k, j] m_n holds
    W2[k, j] in slots [0, n) and 0 in slots [n, 4,096): slot s >= n of a logit holds b2[k]
    alone whatever the buyer put in its input slots, so a request pays for exactly the n
    predictions it gets (scalar weights would return 4,096 for the price of n). Ten logit
    ciphertexts come back. No Galois keys: the public context is the public key and the
    relinearization key only.

Wire formats (integers big-endian; "blob" is a SEAL object as SEAL 4.3 serializes it,
zstd-compressed, with SEAL's own 16-byte header)
    public context  b"PHEC" | u8 version (1) | u8 layout (1 single, 2 batch) | u8 count
                    | count x (4-byte tag | u32 length | body), tags in this order:
                    PARM (u32 N | u8 k | k x u64 prime | u8 scale bits), PKEY (public
                    key blob), RLKY (relinearization key blob), GLKY (Galois keys blob;
                    "single" only) and, only in a buyer's file saved with its secret,
                    SKEY (secret key blob). A context with SKEY is refused as public.
    request         b"PHEQ" | u8 version | u8 layout | u32 n | u32 count (1 single, F
                    batch) | count x (u32 length | ciphertext blob)
    reply           b"PHER" | u8 version | u8 layout | u32 n | u32 count (1 single, C
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
to about +-21). ``tests/crypto/test_he.py`` asserts max abs error <= 1e-4 x max |logit| (about
2e-3 there, a margin of 200x) and the same argmax on all 359 test digits for both layouts.

Modules (each imports only modules listed before it)
    :mod:`crypto.he.params` the pinned parameters, size limits and :class:`HEError` (no
    ``tenseal``); :mod:`crypto.he.seal` SEAL plumbing; :mod:`crypto.he.wire` the
    containers above and key loading; :mod:`crypto.he.buyer` the buyer's keys;
    :mod:`crypto.he.server` a buyer's checked public context; :mod:`crypto.he.single` and
    :mod:`crypto.he.batch` the two circuits; :mod:`crypto.he.model` the model and its checks.
"""

from __future__ import annotations

from crypto.he.buyer import BuyerContext, buyer_context
from crypto.he.model import EncryptedModel
from crypto.he.params import _LAYOUT_CODE as _LAYOUT_CODE
from crypto.he.params import _REQ_MAGIC as _REQ_MAGIC
from crypto.he.params import (
    ACTIVATIONS,
    DIGITS_SHAPE,
    LAYOUTS,
    NUM_CLASSES,
    NUM_FEATURES,
    PARAMS,
    WIRE_VERSION,
    CkksParams,
    HEError,
    ModelShape,
    context_id,
    max_batch,
    max_reply_bytes,
    max_request_bytes,
)
from crypto.he.seal import _ZSTD_MAGIC as _ZSTD_MAGIC
from crypto.he.seal import _save as _save
from crypto.he.server import ServerContext, load_public_context
from crypto.he.wire import _pack_context as _pack_context
from crypto.he.wire import _pack_cts as _pack_cts
from crypto.he.wire import _unpack_context as _unpack_context

__all__ = [
    "ACTIVATIONS",
    "DIGITS_SHAPE",
    "LAYOUTS",
    "NUM_CLASSES",
    "NUM_FEATURES",
    "PARAMS",
    "WIRE_VERSION",
    "BuyerContext",
    "CkksParams",
    "EncryptedModel",
    "HEError",
    "ModelShape",
    "ServerContext",
    "buyer_context",
    "context_id",
    "load_public_context",
    "max_batch",
    "max_reply_bytes",
    "max_request_bytes",
]
