"""Wire envelope and codec: round trips, validation, and garbage that only ever raises WireError."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fednb.wire
from fednb.errors import WireError
from fednb.party.egress import EgressRules
from fednb.wire import DTYPES, MAX_METRICS, Limits, Message, check_content, decode, encode

RUN = "0123456789abcdef" * 2

_dtypes = st.sampled_from(sorted(DTYPES)).map(lambda name: DTYPES[name])
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _frames(message: Message) -> list[bytes]:
    return [bytes(frame) for frame in encode(message)]


@settings(max_examples=300, deadline=None)
@given(arrays=st.dictionaries(_names, _arrays, max_size=5), content=st.dictionaries(st.text(max_size=10), _json, max_size=5),
       round_=st.none() | st.integers(0, 2**31 - 1))
def test_round_trip(arrays, content, round_):
    message = Message(type="result", content=content, round=round_, arrays=arrays)
    decoded = decode(_frames(message))
    assert decoded.id == message.id and decoded.type == "result" and decoded.round == round_
    assert decoded.content == content
    assert list(decoded.arrays) == list(arrays)
    for name, array in arrays.items():
        got = decoded.arrays[name]
        assert got.dtype == DTYPES[str(array.dtype)] and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert not got.flags.writeable


def test_decode_does_not_copy_buffers():
    array = np.arange(1000, dtype=np.float32)
    frames = encode(Message(type="result", arrays={"w": array}))
    received = bytearray(frames[1])
    decoded = decode([frames[0], received])
    received[0:4] = np.float32(42).tobytes()
    assert decoded.arrays["w"][0] == 42  # a view on the frame, not a copy


def test_non_contiguous_and_big_endian_arrays_are_sent_as_little_endian():
    array = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    decoded = decode(_frames(Message(type="result", arrays={"w": array})))
    np.testing.assert_array_equal(decoded.arrays["w"], array)
    assert decoded.arrays["w"].dtype.str == "<f8"


@pytest.mark.parametrize("dtype", ["U3", "O", "c8", "V4", "M8[s]"])
def test_disallowed_dtypes_are_not_encoded(dtype):
    with pytest.raises(ValueError, match="cannot be sent"):
        encode(Message(type="result", arrays={"x": np.zeros(2, dtype=dtype)}))


def test_content_must_be_json():
    with pytest.raises(ValueError, match="JSON"):
        encode(Message(type="result", content={"x": float("nan")}))
    with pytest.raises(ValueError, match="JSON"):
        encode(Message(type="result", content={"x": object()}))


def _header(**overrides):
    header = {"v": 1, "id": "0" * 32, "type": "heartbeat", "round": None, "reply_to": None, "content": {}, "buffers": []}
    header.update(overrides)
    return json.dumps(header).encode()


@pytest.mark.parametrize(
    "header, match",
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "exactly the keys"),
        (_header(v=2), "version"),
        (_header(v=True), "version"),
        (_header(type="exec"), "unknown message type"),
        (_header(id="xyz"), "message id"),
        (_header(round=-1), "round"),
        (_header(round=True), "round"),
        (_header(round=2**40), "round"),
        (_header(reply_to=5), "reply_to"),
        (_header(content=[]), "content"),
        (_header(extra=1), "exactly the keys"),
        (b'{"v":1,"v":1,"id":"' + b"0" * 32 + b'","type":"heartbeat","round":null,"reply_to":null,"content":{},"buffers":[]}', "repeats"),
        (_header(content={"x": float("nan")}), "non-JSON constant"),
        (_header(content={"x": json.loads("[" * 40 + "]" * 40)}), "nests deeper"),
        (b'{"content":' + b"[" * 100000 + b"]" * 100000 + b"}", "nests deeper|not valid JSON"),
    ],
)
def test_bad_headers_raise_wire_error(header, match):
    with pytest.raises(WireError, match=match):
        decode([header])


def _descriptor(**overrides):
    descriptor = {"name": "w", "dtype": "float32", "shape": [2], "nbytes": 8}
    descriptor.update(overrides)
    return descriptor


@pytest.mark.parametrize(
    "descriptor, frame, match",
    [
        (_descriptor(dtype="object"), b"\0" * 8, "not allowed"),
        (_descriptor(dtype="float128"), b"\0" * 8, "not allowed"),
        (_descriptor(shape=[3]), b"\0" * 8, "does not make"),
        (_descriptor(shape=[2**40, 2**40], nbytes=8), b"\0" * 8, "does not make"),
        (_descriptor(shape=[-2]), b"\0" * 8, "non-negative"),
        (_descriptor(shape=[2.0]), b"\0" * 8, "non-negative"),
        (_descriptor(shape=[1] * 17, nbytes=4), b"\0" * 4, "shape"),
        (_descriptor(nbytes=-8), b"\0" * 8, "nbytes"),
        (_descriptor(), b"\0" * 7, "frame has 7 bytes"),
        (_descriptor(name=""), b"\0" * 8, "name"),
        (_descriptor(name="x" * 300), b"\0" * 8, "name"),
        ({"name": "w", "dtype": "float32", "shape": [2]}, b"\0" * 8, "exactly"),
    ],
)
def test_bad_descriptors_raise_wire_error(descriptor, frame, match):
    with pytest.raises(WireError, match=match):
        decode([_header(type="result", buffers=[descriptor]), frame])


def test_frame_count_must_match_descriptors():
    with pytest.raises(WireError, match="frames follow"):
        decode([_header(type="result", buffers=[_descriptor()])])
    with pytest.raises(WireError, match="frames follow"):
        decode([_header(), b"extra"])


def test_duplicate_buffer_names_are_refused():
    with pytest.raises(WireError, match="unique"):
        decode([_header(type="result", buffers=[_descriptor(), _descriptor()]), b"\0" * 8, b"\0" * 8])


def test_limits_are_checked_before_allocation():
    small = Limits(max_buffer_bytes=1024, max_message_bytes=1536, max_header_bytes=512, max_buffers=2)
    # A header that claims a huge buffer is refused from the descriptor alone.
    with pytest.raises(WireError, match="exceeds the limit"):
        decode([_header(type="result", buffers=[_descriptor(shape=[4096], nbytes=16384)]), b""], small)
    with pytest.raises(WireError, match="over the limit"):
        decode([_header(type="result", buffers=[_descriptor(name=n, shape=[256], nbytes=1024) for n in "ab"]), b"", b""], small)
    with pytest.raises(WireError, match="at most 2"):
        decode([_header(type="result", buffers=[_descriptor(name=n) for n in "abc"])] + [b"\0" * 8] * 3, small)
    with pytest.raises(WireError, match="header of"):
        decode([_header(content={"x": "y" * 600})], small)
    with pytest.raises(ValueError):
        Limits(max_buffers=0)


def test_check_content_validates_fields_per_type():
    good = Message(type="train", content={"source": "model = 1", "config": {}, "run": RUN})
    assert check_content(good) is good
    assert check_content(Message(type="train", content={**good.content, "evaluate": True}))
    for content, match in [
        ({"config": {}, "run": RUN}, "missing field 'source'"),
        ({"source": 3, "config": {}, "run": RUN}, "wrong type"),
        ({"source": "x", "config": {}, "run": RUN, "rm": 1}, "unexpected field"),
        ({"source": "x" * (2 * 1024 * 1024), "config": {}, "run": RUN}, "longer than"),
        ({"source": "x", "config": {}}, "missing field 'run'"),
        ({"source": "x", "config": {}, "run": RUN.upper()}, "32 lowercase hex"),
        ({"source": "x", "config": {}, "run": RUN[:-1]}, "32 lowercase hex"),
        ({"source": "x", "config": {}, "run": RUN, "evaluate": 1}, "wrong type"),
    ]:
        with pytest.raises(WireError, match=match):
            check_content(Message(type="train", content=content))
    with pytest.raises(WireError, match="finite"):
        check_content(Message(type="result", content={"metrics": {"loss": "high"}}))
    with pytest.raises(WireError, match="more than"):
        check_content(Message(type="result", content={"metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}}))
    evaluation = {"examples": 5, "metrics": {"accuracy": 0.5}}
    assert check_content(Message(type="result", content={"examples": 3, "evaluation": evaluation}))
    for bad, match in [
        ({"examples": 5}, "exactly: examples, metrics"),
        ({**evaluation, "extra": 1}, "exactly: examples, metrics"),
        ({"examples": -1, "metrics": {}}, "non-negative"),
        ({"examples": True, "metrics": {}}, "non-negative"),
        ({"examples": 5, "metrics": {"loss": float("nan")}}, "finite"),
        ({"examples": 5, "metrics": {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}}, "more than"),
        ([1, 2], "wrong type"),
    ]:
        with pytest.raises(WireError, match=match):
            check_content(Message(type="result", content={"evaluation": bad}))


def test_one_metric_limit():
    assert MAX_METRICS == 16 and fednb.wire.MAX_METRICS is MAX_METRICS
    assert EgressRules().max_metrics == MAX_METRICS
    with pytest.raises(ValueError, match="at most 16"):
        EgressRules(max_metrics=17)


@pytest.mark.parametrize("header", [
    b'{"v":1,"id":"%s","type":"run","round":null,"reply_to":null,"content":{"source":"\\ud800"},"buffers":[]}',
    b'{"v":1,"id":"%s","type":"run","round":null,"reply_to":null,"content":{"\\udfff":1,"source":"x"},"buffers":[]}',
    b'{"v":1,"id":"%s","type":"train","round":1,"reply_to":null,"content":{"source":"x","config":{"a":["\\udc00"]}},'
    b'"buffers":[]}',
    b'{"v":1,"id":"%s","type":"run","round":null,"reply_to":null,"content":{"source":"x"},'
    b'"buffers":[{"name":"\\ud800","dtype":"uint8","shape":[0],"nbytes":0}]}',
])
def test_lone_surrogates_anywhere_in_the_header_are_refused(header):
    with pytest.raises(WireError, match="lone surrogate"):
        decode([header % RUN.encode(), b""][: 2 if b"nbytes" in header else 1])


def test_valid_escapes_and_non_ascii_text_pass():
    header = (b'{"v":1,"id":"%s","type":"run","round":null,"reply_to":null,'
              b'"content":{"source":"\\ud83d\\ude00 \xc3\xa9"},"buffers":[]}' % RUN.encode())
    assert decode([header]).content["source"] == "\U0001f600 \u00e9"
    assert decode(encode(Message("run", {"source": "caf\u00e9 \U0001f600"}))).content["source"] == "caf\u00e9 \U0001f600"
    with pytest.raises(ValueError, match="lone surrogate"):
        encode(Message("error", {"error_type": "X", "message": "\ud800"}))


def _mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        position = rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif op < 0.6:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.8:
            del data[position : position + rng.randint(1, 8)]
        else:
            token = rng.choice([b"[", b"{", b'"', b"-1", b"1e999", b"NaN", b"null", b"\\u0000", b"\\ud800", b"9" * 30])
            data[position:position] = token
    return bytes(data)


def test_mutated_frames_only_ever_raise_wire_error():
    """10^5 mutations of valid messages: each decodes or raises WireError, nothing else."""
    rng = random.Random(1234)
    seeds = [
        _frames(Message(type="train", content={"source": "model = M()", "config": {"lr": 0.1}, "run": RUN}, round=1,
                        arrays={"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.int64)})),
        _frames(Message(type="result", content={"examples": 10, "metrics": {"loss": 0.5}}, arrays={"x": np.arange(4, dtype=np.uint8)})),
        _frames(Message(type="heartbeat")),
    ]
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(100_000):
        frames = list(rng.choice(seeds))
        which = rng.randrange(len(frames) + 1)
        if which == len(frames):
            frames.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 16))))
        else:
            frames[which] = _mutate(frames[which], rng)
        try:
            check_content(decode(frames))
            outcomes["decoded"] += 1
        except WireError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50_000 and outcomes["decoded"] > 0


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_frames_only_ever_raise_wire_error(frames):
    try:
        check_content(decode(frames))
    except WireError:
        pass


@pytest.mark.parametrize("positions", [np.array([0, 3], dtype=np.int32), np.array([[0]], dtype=np.int64),
                                       np.array([-1], dtype=np.int64), np.array([4], dtype=np.int64)])
def test_a_scoring_steps_positions_must_point_into_the_test_split(positions):
    from fednb.wire.vertical import scored_positions

    with pytest.raises(ValueError, match="int64 positions into the test split"):
        scored_positions({"positions": positions}, 4)
    assert scored_positions({}, 4) is None
    assert list(scored_positions({"positions": np.array([3, 0], dtype=np.int64)}, 4)) == [3, 0]
    assert len(scored_positions({"positions": np.zeros(0, dtype=np.int64)}, 0)) == 0
