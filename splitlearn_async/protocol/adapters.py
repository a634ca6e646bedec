"""Adapter messages of the trunk service: ``LoadAdapter`` and ``DeleteAdapter``.

Methods (unary; see ``docs/protocol.md``)::

    LoadAdapter    load     -> result {adapter_id, trainable_parameters}
    DeleteAdapter  delete   -> result {adapter_id, closed: true}
"""

from __future__ import annotations

from splitlearn_async.errors import WireError
from splitlearn_async.wire import Kind, check_keys, message_kind, pack

from .inference import SERVICE_NAME, Body, as_message, parse_adapter_id
from .replies import build_reply
from .training import blob_field

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


def build_load_adapter(adapter_id: str, weights: bytes) -> bytes:
    """The body of ``LoadAdapter``: an adapter's safetensors bytes to load under ``adapter_id``."""
    return pack({"kind": Kind.LOAD.value, "adapter_id": adapter_id, "weights": weights})


def parse_load_adapter(body: Body, *, max_bytes: int | None = None) -> tuple[str, bytes]:
    """Parse ``LoadAdapter``: ``(adapter_id, weights)``.

    Raises:
        WireError: the body is malformed or a field is missing.
    """
    msg = as_message(body, max_bytes)
    message_kind(msg, expected=Kind.LOAD)
    check_keys(msg, frozenset({"kind", "adapter_id", "weights"}), "a LoadAdapter message")
    adapter_id = parse_adapter_id(msg, required=True)
    weights = blob_field(msg, "weights")
    if not weights:
        raise WireError("message field 'weights' is missing; send the adapter's safetensors bytes.")
    return adapter_id, weights  # type: ignore[return-value]


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
