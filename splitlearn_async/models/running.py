"""Running stages outside autograd: one call (:func:`run_stage`) or many as one batch (:func:`run_stage_batched`).

Both run on the stage's own device and dtype and hand their outputs back on the CPU, as
a worker thread passes them on to another thread or process.

A stage's calls never overlap: each takes the stage's lock. A stage (and its KV pool) is
normally used by one worker thread, whose calls are sequential anyway, so the lock is
never contended; it makes it safe for several pipelines, each with its own worker, to
share one bottom and top (e.g. one pipeline per LoRA adapter): their calls on a shared
stage take turns instead of corrupting its KV pool.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from splitlearn_async.errors import ConfigError

from .cache import KVCache
from .cache_group import CacheGroup
from .stage_classes import Stage

__all__ = ["run_stage", "run_stage_batched"]

_LOCKS: weakref.WeakKeyDictionary[Stage, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _lock_of(stage: Stage) -> threading.Lock:
    """The lock of ``stage``'s calls (kept beside the stage, so that stages stay copyable)."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(stage)
        if lock is None:
            lock = _LOCKS[stage] = threading.Lock()
        return lock


def run_stage(
    stage: Stage,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: KVCache | CacheGroup | None,
    **stage_kwargs: Any,
) -> torch.Tensor:
    """Run ``stage`` without autograd on its own device and dtype; the output comes back on the CPU.

    ``inputs`` are token ids (bottom) or hidden states (trunk, top), usually on the CPU as
    they arrive from another thread or process; float inputs are cast to the stage's dtype.
    ``stage_kwargs`` go to the stage's forward (``logits_to_keep`` for the top).
    """
    device = stage.device
    x = inputs.to(device, stage.dtype) if inputs.is_floating_point() else inputs.to(device)
    with _lock_of(stage), torch.no_grad():
        out: torch.Tensor = stage(
            x,
            None if attention_mask is None else attention_mask.to(device),
            None if position_ids is None else position_ids.to(device),
            cache=cache,
            **stage_kwargs,
        )
    return out.to("cpu")


def run_stage_batched(
    stage: Stage,
    calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, KVCache]],
    **stage_kwargs: Any,
) -> list[torch.Tensor]:
    """Run several cached calls of ``stage`` as one batch; each gets its own rows back.

    Every call is ``(inputs (B_i, T_i), mask, positions, cache)`` as for :func:`run_stage`,
    with its own :class:`KVCache` of ``B_i`` rows; the caches may hold different numbers
    of columns. Every layer runs once over all ``sum(B_i)`` rows, attention included (one
    call over the stage's KV pool, :class:`CacheGroup`). Calls with fewer new tokens than
    the longest are left-padded to ``max(T_i)`` for the call; the padding is computed but
    never stored, and each cache advances by its own ``T_i``. (Prefills of different
    lengths batch this way; keep decode steps apart from prefills, since a one-token step
    padded to a long prompt would pay for the prompt's length.)

    Args:
        stage: The stage to run.
        calls: At least one call; the masks may be ``(B_i, T_i)`` or ``(B_i, past + T_i)``
            (only the last ``T_i`` columns are read), or None for all valid. Positions are
            required when the calls differ in ``T_i``.

    Returns:
        One output per call, ``(B_i, T_i, ...)`` on the CPU, in order.

    Raises:
        ValueError: a cache appears twice, or positions are missing for ragged calls.

    ``stage_kwargs`` go to the stage's forward; with ``logits_to_keep=k`` (the top), each
    call gets ``(B_i, k, V)`` back.
    """
    if len(calls) == 1:
        inputs, mask, positions, cache = calls[0]
        return [run_stage(stage, inputs, mask, positions, cache, **stage_kwargs)]
    lengths = [int(c[0].shape[1]) for c in calls]
    width = max(lengths)
    ragged = min(lengths) != width
    if ragged and any(c[2] is None for c in calls):
        raise ConfigError("calls with different numbers of new tokens need their position ids.")
    group = CacheGroup([c[3] for c in calls], new_tokens=lengths if ragged else None)

    def left_pad(t: torch.Tensor, length: int, fill: float = 0) -> torch.Tensor:
        if length == width:
            return t
        pad = t.new_full((t.shape[0], width - length, *t.shape[2:]), fill)
        return torch.cat([pad, t], dim=1)

    def valid(call_mask: torch.Tensor | None, rows: int, n: int) -> torch.Tensor:
        new = torch.ones(rows, n, dtype=torch.bool) if call_mask is None else call_mask[:, -n:].to(torch.bool)
        return left_pad(new, n)  # (B_i, W), False at left padding

    def positions_of(call_positions: torch.Tensor | None, cache: KVCache, rows: int, n: int) -> torch.Tensor:
        if call_positions is None:  # the cache's next columns (only when no call is ragged)
            return torch.arange(cache.length, cache.length + n).expand(rows, n)
        return left_pad(call_positions.long().expand(rows, n), n)  # (B_i, W)

    inputs = torch.cat([left_pad(c[0], n) for c, n in zip(calls, lengths, strict=True)])  # (B, W) ids or (B, W, H)
    masks = torch.cat([valid(c[1], c[0].shape[0], n) for c, n in zip(calls, lengths, strict=True)])  # (B, W)
    positions = torch.cat([positions_of(c[2], c[3], c[0].shape[0], n) for c, n in zip(calls, lengths, strict=True)])
    out = run_stage(stage, inputs, masks, positions, group, **stage_kwargs)  # (B, W or k, ...)
    if stage_kwargs.get("logits_to_keep"):
        return [out[rows] for rows in group.slices()]
    return [out[rows, width - n :] for rows, n in zip(group.slices(), lengths, strict=True)]
