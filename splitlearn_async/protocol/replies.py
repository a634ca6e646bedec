"""Plain ``result`` replies of the trunk service: ids, counts and checkpoint headers, no tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitlearn_async.wire import Kind, check_keys, field, message_kind, pack, unpack

from .checkpoints import BLOB_NAMES, Blob, blob_fields, parse_blobs

__all__ = [
    "SaveHeader",
    "build_optimizer_step_result",
    "build_reply",
    "build_train_closed",
    "build_train_open_result",
    "build_train_save_header",
    "parse_reply",
    "parse_train_save_header",
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


@dataclass(frozen=True)
class SaveHeader:
    """The first reply of ``TrainSave``: what was trained and the blobs that follow in chunks.

    Attributes:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        adapter_id: The adapter's name (LoRA only).
        blobs: ``weights`` (absent for ``"frozen"``) and ``optimizer_state`` (if asked for), declared.
        chunk_bytes: The size of their chunks (None when no blob follows).
    """

    mode: str
    adapter_id: str | None
    blobs: list[Blob]
    chunk_bytes: int | None


_SAVE_HEADER_FIELDS = frozenset({"kind", "mode", "adapter_id", "chunk_bytes", *BLOB_NAMES})


def build_train_save_header(mode: str, adapter_id: str | None, blobs: Sequence[Blob], chunk_bytes: int) -> bytes:
    """The first reply of ``TrainSave``: the mode, the adapter's name, and the blobs declared."""
    return build_reply(mode=mode, adapter_id=adapter_id, **blob_fields(blobs, chunk_bytes))


def parse_train_save_header(body: bytes | bytearray | memoryview) -> SaveHeader:
    """Parse the first reply of ``TrainSave``.

    Raises:
        WireError: the body is malformed, or a blob's declaration is.
    """
    msg = unpack(body)
    message_kind(msg, expected=Kind.RESULT)
    check_keys(msg, _SAVE_HEADER_FIELDS, "a TrainSave header")
    blobs, chunk_bytes = parse_blobs(msg, BLOB_NAMES)
    return SaveHeader(field(msg, "mode", str), field(msg, "adapter_id", str, required=False), blobs, chunk_bytes)


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
