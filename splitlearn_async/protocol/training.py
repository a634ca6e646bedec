"""Training messages of the trunk service: split training steps and LoRA adapters.

Methods (see ``docs/protocol.md``)::

    TrainOpen      open, chunk...  -> result {training_id, mode, adapter_id, trainable_parameters}
    TrainForward   forward         -> result {hidden_states, step_id}      (graph kept on the server)
    Backward       backward        -> result {grad_input, optimizer_steps, applied}
    OptimizerStep  step            -> result {optimizer_steps}
    TrainSave      save            -> result {mode, adapter_id, blobs declared}, chunk...
    TrainClose     close           -> result {training_id, closed: true}

``TrainOpen`` is client-streaming: the ``open`` message declares the checkpoint it starts
from (``weights``, ``optimizer_state``: size and SHA-256), and ``chunk`` messages carry
the bytes. ``TrainSave`` is server-streaming the other way. :mod:`.checkpoints` holds the
chunks' rules, the same both ways.

The plain replies (ids, counts, bytes) are built in :mod:`.replies`.

Adapters (``LoadAdapter``, ``DeleteAdapter``) are in :mod:`.adapters`.

Parsing raises :class:`splitlearn_async.errors.WireError` with a whole sentence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splitlearn_async.errors import WireError
from splitlearn_async.wire import Kind, check_keys, decode_tensor, encode_tensor, field, message_kind, pack, unpack

from .checkpoints import Blob, blob_fields, parse_blobs
from .inference import (
    HIDDEN_DTYPES,
    SERVICE_NAME,
    Body,
    TrunkInputs,
    as_message,
    inputs_message,
    parse_adapter_id,
    parse_inputs,
)

__all__ = [
    "METHOD_BACKWARD",
    "METHOD_OPTIMIZER_STEP",
    "METHOD_TRAIN_CLOSE",
    "METHOD_TRAIN_FORWARD",
    "METHOD_TRAIN_OPEN",
    "METHOD_TRAIN_SAVE",
    "BackwardRequest",
    "Kind",
    "TrainOpenRequest",
    "build_backward",
    "build_backward_result",
    "build_train_forward",
    "build_train_forward_result",
    "build_train_open",
    "build_training_call",
    "parse_backward",
    "parse_backward_norm",
    "parse_backward_result",
    "parse_train_forward",
    "parse_train_forward_result",
    "parse_train_open",
    "parse_training_call",
]

METHOD_TRAIN_OPEN = f"/{SERVICE_NAME}/TrainOpen"
METHOD_TRAIN_FORWARD = f"/{SERVICE_NAME}/TrainForward"
METHOD_BACKWARD = f"/{SERVICE_NAME}/Backward"
METHOD_OPTIMIZER_STEP = f"/{SERVICE_NAME}/OptimizerStep"
METHOD_TRAIN_SAVE = f"/{SERVICE_NAME}/TrainSave"
METHOD_TRAIN_CLOSE = f"/{SERVICE_NAME}/TrainClose"

#: The largest step id a client may send (ids are positive 63-bit integers).
MAX_STEP_ID = 2**63 - 1


def _training_id(msg: Mapping[str, Any]) -> str:
    value = field(msg, "training_id", str)
    if not 0 < len(value) <= 64:
        raise WireError(f"message field 'training_id' has {len(value)} characters; send the id TrainOpen returned.")
    return value


@dataclass
class TrainOpenRequest:
    """A parsed ``TrainOpen`` header.

    Attributes:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        optimizer: The optimizer settings map (``OptimizerConfig.to_wire``).
        lora: The adapter settings map (``LoraConfig.to_wire``), or None.
        adapter_id: Adapter to train (existing) or to create under this name; None = a new name.
        blobs: The checkpoint to start from, declared (``weights``, ``optimizer_state``);
            its bytes follow in ``chunk`` messages.
        chunk_bytes: The declared chunk size (None when no blob is declared).
    """

    mode: str
    optimizer: dict[str, Any]
    lora: dict[str, Any] | None
    adapter_id: str | None
    blobs: list[Blob]
    chunk_bytes: int | None


def build_train_open(
    mode: str,
    optimizer: Mapping[str, Any],
    lora: Mapping[str, Any] | None = None,
    *,
    adapter_id: str | None = None,
    blobs: Sequence[Blob] = (),
    chunk_bytes: int | None = None,
) -> bytes:
    """The first message of ``TrainOpen``: what trains on the trunk and with which optimizer.

    Args:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        optimizer: ``OptimizerConfig.to_wire()``.
        lora: ``LoraConfig.to_wire()`` for a new adapter (``mode="lora"``).
        adapter_id: Train this loaded adapter, or create it under this name.
        blobs: The checkpoint to start from (``describe_blobs({"weights": ..., "optimizer_state": ...})``:
            an adapter, or trunk weights for ``"full"``; a saved optimizer state); its
            ``chunk_bodies`` follow this message.
        chunk_bytes: The size of those chunks.

    Returns:
        The message body.
    """
    msg: dict[str, Any] = {"kind": Kind.OPEN.value, "mode": mode, "optimizer": dict(optimizer)}
    for key, value in (("lora", dict(lora) if lora is not None else None), ("adapter_id", adapter_id)):
        if value is not None:
            msg[key] = value
    return pack({**msg, **blob_fields(blobs, chunk_bytes)})


_TRAIN_OPEN_FIELDS = frozenset(
    {"kind", "mode", "optimizer", "lora", "adapter_id", "weights", "optimizer_state", "chunk_bytes"}
)
_TRAIN_FORWARD_FIELDS = frozenset({"training_id", "keep_graph"})
_BACKWARD_FIELDS = frozenset({"kind", "training_id", "step_id", "grad_output", "apply"})
#: The fields of ``OptimizerStep`` (``step``), ``TrainSave`` (``save``) and ``TrainClose`` (``close``).
_CALL_FIELDS = {
    Kind.STEP: frozenset({"kind", "training_id", "scale"}),
    Kind.SAVE: frozenset({"kind", "training_id", "optimizer", "chunk_bytes"}),
    Kind.CLOSE: frozenset({"kind", "training_id"}),
}


def parse_train_open(
    body: Body, *, max_bytes: int | None = None, max_message_bytes: int | None = None
) -> TrainOpenRequest:
    """Parse the first message of ``TrainOpen`` (the settings' values are checked by the config classes).

    Args:
        body: The message.
        max_bytes: Refuse a larger body.
        max_message_bytes: The receiver's message limit: a declared chunk must fit it.

    Raises:
        WireError: the body is malformed, has unknown fields, a field has the wrong type, or
            a blob's declaration or ``chunk_bytes`` is malformed or out of range.
    """
    msg = as_message(body, max_bytes)
    message_kind(msg, expected=Kind.OPEN)
    check_keys(msg, _TRAIN_OPEN_FIELDS, "a TrainOpen message")
    mode = field(msg, "mode", str)
    lora = field(msg, "lora", dict, required=False)
    blobs, chunk_bytes = parse_blobs(msg, ("weights", "optimizer_state"), max_message_bytes=max_message_bytes)
    return TrainOpenRequest(
        mode=mode,
        optimizer=field(msg, "optimizer", dict, required=False, default={}),
        lora=lora,
        adapter_id=parse_adapter_id(msg, required=False),
        blobs=blobs,
        chunk_bytes=chunk_bytes,
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
    return inputs_message(Kind.FORWARD, hidden_states, attention_mask, position_ids, wire_dtype, extra)


def parse_train_forward(
    body: Body,
    *,
    hidden_size: int | None = None,
    max_bytes: int | None = None,
    max_elements: int | None = None,
) -> tuple[str, TrunkInputs, bool]:
    """Parse ``TrainForward``: ``(training_id, inputs, keep_graph)``; checks as :func:`parse_inputs`.

    Raises:
        WireError: the body or a tensor is malformed, or the training id is missing.
    """
    msg = as_message(body, max_bytes)
    training_id = _training_id(msg)
    keep_graph = bool(field(msg, "keep_graph", bool, required=False, default=True))
    inputs = parse_inputs(
        msg,
        hidden_size=hidden_size,
        expected=Kind.FORWARD,
        max_elements=max_elements,
        extra_fields=_TRAIN_FORWARD_FIELDS,
    )
    if not isinstance(inputs, TrunkInputs):  # parse_inputs returns Kind.CLOSE only when 'close' is expected
        raise WireError("a TrainForward body must be a 'forward' message with hidden states.")
    return training_id, inputs, keep_graph


def build_train_forward_result(
    hidden_states: torch.Tensor, step_id: int, *, wire_dtype: torch.dtype | None = None
) -> bytes:
    """The reply to ``TrainForward``: the trunk output ``(B, T, H)`` and the step id for ``Backward``."""
    return _tensor_result("hidden_states", hidden_states, wire_dtype, step_id=int(step_id))


def parse_train_forward_result(
    body: bytes | bytearray | memoryview, *, hidden_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Parse the reply to ``TrainForward``: ``(hidden_states (B, T, H), step_id)``.

    Raises:
        WireError: the body is malformed.
    """
    return _parse_tensor_result(body, "hidden_states", "step_id", hidden_size)


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
    training_id: str,
    step_id: int,
    grad_output: torch.Tensor,
    *,
    apply: bool = True,
    wire_dtype: torch.dtype | None = None,
) -> bytes:
    """The body of ``Backward``.

    Args:
        training_id: From ``TrainOpen``.
        step_id: From ``TrainForward``.
        grad_output: ``(B, T, H)`` gradient of the loss w.r.t. that step's trunk output.
        apply: Step the trunk's optimizer after accumulating; False only accumulates.
        wire_dtype: Encode the gradient in this dtype; None keeps its own.
    """
    return pack(
        {
            "kind": Kind.BACKWARD.value,
            "training_id": training_id,
            "step_id": int(step_id),
            "grad_output": encode_tensor(grad_output, wire_dtype),
            "apply": bool(apply),
        }
    )


def parse_backward(
    body: Body,
    *,
    hidden_size: int | None = None,
    max_bytes: int | None = None,
    max_elements: int | None = None,
) -> BackwardRequest:
    """Parse ``Backward``; the gradient must be a finite ``(B, T, H)`` float tensor.

    Raises:
        WireError: the body or the gradient is malformed, or the ids are missing.
    """
    msg = as_message(body, max_bytes)
    message_kind(msg, expected=Kind.BACKWARD)
    check_keys(msg, _BACKWARD_FIELDS, "a Backward message")
    training_id = _training_id(msg)
    step_id = field(msg, "step_id", int)
    if not 0 < step_id <= MAX_STEP_ID:
        raise WireError(f"message field 'step_id' is {step_id}; send the positive id TrainForward returned.")
    grad = decode_tensor(
        msg.get("grad_output"),
        name="grad_output",
        dtypes=HIDDEN_DTYPES,
        shape=(None, None, hidden_size),
        max_elements=max_elements,
    )
    apply = field(msg, "apply", bool, required=False, default=True)
    return BackwardRequest(training_id, step_id, grad, bool(apply))


def build_backward_result(
    grad_input: torch.Tensor,
    *,
    optimizer_steps: int,
    applied: bool,
    grad_norm_sq: float = 0.0,
    wire_dtype: torch.dtype | None = None,
) -> bytes:
    """The reply to ``Backward``: ``grad_input (B, T, H)`` for the client's bottom stage.

    ``grad_norm_sq`` is the squared norm of the trunk's accumulated gradients after this
    backward (before an optimizer step): the trunk's share of a global-norm clip.
    """
    return _tensor_result(
        "grad_input",
        grad_input,
        wire_dtype,
        optimizer_steps=int(optimizer_steps),
        applied=bool(applied),
        grad_norm_sq=float(grad_norm_sq),
    )


def parse_backward_norm(body: bytes | bytearray | memoryview) -> float:
    """The ``grad_norm_sq`` of a ``Backward`` reply (0.0 from a server that does not report it).

    Raises:
        WireError: the field is not a number.
    """
    value = field(unpack(body), "grad_norm_sq", (int, float), required=False, default=0.0)
    return float(value)


def parse_backward_result(
    body: bytes | bytearray | memoryview, *, hidden_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Parse the reply to ``Backward``: ``(grad_input (B, T, H), optimizer_steps)``.

    Raises:
        WireError: the body is malformed.
    """
    return _parse_tensor_result(body, "grad_input", "optimizer_steps", hidden_size)


def _tensor_result(name: str, tensor: torch.Tensor, wire_dtype: torch.dtype | None, **fields: Any) -> bytes:
    """A ``result`` with one ``(B, T, H)`` tensor field ``name`` and plain ``fields``."""
    return pack({"kind": Kind.RESULT.value, name: encode_tensor(tensor, wire_dtype), **fields})


def _parse_tensor_result(
    body: bytes | bytearray | memoryview, name: str, count: str, hidden_size: int | None
) -> tuple[torch.Tensor, int]:
    """``(tensor (B, T, H), count)`` of a ``result`` made by :func:`_tensor_result`."""
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    tensor = decode_tensor(msg.get(name), name=name, dtypes=HIDDEN_DTYPES, shape=(None, None, hidden_size))
    return tensor, field(msg, count, int)


def build_training_call(kind: Kind, training_id: str, **fields: Any) -> bytes:
    """The body of ``OptimizerStep`` (``step``), ``TrainSave`` (``save``, fields ``optimizer``: bool and
    ``chunk_bytes``: int) or ``TrainClose`` (``close``)."""
    return pack({"kind": kind.value, "training_id": training_id, **fields})


def parse_training_call(body: Body, expected: Kind, *, max_bytes: int | None = None) -> tuple[str, Mapping[str, Any]]:
    """Parse a :func:`build_training_call` body: ``(training_id, message map)``.

    Raises:
        WireError: the body is malformed, of another kind, or lacks ``training_id``.
    """
    msg = as_message(body, max_bytes)
    kind = message_kind(msg, expected=expected)
    check_keys(msg, _CALL_FIELDS.get(kind, frozenset({"kind", "training_id"})), f"a {kind.value!r} message")
    return _training_id(msg), msg
