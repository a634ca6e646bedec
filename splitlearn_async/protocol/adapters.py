"""Adapter messages of the trunk service: ``LoadAdapter`` and ``DeleteAdapter``.

Methods (see ``docs/protocol.md``)::

    LoadAdapter    load, chunk...  -> result {adapter_id, trainable_parameters}
    DeleteAdapter  delete          -> result {adapter_id, closed: true}

``LoadAdapter`` is client-streaming: the ``load`` message declares the adapter file
(``weights``: size and SHA-256) and ``chunk`` messages carry its bytes (:mod:`.checkpoints`).
"""

from __future__ import annotations

from splitlearn_async.errors import WireError
from splitlearn_async.wire import Kind, check_keys, message_kind, pack

from .checkpoints import Blob, blob_fields, parse_blobs
from .inference import SERVICE_NAME, Body, as_message, parse_adapter_id
from .replies import build_reply

__all__ = [
    "METHOD_DELETE_ADAPTER",
    "METHOD_LOAD_ADAPTER",
    "build_adapter_result",
    "build_delete_adapter",
    "build_load_adapter",
    "parse_delete_adapter",
    "parse_load_adapter",
]

METHOD_LOAD_ADAPTER = f"/{SERVICE_NAME}/LoadAdapter"
METHOD_DELETE_ADAPTER = f"/{SERVICE_NAME}/DeleteAdapter"


def build_load_adapter(adapter_id: str, weights: Blob, chunk_bytes: int) -> bytes:
    """The first message of ``LoadAdapter``: load the adapter file declared by ``weights`` under ``adapter_id``.

    Its ``chunk_bodies`` follow (``describe_blobs({"weights": data})`` gives ``weights``).
    """
    return pack({"kind": Kind.LOAD.value, "adapter_id": adapter_id, **blob_fields([weights], chunk_bytes)})


def parse_load_adapter(
    body: Body, *, max_bytes: int | None = None, max_message_bytes: int | None = None
) -> tuple[str, Blob, int]:
    """Parse the first message of ``LoadAdapter``: ``(adapter_id, weights declared, chunk_bytes)``.

    Raises:
        WireError: the body is malformed, a field is missing, or the declaration is malformed
            or its chunks would not fit ``max_message_bytes``.
    """
    msg = as_message(body, max_bytes)
    message_kind(msg, expected=Kind.LOAD)
    check_keys(msg, frozenset({"kind", "adapter_id", "weights", "chunk_bytes"}), "a LoadAdapter message")
    adapter_id = parse_adapter_id(msg, required=True)
    if msg.get("weights") is None:
        raise WireError("message field 'weights' is missing; declare the adapter file ({'bytes', 'sha256'}).")
    blobs, chunk_bytes = parse_blobs(msg, ("weights",), max_message_bytes=max_message_bytes)
    return adapter_id, blobs[0], chunk_bytes  # type: ignore[return-value]


def build_delete_adapter(adapter_id: str) -> bytes:
    """The body of ``DeleteAdapter``."""
    return pack({"kind": Kind.DELETE.value, "adapter_id": adapter_id})


def parse_delete_adapter(body: Body, *, max_bytes: int | None = None) -> str:
    """Parse ``DeleteAdapter``: the adapter id.

    Raises:
        WireError: the body is malformed or lacks ``adapter_id``.
    """
    msg = as_message(body, max_bytes)
    message_kind(msg, expected=Kind.DELETE)
    check_keys(msg, frozenset({"kind", "adapter_id"}), "a DeleteAdapter message")
    return parse_adapter_id(msg, required=True)  # type: ignore[return-value]


def build_adapter_result(adapter_id: str, *, trainable_parameters: int | None = None, closed: bool = False) -> bytes:
    """The reply to ``LoadAdapter`` (with the adapter's element count) or ``DeleteAdapter`` (``closed``)."""
    return build_reply(
        adapter_id=adapter_id, trainable_parameters=trainable_parameters, closed=True if closed else None
    )
