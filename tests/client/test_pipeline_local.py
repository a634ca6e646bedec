"""SplitPipeline over LocalTrunk: generate semantics, caches, streaming, the free event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from splitlearn_async import ClientClosed, LocalTrunk, SplitPipeline, split_model
from tests.support.tiny_models import left_padded_batch, tiny_model


def _pipeline(model, split=(2, 4)):
    bottom, trunk, top = split_model(model, split)
    local = LocalTrunk(trunk)
    return SplitPipeline(bottom, local, top), local


async def test_greedy_equals_model_generate_with_left_padding_and_eos(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch([4, 9, 6], seed=5)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 2])  # a token row 1 really emits: stopping is exercised
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    pipeline, local = _pipeline(model)
    async with pipeline, local:
        got = await pipeline.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


async def test_sampling_with_a_seed_is_reproducible():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([5, 3])
    pipeline, local = _pipeline(model)
    async with pipeline, local:
        kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
        a = await pipeline.generate(ids, mask, seed=7, **kwargs)
        b = await pipeline.generate(ids, mask, seed=7, **kwargs)
        c = await pipeline.generate(ids, mask, seed=8, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


async def test_every_stage_uses_its_cache():
    model = tiny_model("qwen2")
    bottom, trunk, top = split_model(model, (2, 4))
    seen: dict[str, list[int]] = {"bottom": [], "trunk": [], "top": []}
    for name, stage in (("bottom", bottom), ("trunk", trunk), ("top", top)):
        stage.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0].shape[1]))
    ids, mask = left_padded_batch([6, 4])
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top) as pipeline:
        await pipeline.generate(ids, mask, max_new_tokens=8)
    for name in seen:  # the prompt once, then one token per step: nothing recomputed
        assert seen[name] == [6] + [1] * 7, name


async def test_stream_yields_each_step():
    model = tiny_model("gpt2")
    ids, mask = left_padded_batch([3])
    pipeline, local = _pipeline(model)
    async with pipeline, local:
        chunks = [c async for c in pipeline.stream(ids, mask, max_new_tokens=5)]
        full = await pipeline.generate(ids, mask, max_new_tokens=5)
    assert len(chunks) == 5
    assert torch.equal(torch.stack([c.tokens for c in chunks], dim=1), full[:, ids.shape[1]:])
    assert chunks[0].text is None


async def test_cancelling_generate_closes_the_trunk_session():
    model = tiny_model("llama", num_layers=6)
    ids, mask = left_padded_batch([5])
    pipeline, local = _pipeline(model)
    started = asyncio.Event()

    async def run():
        async for _ in pipeline.stream(ids, mask, max_new_tokens=100_000):
            started.set()

    async with pipeline, local:
        task = asyncio.create_task(run())
        await started.wait()
        assert local.sessions_open == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert local.sessions_open == 0


async def test_use_after_close_fails_with_a_sentence():
    model = tiny_model("gemma")
    pipeline, local = _pipeline(model)
    await pipeline.aclose()
    await local.aclose()
    ids, mask = left_padded_batch([3])
    with pytest.raises(ClientClosed, match="has been closed"):
        await pipeline.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(ClientClosed, match="has been closed"):
        await local.open_session()


async def test_bad_arguments_are_clear():
    model = tiny_model("llama")
    pipeline, local = _pipeline(model)
    async with pipeline, local:
        ids, mask = left_padded_batch([2, 4])
        right_padded = mask.flip(1)
        with pytest.raises(ValueError, match="pad prompts on the left"):
            await pipeline.generate(ids, right_padded, max_new_tokens=2)
        with pytest.raises(ValueError, match="temperature"):
            await pipeline.generate(ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)
        with pytest.raises(ValueError, match="no tokenizer"):
            await pipeline.generate_text("hi")


async def test_event_loop_stays_free_during_generation():
    # Each trunk call, on the worker thread, waits until a task on the event loop has run
    # after the call began. Were torch work on the loop's thread (or the loop blocked while
    # it ran), that task could never run and the call would find no acknowledgement.
    model = tiny_model("llama")
    ids, mask = left_padded_batch([5, 3])
    pipeline, local = _pipeline(model)
    loop_thread = threading.get_ident()
    started, acknowledged = threading.Event(), threading.Event()
    calls: list[tuple[int, bool]] = []  # (thread, acknowledged by the loop)

    def wait_for_the_loop(module, args):
        acknowledged.clear()
        started.set()
        calls.append((threading.get_ident(), acknowledged.wait(timeout=30)))  # a hang guard

    async def acknowledge():
        while True:
            if started.is_set():
                started.clear()
                acknowledged.set()
            await asyncio.sleep(0.001)

    hook = local.trunk.register_forward_pre_hook(wait_for_the_loop)
    async with pipeline, local:
        beat = asyncio.create_task(acknowledge())
        try:
            tokens = [chunk async for chunk in pipeline.stream(ids, mask, max_new_tokens=6, pad_token_id=0)]
        finally:
            beat.cancel()
            hook.remove()
    assert len(tokens) == 6 and len(calls) == 6  # the prompt's call, then one per further token
    assert all(thread != loop_thread and seen for thread, seen in calls), calls


@pytest.mark.slow
async def test_smollm2_pipeline_equals_model_generate_and_streams_text():
    from transformers import AutoModelForCausalLM

    from splitlearn_async import default_bundle, load_stages
    from splitlearn_async.models.default import default_gguf_path, load_tokenizer

    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    bundle = default_bundle()
    tokenizer = load_tokenizer(bundle)
    bottom, trunk, top = load_stages(bundle)
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top, tokenizer) as pipeline:
        ids, mask = pipeline.encode([{"role": "user", "content": "What is the capital of France?"}])
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        got = await pipeline.generate(ids, mask, max_new_tokens=24)
        assert torch.equal(got, expected)
        pieces = [c.text[0] async for c in pipeline.stream(ids, mask, max_new_tokens=24)]
        answer = await pipeline.generate_text([{"role": "user", "content": "What is the capital of France?"}], 24)
    assert "".join(pieces) == answer and "Paris" in answer


async def test_several_pipelines_sharing_bottom_and_top_run_at_once_and_equal_model_generate():
    """Each pipeline has its own worker thread; their calls on the shared stages take turns."""
    import asyncio

    model = tiny_model("qwen2")
    bottom, trunk, top = split_model(model, (2, 4))
    prompts = [left_padded_batch([3 + i, 6], seed=i) for i in range(4)]
    expected = [
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for ids, mask in prompts
    ]
    async with LocalTrunk(trunk) as local:
        pipelines = [SplitPipeline(bottom, local, top) for _ in range(4)]
        try:
            for p in pipelines:
                await p.__aenter__()

            async def many(p, ids, mask):
                return await asyncio.gather(
                    *(p.generate(ids, mask, max_new_tokens=12, pad_token_id=0) for _ in range(3))
                )

            got = await asyncio.gather(*(many(p, ids, mask) for p, (ids, mask) in zip(pipelines, prompts)))
        finally:
            for p in pipelines:
                await p.__aexit__(None, None, None)
    for runs, want in zip(got, expected):
        assert all(torch.equal(r, want) for r in runs)


def test_a_stage_call_waits_while_another_thread_runs_the_same_stage():
    from splitlearn_async.models.running import _lock_of, run_stage

    bottom = split_model(tiny_model("llama"), (2, 4), parts=("bottom",)).bottom
    ids = torch.tensor([[5, 6, 7]])
    done = threading.Event()

    def call():
        run_stage(bottom, ids, None, None, bottom.new_cache(1))
        done.set()

    with _lock_of(bottom):  # as if another worker were running the stage
        thread = threading.Thread(target=call)
        thread.start()
        assert not done.wait(0.3), "the call ran while the stage was in use"
    thread.join(10)
    assert done.is_set()
