"""Tensor frames: a msgpack map ``{"dtype": str, "shape": [int, ...], "data": bytes}``.

``data`` holds the elements in C (row-major) order as raw little-endian bytes, so its
length is always ``numel * itemsize``. Decoding checks every field and says what was
wrong in a whole sentence that names the field; it never trusts a frame from the network.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import torch

from splitlearn_async.errors import WireError

__all__ = ["WIRE_DTYPES", "decode_tensor", "encode_tensor"]

#: Dtype names allowed on the wire, and the torch dtype each one stands for.
WIRE_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}

_NAME_OF_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_FRAME_KEYS = ("dtype", "shape", "data")
# integer dtype of each item size: raw bytes go through these, because numpy has no bfloat16
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ITEMSIZE: dict[torch.dtype, int] = {dtype: dtype.itemsize for dtype in WIRE_DTYPES.values()}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
# torch tensors have at most 64 dims; real frames have 1-4, so refuse silly ranks early
_MAX_RANK = 16


def encode_tensor(t: torch.Tensor, wire_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Encode a tensor as a wire frame.

    Args:
        t: Any tensor on any device; it is detached and copied to the CPU.
        wire_dtype: Cast to this dtype before encoding (e.g. ``torch.float16`` to halve the
            bytes). ``None`` keeps ``t.dtype``, so the receiver gets the exact values.

    Returns:
        ``{"dtype": name, "shape": [dims], "data": bytes}``, ready for :func:`pack`.

    Raises:
        WireError: the (cast) dtype is not one of :data:`WIRE_DTYPES`.
    """
    dtype = t.dtype if wire_dtype is None else wire_dtype
    name = _NAME_OF_DTYPE.get(dtype)
    if name is None:
        raise WireError(
            f"cannot encode a tensor of dtype {dtype}; the wire carries only "
            f"{', '.join(WIRE_DTYPES)}, so cast it or pass wire_dtype=."
        )
    cpu = t.detach().to(device="cpu", dtype=dtype).contiguous()
    # view the elements as same-size integers: numpy then gives the bytes for every dtype
    raw = cpu.reshape(-1).view(_INT_OF_SIZE[cpu.element_size()]).numpy()
    if not _LITTLE_ENDIAN_HOST:
        raw = raw.byteswap()
    return {"dtype": name, "shape": list(cpu.shape), "data": raw.tobytes()}


def decode_tensor(
    obj: object,
    *,
    name: str,
    dtypes: Collection[str] | None = None,
    shape: tuple[int | None, ...] | None = None,
    allow_nonfinite: bool = False,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Check a wire frame and turn it into a CPU tensor, without copying where possible.

    The returned tensor shares memory with ``obj["data"]`` (a read-only ``bytes`` object):
    callers must treat it as read-only (use ``.clone()`` before an in-place op). A copy is
    made only for zero-size tensors, buffers that are not aligned to the item size, and
    on big-endian hosts.

    Args:
        obj: The decoded msgpack value that should be a frame.
        name: What the frame is (e.g. ``"hidden_states"``); every error message names it.
        dtypes: Dtype names accepted here; ``None`` accepts all of :data:`WIRE_DTYPES`.
        shape: Expected shape; its length is the required rank and ``None`` entries accept
            any size. ``None`` accepts any shape.
        allow_nonfinite: Accept NaN and infinities in float tensors.
        max_elements: Largest element count accepted; ``None`` for no limit.

    Returns:
        A tensor of the frame's dtype and shape.

    Raises:
        WireError: the frame is not a map with exactly the keys ``dtype``, ``shape`` and
            ``data``; the dtype is unknown or not allowed; the shape is not a list of
            non-negative ints, has the wrong rank or a wrong dim; there are too many
            elements; the byte count is not ``numel * itemsize``; a bool byte is not 0 or
            1; or a float tensor holds NaN or infinity and ``allow_nonfinite`` is false.
    """
    dtype_name, dims, data = _frame_fields(obj, name)
    dtype = _check_dtype(dtype_name, name, dtypes)
    _check_shape(dims, name, shape)
    numel = math.prod(dims)
    if max_elements is not None and numel > max_elements:
        raise WireError(
            f"{name} has shape {dims} = {numel} elements, more than the {max_elements} "
            "accepted; send it in smaller pieces."
        )
    itemsize = _ITEMSIZE[dtype]
    if len(data) != numel * itemsize:
        raise WireError(
            f"{name} has {len(data)} bytes but dtype {dtype_name} and shape {dims} need "
            f"{numel}*{itemsize} = {numel * itemsize} bytes; send the elements as raw "
            "little-endian bytes in row-major order."
        )
    tensor = _from_bytes(data, dtype, numel).reshape(dims)
    if dtype is torch.bool:
        _check_bool_bytes(tensor, name)
    elif dtype in _FLOAT_DTYPES and not allow_nonfinite:
        _check_finite(tensor, name)
    return tensor


def _type_name(value: object) -> str:
    """The msgpack-flavoured name of a decoded value's type, for error messages."""
    names = {
        dict: "a map",
        list: "a list",
        tuple: "a list",
        str: "a string",
        bool: "a bool",
        int: "an int",
        float: "a float",
        bytes: "bytes",
        type(None): "nil",
    }
    return names.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages echo untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frame_fields(obj: object, name: str) -> tuple[object, list[int], bytes | bytearray | memoryview]:
    """The (dtype, shape, data) of a frame, after checking the keys and field types."""
    if not isinstance(obj, dict):
        raise WireError(f"{name} must be a tensor frame (a map with keys dtype, shape, data), got {_type_name(obj)}.")
    keys = set(obj)
    if keys != set(_FRAME_KEYS):
        missing = [k for k in _FRAME_KEYS if k not in keys]
        extra = sorted(_short(k, 30) for k in keys - set(_FRAME_KEYS))[:5]
        problems = []
        if missing:
            problems.append(f"lacks {', '.join(missing)}")
        if extra:
            problems.append(f"has unexpected keys {', '.join(extra)}")
        raise WireError(f"{name} {' and '.join(problems)}; a tensor frame has exactly the keys dtype, shape and data.")
    dims = obj["shape"]
    if not isinstance(dims, (list, tuple)) or not all(type(d) is int and d >= 0 for d in dims):
        raise WireError(f"{name} has shape {_short(dims)}; the shape must be a list of non-negative ints.")
    if len(dims) > _MAX_RANK:
        raise WireError(f"{name} has {len(dims)} dims; at most {_MAX_RANK} are accepted.")
    data = obj["data"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(
            f"{name} has data of type {_type_name(data)}; data must be msgpack bin (raw bytes), not a string or a list."
        )
    if isinstance(data, memoryview):  # count bytes, not items, and never read a strided view
        data = data.cast("B") if data.c_contiguous else data.tobytes()
    return obj["dtype"], list(dims), data


def _check_dtype(dtype_name: object, name: str, allowed: Collection[str] | None) -> torch.dtype:
    """The torch dtype for ``dtype_name``, or a WireError if it is unknown or not allowed."""
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise WireError(
            f"{name} has dtype {_short(dtype_name)}, which the wire does not know; use one of {', '.join(WIRE_DTYPES)}."
        )
    if allowed is not None and dtype_name not in allowed:
        raise WireError(
            f"{name} has dtype {dtype_name}, but only {', '.join(sorted(allowed))} "
            "is accepted here; cast it before sending."
        )
    return WIRE_DTYPES[dtype_name]


def _check_shape(dims: list[int], name: str, expected: tuple[int | None, ...] | None) -> None:
    """Raise a WireError when ``dims`` does not match the expected rank and sizes."""
    if expected is None:
        return
    shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
    if len(dims) != len(expected):
        raise WireError(
            f"{name} has shape {dims} with {len(dims)} dims, but {len(expected)} are expected ({shown}, * = any size)."
        )
    for axis, (got, want) in enumerate(zip(dims, expected, strict=True)):
        if want is not None and got != want:
            raise WireError(
                f"{name} has shape {dims}, but dim {axis} must be {want} ({shown}, "
                "* = any size); check that client and server use the same model."
            )


def _from_bytes(data: bytes | bytearray | memoryview, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A 1-D tensor over ``data`` (shared memory where possible, see decode_tensor)."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)  # frombuffer rejects empty buffers
    with warnings.catch_warnings():
        # bytes are read-only and torch has no read-only tensors; callers are told not to write
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        tensor = torch.frombuffer(data, dtype=dtype, count=numel)
    itemsize = tensor.element_size()
    if tensor.data_ptr() % itemsize:
        tensor = tensor.clone()  # unaligned memory: kernels may assume natural alignment
    if not _LITTLE_ENDIAN_HOST and itemsize > 1:
        swapped = tensor.view(_INT_OF_SIZE[itemsize]).numpy().byteswap()
        tensor = torch.from_numpy(swapped).view(dtype)
    return tensor


def _check_bool_bytes(tensor: torch.Tensor, name: str) -> None:
    """Bool elements are one byte each and must be 0 or 1; other bytes are undefined in torch."""
    bad = int((tensor.view(torch.uint8) > 1).sum())
    if bad:
        raise WireError(
            f"{name} is a bool tensor with {bad} bytes other than 0 and 1; send each "
            "element as one byte, 0 for false and 1 for true."
        )


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise a WireError naming how many NaN and infinite values a float tensor holds."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor).all()):
        return
    nans = int(torch.isnan(tensor).sum())
    infs = int(torch.isinf(tensor).sum())
    raise WireError(
        f"{name} contains {nans} NaN and {infs} infinite values; only finite values are "
        "accepted here, so check the sender's computation (overflow in float16?)."
    )
