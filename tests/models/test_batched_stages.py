"""run_stage_batched: several caches of different lengths in one call equal each call alone."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import split_model
from splitlearn_async.models.cache import CacheGroup
from splitlearn_async.models.positions import prompt_positions
from splitlearn_async.models.stages import run_stage, run_stage_batched
from tiny_models import left_padded_batch, tiny_model

ATOL = 1e-5


def _prompts():
    # three "sessions": rows 1, 2 and 1, prompts of different lengths, one left-padded
    return [left_padded_batch([4], seed=1), left_padded_batch([6, 3], seed=2), left_padded_batch([9], seed=3)]


@pytest.mark.parametrize("part", ["bottom", "trunk", "top"])
async def test_batched_steps_equal_single_steps(family, part):
    model = tiny_model(family)
    stage = split_model(model, (2, 4))[("bottom", "trunk", "top").index(part)]
    g = torch.Generator().manual_seed(0)
    prompts = _prompts()

    def inputs(ids):  # token ids for the bottom, hidden states for the others
        if part == "bottom":
            return ids
        return torch.randn(*ids.shape, stage.hidden_size, generator=g)

    alone = [stage.new_cache(ids.shape[0]) for ids, _ in prompts]
    grouped = [stage.new_cache(ids.shape[0]) for ids, _ in prompts]
    masks = [mask for _, mask in prompts]
    for (ids, mask), a, b in zip(prompts, alone, grouped):
        x = inputs(ids)
        pos = prompt_positions(mask)
        assert torch.equal(run_stage(stage, x, mask, pos, a), run_stage(stage, x, mask, pos, b))
    worst = 0.0
    for step in range(5):
        calls = []
        for i, (ids, _) in enumerate(prompts):
            masks[i] = torch.cat([masks[i], torch.ones(ids.shape[0], 1, dtype=torch.long)], dim=1)
            x = inputs(torch.randint(3, 90, (ids.shape[0], 1), generator=g))
            calls.append((x, masks[i], prompt_positions(masks[i])[:, -1:]))
        members = [i for i in range(3) if not (step == 2 and i == 1)]  # session 1 sits out one step
        singles = [run_stage(stage, *calls[i], alone[i]) for i in members]
        batched = run_stage_batched(stage, [(*calls[i], grouped[i]) for i in members])
        for s, b in zip(singles, batched):
            assert s.shape == b.shape
            worst = max(worst, float((s - b).abs().max()))
        if step == 2:  # keep session 1's caches in step for the next rounds
            run_stage(stage, *calls[1], alone[1])
            run_stage(stage, *calls[1], grouped[1])
    assert worst <= ATOL
    assert [c.length for c in alone] == [c.length for c in grouped]


def test_batched_calls_must_share_the_number_of_new_tokens():
    trunk = split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk
    a, b = trunk.new_cache(1), trunk.new_cache(1)
    calls = [(torch.randn(1, 2, 64), None, None, a), (torch.randn(1, 1, 64), None, None, b)]
    with pytest.raises(ValueError, match="same number of new tokens"):
        run_stage_batched(trunk, calls)


def test_a_cache_cannot_appear_twice_in_a_group():
    trunk = split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk
    cache = trunk.new_cache(1)
    with pytest.raises(ValueError, match="appears twice"):
        CacheGroup([cache, cache])
    with pytest.raises(ValueError, match="at least one"):
        CacheGroup([])
