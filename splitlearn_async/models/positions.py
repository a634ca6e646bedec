"""Position ids the way transformers' ``generate`` assigns them."""

from __future__ import annotations

import torch

__all__ = ["prompt_positions"]


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, T)`` for a left-padded prompt: real tokens count from 0, padding gets 0.

    Decode steps then continue with ``last + 1``, as ``generate`` does.
    """
    mask = attention_mask.long()
    return (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)
