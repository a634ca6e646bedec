"""How stages feed Hugging Face decoder layers their keys, values and masks.

Stages reuse each family's decoder layers unchanged. Every HF attention module ends in
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, **kwargs)``.
A stage's layers are copies whose config names the implementation ``"splitlearn"``,
registered here; the stage passes an :class:`AttentionContext` through the layers'
``**kwargs``, and the context writes new keys/values to the stage's cache, builds the mask
and calls the real kernel (``sdpa`` or ``eager``) from transformers itself. The original
model's modules are not touched and keep their own implementation.

The masks follow transformers' own rules (``masking_utils``): causal over cache columns,
the 2D padding mask, the sliding window ``kv > q - window``, and the same "no mask
needed" shortcut for sdpa, so split outputs match the unsplit model.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

import torch

from splitlearn_async.errors import StateError

if TYPE_CHECKING:
    from .cache_group import CacheGroup

__all__ = ["ATTENTION_NAME", "AttentionContext", "CacheContext", "PlainContext", "ensure_registered"]

# What a transformers attention kernel returns: the output ``(B, T, H, D)`` and, from
# eager kernels, the attention weights (sdpa returns None).
AttentionOutput = tuple[torch.Tensor, torch.Tensor | None]

ATTENTION_NAME = "splitlearn"
SUPPORTED_BASES = ("sdpa", "eager")
_registered = False
_lock = threading.Lock()


def ensure_registered() -> None:
    """Register the ``"splitlearn"`` attention implementation with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTENTION_NAME, _splitlearn_attention)
            _registered = True


def _splitlearn_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> AttentionOutput:
    ctx: AttentionContext | None = kwargs.pop("splitlearn_attention", None)
    if ctx is None:
        raise StateError(
            "A splitlearn stage layer was called without its attention context; call the stage "
            "(bottom/trunk/top) rather than its layers directly."
        )
    return ctx.attend(module, query, key, value, **kwargs)


class AttentionContext:
    """Per-forward state shared by all layers of one stage call.

    Subclasses decide where keys and values come from (:meth:`keys_values`); this class
    builds masks (one per window size, memoised) and calls the transformers kernel.

    Args:
        base: ``"sdpa"`` or ``"eager"``.
        q_start: Cache column of each row's first query: an int for all rows, or ``(B,)``.
        q_len: Queries per row ``T``.
        valid: ``(B, L)`` bool over all kv columns the call attends to, or None for "all valid".
        uniform: True when every row has the same columns (no row is padded at the end).
    """

    def __init__(
        self, base: str, q_start: int | torch.Tensor, q_len: int, valid: torch.Tensor | None, uniform: bool = True
    ) -> None:
        self.base = base
        self.q_start = q_start
        self.q_len = q_len
        self.valid = valid
        self.uniform = uniform
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def keys_values(
        self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, H, T, D)
        key: torch.Tensor,  # (B, Hkv, T, D), the new tokens only
        value: torch.Tensor,
        sliding_window: int | None = None,
        **kwargs: Any,
    ) -> AttentionOutput:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        keys, values = self.keys_values(module, key, value)  # (B, Hkv, L, D)
        window = sliding_window or None
        if window not in self._masks:
            self._masks[window] = self._build_mask(keys.shape[2], window, query.dtype, query.device)
        mask = self._masks[window]
        if self.base == "eager":  # each modeling file has its own eager kernel, as HF layers use
            kernel = sys.modules[type(module).__module__].eager_attention_forward
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[self.base]
        output: AttentionOutput = kernel(module, query, keys, values, mask, **kwargs)
        return output

    def _build_mask(
        self, kv_len: int, window: int | None, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        valid = self.valid
        all_valid = valid is None or bool(valid.all())
        if (
            self.base == "sdpa"
            and all_valid
            and self.uniform
            and (self.q_len == 1 or self.q_len == kv_len)
            and (window is None or kv_len < window)
        ):
            return None  # sdpa's is_causal (or no mask for one query) is exact here
        q_start = self.q_start
        if isinstance(q_start, torch.Tensor):
            q_start = q_start.to(device)[:, None]  # (B, 1)
        q_cols = q_start + torch.arange(self.q_len, device=device)[None, :]  # (B or 1, T)
        kv_cols = torch.arange(kv_len, device=device)  # (L,)
        mask = kv_cols[None, None, :] <= q_cols[:, :, None]  # (B or 1, T, L) causal over cache columns
        if window is not None:
            mask = mask & (kv_cols[None, None, :] > q_cols[:, :, None] - window)
        mask = mask[:, None]  # (B or 1, 1, T, L)
        if valid is not None:
            mask = mask & valid[:, None, None, :kv_len].to(device)  # (B, 1, T, L)
        if self.base == "eager":
            zero = torch.zeros((), dtype=dtype, device=device)
            return torch.where(mask, zero, torch.finfo(dtype).min)
        return mask


class PlainContext(AttentionContext):
    """No cache: the call attends over its own tokens (full forward, training)."""

    def __init__(self, base: str, q_len: int, valid: torch.Tensor | None) -> None:
        super().__init__(base, 0, q_len, valid)

    def keys_values(
        self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return key, value


class CacheContext(AttentionContext):
    """Attention of all rows of a :class:`~splitlearn_async.models.cache.CacheGroup`, one call per layer.

    Built once per stage call (after ``group.begin``): the slots of the new columns, and
    for every row the slots of all its columns, padded to the longest row with the pool's
    padding slot. Each layer then writes the new keys/values of all rows with one
    ``index_copy_``, gathers all rows' keys/values with one ``index_select`` into a
    ``(B, Hkv, Lmax, D)`` view, and makes one kernel call under a mask that is causal over
    each row's own columns, hides padding and columns past the row's end, and applies the
    sliding window. A call on empty caches (a prefill) attends over its own keys, as the
    unsplit model does.
    """

    def __init__(self, base: str, group: CacheGroup, q_len: int, new_slots: torch.Tensor) -> None:
        lengths = group.lengths()  # (B,) columns before this call
        pads = group.pads(q_len)  # (B,) left padding of rows with fewer new tokens
        q_start = lengths - pads  # (B,) cache column of each row's first query (pads: before it)
        uniform = bool((q_start == q_start[0]).all()) and not bool(pads.any())
        self.fresh = uniform and bool(lengths[0] == 0)
        ends = q_start + q_len  # (B,) columns each row holds after this call
        kv_len = int(ends.max())
        gather = torch.zeros(group.batch_size, kv_len, dtype=torch.long)  # slot 0: the padding slot
        valid = torch.zeros(group.batch_size, kv_len, dtype=torch.bool, device=group.pool.device)
        starts = [s.start for s in group.slices()]
        for cache, rows, end in zip(group.caches, group.slices(), ends[starts].tolist(), strict=True):
            gather[rows, :end] = cache.slots[:, :end]
            valid[rows, :end] = cache.valid[:, :end]
        super().__init__(base, q_start if not uniform else int(q_start[0]), q_len, valid, uniform)
        device = group.pool.device
        self.pool = group.pool
        self.kv_len = kv_len
        flat = new_slots.reshape(-1)  # (B * T,), -1 at left padding
        real = flat >= 0
        self.write_rows = None if bool(real.all()) else real.nonzero().squeeze(1).to(device)
        self.write_slots = flat[real].to(device)
        self.gather_slots = gather.reshape(-1).to(device)  # (B * Lmax,)

    def keys_values(
        self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t, d = key.shape
        # an int attribute of every HF attention module; nn.Module.__getattr__ is typed for tensors and submodules
        layer: int = module.layer_idx  # type: ignore[assignment]
        k_store, v_store = self.pool.storage(layer, key)  # (capacity, Hkv, D)
        k_new = key.transpose(1, 2).reshape(b * t, h, d)
        v_new = value.transpose(1, 2).reshape(b * t, h, d)
        if self.write_rows is not None:  # left padding is not stored
            k_new, v_new = k_new.index_select(0, self.write_rows), v_new.index_select(0, self.write_rows)
        k_store.index_copy_(0, self.write_slots, k_new)
        v_store.index_copy_(0, self.write_slots, v_new)
        if self.fresh:
            return key, value
        keys = k_store.index_select(0, self.gather_slots).view(b, self.kv_len, h, d).transpose(1, 2)
        values = v_store.index_select(0, self.gather_slots).view(b, self.kv_len, h, d).transpose(1, 2)
        return keys, values  # (B, Hkv, Lmax, D)
