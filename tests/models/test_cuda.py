"""The stages and the KV pool on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import (
    LocalTrunk,
    OptimizerConfig,
    RemoteTrunk,
    SplitPipeline,
    SplitTrainer,
    TrainingConfig,
    split_model,
)
from splitlearn_async.models.positions import prompt_positions
from splitlearn_async.models.stages import run_stage, run_stage_batched
from tests.support.rpc import served
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.training_reference import SPLIT, clone_model, make_batch, max_diff, unsplit_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@torch.no_grad()
def test_split_on_cuda_matches_unsplit_on_cpu(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch([7, 3, 9])
    ref = model(input_ids=ids, attention_mask=mask).logits
    bottom, trunk, top = split_model(model.to("cuda"), (2, 4))
    h = run_stage(bottom, ids, mask, None, None)
    h = run_stage(trunk, h, mask, None, None)
    out = run_stage(top, h, mask, None, None)
    assert (ref - out)[mask.bool()].abs().max().item() <= 1e-4  # TF32-free fp32 kernels differ in order only


@torch.no_grad()
def test_ragged_batch_on_cuda_equals_each_session_alone(family):
    model = tiny_model(family).to("cuda")
    trunk = split_model(model, (1, 5), parts=("trunk",)).trunk
    g = torch.Generator().manual_seed(0)
    lengths = [7, 2, 11, 1]
    grouped = [trunk.new_cache(1) for _ in lengths]
    alone = [trunk.new_cache(1) for _ in lengths]
    for n, a, b in zip(lengths, grouped, alone):
        x = torch.randn(1, n, trunk.hidden_size, generator=g)
        mask, pos = torch.ones(1, n, dtype=torch.long), torch.arange(n)[None]
        run_stage(trunk, x, mask, pos, a)
        run_stage(trunk, x, mask, pos, b)
    worst = 0.0
    for _ in range(8):  # past the sliding windows (5)
        xs = [torch.randn(1, 1, trunk.hidden_size, generator=g) for _ in lengths]
        batched = run_stage_batched(trunk, [(x, None, torch.tensor([[c.length]]), c) for x, c in zip(xs, grouped)])
        for x, c, out in zip(xs, alone, batched):
            worst = max(worst, float((run_stage(trunk, x, None, torch.tensor([[c.length]]), c) - out).abs().max()))
    assert worst <= 1e-4
    assert trunk.kv_pool.device.type == "cuda"


@torch.no_grad()
def test_bf16_stages_on_cuda_stay_close_to_fp32():
    ids, mask = left_padded_batch([5, 8])
    ref = tiny_model("llama")(input_ids=ids, attention_mask=mask).logits
    bottom, trunk, top = split_model(tiny_model("llama").to("cuda", torch.bfloat16), (2, 4))
    cache = [s.new_cache(2) for s in (bottom, trunk, top)]
    pos = prompt_positions(mask)
    h = run_stage(bottom, ids, mask, pos, cache[0])
    h = run_stage(trunk, h, mask, pos, cache[1])
    out = run_stage(top, h, mask, pos, cache[2]).float()
    valid = mask.bool()
    scale = ref[valid].abs().max()
    assert out.dtype == torch.float32 and h.dtype == torch.bfloat16
    assert ((ref - out)[valid].abs().max() / scale).item() <= 5e-2  # bf16 keeps about 3 significant digits


@torch.no_grad()
def test_a_beam_reorder_on_cuda_equals_the_one_on_the_cpu():
    """The slot copies of KVCache.reorder run on the pool's device."""
    outs = []
    for device in ("cpu", "cuda"):
        trunk = split_model(tiny_model("gemma3").to(device), (1, 5), parts=("trunk",)).trunk
        g = torch.Generator().manual_seed(0)
        ids, mask = left_padded_batch([6, 2, 6, 4])
        cache, pos = trunk.new_cache(4), prompt_positions(mask)
        run_stage(trunk, torch.randn(4, 6, trunk.hidden_size, generator=g), mask, pos, cache)
        cache.reorder(torch.tensor([2, 2, 0, 2]))
        step = torch.randn(4, 1, trunk.hidden_size, generator=g)
        outs.append(run_stage(trunk, step, None, pos[[2, 2, 0, 2], -1:] + 1, cache))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4


async def test_remote_generate_with_the_trunk_on_cuda_equals_model_generate(family):
    """A server whose trunk is on the GPU (client stages on the CPU): the tokens of model.generate."""
    model = tiny_model(family)
    ids, mask = left_padded_batch([4, 9, 6], seed=5)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    bottom, trunk, top = split_model(model, (2, 4))
    trunk.to("cuda")
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitPipeline(bottom, remote, top) as pipeline:
            got = await pipeline.generate(ids, mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(got, expected)


async def test_a_training_step_with_the_trunk_on_cuda_equals_the_unsplit_step(family):
    """Full-trunk training with the trunk on the GPU: loss and every updated weight as on the CPU."""
    opt = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
    model = tiny_model(family)
    reference = unsplit_step(clone_model(model), make_batch(), opt)
    bottom, trunk, top = split_model(model, SPLIT)
    trunk.to("cuda")
    config = TrainingConfig(optimizer=opt, trunk="full")
    async with LocalTrunk(trunk) as local, SplitTrainer(bottom, local, top, config) as trainer:
        loss = await trainer.step(make_batch())
    assert abs(loss - reference.loss) <= 1e-4
    updated = dict(reference.model.named_parameters())
    for name, p in model.named_parameters():
        assert max_diff(p.cpu(), updated[name]) <= 1e-4, name


@torch.no_grad()
def test_a_batch_of_mixed_lora_adapters_on_cuda_equals_each_session_alone():
    from splitlearn_async.training._lora import LoraAdapter, bind_adapter

    trunk = split_model(tiny_model("llama").to("cuda"), (1, 5), parts=("trunk",)).trunk
    adapters = []
    for i in range(2):
        adapter = LoraAdapter(trunk, rank=4, alpha=8.0, target_modules=("q_proj", "o_proj"), seed=i)
        for _, b in adapter.pairs.values():
            b.normal_(0.0, 0.1)
        adapters.append(adapter)
    plan = [adapters[0], None, adapters[1], adapters[0]]
    batched, alone = [trunk.new_cache(1) for _ in plan], [trunk.new_cache(1) for _ in plan]
    for together, apart, adapter in zip(batched, alone, plan):
        bind_adapter(together, adapter)
        bind_adapter(apart, adapter)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(3):
        xs = [torch.randn(1, 4 if step == 0 else 1, trunk.hidden_size, generator=g) for _ in plan]
        pos = [torch.arange(c.length, c.length + x.shape[1])[None] for x, c in zip(xs, batched)]
        outs = run_stage_batched(trunk, [(x, None, p, c) for x, p, c in zip(xs, pos, batched)])
        for x, p, c, out in zip(xs, pos, alone, outs):
            worst = max(worst, float((run_stage(trunk, x, None, p, c) - out).abs().max()))
    assert worst <= 1e-4


async def test_a_training_step_in_one_layer_segments_on_cuda_equals_the_unsplit_step():
    """Each training forward and backward cut into one-layer work items, on the GPU."""
    from splitlearn_async.training import TrainingLimits

    opt = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
    model = tiny_model("qwen2")
    reference = unsplit_step(clone_model(model), make_batch(), opt)
    bottom, trunk, top = split_model(model, SPLIT)
    trunk.to("cuda")
    limits = TrainingLimits(allow_full_training=True, segment_layer_tokens=1)
    async with LocalTrunk(trunk, training=limits) as local:
        async with SplitTrainer(bottom, local, top, TrainingConfig(optimizer=opt, trunk="full")) as trainer:
            loss = await trainer.step(make_batch())
    assert abs(loss - reference.loss) <= 1e-4
    updated = dict(reference.model.named_parameters())
    for name, p in model.named_parameters():
        assert max_diff(p.cpu(), updated[name]) <= 1e-4, name


async def test_sessions_trained_together_on_cuda_equal_each_alone():
    from tests.training.test_batched_training import ALONE_SEGMENTS, ROWS, TOGETHER_SEGMENTS, _assert_close, _train

    alone = await _train("llama", ALONE_SEGMENTS, together=False, device="cuda")
    together = await _train("llama", TOGETHER_SEGMENTS, together=True, device="cuda")
    _assert_close(together, alone)
    assert (sum(ROWS), True) in together["calls"]  # the forwards ran as one batch
