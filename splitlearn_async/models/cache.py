"""KV caches of a stage: one token pool per stage, a slot table per cache, groups run as one batch.

Memory follows the tokens really held. A :class:`KVPool` stores the keys and values of
every cache of one stage, token by token: per layer one tensor ``(capacity, Hkv, D)``
whose rows are *slots* (a page size of one token, as SGLang's token pool). A
:class:`KVCache` owns a slot table ``(batch_size, columns)``: column ``c`` of row ``r`` lives
in slot ``slots[r, c]``. Slots are taken as tokens arrive and go back to the pool when the
cache is released (or dropped), so 2048 sessions of one token hold 2048 slots, as one
session of 2048 tokens does.

Beam search reorders a cache's rows after each step (:meth:`KVCache.reorder`): row ``i``
continues the row ``beam_idx[i]``. That is a gather of the slot table; a row chosen twice
needs a second copy of its keys and values, which goes into the slots of a row that no
beam continues (there is one such row per extra copy), so the pool neither grows nor
frees and every slot still belongs to one row.

Several caches run as one batch through :class:`~.cache_group.CacheGroup`. Attention
over a ragged batch is one call per layer (see ``attention.CacheContext``): the
new keys and values of all rows are written with one ``index_copy_``, and the keys and
values of all rows are gathered with one ``index_select`` into a ``(N, Hkv, Lmax, D)``
view, padded with the pool's *padding slot* (slot 0, all zeros, never written or handed
out) and masked.

Threads: the stage's worker thread writes and reads slots. :meth:`KVCache.release` (and a
dropped cache) may come from any thread; its slots return to the free list only at the
next :meth:`KVPool.reclaim`, which a stage calls at the start of each call, on its worker
thread, so a step in flight never sees its slots handed to another cache.
"""

from __future__ import annotations

import threading
import weakref

import torch

from splitlearn_async.errors import ConfigError, StateError

__all__ = ["CacheReleased", "KVCache", "KVPool"]

_PAD_SLOT = 0


class CacheReleased(ValueError):
    """A released KV cache was passed to a stage; it holds no slots any more."""


class KVPool:
    """Token slots for the keys and values of every cache of one stage.

    Storage per layer is allocated on its first write, with that layer's head count,
    head size and dtype, and grows by doubling (all layers together, since a slot means
    the same token in every layer). When the last slot is released, storage grown past
    ``initial_slots`` is freed.

    Args:
        device: Where the tensors live.
        initial_slots: Slots of the first allocation (the padding slot included).
    """

    def __init__(self, device: torch.device | str = "cpu", initial_slots: int = 256) -> None:
        if initial_slots < 2:
            raise ConfigError(f"initial_slots must be >= 2 (one is the padding slot), got {initial_slots}.")
        self.device = torch.device(device)
        self.initial_slots = initial_slots
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (capacity, Hkv, D)
        self.values: dict[int, torch.Tensor] = {}
        # reentrant: a cache's finalizer (which releases) may run inside allocate() when the
        # garbage collector collects a cycle holding a cache on this very thread
        self._lock = threading.RLock()
        self._capacity = 0
        self._free: list[int] = []
        self._released: list[torch.Tensor] = []  # slot lists waiting to return to _free
        self._bytes_per_slot = 0  # kept up to date by storage(): read for every cache on every step

    @property
    def capacity(self) -> int:
        """Slots the storage has room for (the padding slot included)."""
        return self._capacity

    @property
    def slots_used(self) -> int:
        """Slots held by caches (released ones that are not yet back in the free list included)."""
        with self._lock:
            return max(0, self._capacity - 1 - len(self._free))

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one token takes over all layers' keys and values (0 before the first write)."""
        return self._bytes_per_slot

    def nbytes(self) -> int:
        """Bytes of the storage, spare capacity included."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def allocate(self, count: int) -> torch.Tensor:
        """Take ``count`` free slots (growing the storage if needed); returns their ids ``(count,)``."""
        with self._lock:
            if len(self._free) < count:
                self._grow(count)
            taken = self._free[len(self._free) - count :]
            del self._free[len(self._free) - count :]
        return torch.tensor(taken, dtype=torch.long)

    def release(self, slots: torch.Tensor) -> None:
        """Give slots back; they become free at the next :meth:`reclaim` (any thread may call this)."""
        if slots.numel():
            with self._lock:
                self._released.append(slots)

    def storage(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(capacity, Hkv, D)`` of ``layer``, made like ``like`` ``(B, Hkv, T, D)`` if new."""
        k = self.keys.get(layer)
        if k is None or k.dtype != like.dtype:
            shape = (self._capacity, like.shape[1], like.shape[3])
            k = self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._bytes_per_slot = sum(
                t[0].numel() * t.element_size() for t in (*self.keys.values(), *self.values.values())
            )
        return k, self.values[layer]

    def copy_slots(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """(worker) Copy the keys and values of every layer from slots ``source`` to slots ``target`` (both ``(n,)``).

        The two sets must not overlap; the targets' old contents are overwritten.
        """
        with self._lock:  # against a concurrent _grow replacing the storage
            src, dst = source.to(self.device), target.to(self.device)
            for store in (self.keys, self.values):
                for t in store.values():
                    t.index_copy_(0, dst, t.index_select(0, src))

    def reclaim(self) -> None:
        """Return released slots to the free list; free the storage once nothing is held.

        Call it only where no stage call of this pool is running (a stage does, at the start
        of each call): a step in flight may still write slots that were just released.
        """
        with self._lock:
            self._reclaim()

    def _reclaim(self) -> None:
        if self._released:
            released, self._released = self._released, []  # a finalizer may append meanwhile
            for slots in released:
                self._free.extend(slots.tolist())
            if len(self._free) == self._capacity - 1 and self._capacity > self.initial_slots:
                self.keys.clear()
                self.values.clear()
                self._bytes_per_slot = 0
                self._capacity = 0
                self._free.clear()

    def _grow(self, count: int) -> None:
        """(locked) Make room for ``count`` more free slots."""
        old = self._capacity
        new = max(self.initial_slots, 2 * old, old + count - len(self._free) + (0 if old else 1))
        for store in (self.keys, self.values):
            for layer, t in store.items():
                grown = torch.zeros((new, *t.shape[1:]), dtype=t.dtype, device=t.device)
                grown[:old] = t
                store[layer] = grown
        first = max(old, _PAD_SLOT + 1)
        self._free[:0] = range(new - 1, first - 1, -1)  # taken from the end: low ids first
        self._capacity = new


class KVCache:
    """Keys and values of a stage's layers for ``batch_size`` rows that advance together.

    Columns are cache positions, shared by all rows: a left-padded prompt of length ``T``
    fills columns ``0..T-1`` of every row, and each decode step adds one column. A column
    is *valid* where the row holds a real token (padding is stored but masked). Each
    column of each row holds one slot of the stage's :class:`KVPool`.

    Args:
        batch_size: Rows.
        pool: The stage's pool (``Stage.new_cache`` passes it); None makes a private one,
            whose cache then cannot be grouped with others.
        device: Device of a private pool.

    Attributes:
        length: Columns written so far.
        valid: ``(batch_size, >= length)`` bool; only ``[:, :length]`` is meaningful.
    """

    def __init__(self, batch_size: int, pool: KVPool | None = None, device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.pool = pool if pool is not None else KVPool(device)
        self.device = self.pool.device
        self.length = 0
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self._held = _Held(torch.zeros(batch_size, 0, dtype=torch.long))
        self._pending = 0  # columns reserved by begin() and not yet committed
        self._released = False
        # a cache dropped without release() still gives its slots back
        self._finalizer = weakref.finalize(self, _give_back, self.pool, self._held)

    @property
    def slots(self) -> torch.Tensor:
        """``(batch_size, >= length)`` slot ids; only ``[:, :length]`` is meaningful."""
        return self._held.slots

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    def nbytes(self) -> int:
        """Bytes this cache holds: its slots in the pool, its slot table and validity mask."""
        held = self.batch_size * self.length
        tables = self.slots[:, : self.length].numel() * 8 + self.valid[:, : self.length].numel()
        return held * self.pool.bytes_per_slot + tables

    def begin(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Take slots for ``new_valid.shape[1]`` new columns and record which are real.

        ``new_valid`` is ``(batch_size, T)`` bool. Returns the new columns' slots
        ``(batch_size, T)``. Nothing becomes visible to later calls until :meth:`commit`;
        :meth:`abort` gives the slots back, so a failed forward leaves the cache as it was.

        Raises:
            CacheReleased: the cache was released.
            ValueError: ``new_valid`` has another number of rows.
        """
        if self._released:
            raise CacheReleased("this KV cache was released (its session was closed); open a new session.")
        if new_valid.shape[0] != self.batch_size:
            raise ConfigError(
                f"this cache holds {self.batch_size} rows but the call has {new_valid.shape[0]}; "
                "use one cache per batch of sequences."
            )
        count = new_valid.shape[1]
        end = self.length + count
        if end > self.slots.shape[1]:
            self._grow_tables(end)
        new_slots = self.pool.allocate(self.batch_size * count).view(self.batch_size, count)
        self.slots[:, self.length : end] = new_slots
        self.valid[:, self.length : end] = new_valid.to(self.device)
        self._pending = count
        self._held.count = end
        return new_slots

    def commit(self) -> None:
        """Make the columns reserved by :meth:`begin` part of the cache."""
        self.length += self._pending
        self._pending = 0

    def abort(self) -> None:
        """Give back the slots reserved by :meth:`begin` (the forward failed)."""
        if self._pending:
            self.pool.release(self.slots[:, self.length : self.length + self._pending].reshape(-1).clone())
            self._pending = 0
            self._held.count = self.length

    def release(self) -> None:
        """Give every slot back to the pool; the cache is unusable afterwards. A second call does nothing."""
        if not self._released:
            self._released = True
            self._finalizer()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """(worker) Make row ``i`` hold what row ``beam_idx[i]`` held: beam search's cache reorder.

        ``beam_idx`` ``(batch_size,)``: each row's parent, in ``[0, batch_size)``, repeated
        or left out as beams continue or end. The first row of a parent takes its slots,
        the others copies in the slots of left-out rows: nothing is allocated or freed.

        Raises:
            CacheReleased: the cache was released.
            StateError: columns reserved by :meth:`begin` are not yet committed.
            ConfigError: ``beam_idx`` has another shape, or an index out of range.
        """
        if self._released:
            raise CacheReleased("this KV cache was released (its session was closed); open a new session.")
        if self._pending:
            raise StateError(
                "a KV cache cannot be reordered while a forward has reserved columns; commit or abort first."
            )
        rows = self.batch_size
        if tuple(beam_idx.shape) != (rows,) or beam_idx.is_floating_point() or beam_idx.is_complex():
            raise ConfigError(
                f"beam_idx must be {rows} integer row indices (one per row of the cache), got a "
                f"{beam_idx.dtype} tensor of shape {list(beam_idx.shape)}."
            )
        parents = beam_idx.to(device="cpu", dtype=torch.long)
        if bool(((parents < 0) | (parents >= rows)).any()):
            raise ConfigError(
                f"beam_idx holds {parents.tolist()}, but every index must lie in [0, {rows}) (the cache's rows)."
            )
        n = self.length
        table = self.slots[:, :n]
        taken: set[int] = set()
        copies: list[int] = []  # rows whose parent was already taken by an earlier row
        for row, parent in enumerate(parents.tolist()):
            if parent in taken:
                copies.append(row)
            taken.add(parent)
        slots = self.slots.clone()  # a new table, swapped in at the end: a release meanwhile sees one or the other
        slots[:, :n] = table[parents]
        if copies and n:
            spare = [row for row in range(rows) if row not in taken]  # as many as copies
            target = table[spare]  # (copies, n): slots of rows no beam continues
            self.pool.copy_slots(slots[copies, :n].reshape(-1), target.reshape(-1))
            slots[copies, :n] = target
        self.valid = self.valid[parents.to(self.device)]
        self._held.slots = slots

    def _grow_tables(self, needed: int) -> None:
        cap = max(needed, 2 * self.slots.shape[1], 4)
        slots = torch.zeros(self.batch_size, cap, dtype=torch.long)
        valid = torch.zeros(self.batch_size, cap, dtype=torch.bool, device=self.device)
        slots[:, : self.length] = self.slots[:, : self.length]
        valid[:, : self.length] = self.valid[:, : self.length]
        self._held.slots, self.valid = slots, valid


class _Held:
    """A cache's slot table and how many of its columns hold slots; what its finalizer frees."""

    __slots__ = ("count", "slots")

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots  # (batch_size, capacity) slot ids
        self.count = 0  # columns [0, count) hold slots (committed or reserved)


def _give_back(pool: KVPool, held: _Held) -> None:
    """Finalizer of a cache: called by release(), or when the cache is collected."""
    if held.count:
        pool.release(held.slots[:, : held.count].reshape(-1).clone())
        held.count = 0
