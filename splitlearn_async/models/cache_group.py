"""Several KV caches of one pool run as one batch: :class:`CacheGroup` (continuous batching)."""

from __future__ import annotations

import itertools

import torch

from splitlearn_async.errors import ConfigError

from .cache import KVCache

__all__ = ["CacheGroup"]


class CacheGroup:
    """Several :class:`KVCache` objects of one pool run as one batch (continuous batching).

    The batch's rows are the caches' rows one after the other: rows
    ``offsets[i]:offsets[i + 1]`` belong to ``caches[i]``. Every layer of a stage sees all
    rows at once, attention included: keys and values are gathered from the pool by the
    caches' slot tables, so caches of different lengths need no copies of their own.
    By default every cache advances by the call's number of new tokens ``T``; with
    ``new_tokens``, cache ``i`` advances by ``new_tokens[i] <= T`` and its rows hold that
    many real tokens at the end of the call's ``T`` columns, left-padded (prefills of
    different lengths in one batch).

    Args:
        caches: The caches, in batch-row order; each one at most once, all of one pool.
        new_tokens: New tokens of each cache (None: all ``T``).

    Raises:
        ValueError: no caches, a cache appears twice, or the caches belong to different pools.
    """

    def __init__(self, caches: list[KVCache], new_tokens: list[int] | None = None) -> None:
        if not caches:
            raise ConfigError("a CacheGroup needs at least one cache.")
        if len({id(c) for c in caches}) != len(caches):
            raise ConfigError("a cache appears twice in one CacheGroup; a session can take part in a batch once.")
        if len({id(c.pool) for c in caches}) != 1:
            raise ConfigError(
                "the caches of one CacheGroup must share a KVPool; make them with the same stage's new_cache()."
            )
        if new_tokens is not None and len(new_tokens) != len(caches):
            raise ConfigError(f"new_tokens has {len(new_tokens)} entries for {len(caches)} caches.")
        self.caches = list(caches)
        self.new_tokens = new_tokens
        self.pool = caches[0].pool
        self.offsets = [0]
        for cache in self.caches:
            self.offsets.append(self.offsets[-1] + cache.batch_size)
        self.batch_size = self.offsets[-1]

    def slices(self) -> list[slice]:
        """The batch rows of each cache."""
        return [slice(a, b) for a, b in itertools.pairwise(self.offsets)]

    def lengths(self) -> torch.Tensor:
        """Columns each row held before this call: ``(batch_size,)``."""
        return torch.cat([torch.full((c.batch_size,), c.length, dtype=torch.long) for c in self.caches])

    def pads(self, width: int) -> torch.Tensor:
        """Left padding of each row in a call of ``width`` new columns: ``(batch_size,)``."""
        if self.new_tokens is None:
            return torch.zeros(self.batch_size, dtype=torch.long)
        return torch.cat(
            [
                torch.full((c.batch_size,), width - t, dtype=torch.long)
                for c, t in zip(self.caches, self.new_tokens, strict=True)
            ]
        )

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """Default position ids ``(batch_size, length)``: each cache's columns so far + arange."""
        return (self.lengths()[:, None] + torch.arange(length)[None]).to(device)

    def begin(self, new_valid: torch.Tensor) -> torch.Tensor:
        """:meth:`KVCache.begin` of every cache with its rows of ``new_valid`` ``(batch_size, T)``.

        Returns the new columns' slots ``(batch_size, T)``, -1 where a row is left-padded
        (see ``new_tokens``). If one cache refuses, those already begun are aborted and the
        error is raised.
        """
        if new_valid.shape[0] != self.batch_size:
            raise ConfigError(f"this cache group holds {self.batch_size} rows but the call has {new_valid.shape[0]}.")
        width = new_valid.shape[1]
        counts = self.new_tokens or [width] * len(self.caches)
        slots = []
        try:
            for cache, rows, count in zip(self.caches, self.slices(), counts, strict=True):
                new = cache.begin(new_valid[rows, width - count :])
                if count < width:
                    new = torch.cat([torch.full((new.shape[0], width - count), -1, dtype=torch.long), new], dim=1)
                slots.append(new)
        except BaseException:
            self.abort()
            raise
        return torch.cat(slots)

    def commit(self) -> None:
        """:meth:`KVCache.commit` of every cache."""
        for cache in self.caches:
            cache.commit()

    def abort(self) -> None:
        """:meth:`KVCache.abort` of every cache."""
        for cache in self.caches:
            cache.abort()
