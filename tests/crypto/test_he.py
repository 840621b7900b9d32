"""Encrypted inference (crypto/he/): decrypted logits against the float64 plaintext model,
and every refusal of hostile input.

Tolerance: the max abs error of the decrypted logits over the test digits must stay below
``REL_TOL = 1e-4`` times the largest |logit| of the plaintext model (about 2e-3 absolute for
the trained models here, logits up to about +-20). Measured: up to about 1e-5 for "single"
and 6e-7 for "batch", so the bound has a margin of about 200x; an error in the slot
maps, the scales or the poly2 rewrite gives errors of order 1 and fails it. Argmax must agree
on every one of the 359 test digits for both layouts with the square activation, and for
"batch" also with poly2. "single" with poly2 runs on every 12th test digit (30 samples): the
slot map is the same for both activations, so this only checks the poly2 rewrite under the
single layout, and all 359 would add about 15 s to this file.

A ciphertext encrypted under another buyer's key is ACCEPTED (CKKS ciphertexts carry no
integrity and SEAL cannot tell whose key made one): the reply decrypts to garbage for the
honest buyer. The service therefore authenticates requests; the test pins this behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import stat
import struct

import numpy as np
import pytest
import torch

from client.task import digits_split, functional_float64, get_weights, make_model, train_plain
from crypto import he

REL_TOL = 1e-4
BIG = 64 * 2**20


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return digits_split().test.x


def _trained(activation: str, hidden: int = 32) -> tuple[dict[str, np.ndarray], torch.nn.Module]:
    model = make_model(hidden_units=hidden, activation=activation, seed=0)
    train_plain(model, digits_split().pool, epochs=5, batch_size=32, learning_rate=0.1, seed=0)
    return get_weights(model), model


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """activation -> (weights, float64 plaintext logits on all test digits)."""
    x = torch.as_tensor(digits_split().test.x, dtype=torch.float64)
    out = {}
    for activation in he.ACTIVATIONS:
        weights, model = _trained(activation)
        with torch.no_grad():
            out[activation] = (weights, functional_float64(model)(x).numpy())
    return out


@pytest.fixture(scope="module")
def buyers() -> dict[str, he.BuyerContext]:
    return {layout: he.buyer_context(layout) for layout in he.LAYOUTS}


@pytest.fixture(scope="module")
def servers(buyers: dict[str, he.BuyerContext]) -> dict[str, he.ServerContext]:
    return {layout: he.load_public_context(b.public_bytes(), layout, max_bytes=BIG)
            for layout, b in buyers.items()}


def _reference(weights: dict[str, np.ndarray], activation: str, x: np.ndarray) -> np.ndarray:
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    h = x.astype(np.float64) @ w["fc1.weight"].T + w["fc1.bias"]
    a = h * h if activation == "square" else 0.5 * h + 0.125 * h * h
    return a @ w["fc2.weight"].T + w["fc2.bias"]


def _small_weights(hidden: int, seed: int, features: int = 64, classes: int = 10
                   ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc1.weight": rng.normal(0, 0.3, (hidden, features)),
            "fc1.bias": rng.normal(0, 0.5, hidden),
            "fc2.weight": rng.normal(0, 0.3, (classes, hidden)),
            "fc2.bias": rng.normal(0, 0.5, classes)}


def _bound(reference: np.ndarray) -> float:
    return REL_TOL * max(1.0, float(np.abs(reference).max()))


# ------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("activation", he.ACTIVATIONS)
def test_batch_matches_plaintext_on_every_test_digit(activation, trained, buyers, servers, test_x):
    weights, reference = trained[activation]
    model = he.EncryptedModel(weights, activation)
    buyer, n = buyers["batch"], len(test_x)
    got = buyer.decrypt(model.predict(servers["batch"], buyer.encrypt(test_x), n), n)
    assert got.shape == (359, 10) and got.dtype == np.float64
    assert np.abs(got - reference).max() <= _bound(reference)
    np.testing.assert_array_equal(got.argmax(axis=1), reference.argmax(axis=1))


@pytest.mark.parametrize(("activation", "stride"), [("square", 1), ("poly2", 12)])
def test_single_matches_plaintext(activation, stride, trained, buyers, servers, test_x):
    weights, reference = trained[activation]
    model = he.EncryptedModel(weights, activation)
    buyer, ctx = buyers["single"], servers["single"]
    rows = range(0, len(test_x), stride)
    got = np.concatenate([buyer.decrypt(model.predict(ctx, buyer.encrypt(test_x[i]), 1), 1)
                          for i in rows])
    assert got.shape == (len(rows), 10)
    assert np.abs(got - reference[rows]).max() <= _bound(reference)
    np.testing.assert_array_equal(got.argmax(axis=1), reference[rows].argmax(axis=1))


@pytest.mark.parametrize("activation", he.ACTIVATIONS)
def test_fewer_hidden_units_and_degenerate_rows(activation, buyers, servers, test_x):
    """H < 32 pads; a unit with zero incoming weights is a constant; a logit with zero
    weights is its bias; an all-zero model returns the output bias exactly."""
    weights = _small_weights(10, seed=1)
    weights["fc1.weight"][3] = 0.0
    weights["fc2.weight"][5] = 0.0
    zero = {k: np.zeros_like(v) for k, v in weights.items()}
    zero["fc2.bias"] = np.arange(10.0) - 4.5
    x = test_x[:4]
    for w in (weights, zero):
        model, reference = he.EncryptedModel(w, activation), _reference(w, activation, x)
        for layout in he.LAYOUTS:
            buyer, ctx = buyers[layout], servers[layout]
            if layout == "batch":
                got = buyer.decrypt(model.predict(ctx, buyer.encrypt(x), 4), 4)
            else:
                got = np.concatenate([buyer.decrypt(model.predict(ctx, buyer.encrypt(r), 1), 1)
                                      for r in x[:2]])
            assert np.abs(got - reference[:len(got)]).max() <= _bound(reference), (layout, w is zero)


def test_more_than_32_hidden_units_batch_only(buyers, servers, test_x):
    """64 features and 40 hidden units: a block of 64 slots, 65 x 64 > 4,096."""
    weights = _small_weights(40, seed=2)
    model = he.EncryptedModel(weights, "square")
    assert model.shape == he.ModelShape(64, 10, 40) and model.shape.layouts == ("batch",)
    got = buyers["batch"].decrypt(model.predict(servers["batch"], buyers["batch"].encrypt(
        test_x[:3], model.shape), 3), 3, model.shape)
    reference = _reference(weights, "square", test_x[:3])
    assert np.abs(got - reference).max() <= _bound(reference)
    refusal = r"needs 4160 slots \(\(64 \+ 1\) x 64\), the layout has 4096: expected one of \['batch'\]"
    with pytest.raises(he.HEError, match=refusal):
        model.predict(servers["single"], buyers["single"].encrypt(test_x[0]), 1)
    with pytest.raises(he.HEError, match=refusal):  # the buyer is told before encrypting
        buyers["single"].encrypt(test_x[0], model.shape)


@pytest.mark.parametrize(("features", "hidden", "classes"),
                         [(40, 8, 10), (40, 40, 10), (127, 32, 3), (5, 100, 20)])
def test_other_schemas_in_both_layouts(buyers, servers, features, hidden, classes):
    """Any task's widths: the single layout with its block of max(32, 2^ceil(log2 H))
    slots (the same Galois keys), the batch layout with one ciphertext a feature in and
    one a class out; logits against the float64 reference."""
    weights = _small_weights(hidden, seed=features, features=features, classes=classes)
    shape = he.ModelShape(features, classes, hidden)
    model = he.EncryptedModel(weights, "poly2")
    assert model.shape == shape and shape.layouts == ("single", "batch")
    x = np.random.default_rng(1).random((3, features))
    reference = _reference(weights, "poly2", x)
    got = buyers["batch"].decrypt(model.predict(
        servers["batch"], buyers["batch"].encrypt(x, shape), 3), 3, shape)
    assert got.shape == (3, classes) and np.abs(got - reference).max() <= _bound(reference)
    single = buyers["single"]
    got = single.decrypt(model.predict(servers["single"], single.encrypt(x[0], shape), 1), 1,
                         shape)
    assert got.shape == (1, classes)
    assert np.abs(got - reference[:1]).max() <= _bound(reference)
    # A request shaped for another model is refused with the shapes named.
    with pytest.raises(he.HEError, match=rf"expected shape \(n, {features}\)"):
        buyers["batch"].encrypt(np.zeros((2, features + 1)), shape)


def test_model_shape_bounds_and_layouts():
    assert he.ModelShape(64, 10, 32) == he.DIGITS_SHAPE and he.DIGITS_SHAPE.block == 32
    assert he.ModelShape(64, 10, 33).block == 64 and he.ModelShape(10, 2, 1).block == 32
    assert he.ModelShape(127, 10, 32).layouts == ("single", "batch")
    assert he.ModelShape(128, 10, 32).layouts == ("batch",)  # 129 x 32 > 4,096
    assert he.ModelShape(1024, 256, 64).layouts == ("batch",)
    first, second = he.ModelShape(40, 10, 100).single_steps()  # block 128
    assert first == (128, 256, 512, 1024, 2048) and second == (1, 2, 4, 8, 16, 32, 64)
    assert set(first + second) == set(he.PARAMS["single"].galois_steps)
    for bad, match in (((0, 10, 8), "features in 1..1024"), ((1025, 10, 8), "features"),
                       ((40, 1, 8), "classes in 2..256"), ((40, 10, 0), "hidden units")):
        with pytest.raises(he.HEError, match=match):
            he.ModelShape(*bad).check()
    # Request and reply bounds follow the widths: one ciphertext a feature / a class.
    wide = he.ModelShape(128, 20, 32)
    assert he.max_request_bytes("batch", wide) > 1.9 * he.max_request_bytes("batch")
    assert he.max_reply_bytes("batch", wide) > 1.9 * he.max_reply_bytes("batch")
    assert he.max_request_bytes("single", wide) == he.max_request_bytes("single")


# ---------------------------------------------------------------- parameters and keys
def test_params_and_json():
    for layout in he.LAYOUTS:
        params = he.PARAMS[layout]
        assert params.layout == layout and params.poly_modulus_degree == 8192
        assert sum(params.coeff_mod_bit_sizes) == 214 <= 218 and params.scale_bits == 38
        doc = json.loads(json.dumps(params.to_json()))
        assert doc["layout"] == layout and doc["max_batch"] == he.max_batch(layout)
    assert he.PARAMS["single"].galois_steps == (32, 64, 128, 256, 512, 1024, 2048, 1, 2, 4, 8, 16)
    assert he.PARAMS["batch"].galois_steps == ()
    assert (he.max_batch("single"), he.max_batch("batch")) == (1, 4096)
    with pytest.raises(he.HEError, match="expected one of"):
        he.max_batch("triple")
    with pytest.raises(he.HEError, match="layout"):
        he.buyer_context("triple")


def test_secret_key_never_leaves(buyers, servers, test_x, tmp_path):
    for layout, buyer in buyers.items():
        secret = he._save(buyer._secret_key)
        chunk = secret[4096:4160]
        public = buyer.public_bytes()
        request = buyer.encrypt(test_x[0] if layout == "single" else test_x[:2])
        for blob in (public, request):
            assert secret not in blob and chunk not in blob
        assert servers[layout].is_private() is False
        assert he.context_id(public) == servers[layout].context_id == buyer.context_id
        path = tmp_path / f"{layout}.pub"
        buyer.save(path)
        assert chunk not in path.read_bytes()
        public_only = he.BuyerContext.load(path)
        assert not public_only.has_secret and public_only.public_bytes() == public
        with pytest.raises(he.HEError, match="secret key"):
            public_only.decrypt(b"", 1)


def test_save_load_with_secret_round_trip(buyers, servers, tmp_path, test_x):
    buyer = buyers["single"]
    path = tmp_path / "buyer.key"
    buyer.save(path, include_secret=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = he.BuyerContext.load(path)
    assert again.has_secret and again.public_bytes() == buyer.public_bytes()
    weights = _small_weights(8, seed=3)
    model = he.EncryptedModel(weights, "square")
    reply = model.predict(servers["single"], again.encrypt(test_x[7]), 1)
    reference = _reference(weights, "square", test_x[7:8])
    assert np.abs(buyer.decrypt(reply, 1) - reference).max() <= _bound(reference)
    other = tmp_path / "mixed.key"  # a secret key that does not belong to the public key
    _, sections = he._unpack_context(path.read_bytes(), "single", "t")
    sections[b"SKEY"] = he._save(he.buyer_context("batch")._secret_key)
    other.write_bytes(he._pack_context("single", list(sections.items())))
    with pytest.raises(he.HEError, match="matching the public key"):
        he.BuyerContext.load(other)


def _relabel(data: bytes, layout: str) -> bytes:
    return data[:5] + bytes([he._LAYOUT_CODE[layout]]) + data[6:]


def _zstd_bomb() -> bytes:
    """A SEAL header and a 134-byte zstd frame of 32 RLE blocks that inflate to 4 MiB."""
    frame = struct.pack("<IBB", he._ZSTD_MAGIC, 0x00, 0x58)
    for index in range(32):
        frame += (((128 * 1024) << 3) | (1 << 1) | (index == 31)).to_bytes(3, "little") + b"\0"
    return struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, 2, 0, 16 + len(frame)) + frame


def _context_refusals(buyers, tmp_path):
    batch, single = buyers["batch"].public_bytes(), buyers["single"].public_bytes()
    private = tmp_path / "private.key"
    buyers["batch"].save(private, include_secret=True)
    other = he.BuyerContext._generate
    _, sections = he._unpack_context(batch, "batch", "t")
    bomb = he._pack_context("batch", [(t, _zstd_bomb() if t == b"PKEY" else b)
                                      for t, b in sections.items()])
    return [
        ("private", private.read_bytes(), "batch", "secret key"),
        ("scale", other(dataclasses.replace(he.PARAMS["batch"], scale_bits=30)).public_bytes(),
         "batch", "scale 2\\^38, got 2\\^30"),
        ("degree", other(dataclasses.replace(he.PARAMS["batch"], poly_modulus_degree=16384)
                         ).public_bytes(), "batch", "poly_modulus_degree 8192, got 16384"),
        ("primes", other(dataclasses.replace(he.PARAMS["batch"], coeff_mod_bit_sizes=(60, 40, 40, 60))
                         ).public_bytes(), "batch", "bit sizes"),
        ("other layout", batch, "single", "expected layout 'single', got 'batch'"),
        ("no galois", _relabel(batch, "single"), "single", "Galois keys for steps"),
        ("extra galois", _relabel(single, "batch"), "batch", "no Galois keys"),
        ("wrong steps", other(dataclasses.replace(he.PARAMS["single"], galois_steps=(1, 2, 4))
                              ).public_bytes(), "single", "missing steps \\[32"),
        ("garbage", os.urandom(4000), "batch", "magic"),
        ("empty", b"", "batch", "magic"),
        ("truncated", batch[: len(batch) // 2], "batch", "only"),
        ("trailing", batch + b"\0", "batch", "trailing"),
        ("bomb", bomb, "batch", "decompresses"),
    ]


def test_load_public_context_refusals(buyers, tmp_path):
    cases = _context_refusals(buyers, tmp_path)
    for name, data, layout, message in cases:
        with pytest.raises(he.HEError, match=message):
            he.load_public_context(data, layout, max_bytes=BIG)
        assert name
    batch = buyers["batch"].public_bytes()
    with pytest.raises(he.HEError, match=f"at most 1000 bytes, got {len(batch)}"):
        he.load_public_context(batch, "batch", max_bytes=1000)
    assert len(batch) <= 3_000_000  # the registered batch context stays under 3 MB
    with pytest.raises(he.HEError, match="layout"):
        he.load_public_context(batch, "both", max_bytes=BIG)


# ----------------------------------------------------------------------- predict refusals
@pytest.fixture(scope="module")
def small(buyers, test_x):
    """A 4-unit poly2 model (cheap in "batch") and one valid query per layout."""
    weights = _small_weights(4, seed=4)
    queries = {"single": (buyers["single"].encrypt(test_x[0]), test_x[:1]),
               "batch": (buyers["batch"].encrypt(test_x[:3]), test_x[:3])}
    return weights, he.EncryptedModel(weights, "poly2"), queries


def _check_still_works(small, buyers, servers):
    weights, model, queries = small
    for layout, (query, rows) in queries.items():
        got = buyers[layout].decrypt(model.predict(servers[layout], query, len(rows)), len(rows))
        reference = _reference(weights, "poly2", rows)
        assert np.abs(got - reference).max() <= _bound(reference)


def test_predict_refusals_then_still_works(small, buyers, servers, test_x):
    _, model, queries = small
    single_q, batch_q = queries["single"][0], queries["batch"][0]
    scaled = he.BuyerContext._generate(
        dataclasses.replace(he.PARAMS["single"], scale_bits=30, galois_steps=()))
    header = he._pack_cts(he._REQ_MAGIC, "batch", 3, [])[:-4]
    blob_start = 18
    cases = [
        ("garbage", "single", os.urandom(3000), 1, "magic"),
        ("empty", "single", b"", 1, "magic"),
        ("truncated", "single", single_q[:-100], 1, "only"),
        ("truncated batch", "batch", batch_q[: len(batch_q) // 2], 3, "only"),
        ("batch request, single context", "single", batch_q, 1, "request: expected at most"),
        ("other layout", "single", _relabel(single_q, "batch"), 1,
         "expected layout 'single', got 'batch'"),
        ("other layout", "batch", single_q, 3, "expected layout 'batch', got 'single'"),
        ("count", "batch", header + struct.pack(">I", 1) + single_q[14:], 3,
         "expected 64 ciphertexts for layout 'batch', got 1"),
        ("n mismatch", "batch", batch_q, 2, "expected n = 2, got n = 3"),
        ("n zero", "batch", batch_q, 0, "1..4096"),
        ("n too big", "batch", batch_q, 4097, "1..4096"),
        ("n single", "single", single_q, 2, "1..1"),
        ("n bool", "single", single_q, True, "1..1"),
        ("oversize", "single", b"\0" * (he.max_request_bytes("single") + 1), 1, "at most"),
        ("seal header", "single", single_q[:blob_start] + b"\x00" + single_q[blob_start + 1:], 1,
         "SEAL 4.x header"),
        ("scale", "single", scaled.encrypt(test_x[0]), 1, "scale 2\\^38"),
        ("not bytes", "single", "text", 1, "bytes"),
    ]
    for name, layout, data, n, message in cases:
        with pytest.raises(he.HEError, match=message):
            model.predict(servers[layout], data, n)
        _check_still_works(small, buyers, servers)  # the same model object, after each
        assert name
    with pytest.raises(he.HEError, match="ServerContext"):
        model.predict(buyers["single"], single_q, 1)  # type: ignore[arg-type]
    _check_still_works(small, buyers, servers)


def test_foreign_key_is_accepted_and_decrypts_to_garbage(small, buyers, servers, test_x):
    weights, model, _ = small
    stranger = he.buyer_context("single")
    reply = model.predict(servers["single"], stranger.encrypt(test_x[0]), 1)  # no refusal
    got = buyers["single"].decrypt(reply, 1)
    assert np.abs(got - _reference(weights, "poly2", test_x[:1])).max() > 1.0
    _check_still_works(small, buyers, servers)


def test_bad_arguments(buyers, small, servers, test_x):
    with pytest.raises(he.HEError, match="activation"):
        he.EncryptedModel(_small_weights(4, 0), "relu")
    with pytest.raises(he.HEError, match="'fc2.bias' entry"):
        he.EncryptedModel({k: v for k, v in _small_weights(4, 0).items() if k != "fc2.bias"}, "square")
    bad = _small_weights(4, 0)
    bad["fc2.weight"] = bad["fc2.weight"][:, :3]
    with pytest.raises(he.HEError, match="expected shape \\(10, 4\\)"):
        he.EncryptedModel(bad, "square")
    bad = _small_weights(4, 0)
    bad["fc1.bias"][0] = np.nan
    with pytest.raises(he.HEError, match="finite"):
        he.EncryptedModel(bad, "square")
    with pytest.raises(he.HEError, match="shape \\(64,\\)"):
        buyers["single"].encrypt(test_x[:2])
    with pytest.raises(he.HEError, match="1 <= n <= 4096"):
        buyers["batch"].encrypt(np.zeros((4097, 64)))
    with pytest.raises(he.HEError, match="in \\[0, 1\\]"):
        buyers["batch"].encrypt(test_x[:2] * 16)
    _, model, _ = small
    reply = model.predict(servers["batch"], buyers["batch"].encrypt(test_x[:3]), 3)
    with pytest.raises(he.HEError, match="expected n = 4, got n = 3"):
        buyers["batch"].decrypt(reply, 4)
    with pytest.raises(he.HEError, match="reply: expected at most"):
        buyers["single"].decrypt(reply, 1)
    with pytest.raises(he.HEError, match="magic"):
        buyers["batch"].decrypt(os.urandom(100), 3)
    clone = pickle.loads(pickle.dumps(model))  # worker processes get the model by pickle
    got = buyers["batch"].decrypt(clone.predict(servers["batch"], buyers["batch"].encrypt(test_x[:3]), 3), 3)
    np.testing.assert_allclose(got, buyers["batch"].decrypt(reply, 3), atol=1e-4)


def _all_slots(buyer: he.BuyerContext, reply: bytes) -> np.ndarray:
    """Every slot of every reply ciphertext, decrypted with the buyer's secret key: what a
    buyer can read whatever ``n`` the reply's header says. Shape (ciphertexts, 4096)."""
    from crypto.he import params, seal, wire

    st = buyer._state
    _, count = params._ct_count(buyer.layout)
    n = struct.unpack(">I", reply[6:10])[0]
    blobs = wire._unpack_cts(reply, params._REP_MAGIC, buyer.layout, n, count, "reply",
                             params._raw_ct_bytes(buyer.params, 1))
    out = []
    for blob in blobs:
        ct = seal._load(seal._seal.Ciphertext(), st, blob, "reply")
        plain = seal._seal.Plaintext()
        buyer._decryptor.decrypt(ct, plain)
        out.append(np.asarray(st.encoder.decode_double(plain), dtype=np.float64))
    return np.stack(out)


@pytest.mark.parametrize("n", [1, 100])
def test_a_batch_reply_holds_only_the_n_predictions_paid_for(n, buyers, servers, test_x):
    """A buyer that fills all 4,096 slots but declares (and pays for) n gets n predictions:
    every slot s >= n of every logit holds the output bias alone (no other model term).
    Mutation: scalar second-layer weights (the layout before the fix) give 4,096
    predictions and fail this."""
    weights = _small_weights(4, seed=7)
    model = he.EncryptedModel(weights, "square")
    rng = np.random.default_rng(0)
    rows = rng.random((4096, 64))
    full = buyers["batch"].encrypt(rows)
    cheap = full[:6] + struct.pack(">I", n) + full[10:]  # the PoC's n = 1 header
    slots = _all_slots(buyers["batch"], model.predict(servers["batch"], cheap, n))
    reference = _reference(weights, "square", rows)
    assert np.abs(slots[:, :n].T - reference[:n]).max() <= _bound(reference)
    beyond = slots[:, n:] - np.asarray(weights["fc2.bias"], dtype=np.float64)[:, None]
    assert np.abs(beyond).max() < 1e-3  # the bias alone; a prediction differs by ~1
    assert np.abs(reference[n:] - weights["fc2.bias"]).max() > 0.1  # so it would show
    # the next size is encoded afresh, a repeated size comes from the cache
    again = _all_slots(buyers["batch"], model.predict(servers["batch"], cheap, n))
    assert np.abs(again - slots).max() < 1e-3


def test_a_single_reply_holds_ten_logits_and_noise(small, buyers, servers, test_x):
    """The single layout has no unpaid slot: 64 x 32 input slots feed one prediction, and
    every reply slot other than 32 k is masked by noise of magnitude ~2^12 (so nothing a
    buyer packs into its input comes back in the clear)."""
    weights, model, queries = small
    query, rows = queries["single"]
    slots = _all_slots(buyers["single"], model.predict(servers["single"], query, 1))[0]
    logits = slots[0:320:32]
    reference = _reference(weights, "poly2", rows)[0]
    assert np.abs(logits - reference).max() <= _bound(reference[None])
    others = np.delete(slots, np.arange(0, 320, 32))
    assert np.median(np.abs(others)) > 100.0
