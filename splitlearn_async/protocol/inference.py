"""Inference messages of the trunk service: ``Session``, ``Forward`` and ``Info``.

Every body is one msgpack map (see ``docs/protocol.md``); this module builds and parses
them with :mod:`splitlearn_async.wire`, so the client and the server agree on field names,
dtypes and shapes in one place.

Methods of the service ``splitlearn.Trunk``:

- ``Session`` (stream-stream): ``open`` -> ``result``, then ``step`` -> ``result`` any
  number of times, then ``close`` -> ``result`` with ``closed=True``; the stream ends.
- ``Forward`` (unary): ``forward`` -> ``result``, no state kept.
- ``Info`` (unary): any map (usually ``{}``) -> a ``result`` map describing the server.

Parsing raises :class:`splitlearn_async.errors.WireError` with a whole sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from splitlearn_async.errors import WireError
from splitlearn_async.wire import (
    DEFAULT_LIMITS,
    DecodeLimits,
    Kind,
    check_keys,
    decode_tensor,
    encode_tensor,
    field,
    message_kind,
    pack,
    unpack,
)

__all__ = [
    "HIDDEN_DTYPES",
    "MASK_DTYPES",
    "MAX_POSITION",
    "METHOD_FORWARD",
    "METHOD_INFO",
    "METHOD_SESSION",
    "POSITION_DTYPES",
    "REQUEST_FIELDS",
    "SERVICE_NAME",
    "Body",
    "TrunkInputs",
    "TrunkResult",
    "as_message",
    "build_close",
    "build_closed",
    "build_forward",
    "build_info",
    "build_info_request",
    "build_open",
    "build_result",
    "build_step",
    "inputs_message",
    "parse_adapter_id",
    "parse_info",
    "parse_inputs",
    "parse_result",
]

#: The gRPC service name; methods are ``/splitlearn.Trunk/<Method>``.
SERVICE_NAME = "splitlearn.Trunk"
METHOD_SESSION = f"/{SERVICE_NAME}/Session"
METHOD_FORWARD = f"/{SERVICE_NAME}/Forward"
METHOD_INFO = f"/{SERVICE_NAME}/Info"

#: Dtypes accepted for ``hidden_states`` (the reply uses the same one).
HIDDEN_DTYPES = ("float32", "float16", "bfloat16")
#: Dtypes accepted for ``attention_mask`` (non-zero = real token).
MASK_DTYPES = ("bool", "int64", "int32")
#: Dtypes accepted for ``position_ids``.
POSITION_DTYPES = ("int64", "int32")
#: Position ids must lie in ``[0, MAX_POSITION)``.
MAX_POSITION = 2**31


@dataclass
class TrunkInputs:
    """The tensors of an ``open``, ``step`` or ``forward`` message.

    Attributes:
        kind: The message kind.
        hidden_states: ``(B, T, H)`` float tensor (read-only memory shared with the body).
        attention_mask: ``(B, T)`` or ``(B, past + T)`` validity of the tokens (non-zero = real).
        position_ids: ``(B, T)`` int tensor.
        session_id: The client's session id (``open`` only; optional).
        adapter_id: The LoRA adapter the session runs with (``open`` only; None = base weights).
        beam_idx: ``(B,)`` int64, the row of the session's cache each row continues;
            the cache is reordered by it before the step (``step`` only; None = no reorder).
    """

    kind: Kind
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    session_id: str | None = None
    adapter_id: str | None = None
    beam_idx: torch.Tensor | None = None


@dataclass
class TrunkResult:
    """A parsed ``result`` of ``Session`` or ``Forward``.

    Attributes:
        hidden_states: ``(B, T, H)`` output of the trunk, or ``None`` in the reply to ``close``.
        session_id: The session's id (``Session`` only).
        length: Cache columns held by the session after this step (``Session`` only).
        closed: True in the reply to ``close``.
    """

    hidden_states: torch.Tensor | None
    session_id: str | None = None
    length: int | None = None
    closed: bool = False


def inputs_message(
    kind: Kind,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    wire_dtype: torch.dtype | None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """One map with the three tensors of an ``open``, ``step`` or ``forward`` message, plus ``extra`` fields."""
    msg: dict[str, Any] = {
        "kind": kind.value,
        "hidden_states": encode_tensor(hidden_states, wire_dtype),  # (B, T, H)
        "attention_mask": encode_tensor(attention_mask),  # (B, T)
        "position_ids": encode_tensor(position_ids.to(torch.int64)),  # (B, T)
    }
    if extra:
        msg.update(extra)
    return pack(msg)


def build_open(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    session_id: str | None = None,
    wire_dtype: torch.dtype | None = None,
    adapter_id: str | None = None,
) -> bytes:
    """The first message of a ``Session`` stream: the prompt's hidden states.

    Args:
        hidden_states: ``(B, T, H)`` output of the client's bottom stage.
        attention_mask: ``(B, T)`` validity of the new tokens (bool or int, non-zero = real).
        position_ids: ``(B, T)`` positions of the new tokens.
        session_id: Optional id the server echoes (for logs); the server makes one if absent.
        wire_dtype: Send hidden states in this dtype (``torch.float16``/``torch.bfloat16``
            to halve the bytes); ``None`` keeps their own dtype (exact).
        adapter_id: Run the session with this LoRA adapter loaded on the server (see
            ``TrainOpen``/``LoadAdapter``); ``None`` uses the base weights.

    Returns:
        The message body.

    Raises:
        WireError: a tensor's dtype cannot travel on the wire.
    """
    extra: dict[str, Any] = {"session_id": session_id} if session_id is not None else {}
    if adapter_id is not None:
        extra["adapter_id"] = adapter_id
    return inputs_message(Kind.OPEN, hidden_states, attention_mask, position_ids, wire_dtype, extra or None)


def build_step(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    wire_dtype: torch.dtype | None = None,
    beam_idx: torch.Tensor | None = None,
) -> bytes:
    """A ``step`` message of a ``Session`` stream (usually ``T = 1``); arguments as :func:`build_open`.

    ``beam_idx`` ``(B,)`` (beam search) makes the server reorder the session's cache
    before the step: row ``i`` continues the row ``beam_idx[i]``, each in ``[0, B)``.
    """
    extra = None if beam_idx is None else {"beam_idx": encode_tensor(beam_idx.to(torch.int64))}  # (B,)
    return inputs_message(Kind.STEP, hidden_states, attention_mask, position_ids, wire_dtype, extra)


def build_forward(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    wire_dtype: torch.dtype | None = None,
) -> bytes:
    """The body of a stateless ``Forward`` call; arguments as :func:`build_open`."""
    return inputs_message(Kind.FORWARD, hidden_states, attention_mask, position_ids, wire_dtype)


def build_close() -> bytes:
    """The last message of a ``Session`` stream: free the session's cache."""
    return pack({"kind": Kind.CLOSE.value})


def build_info_request() -> bytes:
    """The body of an ``Info`` call."""
    return pack({})


def build_result(
    hidden_states: torch.Tensor,
    *,
    session_id: str | None = None,
    length: int | None = None,
    wire_dtype: torch.dtype | None = None,
) -> bytes:
    """A ``result`` reply carrying the trunk's output.

    Args:
        hidden_states: ``(B, T, H)`` trunk output.
        session_id: The session's id (``Session`` replies).
        length: Cache columns held after this step (``Session`` replies).
        wire_dtype: Encode the hidden states in this dtype; ``None`` keeps theirs.

    Returns:
        The message body.

    Raises:
        WireError: the dtype cannot travel on the wire.
    """
    msg: dict[str, Any] = {"kind": Kind.RESULT.value, "hidden_states": encode_tensor(hidden_states, wire_dtype)}
    if session_id is not None:
        msg["session_id"] = session_id
    if length is not None:
        msg["length"] = int(length)
    return pack(msg)


def build_closed(session_id: str) -> bytes:
    """The reply to ``close``: a ``result`` with ``closed=True`` and no hidden states."""
    return pack({"kind": Kind.RESULT.value, "session_id": session_id, "closed": True, "length": 0})


def build_info(info: Mapping[str, Any]) -> bytes:
    """The reply to ``Info``: ``info``'s fields plus ``kind="result"``."""
    return pack({"kind": Kind.RESULT.value, **info})


#: A request as it arrives (bytes), or already decoded (off the event loop) into a map.
Body = bytes | bytearray | memoryview | Mapping[str, Any]

_TENSOR_FIELDS = frozenset({"kind", "hidden_states", "attention_mask", "position_ids"})
#: The fields each request kind of ``Session`` and ``Forward`` may carry (docs/protocol.md).
REQUEST_FIELDS: dict[Kind, frozenset[str]] = {
    Kind.OPEN: _TENSOR_FIELDS | {"session_id", "adapter_id"},
    Kind.STEP: _TENSOR_FIELDS | {"beam_idx"},
    Kind.FORWARD: _TENSOR_FIELDS,
    Kind.CLOSE: frozenset({"kind"}),
}


def as_message(body: Body, max_bytes: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS) -> Mapping[str, Any]:
    """``body`` decoded within ``limits`` (or returned as it is, if already a map).

    Raises:
        WireError: the body is larger than ``max_bytes``, or not a msgpack map within the limits.
    """
    return body if isinstance(body, Mapping) else unpack(body, max_bytes=max_bytes, limits=limits)


def parse_inputs(
    body: Body,
    *,
    hidden_size: int | None = None,
    expected: Kind | tuple[Kind, ...] = (Kind.OPEN, Kind.STEP, Kind.FORWARD),
    max_bytes: int | None = None,
    max_elements: int | None = None,
    extra_fields: frozenset[str] = frozenset(),
) -> TrunkInputs | Kind:
    """Parse an ``open``, ``step`` or ``forward`` message (or recognise ``close``).

    Args:
        body: The message body, or an already-unpacked map.
        hidden_size: The model's hidden size ``H``; ``None`` skips that check.
        expected: The kinds allowed here; ``close`` is returned as ``Kind.CLOSE``.
        max_bytes: Largest body accepted.
        max_elements: Largest element count of the hidden states.
        extra_fields: Fields allowed besides the kind's own (``TrainForward`` adds its ids).

    Returns:
        :class:`TrunkInputs`, or ``Kind.CLOSE`` for a ``close`` message.

    Raises:
        WireError: the body is malformed, its kind is not expected, a tensor has a wrong
            dtype, shape or byte count, the hidden states hold NaN/inf, the mask's or the
            positions' shapes do not match the hidden states, or positions or ``beam_idx``
            are out of range.
    """
    msg = as_message(body, max_bytes)
    kind = message_kind(msg, expected=expected)
    check_keys(msg, REQUEST_FIELDS[kind] | extra_fields, f"a {kind.value!r} message")
    if kind is Kind.CLOSE:
        return kind
    hidden = decode_tensor(
        msg.get("hidden_states"),
        name="hidden_states",
        dtypes=HIDDEN_DTYPES,
        shape=(None, None, hidden_size),
        max_elements=max_elements,
    )
    batch, length, _ = hidden.shape
    if batch < 1 or length < 1:
        raise WireError(f"hidden_states has shape {list(hidden.shape)}; it needs at least one row and one token.")
    mask = decode_tensor(msg.get("attention_mask"), name="attention_mask", dtypes=MASK_DTYPES, shape=(batch, None))
    if mask.shape[1] < length:
        raise WireError(
            f"attention_mask has shape {list(mask.shape)} but hidden_states has {length} tokens; "
            f"send a ({batch}, {length}) mask of the new tokens."
        )
    positions = decode_tensor(
        msg.get("position_ids"), name="position_ids", dtypes=POSITION_DTYPES, shape=(batch, length)
    )
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= MAX_POSITION):
        raise WireError(
            f"position_ids must lie in [0, {MAX_POSITION}), got values from {int(positions.min())} "
            f"to {int(positions.max())}."
        )
    session_id = adapter_id = None
    if kind is Kind.OPEN:
        session_id = field(msg, "session_id", str, required=False)
        if session_id is not None and len(session_id) > 128:
            raise WireError(f"message field 'session_id' has {len(session_id)} characters; at most 128 are accepted.")
        adapter_id = parse_adapter_id(msg, required=False)
    beam_idx = _parse_beam_idx(msg, batch) if kind is Kind.STEP else None
    return TrunkInputs(kind, hidden, mask, positions.to(torch.int64), session_id, adapter_id, beam_idx)


def _parse_beam_idx(msg: Mapping[str, Any], batch: int) -> torch.Tensor | None:
    """The optional ``beam_idx`` of a ``step``: ``(B,)`` int64, each in ``[0, B)``.

    Raises:
        WireError: the frame is malformed, of another dtype or shape, or an index is out of range.
    """
    if msg.get("beam_idx") is None:
        return None
    beam_idx = decode_tensor(msg["beam_idx"], name="beam_idx", dtypes=("int64",), shape=(batch,))
    if int(beam_idx.min()) < 0 or int(beam_idx.max()) >= batch:
        raise WireError(
            f"beam_idx holds values from {int(beam_idx.min())} to {int(beam_idx.max())}, but each must be a row "
            f"of the session's cache, in [0, {batch}); send the parent row of every row."
        )
    return beam_idx


def parse_result(body: bytes | bytearray | memoryview, *, hidden_size: int | None = None) -> TrunkResult:
    """Parse a ``result`` reply of ``Session`` or ``Forward``.

    Returns:
        :class:`TrunkResult` (its hidden states share memory with ``body``).

    Raises:
        WireError: the body is malformed or not a ``result``.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    closed = bool(field(msg, "closed", bool, required=False, default=False))
    hidden = None
    if not closed:
        hidden = decode_tensor(
            msg.get("hidden_states"), name="hidden_states", dtypes=HIDDEN_DTYPES, shape=(None, None, hidden_size)
        )
    return TrunkResult(
        hidden_states=hidden,
        session_id=field(msg, "session_id", str, required=False),
        length=field(msg, "length", int, required=False),
        closed=closed,
    )


def parse_info(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse the reply to ``Info`` into a plain dict (see ``docs/protocol.md`` for its fields).

    Raises:
        WireError: the body is malformed or not a ``result``.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    return msg


def parse_adapter_id(msg: Mapping[str, Any], *, required: bool) -> str | None:
    """The ``adapter_id`` field: 1..64 letters, digits, ``-``, ``_`` or ``.``.

    Raises:
        WireError: the field is missing (when ``required``), not a string, or malformed.
    """
    value = field(msg, "adapter_id", str, required=required)
    if value is not None and not (0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)):
        raise WireError(
            f"message field 'adapter_id' is {value[:80]!r}; it must be 1 to 64 letters, digits, '-', '_' or '.'."
        )
    return value
