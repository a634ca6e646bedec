"""run_stage_batched: several caches of different lengths in one call equal each call alone."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import split_model
from splitlearn_async.models.cache_group import CacheGroup
from splitlearn_async.models.positions import prompt_positions
from splitlearn_async.models.stages import run_stage, run_stage_batched
from tests.support.tiny_models import left_padded_batch, tiny_model

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


@pytest.mark.parametrize("part", ["bottom", "trunk", "top"])
def test_calls_of_different_lengths_batch_and_equal_each_alone(family, part):
    """Prefills (and chunks) of different lengths, some on caches that already hold columns."""
    model = tiny_model(family)
    stage = split_model(model, (2, 4))[("bottom", "trunk", "top").index(part)]
    g = torch.Generator().manual_seed(7)

    def inputs(rows, n):
        if part == "bottom":
            return torch.randint(3, 90, (rows, n), generator=g)
        return torch.randn(rows, n, stage.hidden_size, generator=g)

    # (rows, columns already held, new tokens); one call's prompt is itself left-padded
    shapes = [(1, 0, 9), (2, 0, 3), (1, 4, 6), (1, 0, 1), (1, 2, 7)]
    alone, grouped, calls = [], [], []
    for rows, past, n in shapes:
        a, b = stage.new_cache(rows), stage.new_cache(rows)
        if past:
            x = inputs(rows, past)
            run_stage(stage, x, None, torch.arange(past).expand(rows, past), a)
            run_stage(stage, x, None, torch.arange(past).expand(rows, past), b)
        mask = torch.ones(rows, past + n, dtype=torch.long)
        if rows == 2:
            mask[1, :1] = 0  # the second row of this prompt is left-padded by one token
        pos = prompt_positions(mask)[:, -n:]
        alone.append(a)
        grouped.append(b)
        calls.append((inputs(rows, n), mask, pos))
    singles = [run_stage(stage, *call, a) for call, a in zip(calls, alone)]
    batched = run_stage_batched(stage, [(*call, b) for call, b in zip(calls, grouped)])
    worst = 0.0
    for (rows, _, n), s_out, b_out, call in zip(shapes, singles, batched, calls):
        assert b_out.shape == s_out.shape == (rows, n, *s_out.shape[2:])
        valid = call[1][:, -n:].bool()
        worst = max(worst, float((s_out - b_out)[valid].abs().max()))
    assert worst <= ATOL
    assert [c.length for c in alone] == [c.length for c in grouped] == [p + n for _, p, n in shapes]
    # and the caches go on as one batch of decode steps
    steps = [(inputs(rows, 1), None, torch.tensor([[c.length]]).expand(rows, 1)) for (rows, _, _), c in zip(shapes, alone)]
    singles = [run_stage(stage, *call, a) for call, a in zip(steps, alone)]
    batched = run_stage_batched(stage, [(*call, b) for call, b in zip(steps, grouped)])
    assert max(float((s - b).abs().max()) for s, b in zip(singles, batched)) <= ATOL


def test_ragged_calls_need_positions():
    trunk = split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk
    a, b = trunk.new_cache(1), trunk.new_cache(1)
    calls = [(torch.randn(1, 2, 64), None, None, a), (torch.randn(1, 1, 64), None, None, b)]
    with pytest.raises(ValueError, match="position ids"):
        run_stage_batched(trunk, calls)


def test_a_cache_cannot_appear_twice_in_a_group():
    trunk = split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk
    cache = trunk.new_cache(1)
    with pytest.raises(ValueError, match="appears twice"):
        CacheGroup([cache, cache])
    with pytest.raises(ValueError, match="at least one"):
        CacheGroup([])
