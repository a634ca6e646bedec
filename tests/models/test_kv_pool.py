"""The KV pool: one attention call per layer for ragged batches, slots taken and given back."""

from __future__ import annotations

import gc

import pytest
import torch

from splitlearn_async import split_model
from splitlearn_async.models.cache import CacheReleased, KVPool
from splitlearn_async.models.cache_group import CacheGroup
from splitlearn_async.models.stages import run_stage, run_stage_batched
from tests.support.tiny_models import tiny_model

ATOL = 1e-5


def _trunk(family: str = "llama", **kw):
    return split_model(tiny_model(family, **kw), (1, 5), parts=("trunk",)).trunk


def _prefill(trunk, cache, length: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(cache.batch_size, length, trunk.hidden_size, generator=g)
    mask = torch.ones(cache.batch_size, length, dtype=torch.long)
    return run_stage(trunk, x, mask, torch.arange(length).expand(cache.batch_size, length), cache)


@torch.no_grad()
def test_sessions_joining_and_leaving_a_ragged_batch_equal_each_alone(family):
    """Sessions of different lengths join and leave the batch mid-way; past the sliding windows (5)."""
    trunk = _trunk(family)
    alone_trunk = _trunk(family)  # same weights (same seed), its own pool
    g = torch.Generator().manual_seed(0)
    # session -> (prompt length, step it joins, step it leaves)
    plan = {"a": (7, 0, 9), "b": (2, 3, 14), "c": (11, 5, 14), "d": (1, 8, 12)}
    grouped, alone, worst = {}, {}, 0.0
    for step in range(14):
        for name, (length, join, _) in plan.items():
            if step == join:
                grouped[name], alone[name] = trunk.new_cache(1), alone_trunk.new_cache(1)
                x = torch.randn(1, length, trunk.hidden_size, generator=g)
                mask, pos = torch.ones(1, length, dtype=torch.long), torch.arange(length)[None]
                worst = max(worst, float((run_stage(trunk, x, mask, pos, grouped[name])
                                          - run_stage(alone_trunk, x, mask, pos, alone[name])).abs().max()))
        for name, (_, _, leave) in plan.items():
            if step == leave and name in grouped:
                grouped.pop(name).release()
                alone.pop(name)
        members = sorted(grouped)
        calls = [(torch.randn(1, 1, trunk.hidden_size, generator=g), None,
                  torch.tensor([[grouped[m].length]]), m) for m in members]
        batched = run_stage_batched(trunk, [(x, mask, pos, grouped[m]) for x, mask, pos, m in calls])
        for (x, mask, pos, m), out in zip(calls, batched):
            worst = max(worst, float((run_stage(alone_trunk, x, mask, pos, alone[m]) - out).abs().max()))
    assert worst <= ATOL
    assert all(grouped[m].length == alone[m].length for m in grouped)


@torch.no_grad()
def test_a_lone_session_is_bit_identical_to_the_unsplit_layers():
    """Batch 1 makes the very kernel calls of the unsplit model: no padding, no mask."""
    model = tiny_model("llama")
    _, trunk, _ = split_model(model, (0, 6))
    from transformers import DynamicCache

    from splitlearn_async.models.hf_compat import cache_kwargs

    g = torch.Generator().manual_seed(3)
    hf_cache = DynamicCache(config=model.config)
    cache = trunk.new_cache(1)
    x = torch.randn(1, 6, 64, generator=g)
    for step in range(8):
        pos = torch.arange(cache.length, cache.length + x.shape[1])[None]
        ours = run_stage(trunk, x, None, pos, cache)
        h = x
        pe = model.model.rotary_emb(h, pos)
        for layer in model.model.layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True,
                      **cache_kwargs(layer, hf_cache))
        assert torch.equal(ours, h), step
        x = torch.randn(1, 1, 64, generator=g)


@torch.no_grad()
def test_no_slot_leaks_after_1000_sessions():
    trunk = _trunk()
    pool = trunk.kv_pool
    g = torch.Generator().manual_seed(1)
    live = []
    peak = 0
    for i in range(1000):
        cache = trunk.new_cache(1 + i % 2)
        _prefill(trunk, cache, 1 + i % 7, g)
        live.append(cache)
        if len(live) == 8:  # a decode step of 8 sessions together, then they end
            calls = [(torch.randn(c.batch_size, 1, 64, generator=g), None, None, c) for c in live]
            run_stage_batched(trunk, calls)
            for k, c in enumerate(live):
                if k % 2:
                    c.release()  # closed sessions give their slots back...
            live.clear()  # ...and dropped caches too
            gc.collect()
        peak = max(peak, pool.capacity)
    del cache, calls, c  # the loop's names still refer to the last caches
    pool.reclaim()
    assert pool.slots_used == 0
    assert pool.capacity <= pool.initial_slots  # grown storage is freed once nothing is held
    assert peak <= 512  # at most 8 sessions x 2 rows x 8 columns live at once: the pool never ran away


@torch.no_grad()
def test_one_token_sessions_hold_what_one_long_session_holds():
    trunk = _trunk()
    g = torch.Generator().manual_seed(2)
    short = [trunk.new_cache(1) for _ in range(2048)]
    for cache in short:
        _prefill(trunk, cache, 1, g)
    many = trunk.kv_pool.slots_used, trunk.kv_pool.nbytes(), sum(c.nbytes() for c in short)
    for cache in short:
        cache.release()
    trunk.kv_pool.reclaim()
    long = trunk.new_cache(1)
    _prefill(trunk, long, 2048, g)
    one = trunk.kv_pool.slots_used, trunk.kv_pool.nbytes(), long.nbytes()
    assert many[0] == one[0] == 2048
    assert many[1] <= 2 * one[1]  # the pool's storage, spare capacity included
    per_slot = trunk.kv_pool.bytes_per_slot
    assert one[2] >= 2048 * per_slot and many[2] <= 2 * one[2]  # what each cache reports holding


@torch.no_grad()
def test_a_released_cache_is_refused_and_its_slots_are_reused():
    trunk = _trunk()
    g = torch.Generator().manual_seed(4)
    cache = trunk.new_cache(1)
    _prefill(trunk, cache, 5, g)
    held = set(cache.slots[0, :5].tolist())
    cache.release()
    cache.release()  # a second release does nothing
    with pytest.raises(CacheReleased, match="released"):
        _prefill(trunk, cache, 1, g)
    other = trunk.new_cache(1)
    _prefill(trunk, other, 5, g)
    assert set(other.slots[0, :5].tolist()) == held


@torch.no_grad()
def test_a_failed_call_leaves_the_cache_and_the_pool_as_they_were(monkeypatch):
    trunk = _trunk()
    g = torch.Generator().manual_seed(5)
    cache = trunk.new_cache(2)
    _prefill(trunk, cache, 4, g)
    used = trunk.kv_pool.slots_used
    step = torch.randn(2, 1, 64, generator=g)
    layer = trunk.layers["3"]
    original = layer.forward

    def broken(*args, **kwargs):
        raise RuntimeError("layer 3 broke")

    monkeypatch.setattr(layer, "forward", broken)
    with pytest.raises(RuntimeError, match="layer 3 broke"):
        run_stage(trunk, step, None, torch.full((2, 1), 4), cache)
    monkeypatch.setattr(layer, "forward", original)
    trunk.kv_pool.reclaim()
    assert cache.length == 4 and trunk.kv_pool.slots_used == used
    fresh_trunk = _trunk()
    fresh = fresh_trunk.new_cache(2)
    _prefill(fresh_trunk, fresh, 4, torch.Generator().manual_seed(5))
    expected = run_stage(fresh_trunk, step, None, torch.full((2, 1), 4), fresh)
    assert torch.equal(run_stage(trunk, step, None, torch.full((2, 1), 4), cache), expected)


def test_caches_of_different_pools_cannot_share_a_batch():
    a, b = _trunk().new_cache(1), _trunk().new_cache(1)
    with pytest.raises(ValueError, match="share a KVPool"):
        CacheGroup([a, b])


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="initial_slots"):
        KVPool(initial_slots=1)


@torch.no_grad()
def test_a_cache_collected_in_a_cycle_gives_its_slots_back_even_inside_the_pools_lock():
    """The garbage collector may finalize a cache while the pool's lock is held on the same
    thread (a collection triggered inside allocate()); that must neither deadlock nor lose slots."""
    import threading

    trunk = _trunk()
    pool = trunk.kv_pool
    holder = {"cache": trunk.new_cache(1)}
    holder["self"] = holder  # a reference cycle: only the collector frees it
    _prefill(trunk, holder["cache"], 3, torch.Generator().manual_seed(6))
    del holder
    done = threading.Event()

    def collect_under_the_lock() -> None:
        with pool._lock:
            gc.collect()
        done.set()

    thread = threading.Thread(target=collect_under_the_lock, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert done.is_set(), "the finalizer deadlocked on the pool's lock"
    pool.reclaim()
    assert pool.slots_used == 0
