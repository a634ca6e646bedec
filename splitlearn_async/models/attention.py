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
from typing import Any

import torch

__all__ = ["ATTENTION_NAME", "AttentionContext", "PlainContext", "CacheContext", "GroupContext", "ensure_registered"]

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
) -> tuple[torch.Tensor, None]:
    ctx = kwargs.pop("splitlearn_attention", None)
    if ctx is None:
        raise RuntimeError(
            "A splitlearn stage layer was called without its attention context; call the stage "
            "(bottom/trunk/top) rather than its layers directly."
        )
    return ctx.attend(module, query, key, value, **kwargs)


class AttentionContext:
    """Per-forward state shared by all layers of one stage call.

    Subclasses decide where keys and values come from (:meth:`keys_values`) and which
    columns are valid; this class builds masks (one per window size, memoised) and calls
    the transformers kernel.
    """

    def __init__(self, base: str, q_start: int, q_len: int, valid: torch.Tensor | None) -> None:
        # valid: (B, L) bool over all kv columns this call attends to, or None for "all valid"
        self.base = base
        self.q_start = q_start
        self.q_len = q_len
        self.valid = valid
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
    ) -> tuple[torch.Tensor, None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        keys, values = self.keys_values(module, key, value)  # (B, Hkv, L, D)
        window = sliding_window or None
        if window not in self._masks:
            self._masks[window] = self._build_mask(keys.shape[2], window, query.dtype, query.device)
        mask = self._masks[window]
        if self.base == "eager":  # each modeling file has its own eager kernel, as HF layers use
            kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[self.base]
        return kernel(module, query, keys, values, mask, **kwargs)

    def _build_mask(
        self, kv_len: int, window: int | None, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        valid = self.valid
        all_valid = valid is None or bool(valid.all())
        if self.base == "sdpa" and all_valid and (self.q_len == 1 or self.q_len == kv_len):
            if window is None or kv_len < window:
                return None  # sdpa's is_causal (or no mask for one query) is exact here
        q_cols = torch.arange(self.q_start, self.q_start + self.q_len, device=device)  # (T,)
        kv_cols = torch.arange(kv_len, device=device)  # (L,)
        mask = kv_cols[None, :] <= q_cols[:, None]  # (T, L) causal over cache columns
        if window is not None:
            mask = mask & (kv_cols[None, :] > q_cols[:, None] - window)
        mask = mask[None, None]  # (1, 1, T, L)
        if valid is not None:
            mask = mask & valid[:, None, None, :kv_len]  # (B, 1, T, L)
        if self.base == "eager":
            zero = torch.zeros((), dtype=dtype, device=device)
            return torch.where(mask, zero, torch.finfo(dtype).min)
        return mask


class PlainContext(AttentionContext):
    """No cache: the call attends over its own tokens (full forward, training)."""

    def __init__(self, base: str, q_len: int, valid: torch.Tensor | None) -> None:
        super().__init__(base, 0, q_len, valid)

    def keys_values(self, module, key, value):
        return key, value


class CacheContext(AttentionContext):
    """Writes the call's keys/values into a :class:`~splitlearn_async.models.cache.KVCache`."""

    def __init__(self, base: str, cache: Any, q_len: int) -> None:
        start = cache.length
        super().__init__(base, start, q_len, cache.valid[:, : start + q_len])
        self.cache = cache

    def keys_values(self, module, key, value):
        return self.cache.write(module.layer_idx, self.q_start, key, value)


class GroupContext:
    """Attention for a :class:`~splitlearn_async.models.cache.CacheGroup`: one batch, many caches.

    The layer computes queries, keys and values for all rows of the batch at once; this
    context cuts them by cache, lets each cache's :class:`CacheContext` write its keys and
    values and attend over its own columns with its own mask, and joins the outputs. So the
    rows of one cache give the very same attention result as when that cache runs alone.
    """

    def __init__(self, base: str, group: Any, q_len: int) -> None:
        self.slices = group.slices()
        self.contexts = [CacheContext(base, cache, q_len) for cache in group.caches]

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, H, T, D), all rows of the group
        key: torch.Tensor,  # (B, Hkv, T, D)
        value: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        outputs = [
            ctx.attend(module, query[rows], key[rows], value[rows], **kwargs)[0]  # (B_i, T, H, D)
            for ctx, rows in zip(self.contexts, self.slices)
        ]
        return torch.cat(outputs, dim=0), None  # (B, T, H, D)
