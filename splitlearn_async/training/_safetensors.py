"""Tensors as safetensors bytes with string metadata, both ways: the checkpoint format on the wire."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

__all__ = ["from_safetensors", "to_safetensors"]


def to_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise CPU tensors to safetensors bytes with string ``metadata``."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata=dict(metadata or {}))


def from_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into ``(tensors, metadata)``.

    Raises:
        CheckpointError: the bytes are not a valid safetensors file.
    """
    from safetensors.torch import load

    try:
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8 : 8 + header_len]))
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"the data is not a valid safetensors file ({type(exc).__name__}: {exc}).") from exc
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}
