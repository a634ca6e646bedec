"""The wire format: msgpack message maps and tensor frames with raw little-endian bytes.

A tensor travels as ``{"dtype": "float32", "shape": [B, T, H], "data": <bytes>}``; a
message is a msgpack map with a ``"kind"`` field. See ``docs/protocol.md``.
Every malformed input raises :class:`splitlearn_async.errors.WireError` (a ``ValueError``)
with a sentence that names the field, says what was wrong and how to fix it.
"""

from __future__ import annotations

from splitlearn_async.wire._messages import (
    DEFAULT_LIMITS,
    DecodeLimits,
    Kind,
    check_keys,
    field,
    message_kind,
    pack,
    unpack,
)
from splitlearn_async.wire._tensors import WIRE_DTYPES, decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_LIMITS",
    "WIRE_DTYPES",
    "DecodeLimits",
    "Kind",
    "check_keys",
    "decode_tensor",
    "encode_tensor",
    "field",
    "message_kind",
    "pack",
    "unpack",
]
