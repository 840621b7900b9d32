"""One Array per model on PoI's messages (``client.wire``): exact round trips in the
receiver's own layout, the object count it saves, strict refusal of anything that does
not fit the task model, and a subscriber that answers in the form it was asked in."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from client import protocol as P
from client.client_app import train, vote
from client.task import get_weights, make_model
from client.wire import PACKED, PACKED_FLOAT64, WireError, is_packed, pack, unpack
from crypto.digests import tensors_digest
from server.round.strategy import numpy_to_arrays
from tests.conftest import make_contexts

MODEL = get_weights(make_model(hidden_units=32, activation="square", seed=0))


@st.composite
def tensor_maps(draw):  # type: ignore[no-untyped-def]
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True))
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    return {n: draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3,
                                                           max_side=4), elements=floats))
            for n in names}


@settings(max_examples=80, deadline=None)
@given(tensor_maps())
def test_pack_then_unpack_is_exact_in_the_receivers_order(tensors) -> None:  # type: ignore[no-untyped-def]
    record = pack(tensors)
    assert is_packed(record) and list(record.keys()) == [PACKED]
    layout = {n: np.zeros_like(v) for n, v in reversed(list(tensors.items()))}
    out = unpack(record, layout)
    assert list(out) == list(layout)  # the receiver's own order
    for name, value in tensors.items():
        assert out[name].dtype == np.float32 and out[name].shape == value.shape
        np.testing.assert_array_equal(out[name].view(np.uint32), value.view(np.uint32))  # bits
    assert tensors_digest(out) == tensors_digest(tensors)


def test_a_model_is_one_array_on_the_wire_and_messages_shrink() -> None:
    def objects(**records: ArrayRecord) -> int:
        msg = Message(RecordDict({**records, "config": ConfigRecord({"x": 1})}), dst_node_id=2,
                      message_type="train")
        return len(get_all_nested_objects(msg))

    rng = np.random.default_rng(0)  # four different models: objects are content-addressed
    models = {name: {k: (v + rng.normal(size=v.shape)).astype(np.float32)
                     for k, v in MODEL.items()} for name in ("a", "b", "c", "d")}
    plain = {name: numpy_to_arrays(m) for name, m in models.items()}
    packed = {name: pack(m) for name, m in models.items()}
    assert objects(a=plain["a"]) == 12 and objects(a=packed["a"]) == 6
    assert objects(**plain) == 39 and objects(**packed) == 15  # a vote with 2 candidates
    # the marginal vote's trusted mean is float64: packed too, under its own key
    mean = {k: v.astype(np.float64) for k, v in models["b"].items()}
    packed["b"] = pack(mean)
    assert list(packed["b"].keys()) == [PACKED_FLOAT64]
    assert objects(**packed) == 15


def test_a_float64_mapping_round_trips_under_its_own_key() -> None:
    rng = np.random.default_rng(1)
    mean = {k: rng.normal(size=v.shape) for k, v in MODEL.items()}  # float64
    out = unpack(pack(mean), MODEL)  # the layout's own dtype does not matter
    assert all(out[k].dtype == np.float64 for k in out)
    assert tensors_digest(out) == tensors_digest(mean)
    wrong = ArrayRecord({PACKED_FLOAT64: Array(np.zeros(2410, np.float32))})
    with pytest.raises(WireError, match="expected one float64 vector of 2410 values"):
        unpack(wrong, MODEL)
    lying = ArrayRecord({PACKED_FLOAT64: Array(dtype="float64", shape=(2410,),
                                               stype="numpy.ndarray",
                                               data=_npy(array=np.zeros(2410, np.float32)))})
    with pytest.raises(WireError, match="declares dtype <f4 .* expected <f8"):
        unpack(lying, MODEL)


def test_a_mapping_of_mixed_dtypes_travels_as_before() -> None:
    record = pack({"w": np.zeros(3, np.float32), "steps": np.zeros(1, np.int64)})
    assert not is_packed(record) and sorted(record.keys()) == ["steps", "w"]


@pytest.mark.parametrize(("bad", "match"), [
    (ArrayRecord({PACKED: Array(np.zeros(2409, np.float32))}), "of 2410 values .* shape \\(2409,\\)"),
    (ArrayRecord({PACKED: Array(np.zeros(2410, np.float64))}), "got dtype float64"),
    (ArrayRecord({PACKED: Array(np.zeros((1, 2410), np.float32))}), "shape \\(1, 2410\\)"),
    (ArrayRecord({PACKED: Array(np.zeros(2410, np.float32)), "x": Array(np.zeros(1))}),
     "expected one packed array"),
    (numpy_to_arrays(MODEL), "expected one packed array"),
])
def test_anything_that_does_not_fit_the_task_model_is_refused(bad: ArrayRecord, match: str) -> None:
    with pytest.raises(WireError, match=match):
        unpack(bad, MODEL)


def _npy(header: dict | None = None, array: np.ndarray | None = None, *, version=(1, 0),
         extra: bytes = b"") -> bytes:
    import io

    buffer = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(buffer, array, version=version)
    else:
        np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + extra


def _honest_description(data: bytes) -> ArrayRecord:
    """An Array whose dtype/shape say: one float32 vector of the model's size, whatever
    its bytes hold."""
    return ArrayRecord({PACKED: Array(dtype="float32", shape=(2410,), stype="numpy.ndarray",
                                      data=data)})


@pytest.mark.parametrize(("data", "match"), [
    (_npy({"descr": "<f4", "fortran_order": False, "shape": (10**12,)}),
     r"declares dtype <f4 shape \(1000000000000,\)"),
    (_npy(array=np.zeros(2410, ">f4")), "declares dtype >f4"),
    (_npy(array=np.zeros(2410, np.float64)), "declares dtype <f8"),
    (_npy(array=np.zeros(2410, object)), r"not a plain .npy vector|declares dtype \|O"),
    (_npy(array=np.asfortranarray(np.zeros((2410, 1), np.float32))), "Fortran order|shape"),
    (_npy(array=np.zeros(2410, np.float32), version=(3, 0)), "not a plain .npy vector"),
    (_npy(array=np.zeros(2409, np.float32)), r"shape \(2409,\)"),
    (_npy(array=np.zeros(2410, np.float32), extra=b"\0" * (1 << 20)), "expected 9640 bytes"),
    (_npy(array=np.zeros(2410, np.float32))[:-4], "expected 9640 bytes .* got 9636"),
    (b"not an npy file at all", "not a plain .npy vector"),
])
def test_a_header_that_lies_is_refused_before_anything_is_allocated(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        unpack(_honest_description(data), MODEL)


def test_the_honest_form_of_the_same_bytes_decodes() -> None:
    flat = np.arange(2410, dtype=np.float32)
    out = unpack(_honest_description(_npy(array=flat)), MODEL)
    assert sum(v.size for v in out.values()) == 2410
    assert all(v.flags.writeable for v in out.values())  # a copy, not a view of the wire


def _train(content_arrays: ArrayRecord) -> Message:
    ctx = make_contexts({"num-subscribers": 2, "partitioner": "iid", "local-epochs": 1}, 2)[1000]
    config = ConfigRecord({P.SERVER_ROUND: 1, P.NOISE_MULTIPLIER: 1.0, P.TARGET_EPSILON: 0.0,
                           P.MAX_GRAD_NORM: 1.0, P.TARGET_DELTA: 1e-5, P.PLANNED_ROUNDS: 5,
                           P.UPDATE_KIND: "delta"})
    return train(Message(RecordDict({P.ARRAYS: content_arrays, P.CONFIG: config}),
                         dst_node_id=1000, message_type="train"), ctx)


def test_a_subscriber_answers_in_the_form_it_was_asked_in() -> None:
    packed_reply = _train(pack(MODEL))
    plain_reply = _train(numpy_to_arrays(MODEL))
    assert is_packed(packed_reply.content[P.ARRAYS])
    assert sorted(plain_reply.content[P.ARRAYS].keys()) == sorted(MODEL)
    a = unpack(packed_reply.content[P.ARRAYS], MODEL)
    b = {k: v.numpy() for k, v in plain_reply.content[P.ARRAYS].items()}
    assert tensors_digest(a) == tensors_digest(b)  # same seed, same update


def test_a_malformed_packed_request_gets_an_error_reply_naming_the_model() -> None:
    reply = _train(ArrayRecord({PACKED: Array(np.zeros(7, np.float32))}))
    assert reply.has_error() and reply.error.code == P.ERROR_REQUEST
    assert "expected one float32 vector of 2410 values" in reply.error.reason
    ctx = make_contexts({"num-subscribers": 2, "partitioner": "iid"}, 2)[1000]
    request = RecordDict({P.ARRAYS: pack(MODEL), P.CONFIG: ConfigRecord({
        P.SERVER_ROUND: 1, P.VOTE_RULE: "single", P.CANDIDATE_IDS: ["a"],
        P.CANDIDATE_AUTHORS: ["1"], P.VOTE_STEP: 1.0})})
    request[P.CANDIDATE_PREFIX + "a"] = ArrayRecord({PACKED: Array(np.zeros(3, np.float64))})
    reply = vote(Message(request, dst_node_id=1000, message_type=P.VOTE_MESSAGE_TYPE), ctx)
    assert reply.has_error() and "a candidate does not fit the task model" in reply.error.reason
