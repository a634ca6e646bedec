"""The KV cache of one stage for one batch of sequences, and groups of caches run as one batch."""

from __future__ import annotations

import torch

__all__ = ["KVCache", "CacheGroup"]


class KVCache:
    """Keys and values of a stage's layers for ``batch_size`` rows that advance together.

    Columns are cache positions, shared by all rows: a left-padded prompt of length ``T``
    fills columns ``0..T-1`` of every row, and each decode step adds one column. A column
    is *valid* where the row holds a real token (padding is stored but masked). Tensors
    are allocated on first write with the layer's own head count, dtype and device, and
    grow by doubling, so a decode step appends in place.

    Attributes:
        length: Columns written so far.
        valid: ``(batch_size, capacity)`` bool; only ``[:, :length]`` is meaningful.
    """

    def __init__(self, batch_size: int, device: torch.device | str = "cpu", capacity: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.length = 0
        self.valid = torch.zeros(batch_size, max(1, capacity), dtype=torch.bool, device=self.device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def nbytes(self) -> int:
        """Bytes held by keys, values and the validity mask."""
        tensors = [*self.keys.values(), *self.values.values(), self.valid]
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin(self, new_valid: torch.Tensor) -> None:
        """Reserve columns for ``new_valid.shape[1]`` tokens and record which are real.

        ``new_valid`` is ``(batch_size, T)`` bool. Nothing becomes visible to later calls
        until :meth:`commit`, so a failed forward leaves the cache as it was.
        """
        if new_valid.shape[0] != self.batch_size:
            raise ValueError(
                f"this cache holds {self.batch_size} rows but the call has {new_valid.shape[0]}; "
                "use one cache per batch of sequences."
            )
        end = self.length + new_valid.shape[1]
        if end > self.capacity:
            self._grow_valid(end)
        self.valid[:, self.length : end] = new_valid

    def write(
        self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``(B, Hkv, T, D)`` at columns ``start..start+T`` of ``layer``.

        Returns views of all columns ``0..start+T`` of that layer: ``(B, Hkv, start+T, D)``.
        """
        end = start + key.shape[2]
        k_buf = self.keys.get(layer)
        if k_buf is None or end > k_buf.shape[2] or k_buf.dtype != key.dtype:
            k_buf = self._grow(self.keys, layer, key, end)
            self._grow(self.values, layer, value, end)
        v_buf = self.values[layer]
        k_buf[:, :, start:end] = key
        v_buf[:, :, start:end] = value
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def commit(self, new_valid: torch.Tensor) -> None:
        """Make the columns reserved by :meth:`begin` part of the cache."""
        self.length += new_valid.shape[1]

    def _grow_valid(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        grown = torch.zeros(self.batch_size, new_cap, dtype=torch.bool, device=self.device)
        grown[:, : self.length] = self.valid[:, : self.length]
        self.valid = grown

    def _grow(
        self, store: dict[int, torch.Tensor], layer: int, like: torch.Tensor, needed: int
    ) -> torch.Tensor:
        old = store.get(layer)
        cap = max(needed, self.capacity, 2 * old.shape[2] if old is not None else 0)
        b, h, _, d = like.shape
        buf = torch.empty(b, h, cap, d, dtype=like.dtype, device=like.device)
        if old is not None:
            buf[:, :, : self.length] = old[:, :, : self.length]
        store[layer] = buf
        return buf


class CacheGroup:
    """Several :class:`KVCache` objects run as one batch (selective batching across sessions).

    The batch's rows are the caches' rows one after the other: rows
    ``offsets[i]:offsets[i + 1]`` belong to ``caches[i]``. The linear layers, norms and MLPs
    of a stage see all rows at once; attention is done per cache, each over its own columns
    (see ``attention.GroupContext``), so caches of different lengths need no padding and
    no copies. Every cache advances by the same number of new tokens ``T``.

    Args:
        caches: The caches, in batch-row order; each one at most once.

    Raises:
        ValueError: no caches, or a cache appears twice.
    """

    def __init__(self, caches: list[KVCache]) -> None:
        if not caches:
            raise ValueError("a CacheGroup needs at least one cache.")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one CacheGroup; a session can take part in a batch once.")
        self.caches = list(caches)
        self.offsets = [0]
        for cache in self.caches:
            self.offsets.append(self.offsets[-1] + cache.batch_size)
        self.batch_size = self.offsets[-1]

    def slices(self) -> list[slice]:
        """The batch rows of each cache."""
        return [slice(a, b) for a, b in zip(self.offsets, self.offsets[1:])]

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """Default position ids ``(batch_size, length)``: each cache's columns so far + arange."""
        return torch.cat([
            torch.arange(c.length, c.length + length, device=device).expand(c.batch_size, length)
            for c in self.caches
        ])

    def begin(self, new_valid: torch.Tensor) -> None:
        """:meth:`KVCache.begin` of every cache with its rows of ``new_valid`` ``(batch_size, T)``."""
        if new_valid.shape[0] != self.batch_size:
            raise ValueError(
                f"this cache group holds {self.batch_size} rows but the call has {new_valid.shape[0]}."
            )
        for cache, rows in zip(self.caches, self.slices()):
            cache.begin(new_valid[rows])

    def commit(self, new_valid: torch.Tensor) -> None:
        """:meth:`KVCache.commit` of every cache."""
        for cache, rows in zip(self.caches, self.slices()):
            cache.commit(new_valid[rows])
