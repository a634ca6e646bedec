"""Property tests: whatever arrives from the network, the wire layer answers a value or a WireError."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from splitlearn_async.errors import WireError
from splitlearn_async.wire import (
    WIRE_DTYPES,
    decode_tensor,
    encode_tensor,
    pack,
    unpack,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-representable values, nested a little
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=64),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_dims = st.lists(st.one_of(st.integers(-3, 6), st.integers(0, 2**40), st.booleans(), st.floats(0, 4)), max_size=5)
_frame_like = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from([*WIRE_DTYPES, "float64", "int8", ""]), _scalars),
        "shape": st.one_of(_dims, _scalars),
        "data": st.one_of(st.binary(max_size=96), _scalars),
    },
    optional={"extra": _scalars},
)
_expected_shape = st.none() | st.lists(st.none() | st.integers(0, 4), max_size=4).map(tuple)


@FUZZ
@given(st.binary(max_size=256))
def test_unpack_random_bytes_gives_a_map_or_wire_error(data: bytes) -> None:
    try:
        message = unpack(data)
    except WireError:
        return
    assert isinstance(message, dict)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _values, max_size=5), st.data())
def test_unpack_mutated_messages_gives_a_map_or_wire_error(message: dict, data: st.DataObject) -> None:
    body = bytearray(pack(message))
    for _ in range(data.draw(st.integers(0, 3))):  # flip, cut or append bytes
        op = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if op == "flip" and body:
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del body[data.draw(st.integers(0, len(body))) :]
        else:
            body += data.draw(st.binary(min_size=1, max_size=8))
    try:
        decoded = unpack(bytes(body))
    except WireError:
        return
    assert isinstance(decoded, dict)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _values, max_size=5))
def test_pack_unpack_round_trip(message: dict) -> None:
    assert _same(unpack(pack(message)), message)


@FUZZ
@given(st.one_of(_frame_like, _values), _expected_shape, st.none() | st.integers(0, 64))
def test_decode_random_frames_gives_a_tensor_or_wire_error(
    obj: object, shape: tuple[int | None, ...] | None, max_elements: int | None
) -> None:
    try:
        tensor = decode_tensor(obj, name="frame_under_test", shape=shape, max_elements=max_elements)
    except WireError as exc:
        assert "frame_under_test" in str(exc)
        return
    assert isinstance(tensor, torch.Tensor)
    assert isinstance(obj, dict) and list(tensor.shape) == obj["shape"]


@FUZZ
@given(st.sampled_from(list(WIRE_DTYPES)), st.lists(st.integers(0, 4), max_size=4), st.data())
def test_decode_well_sized_random_bytes(dtype: str, shape: list[int], data: st.DataObject) -> None:
    nbytes = int(np.prod(shape, dtype=np.int64)) * WIRE_DTYPES[dtype].itemsize
    frame = {"dtype": dtype, "shape": shape, "data": data.draw(st.binary(min_size=nbytes, max_size=nbytes))}
    try:
        tensor = decode_tensor(frame, name="x")
    except WireError as exc:  # NaN/inf bit patterns, or bool bytes other than 0/1
        assert "x contains" in str(exc) or "other than 0 and 1" in str(exc)
        return
    assert tensor.dtype == WIRE_DTYPES[dtype] and list(tensor.shape) == shape


@FUZZ
@given(arrays(np.float32, array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
def test_float32_round_trip_is_exact(array: np.ndarray) -> None:
    original = torch.from_numpy(array.copy())
    frame = unpack(pack({"x": encode_tensor(original)}))["x"]
    decoded = decode_tensor(frame, name="x", allow_nonfinite=True)
    assert decoded.shape == original.shape
    assert torch.equal(decoded.view(torch.int32), original.view(torch.int32))


def _same(a: object, b: object) -> bool:
    """Equality where NaN equals NaN (msgpack keeps NaN bit patterns)."""
    if isinstance(a, float) and isinstance(b, float):
        return (a != a and b != b) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)

