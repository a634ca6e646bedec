"""Sessions with different LoRA adapters (and none) in one batched trunk call: each gets what it gets alone."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from splitlearn_async import RemoteTrunk, SplitPipeline, merge_adapter, split_model
from splitlearn_async.models.stages import run_stage, run_stage_batched
from splitlearn_async.training import from_safetensors, to_safetensors
from splitlearn_async.training._lora import LoraAdapter, RowAdapters, bind_adapter
from tests.support.rpc import served
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.training_reference import lora_targets

ATOL = 1e-5


def adapters_for(trunk, family: str, n: int) -> list[LoraAdapter]:
    """``n`` adapters on ``trunk`` with random, non-zero A and B (so each changes the output)."""
    out = []
    for i in range(n):
        adapter = LoraAdapter(trunk, rank=2 + i, alpha=8.0, target_modules=tuple(lora_targets(family)), seed=i,
                              adapter_id=f"ad{i}")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, b in adapter.pairs.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        out.append(adapter)
    return out


@torch.no_grad()
def test_a_batch_of_mixed_adapters_equals_each_session_alone(family):
    trunk = split_model(tiny_model(family), (1, 5), parts=("trunk",)).trunk
    a, b, c = adapters_for(trunk, family, 3)
    plan = [a, a, None, b, c, None, b]  # runs of equal neighbours and interleaving
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 2, 6, 4, 5]
    batched = [trunk.new_cache(1) for _ in plan]
    alone = [trunk.new_cache(1) for _ in plan]
    for together, apart, adapter in zip(batched, alone, plan, strict=True):
        bind_adapter(together, adapter)
        bind_adapter(apart, adapter)
    worst = 0.0
    for step in range(4):  # a ragged prompt chunk, then decode steps
        ns = lengths if step == 0 else [1] * len(plan)
        xs = [torch.randn(1, n, trunk.hidden_size, generator=g) for n in ns]
        calls = [(x, None, torch.arange(c.length, c.length + x.shape[1])[None], c) for x, c in zip(xs, batched)]
        outs = run_stage_batched(trunk, calls)
        for x, c, out in zip(xs, alone, outs, strict=True):
            ref = run_stage(trunk, x, None, torch.arange(c.length, c.length + x.shape[1])[None], c)
            worst = max(worst, float((ref - out).abs().max()))
    assert worst <= ATOL


@torch.no_grad()
def test_base_rows_of_a_mixed_batch_are_the_base_rows_of_a_plain_batch_bit_for_bit():
    trunk = split_model(tiny_model("llama"), (1, 5), parts=("trunk",)).trunk
    (a,) = adapters_for(trunk, "llama", 1)
    x = torch.randn(3, 4, trunk.hidden_size, generator=torch.Generator().manual_seed(1))
    mixed = [trunk.new_cache(1) for _ in range(3)]
    plain = [trunk.new_cache(1) for _ in range(3)]
    bind_adapter(mixed[1], a)
    pos = torch.arange(4)[None]
    got = run_stage_batched(trunk, [(x[i : i + 1], None, pos, c) for i, c in enumerate(mixed)])
    ref = run_stage_batched(trunk, [(x[i : i + 1], None, pos, c) for i, c in enumerate(plain)])
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    assert not torch.allclose(got[1], ref[1])  # the adapter does change its own row: the test can fail


def test_row_adapters_with_autograd_assemble_a_new_output():
    trunk = split_model(tiny_model("llama"), (1, 5), parts=("trunk",)).trunk
    (a,) = adapters_for(trunk, "llama", 1)
    name = next(iter(a.pairs))
    x = torch.randn(3, 2, a.pairs[name][0].shape[1], requires_grad=True)
    base = torch.zeros(3, 2, a.pairs[name][1].shape[0])
    out = RowAdapters([(0, 1, None), (1, 2, a), (2, 3, None)]).add_delta(name, x, base)
    out.sum().backward()
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert torch.allclose(out[1], a.delta(name, x[1:2].detach())[0])
    assert x.grad is not None and torch.equal(x.grad[0], torch.zeros_like(x.grad[0]))


async def test_sessions_with_different_adapters_share_batches_on_the_server_and_equal_merged_models():
    family = "qwen2"
    model = tiny_model(family)
    bottom, trunk, top = split_model(model, (2, 4))
    adapters = adapters_for(trunk, family, 2)
    files = {ad.adapter_id: to_safetensors(ad.state_tensors(), ad.metadata()) for ad in adapters}
    ids, mask = left_padded_batch([5], seed=3)
    expected = {}
    for name, data in [*files.items(), (None, None)]:
        reference = copy.deepcopy(model)
        if data is not None:
            merge_adapter(reference, *from_safetensors(data))
        expected[name] = reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    plan = ["ad0", "ad1", None, "ad0", "ad1", None]
    mixed_batches = []
    async with served(split_model(model, (2, 4), parts=("trunk",)).trunk) as server:
        record = server.inference.compute_batch

        def recording(trunk, works, metrics):
            mixed_batches.append(len({w.session.adapter_id for w in works}) > 1)
            return record(trunk, works, metrics)

        server.inference.compute_batch = recording
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
            for name, data in files.items():
                await remote.load_adapter(name, data)

            async def one(name):
                async with SplitPipeline(bottom, remote, top, adapter_id=name) as pipeline:
                    return await pipeline.generate(ids, mask, max_new_tokens=8, pad_token_id=0)

            got = await asyncio.gather(*(one(name) for name in plan))
    for name, tokens in zip(plan, got, strict=True):
        assert torch.equal(tokens, expected[name]), name
    assert not torch.equal(expected["ad0"], expected[None])  # the adapters change the tokens
    assert any(mixed_batches), "no batch mixed sessions of different adapters"


@pytest.mark.parametrize("n", [1, 3])
def test_segments_merge_neighbours_with_the_same_adapter(n):
    from splitlearn_async.models.cache_group import CacheGroup
    from splitlearn_async.training._lora import _adapter_of_cache

    trunk = split_model(tiny_model("llama"), (1, 5), parts=("trunk",)).trunk
    a, b = adapters_for(trunk, "llama", 2)
    caches = [trunk.new_cache(n) for _ in range(4)]
    for cache, adapter in zip(caches, [a, a, None, b], strict=True):
        bind_adapter(cache, adapter)
    found, rows = _adapter_of_cache(CacheGroup(caches))
    assert found and isinstance(rows, RowAdapters)
    assert rows.segments == [(0, 2 * n, a), (3 * n, 4 * n, b)]
