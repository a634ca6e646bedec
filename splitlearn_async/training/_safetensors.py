"""Tensors as safetensors bytes with string metadata, both ways: the checkpoint format on the wire."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

__all__ = ["from_safetensors", "safetensors_metadata", "to_safetensors"]


def to_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise CPU tensors to safetensors bytes with string ``metadata``."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata=dict(metadata or {}))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes, read from the header alone (no tensor is built).

    Raises:
        CheckpointError: the bytes do not start with a valid safetensors header.
    """
    try:
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        if header_len > len(data) - 8:
            raise ValueError(f"the header claims {header_len} bytes but the file has {len(data) - 8} after it")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
    except (struct.error, ValueError) as exc:
        raise CheckpointError(f"the data is not a valid safetensors file ({type(exc).__name__}: {exc}).") from exc
    return {str(k): str(v) for k, v in metadata.items()}


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
