"""Tensor frames and message envelopes: round trips, zero copy, and every validation error."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch

import splitlearn_async.wire as wire
from splitlearn_async.errors import WireError
from splitlearn_async.wire import (
    WIRE_DTYPES,
    Kind,
    decode_tensor,
    encode_tensor,
    field,
    message_kind,
    pack,
    unpack,
)

SHAPES = [(), (0,), (1,), (7,), (2, 3), (1, 12, 64), (2, 0, 5), (3, 1, 1, 2)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=torch.int64).to(dtype)


def _frame(dtype: str = "float32", shape: list[int] | None = None, data: bytes | None = None) -> dict:
    shape = [1, 2, 4] if shape is None else shape
    if data is None:
        data = bytes(math.prod(shape) * WIRE_DTYPES[dtype].itemsize)
    return {"dtype": dtype, "shape": shape, "data": data}


def test_all_is_complete() -> None:
    public = {n for n in dir(wire) if not n.startswith("_") and n not in {"annotations"}}
    modules = {n for n in public if getattr(getattr(wire, n), "__file__", None)}
    assert set(wire.__all__) == public - modules


@pytest.mark.parametrize("dtype_name", list(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_bitwise_exact(dtype_name: str, shape: tuple[int, ...]) -> None:
    dtype = WIRE_DTYPES[dtype_name]
    original = _sample(dtype, shape)
    frame = unpack(pack({"kind": "step", "x": encode_tensor(original)}))["x"]
    assert frame["dtype"] == dtype_name and frame["shape"] == list(shape)
    assert len(frame["data"]) == original.numel() * original.element_size()
    decoded = decode_tensor(frame, name="x")
    assert decoded.dtype == dtype and decoded.shape == original.shape
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[original.element_size()]
    assert torch.equal(decoded.reshape(-1).view(bits), original.reshape(-1).view(bits))


def test_special_float_values_survive_when_allowed() -> None:
    original = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45])
    decoded = decode_tensor(encode_tensor(original), name="x", allow_nonfinite=True)
    assert torch.equal(decoded.view(torch.int32), original.view(torch.int32))


def test_bytes_are_little_endian_row_major() -> None:
    frame = encode_tensor(torch.tensor([[1, 2], [3, 256]], dtype=torch.int32))
    assert frame["data"] == (
        b"\x01\x00\x00\x00" b"\x02\x00\x00\x00" b"\x03\x00\x00\x00" b"\x00\x01\x00\x00"
    )


def test_encode_casts_to_wire_dtype_and_makes_contiguous() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous
    frame = encode_tensor(t, wire_dtype=torch.float16)
    assert frame["dtype"] == "float16" and frame["shape"] == [4, 3]
    assert torch.equal(decode_tensor(frame, name="x"), t.to(torch.float16))


def test_encode_refuses_dtypes_the_wire_does_not_carry() -> None:
    with pytest.raises(WireError, match="float64"):
        encode_tensor(torch.zeros(2, dtype=torch.float64))


def test_decode_shares_memory_with_the_bytes() -> None:
    frame = unpack(pack({"x": encode_tensor(torch.randn(4, 8))}))["x"]
    data = frame["data"]
    decoded = decode_tensor(frame, name="x")
    start = np.frombuffer(data, dtype=np.uint8).ctypes.data  # address of the bytes' buffer
    assert start <= decoded.data_ptr() < start + len(data)
    assert decoded.data_ptr() + decoded.numel() * decoded.element_size() <= start + len(data)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    original = torch.randn(3, 5)
    data = encode_tensor(original)["data"]
    for buf in (bytearray(data), memoryview(data)):
        decoded = decode_tensor({"dtype": "float32", "shape": [3, 5], "data": buf}, name="x")
        assert torch.equal(decoded, original)


def test_decode_checks_expected_shape_with_wildcards() -> None:
    t = decode_tensor(_frame(shape=[2, 5, 64]), name="hidden_states", shape=(None, None, 64))
    assert t.shape == (2, 5, 64)


# --- every validation error: right type, and the message names the field -----------------


@pytest.mark.parametrize(
    ("obj", "kwargs", "fragment"),
    [
        pytest.param([1, 2], {}, "must be a tensor frame", id="not-a-map"),
        pytest.param(b"raw", {}, "got bytes", id="bytes-not-a-map"),
        pytest.param({"dtype": "float32", "shape": [1]}, {}, "lacks data", id="missing-key"),
        pytest.param({**_frame(), "scale": 1.0}, {}, "unexpected keys 'scale'", id="extra-key"),
        pytest.param(_frame(dtype="float32"), {"dtypes": ["float16"]}, "only float16", id="dtype-not-allowed"),
        pytest.param({**_frame(), "dtype": "float64"}, {}, "does not know", id="unknown-dtype"),
        pytest.param({**_frame(), "dtype": 3}, {}, "does not know", id="dtype-not-str"),
        pytest.param(_frame(shape=[1, 12, 32]), {"shape": (None, None, 64)}, "dim 2 must be 64", id="hidden-size"),
        pytest.param(_frame(shape=[1, 12]), {"shape": (None, None, 64)}, "2 dims, but 3", id="rank"),
        pytest.param({**_frame(), "shape": [1, -2, 4]}, {}, "non-negative ints", id="negative-dim"),
        pytest.param({**_frame(), "shape": [1, 2.0, 4]}, {}, "non-negative ints", id="float-dim"),
        pytest.param({**_frame(), "shape": [1, True, 4]}, {}, "non-negative ints", id="bool-dim"),
        pytest.param({**_frame(), "shape": "1x2"}, {}, "non-negative ints", id="shape-not-list"),
        pytest.param({**_frame(), "shape": [1] * 40}, {}, "40 dims", id="too-many-dims"),
        pytest.param({**_frame(), "data": "abc"}, {}, "msgpack bin", id="data-str"),
        pytest.param(_frame(shape=[1, 12, 64], data=bytes(1536)), {}, "1536 bytes", id="byte-count"),
        pytest.param(_frame(shape=[4, 1000]), {"max_elements": 1000}, "4000 elements", id="too-many-elements"),
        pytest.param(_frame(dtype="bool", shape=[3], data=b"\x00\x01\x02"), {}, "other than 0 and 1", id="bool-byte"),
    ],
)
def test_decode_errors_name_the_field(obj: object, kwargs: dict, fragment: str) -> None:
    with pytest.raises(WireError) as info:
        decode_tensor(obj, name="hidden_states", **kwargs)
    message = str(info.value)
    assert "hidden_states" in message
    assert fragment in message
    assert message.endswith(".")
    assert isinstance(info.value, ValueError)


def test_byte_count_message_gives_the_needed_bytes() -> None:
    # a float16 body sent under a float32 header: half the bytes
    with pytest.raises(WireError, match=r"^hidden_states has 1536 bytes but dtype float32 and shape \[1, 12, 64\] need 768\*4 = 3072 bytes"):
        decode_tensor(_frame(shape=[1, 12, 64], data=bytes(1536)), name="hidden_states")
    with pytest.raises(WireError, match=r"need 768\*4 = 3072 bytes"):
        decode_tensor(_frame(shape=[1, 12, 64], data=bytes(3072 * 2)), name="hidden_states")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("value", "fragment"), [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 infinite"), (-float("inf"), "0 NaN and 1 infinite")])
def test_nonfinite_values_are_refused_unless_allowed(dtype: torch.dtype, value: float, fragment: str) -> None:
    t = torch.ones(2, 3, dtype=dtype)
    t[1, 2] = value
    frame = encode_tensor(t)
    with pytest.raises(WireError, match=fragment) as info:
        decode_tensor(frame, name="grad_output")
    assert "grad_output" in str(info.value)
    assert torch.isnan(decode_tensor(frame, name="x", allow_nonfinite=True)).any() == (value != value)


def test_integer_tensors_have_no_finiteness_check() -> None:
    t = torch.tensor([-(2**62), 2**62], dtype=torch.int64)
    assert torch.equal(decode_tensor(encode_tensor(t), name="ids"), t)


# --- messages --------------------------------------------------------------------------


def test_pack_unpack_round_trip() -> None:
    message = {"kind": "open", "session": "s1", "n": 3, "t": 0.5, "flags": [True, None], "b": b"\x00\xff"}
    assert unpack(pack(message)) == message


def test_unpack_size_limit() -> None:
    body = pack({"x": bytes(100)})
    assert unpack(body, max_bytes=len(body))["x"] == bytes(100)
    with pytest.raises(WireError, match="more than the 10 accepted"):
        unpack(body, max_bytes=10)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b"", "could not be decoded", id="empty"),
        pytest.param(b"\x81\xa1k", "could not be decoded", id="truncated"),
        pytest.param(pack({"a": 1}) + b"\x00", "could not be decoded", id="extra-data"),
        pytest.param(b"\xc1", "could not be decoded", id="reserved-byte"),
        pytest.param(b"\x81\xa2\xff\xfe\x01", "could not be decoded", id="bad-utf8"),
        pytest.param(msgpack.packb({1: 2}), "could not be decoded", id="int-key"),
        pytest.param(b"\x91" * 5000 + b"\x00", "could not be decoded", id="deep-nesting"),
        pytest.param(msgpack.packb([1, 2]), "must be a msgpack map", id="list-top-level"),
        pytest.param(msgpack.packb(msgpack.ExtType(5, b"x")), "extension type", id="ext"),
    ],
)
def test_unpack_errors(body: bytes, fragment: str) -> None:
    with pytest.raises(WireError, match=fragment):
        unpack(body)


def test_unpack_refuses_non_bytes() -> None:
    with pytest.raises(TypeError):
        unpack("text")  # type: ignore[arg-type]


def test_field_reads_typed_values() -> None:
    msg = {"n": 3, "t": 2, "s": "x", "flag": True, "b": b"\x00", "nil": None}
    assert field(msg, "n", int) == 3
    t = field(msg, "t", float)
    assert t == 2.0 and isinstance(t, float)
    assert field(msg, "s", (str, bytes)) == "x"
    assert field(msg, "flag", bool) is True
    assert field(msg, "b", bytes) == b"\x00"
    assert field(msg, "absent", int, required=False, default=7) == 7
    assert field(msg, "nil", int, required=False) is None


@pytest.mark.parametrize(
    ("msg", "type_", "expected"),
    [
        ({"x": "3"}, int, "message field 'x' must be an int, got str."),
        ({"x": True}, int, "message field 'x' must be an int, got bool."),
        ({"x": 1.5}, int, "message field 'x' must be an int, got float."),
        ({"x": [1]}, dict, "message field 'x' must be a map, got list."),
        ({}, int, "message field 'x' is missing; it must be an int."),
        ({"x": None}, str, "message field 'x' is missing; it must be a string."),
    ],
)
def test_field_errors(msg: dict, type_: type, expected: str) -> None:
    with pytest.raises(WireError) as info:
        field(msg, "x", type_)
    assert str(info.value) == expected


def test_field_custom_name() -> None:
    with pytest.raises(WireError, match="^open.max_tokens must be an int, got str.$"):
        field({"max_tokens": "9"}, "max_tokens", int, name="open.max_tokens")


def test_message_kind() -> None:
    assert message_kind({"kind": "step"}) is Kind.STEP
    assert message_kind({"kind": "open"}, expected=Kind.OPEN) is Kind.OPEN
    assert Kind.STEP == "step" and str(Kind.STEP) == "step"
    with pytest.raises(WireError, match="not a message kind"):
        message_kind({"kind": "jump"})
    with pytest.raises(WireError, match="'kind' is missing"):
        message_kind({})
    with pytest.raises(WireError, match="'close' message arrived where 'step' or 'open'"):
        message_kind({"kind": "close"}, expected=(Kind.STEP, Kind.OPEN))
