"""Plain ``result`` replies of the trunk service: ids, counts and bytes, no tensors."""

from __future__ import annotations

from typing import Any

from splitlearn_async.wire import Kind, message_kind, pack, unpack

__all__ = [
    "build_optimizer_step_result",
    "build_reply",
    "build_train_closed",
    "build_train_open_result",
    "build_train_save_result",
    "parse_reply",
]


def build_reply(**fields: Any) -> bytes:
    """A ``result`` reply with plain fields (ids, counts, bytes); fields that are None are left out."""
    return pack({"kind": Kind.RESULT.value, **{k: v for k, v in fields.items() if v is not None}})


def build_train_open_result(training_id: str, mode: str, adapter_id: str | None, trainable_parameters: int) -> bytes:
    """The reply to ``TrainOpen``: the session's id, what it trains, and how many elements."""
    return build_reply(
        training_id=training_id, mode=mode, adapter_id=adapter_id, trainable_parameters=int(trainable_parameters)
    )


def build_optimizer_step_result(optimizer_steps: int) -> bytes:
    """The reply to ``OptimizerStep``: optimizer steps taken so far by the session."""
    return build_reply(optimizer_steps=int(optimizer_steps))


def build_train_save_result(mode: str, adapter_id: str | None, weights: bytes, optimizer_state: bytes | None) -> bytes:
    """The reply to ``TrainSave``: the trained weights and the optimizer state, as safetensors bytes."""
    return build_reply(mode=mode, adapter_id=adapter_id, weights=weights, optimizer_state=optimizer_state)


def build_train_closed(training_id: str) -> bytes:
    """The reply to ``TrainClose``."""
    return build_reply(training_id=training_id, closed=True)


def parse_reply(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse a plain ``result`` reply into a dict.

    Raises:
        WireError: the body is malformed or not a ``result``.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    return msg
