"""Method names and message schemas of the trunk service, shared by client and server.

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
from splitlearn_async.wire import Kind, decode_tensor, encode_tensor, field, message_kind, pack, unpack

__all__ = [
    "SERVICE_NAME",
    "METHOD_SESSION",
    "METHOD_FORWARD",
    "METHOD_INFO",
    "HIDDEN_DTYPES",
    "MASK_DTYPES",
    "POSITION_DTYPES",
    "MAX_POSITION",
    "TrunkInputs",
    "TrunkResult",
    "build_open",
    "build_step",
    "build_close",
    "build_forward",
    "build_info_request",
    "build_result",
    "build_closed",
    "build_info",
    "parse_inputs",
    "parse_result",
    "parse_info",
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
    """

    kind: Kind
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    session_id: str | None = None
    adapter_id: str | None = None


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


def _inputs_message(
    kind: Kind,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    wire_dtype: torch.dtype | None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
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
    return _inputs_message(Kind.OPEN, hidden_states, attention_mask, position_ids, wire_dtype, extra or None)


def build_step(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    wire_dtype: torch.dtype | None = None,
) -> bytes:
    """A ``step`` message of a ``Session`` stream (usually ``T = 1``); arguments as :func:`build_open`."""
    return _inputs_message(Kind.STEP, hidden_states, attention_mask, position_ids, wire_dtype)


def build_forward(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    wire_dtype: torch.dtype | None = None,
) -> bytes:
    """The body of a stateless ``Forward`` call; arguments as :func:`build_open`."""
    return _inputs_message(Kind.FORWARD, hidden_states, attention_mask, position_ids, wire_dtype)


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


def parse_inputs(
    body: bytes | bytearray | memoryview | Mapping[str, Any],
    *,
    hidden_size: int | None = None,
    expected: Kind | tuple[Kind, ...] = (Kind.OPEN, Kind.STEP, Kind.FORWARD),
    max_bytes: int | None = None,
    max_elements: int | None = None,
) -> TrunkInputs | Kind:
    """Parse an ``open``, ``step`` or ``forward`` message (or recognise ``close``).

    Args:
        body: The message body, or an already-unpacked map.
        hidden_size: The model's hidden size ``H``; ``None`` skips that check.
        expected: The kinds allowed here; ``close`` is returned as ``Kind.CLOSE``.
        max_bytes: Largest body accepted.
        max_elements: Largest element count of the hidden states.

    Returns:
        :class:`TrunkInputs`, or ``Kind.CLOSE`` for a ``close`` message.

    Raises:
        WireError: the body is malformed, its kind is not expected, a tensor has a wrong
            dtype, shape or byte count, the hidden states hold NaN/inf, the mask's or the
            positions' shapes do not match the hidden states, or positions are out of range.
    """
    msg = body if isinstance(body, Mapping) else unpack(body, max_bytes=max_bytes)
    kind = message_kind(msg, expected=expected)
    if kind is Kind.CLOSE:
        return kind
    hidden = decode_tensor(
        msg.get("hidden_states"), name="hidden_states", dtypes=HIDDEN_DTYPES,
        shape=(None, None, hidden_size), max_elements=max_elements,
    )
    batch, length, _ = hidden.shape
    if batch < 1 or length < 1:
        raise WireError(
            f"hidden_states has shape {list(hidden.shape)}; it needs at least one row and one token."
        )
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
        adapter_id = _adapter_id(msg, required=False)
    return TrunkInputs(kind, hidden, mask, positions.to(torch.int64), session_id, adapter_id)


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


# --- split training (issue 6) --------------------------------------------------------------
#
# Methods (all unary):
#   TrainOpen      open     -> result {training_id, mode, adapter_id, trainable_parameters}
#   TrainForward   forward  -> result {hidden_states, step_id}      (graph kept on the server)
#   Backward       backward -> result {grad_input, optimizer_steps, applied}
#   OptimizerStep  step     -> result {optimizer_steps}
#   TrainSave      save     -> result {mode, adapter_id, weights (bin), optimizer_state (bin or nil)}
#   TrainClose     close    -> result {closed: true}
#   LoadAdapter    load     -> result {adapter_id}
#   DeleteAdapter  delete   -> result {adapter_id, closed: true}

METHOD_TRAIN_OPEN = f"/{SERVICE_NAME}/TrainOpen"
METHOD_TRAIN_FORWARD = f"/{SERVICE_NAME}/TrainForward"
METHOD_BACKWARD = f"/{SERVICE_NAME}/Backward"
METHOD_OPTIMIZER_STEP = f"/{SERVICE_NAME}/OptimizerStep"
METHOD_TRAIN_SAVE = f"/{SERVICE_NAME}/TrainSave"
METHOD_TRAIN_CLOSE = f"/{SERVICE_NAME}/TrainClose"
METHOD_LOAD_ADAPTER = f"/{SERVICE_NAME}/LoadAdapter"
METHOD_DELETE_ADAPTER = f"/{SERVICE_NAME}/DeleteAdapter"

#: The largest step id a client may send (ids are positive 63-bit integers).
MAX_STEP_ID = 2**63 - 1

__all__ += [
    "METHOD_TRAIN_OPEN", "METHOD_TRAIN_FORWARD", "METHOD_BACKWARD", "METHOD_OPTIMIZER_STEP",
    "METHOD_TRAIN_SAVE", "METHOD_TRAIN_CLOSE", "METHOD_LOAD_ADAPTER", "METHOD_DELETE_ADAPTER",
    "TrainOpenRequest", "BackwardRequest", "build_train_open", "parse_train_open", "build_train_forward",
    "parse_train_forward", "build_train_forward_result", "parse_train_forward_result", "build_backward",
    "parse_backward", "build_backward_result", "parse_backward_result", "build_training_call",
    "parse_training_call", "build_load_adapter", "parse_load_adapter", "build_delete_adapter",
    "parse_delete_adapter", "build_reply", "parse_reply",
]


def _adapter_id(msg: Mapping[str, Any], *, required: bool) -> str | None:
    """The ``adapter_id`` field: 1..64 letters, digits, ``-``, ``_`` or ``.``."""
    value = field(msg, "adapter_id", str, required=required)
    if value is not None and not (0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)):
        raise WireError(
            f"message field 'adapter_id' is {value[:80]!r}; it must be 1 to 64 letters, digits, '-', '_' or '.'."
        )
    return value


def _training_id(msg: Mapping[str, Any]) -> str:
    value = field(msg, "training_id", str)
    if not 0 < len(value) <= 64:
        raise WireError(f"message field 'training_id' has {len(value)} characters; send the id TrainOpen returned.")
    return value


def _blob(msg: Mapping[str, Any], key: str) -> bytes | None:
    value = field(msg, key, bytes, required=False)
    return bytes(value) if value is not None else None


@dataclass
class TrainOpenRequest:
    """A parsed ``TrainOpen`` request.

    Attributes:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        optimizer: The optimizer settings map (``OptimizerConfig.to_wire``).
        lora: The adapter settings map (``LoraConfig.to_wire``), or None.
        adapter_id: Adapter to train (existing) or to create under this name; None = a new name.
        weights: Safetensors bytes to start from, or None.
        optimizer_state: Safetensors bytes of an optimizer state to resume, or None.
    """

    mode: str
    optimizer: dict[str, Any]
    lora: dict[str, Any] | None
    adapter_id: str | None
    weights: bytes | None
    optimizer_state: bytes | None


def build_train_open(
    mode: str,
    optimizer: Mapping[str, Any],
    lora: Mapping[str, Any] | None = None,
    *,
    adapter_id: str | None = None,
    weights: bytes | None = None,
    optimizer_state: bytes | None = None,
) -> bytes:
    """The body of ``TrainOpen``: what trains on the trunk and with which optimizer.

    Args:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        optimizer: ``OptimizerConfig.to_wire()``.
        lora: ``LoraConfig.to_wire()`` for a new adapter (``mode="lora"``).
        adapter_id: Train this loaded adapter, or create it under this name.
        weights: Safetensors bytes to start from (adapter, or trunk weights for ``"full"``).
        optimizer_state: Safetensors bytes of a saved optimizer state.

    Returns:
        The message body.
    """
    msg: dict[str, Any] = {"kind": Kind.OPEN.value, "mode": mode, "optimizer": dict(optimizer)}
    for key, value in (("lora", dict(lora) if lora is not None else None), ("adapter_id", adapter_id),
                       ("weights", weights), ("optimizer_state", optimizer_state)):
        if value is not None:
            msg[key] = value
    return pack(msg)


def parse_train_open(body: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> TrainOpenRequest:
    """Parse a ``TrainOpen`` request (the settings' values are checked by the config classes).

    Raises:
        WireError: the body is malformed or a field has the wrong type.
    """
    msg = unpack(body, max_bytes=max_bytes)
    message_kind(msg, expected=Kind.OPEN)
    mode = field(msg, "mode", str)
    lora = field(msg, "lora", dict, required=False)
    return TrainOpenRequest(
        mode=mode,
        optimizer=field(msg, "optimizer", dict, required=False, default={}),
        lora=lora,
        adapter_id=_adapter_id(msg, required=False),
        weights=_blob(msg, "weights"),
        optimizer_state=_blob(msg, "optimizer_state"),
    )


def build_train_forward(
    training_id: str,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    wire_dtype: torch.dtype | None = None,
    keep_graph: bool = True,
) -> bytes:
    """The body of ``TrainForward``: a ``forward`` message plus ``training_id``; arguments as :func:`build_open`.

    ``keep_graph=False`` asks for an evaluation forward: the output as the session trains
    the trunk (its adapter active), no graph kept, and step id 0 in the reply.
    """
    extra: dict[str, Any] = {"training_id": training_id}
    if not keep_graph:
        extra["keep_graph"] = False
    return _inputs_message(Kind.FORWARD, hidden_states, attention_mask, position_ids, wire_dtype, extra)


def parse_train_forward(
    body: bytes | bytearray | memoryview,
    *,
    hidden_size: int | None = None,
    max_bytes: int | None = None,
    max_elements: int | None = None,
) -> tuple[str, TrunkInputs, bool]:
    """Parse ``TrainForward``: ``(training_id, inputs, keep_graph)``; checks as :func:`parse_inputs`.

    Raises:
        WireError: the body or a tensor is malformed, or the training id is missing.
    """
    msg = unpack(body, max_bytes=max_bytes)
    training_id = _training_id(msg)
    keep_graph = bool(field(msg, "keep_graph", bool, required=False, default=True))
    inputs = parse_inputs(msg, hidden_size=hidden_size, expected=Kind.FORWARD, max_elements=max_elements)
    if not isinstance(inputs, TrunkInputs):  # parse_inputs returns Kind.CLOSE only when 'close' is expected
        raise WireError("a TrainForward body must be a 'forward' message with hidden states.")
    return training_id, inputs, keep_graph


def build_train_forward_result(hidden_states: torch.Tensor, step_id: int, *, wire_dtype: torch.dtype | None = None) -> bytes:
    """The reply to ``TrainForward``: the trunk output ``(B, T, H)`` and the step id for ``Backward``."""
    return pack({
        "kind": Kind.RESULT.value, "hidden_states": encode_tensor(hidden_states, wire_dtype), "step_id": int(step_id),
    })


def parse_train_forward_result(body: bytes | bytearray | memoryview, *, hidden_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Parse the reply to ``TrainForward``: ``(hidden_states (B, T, H), step_id)``.

    Raises:
        WireError: the body is malformed.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    hidden = decode_tensor(msg.get("hidden_states"), name="hidden_states", dtypes=HIDDEN_DTYPES, shape=(None, None, hidden_size))
    return hidden, field(msg, "step_id", int)


@dataclass
class BackwardRequest:
    """A parsed ``Backward`` request.

    Attributes:
        training_id: The training session.
        step_id: The step whose graph to back-propagate through.
        grad_output: ``(B, T, H)`` gradient w.r.t. that step's trunk output (shape checked by the server).
        apply: Step the optimizer afterwards.
    """

    training_id: str
    step_id: int
    grad_output: torch.Tensor
    apply: bool


def build_backward(
    training_id: str, step_id: int, grad_output: torch.Tensor, *, apply: bool = True, wire_dtype: torch.dtype | None = None
) -> bytes:
    """The body of ``Backward``.

    Args:
        training_id: From ``TrainOpen``.
        step_id: From ``TrainForward``.
        grad_output: ``(B, T, H)`` gradient of the loss w.r.t. that step's trunk output.
        apply: Step the trunk's optimizer after accumulating; False only accumulates.
        wire_dtype: Encode the gradient in this dtype; None keeps its own.
    """
    return pack({
        "kind": Kind.BACKWARD.value, "training_id": training_id, "step_id": int(step_id),
        "grad_output": encode_tensor(grad_output, wire_dtype), "apply": bool(apply),
    })


def parse_backward(
    body: bytes | bytearray | memoryview,
    *,
    hidden_size: int | None = None,
    max_bytes: int | None = None,
    max_elements: int | None = None,
) -> BackwardRequest:
    """Parse ``Backward``; the gradient must be a finite ``(B, T, H)`` float tensor.

    Raises:
        WireError: the body or the gradient is malformed, or the ids are missing.
    """
    msg = unpack(body, max_bytes=max_bytes)
    message_kind(msg, expected=Kind.BACKWARD)
    training_id = _training_id(msg)
    step_id = field(msg, "step_id", int)
    if not 0 < step_id <= MAX_STEP_ID:
        raise WireError(f"message field 'step_id' is {step_id}; send the positive id TrainForward returned.")
    grad = decode_tensor(
        msg.get("grad_output"), name="grad_output", dtypes=HIDDEN_DTYPES, shape=(None, None, hidden_size),
        max_elements=max_elements,
    )
    apply = field(msg, "apply", bool, required=False, default=True)
    return BackwardRequest(training_id, step_id, grad, bool(apply))


def build_backward_result(grad_input: torch.Tensor, *, optimizer_steps: int, applied: bool, wire_dtype: torch.dtype | None = None) -> bytes:
    """The reply to ``Backward``: ``grad_input (B, T, H)`` for the client's bottom stage."""
    return pack({
        "kind": Kind.RESULT.value, "grad_input": encode_tensor(grad_input, wire_dtype),
        "optimizer_steps": int(optimizer_steps), "applied": bool(applied),
    })


def parse_backward_result(body: bytes | bytearray | memoryview, *, hidden_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Parse the reply to ``Backward``: ``(grad_input (B, T, H), optimizer_steps)``.

    Raises:
        WireError: the body is malformed.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    grad = decode_tensor(msg.get("grad_input"), name="grad_input", dtypes=HIDDEN_DTYPES, shape=(None, None, hidden_size))
    return grad, field(msg, "optimizer_steps", int)


def build_training_call(kind: Kind, training_id: str, **fields: Any) -> bytes:
    """The body of ``OptimizerStep`` (``step``), ``TrainSave`` (``save``, field ``optimizer``: bool) or ``TrainClose`` (``close``)."""
    return pack({"kind": kind.value, "training_id": training_id, **fields})


def parse_training_call(
    body: bytes | bytearray | memoryview, expected: Kind, *, max_bytes: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Parse a :func:`build_training_call` body: ``(training_id, message map)``.

    Raises:
        WireError: the body is malformed, of another kind, or lacks ``training_id``.
    """
    msg = unpack(body, max_bytes=max_bytes)
    message_kind(msg, expected=expected)
    return _training_id(msg), msg


def build_load_adapter(adapter_id: str, weights: bytes) -> bytes:
    """The body of ``LoadAdapter``: an adapter's safetensors bytes to load under ``adapter_id``."""
    return pack({"kind": Kind.LOAD.value, "adapter_id": adapter_id, "weights": weights})


def parse_load_adapter(body: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> tuple[str, bytes]:
    """Parse ``LoadAdapter``: ``(adapter_id, weights)``.

    Raises:
        WireError: the body is malformed or a field is missing.
    """
    msg = unpack(body, max_bytes=max_bytes)
    message_kind(msg, expected=Kind.LOAD)
    adapter_id = _adapter_id(msg, required=True)
    weights = _blob(msg, "weights")
    if not weights:
        raise WireError("message field 'weights' is missing; send the adapter's safetensors bytes.")
    return adapter_id, weights  # type: ignore[return-value]


def build_delete_adapter(adapter_id: str) -> bytes:
    """The body of ``DeleteAdapter``."""
    return pack({"kind": Kind.DELETE.value, "adapter_id": adapter_id})


def parse_delete_adapter(body: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> str:
    """Parse ``DeleteAdapter``: the adapter id.

    Raises:
        WireError: the body is malformed or lacks ``adapter_id``.
    """
    msg = unpack(body, max_bytes=max_bytes)
    message_kind(msg, expected=Kind.DELETE)
    return _adapter_id(msg, required=True)  # type: ignore[return-value]


def build_reply(**fields: Any) -> bytes:
    """A ``result`` reply with plain fields (ids, counts, bytes)."""
    return pack({"kind": Kind.RESULT.value, **{k: v for k, v in fields.items() if v is not None}})


def parse_reply(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse a plain ``result`` reply into a dict.

    Raises:
        WireError: the body is malformed or not a ``result``.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    return msg
