"""Sampling equals ``model.generate`` token for token with the same seed, ``num_return_sequences``
included; the per-call ``seed=`` keeps concurrent calls reproducible; ``return_dict_in_generate``
returns what ``generate`` returns. Over LocalTrunk and a server."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.generation import GenerateDecoderOnlyOutput

from tests.support.generation import TRUNK_KINDS, split_pipeline
from tests.support.tiny_models import left_padded_batch, tiny_model

SAMPLING = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=30, top_p=0.95, pad_token_id=0)


@pytest.fixture(params=TRUNK_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The trunk in-process (LocalTrunk) or on a server (RemoteTrunk)."""
    return str(request.param)


def _hf(model, ids, mask, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, **{**SAMPLING, **kwargs})


async def test_sampling_equals_generate_after_the_same_manual_seed(family, kind):
    model = tiny_model(family)
    ids, mask = left_padded_batch([5, 2, 8], seed=3)
    expected = _hf(model, ids, mask, seed=13, num_return_sequences=3)
    after_hf = torch.rand(4)  # where generate left torch's global generator
    async with split_pipeline(model, kind) as pipeline:
        torch.manual_seed(13)
        got = await pipeline.generate(ids, mask, **SAMPLING, num_return_sequences=3)
        after_ours = torch.rand(4)
    assert got.shape == (9, ids.shape[1] + 10)
    assert torch.equal(got, expected)
    assert torch.equal(after_ours, after_hf)  # the global generator moved on as generate moves it


async def test_consecutive_calls_continue_the_global_generator_as_generate_does(kind):
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch([4, 6], seed=2)
    torch.manual_seed(5)
    expected = [_hf(model, ids, mask), _hf(model, ids, mask, top_k=None)]
    async with split_pipeline(model, kind) as pipeline:
        torch.manual_seed(5)
        got = [await pipeline.generate(ids, mask, **SAMPLING), await pipeline.generate(ids, mask, **{**SAMPLING, "top_k": None})]
    assert not torch.equal(expected[0], expected[1])
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


async def test_concurrent_seeded_calls_do_not_disturb_each_other(kind):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([6, 3], seed=9)
    expected = {seed: _hf(model, ids, mask, seed=seed, num_return_sequences=2) for seed in (1, 2, 3)}
    async with split_pipeline(model, kind) as pipeline:
        calls = [pipeline.generate(ids, mask, **SAMPLING, num_return_sequences=2, seed=s) for s in (1, 2, 3)]
        calls += [pipeline.generate(ids, mask, **SAMPLING) for _ in range(2)]  # unseeded ones in between
        got = await asyncio.gather(*calls)
        again = await pipeline.generate(ids, mask, **SAMPLING, num_return_sequences=2, seed=2)
    for seed, tokens in zip((1, 2, 3), got[:3]):
        assert torch.equal(tokens, expected[seed])  # seed=s equals torch.manual_seed(s) before generate
    assert torch.equal(again, expected[2])
    assert not torch.equal(got[3], got[4])  # concurrent unseeded calls draw different numbers


@pytest.mark.parametrize("do_sample", [False, True])
async def test_return_dict_in_generate_gives_sequences_scores_and_logits(do_sample, kind):
    model = tiny_model("gemma", seed=3)
    ids, mask = left_padded_batch([3, 7], seed=4)
    settings = dict(
        max_new_tokens=8, do_sample=do_sample, pad_token_id=0, repetition_penalty=1.3, top_k=20,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )
    if do_sample:
        settings.update(num_return_sequences=2, temperature=0.7)
    torch.manual_seed(3)
    expected = model.generate(input_ids=ids, attention_mask=mask, **settings)
    async with split_pipeline(model, kind) as pipeline:
        torch.manual_seed(3)
        got = await pipeline.generate(ids, mask, **settings)
        plain = await pipeline.generate(ids, mask, **{**settings, "output_scores": False, "output_logits": False})
    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == len(expected.logits) == 8
    for ours, theirs in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # -inf where a processor masked, in both
    assert plain.scores is None and plain.logits is None
