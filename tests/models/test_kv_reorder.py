"""Beam search's cache reorder: a gather of the slot table, duplicated rows copied into the slots
of dropped rows, the pool's books unchanged; a reordered cache computes what a cache of the
reordered rows computes."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import ConfigError, StateError, split_model
from splitlearn_async.models.cache import CacheReleased, KVCache, KVPool
from splitlearn_async.models.stages import run_stage
from tests.support.tiny_models import tiny_model

H = 64


def _left_padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) each


@torch.no_grad()
def test_a_reordered_cache_computes_what_a_cache_of_the_reordered_rows_computes(family):
    """Two reorders with duplicated and dropped rows, past the sliding windows (5), ragged prompts."""
    trunk = split_model(tiny_model(family), (1, 5), parts=("trunk",)).trunk
    g = torch.Generator().manual_seed(0)
    mask, pos = _left_padded([7, 3, 7, 5], 7)
    prompt = torch.randn(4, 7, H, generator=g)
    steps = [torch.randn(4, 1, H, generator=g) for _ in range(3)]
    one = torch.ones(4, 1, dtype=torch.long)
    first, second = torch.tensor([2, 2, 0, 3]), torch.tensor([1, 1, 1, 0])

    cache = trunk.new_cache(4)
    run_stage(trunk, prompt, mask, pos, cache)
    run_stage(trunk, steps[0], one, pos[:, -1:] + 1, cache)
    cache.reorder(first)
    run_stage(trunk, steps[1], one, pos[first, -1:] + 2, cache)
    cache.reorder(second)
    ours = run_stage(trunk, steps[2], one, pos[first[second], -1:] + 3, cache)

    # the same rows' histories, built in order without a reorder
    lineage = first[second]  # the prompt row each final row descends from
    fresh = trunk.new_cache(4)
    run_stage(trunk, prompt[lineage], mask[lineage], pos[lineage], fresh)
    run_stage(trunk, steps[0][lineage], one, pos[lineage, -1:] + 1, fresh)
    run_stage(trunk, steps[1][second], one, pos[lineage, -1:] + 2, fresh)
    theirs = run_stage(trunk, steps[2], one, pos[lineage, -1:] + 3, fresh)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(cache.valid[:, : cache.length], fresh.valid[:, : fresh.length])


def _cache_with_tagged_slots(rows: int, columns: int) -> tuple[KVPool, KVCache]:
    """A cache whose slots hold their own id in every key and value element, and the second row's first column padding."""
    pool = KVPool(initial_slots=64)
    cache = KVCache(rows, pool)
    valid = torch.ones(rows, columns, dtype=torch.bool)
    valid[1, 0] = False
    cache.begin(valid)
    cache.commit()
    for layer in (0, 3):
        keys, values = pool.storage(layer, torch.zeros(1, 2, 1, 8))
        ids = torch.arange(pool.capacity, dtype=torch.float32)[:, None, None]
        keys.copy_(ids.expand_as(keys))
        values.copy_(-ids.expand_as(values))
    return pool, cache


def test_duplicated_rows_are_copied_into_the_slots_of_dropped_rows():
    pool, cache = _cache_with_tagged_slots(4, 3)
    before, used = cache.slots[:, :3].clone(), pool.slots_used
    cache.reorder(torch.tensor([2, 1, 2, 2]))  # row 2 continues three times, rows 0 and 3 end
    after = cache.slots[:, :3]
    assert torch.equal(after[0], before[2]) and torch.equal(after[1], before[1])  # first takers keep the slots
    assert {*after[2:].flatten().tolist()} == {*before[0].tolist(), *before[3].tolist()}  # dropped rows' slots
    assert sorted(after.flatten().tolist()) == sorted(before.flatten().tolist())  # each slot in one place
    assert pool.slots_used == used
    for layer in (0, 3):
        for row in (2, 3):  # the copies hold row 2's keys and values
            assert torch.equal(pool.keys[layer][after[row]], pool.keys[layer][before[2]])
            assert torch.equal(pool.values[layer][after[row]], pool.values[layer][before[2]])
    assert cache.valid[:, :3].tolist() == [[True] * 3, [False, True, True], [True] * 3, [True] * 3]
    cache.release()
    pool.reclaim()
    assert pool.slots_used == 0  # every slot came back


def test_an_identity_reorder_changes_nothing_and_an_empty_cache_can_be_reordered():
    pool, cache = _cache_with_tagged_slots(3, 2)
    before, keys = cache.slots[:, :2].clone(), pool.keys[0].clone()
    cache.reorder(torch.arange(3))
    assert torch.equal(cache.slots[:, :2], before) and torch.equal(pool.keys[0], keys)
    empty = KVCache(3, pool)
    empty.reorder(torch.tensor([0, 0, 0]))  # nothing written yet: nothing to copy
    assert empty.length == 0


def test_bad_reorders_are_refused_with_a_sentence():
    pool, cache = _cache_with_tagged_slots(3, 2)
    with pytest.raises(ConfigError, match=r"beam_idx must be 3 integer row indices .* shape \[2\]"):
        cache.reorder(torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="integer row indices"):
        cache.reorder(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"every index must lie in \[0, 3\)"):
        cache.reorder(torch.tensor([0, 3, 1]))
    with pytest.raises(ConfigError, match=r"every index must lie in \[0, 3\)"):
        cache.reorder(torch.tensor([-1, 0, 1]))
    cache.begin(torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(StateError, match="while a forward has reserved columns"):
        cache.reorder(torch.arange(3))
    cache.abort()
    cache.release()
    with pytest.raises(CacheReleased, match="was released"):
        cache.reorder(torch.arange(3))
