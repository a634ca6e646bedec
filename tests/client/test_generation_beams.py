"""Beam search equals ``model.generate`` token for token: ``length_penalty``, ``early_stopping``,
``num_return_sequences``, beam sampling after the same seed, and ``return_dict_in_generate``
(``sequences_scores`` and ``beam_indices``); concurrent calls batch; streamers are refused as
``generate`` refuses them; the server's token budget counts the beams' rows. Over LocalTrunk and
a server, on left-padded batches of every family."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import TextStreamer
from transformers.generation import GenerateBeamDecoderOnlyOutput

from splitlearn_async import ConfigError, RemoteTrunk, SplitPipeline, StageWorker, TrunkBusy, split_model
from tests.support.generation import TRUNK_KINDS, char_tokenizer, split_pipeline
from tests.support.rpc import served
from tests.support.tiny_models import left_padded_batch, tiny_model

BEAMS = dict(max_new_tokens=9, num_beams=3, pad_token_id=0)


@pytest.fixture(params=TRUNK_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The trunk in-process (LocalTrunk) or on a server (RemoteTrunk)."""
    return str(request.param)


def _hf(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, **{**BEAMS, **kwargs})


def _emitted_eos(model, ids, mask) -> list[int]:
    """Two tokens the beams really emit early, to serve as eos (the tiny models' own eos is rare)."""
    free = _hf(model, ids, mask, eos_token_id=None)
    prompt = ids.shape[1]
    return [int(free[0, prompt + 2]), int(free[1, prompt + 4])]


async def test_beam_search_equals_generate(family, kind):
    model = tiny_model(family)
    ids, mask = left_padded_batch([5, 2, 8], seed=3)
    eos = model.generation_config.eos_token_id = _emitted_eos(model, ids, mask)  # beams finish at different steps
    settings = dict(num_beams=4, num_return_sequences=2, length_penalty=0.7)
    scored = dict(return_dict_in_generate=True, output_scores=True)
    expected = _hf(model, ids, mask, **settings, **scored)
    greedy = _hf(model, ids, mask, num_beams=1, num_return_sequences=1)
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, **{**BEAMS, **settings, **scored})
        tokens = await pipeline.generate(ids, mask, **{**BEAMS, **settings})
    assert got.sequences.shape == expected.sequences.shape and got.sequences.shape[0] == 6
    assert torch.equal(got.sequences, expected.sequences) and torch.equal(tokens, expected.sequences)
    # the scores see every reordered cache: a row that attended to another beam's past would move them
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-5)
    assert torch.equal(got.beam_indices, expected.beam_indices)
    assert not torch.equal(tokens[::2, : greedy.shape[1]], greedy[:, : tokens.shape[1]])  # beams found other sequences
    assert torch.isin(tokens[:, ids.shape[1] : -1], torch.tensor(eos)).any()  # some hypotheses ended early


@pytest.mark.parametrize(
    "settings",
    [
        dict(length_penalty=2.0),
        dict(length_penalty=-1.5, early_stopping="never"),
        dict(early_stopping=True, num_beams=5, num_return_sequences=5),
        dict(length_penalty=0.0, early_stopping="never", num_beams=2),
    ],
    ids=["long", "short-never", "early", "canonical"],
)
async def test_length_penalty_and_early_stopping_as_generate(settings, kind):
    model = tiny_model("qwen2", seed=2)
    ids, mask = left_padded_batch([4, 7], seed=6)
    model.generation_config.eos_token_id = _emitted_eos(model, ids, mask)
    expected = _hf(model, ids, mask, **settings)
    defaults = _hf(model, ids, mask, **{k: v for k, v in settings.items() if k in ("num_beams", "num_return_sequences")})
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, **{**BEAMS, **settings})
    assert defaults.shape != expected.shape or not torch.equal(defaults, expected)  # the settings change the answer
    assert torch.equal(got, expected)


async def test_return_dict_gives_sequences_scores_and_beam_indices(kind):
    model = tiny_model("gemma", seed=3)
    ids, mask = left_padded_batch([3, 7], seed=4)
    model.generation_config.eos_token_id = _emitted_eos(model, ids, mask)
    settings = dict(
        num_beams=3, num_return_sequences=2, repetition_penalty=1.3, length_penalty=1.5,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )
    expected = _hf(model, ids, mask, **settings)
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, **{**BEAMS, **settings})
        plain = await pipeline.generate(ids, mask, **{**BEAMS, **settings, "output_scores": False, "output_logits": False})
    assert isinstance(got, GenerateBeamDecoderOnlyOutput)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-5)
    assert got.beam_indices.dtype == expected.beam_indices.dtype and torch.equal(got.beam_indices, expected.beam_indices)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == len(expected.logits)
    for ours, theirs in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # -inf where a processor masked, in both
    assert plain.sequences_scores is None and plain.scores is None and torch.equal(plain.beam_indices, got.beam_indices)


async def test_beam_sampling_equals_generate_after_the_same_seed(kind):
    model = tiny_model("llama", seed=1)
    ids, mask = left_padded_batch([6, 3], seed=9)
    settings = dict(num_beams=3, do_sample=True, temperature=0.9, top_k=40, num_return_sequences=2)
    torch.manual_seed(21)
    expected = _hf(model, ids, mask, **settings)
    after_hf = torch.rand(4)
    async with split_pipeline(model, kind) as pipeline:
        torch.manual_seed(21)
        got = await pipeline.generate(ids, mask, **{**BEAMS, **settings})
        after_ours = torch.rand(4)
        seeded = await pipeline.generate(ids, mask, **{**BEAMS, **settings}, seed=21)
    assert not torch.equal(expected, _hf(model, ids, mask, num_return_sequences=2))  # sampling changed the beams
    assert torch.equal(got, expected) and torch.equal(seeded, expected)
    assert torch.equal(after_ours, after_hf)


async def test_concurrent_beam_and_greedy_calls_batch_on_client_and_server():
    model = tiny_model("gpt2", seed=4)
    ids, mask = left_padded_batch([5, 2, 6], seed=7)
    variants = [dict(num_beams=2), dict(num_beams=4, num_return_sequences=3), dict(num_beams=1), dict(num_beams=3)]
    expected = [_hf(model, ids, mask, **v) for v in variants]
    bottom, trunk, top = split_model(model, (2, 4))
    worker = StageWorker("client-test")
    async with served(trunk) as server, worker, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitPipeline(bottom, remote, top, worker=worker) as pipeline:
            got = await asyncio.gather(*(pipeline.generate(ids, mask, **{**BEAMS, **v}) for v in variants))
        client, trunk_side = worker.stats, server.worker.stats
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    # every call's steps meet on both workers: the reorders ride inside the batched items
    assert client.largest_batch > 1 and trunk_side.largest_batch > 1


async def test_a_streamer_or_stream_with_beams_is_refused_as_generate_refuses_it():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([4], seed=1)
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="streamer. cannot be used with beam search"):
        _hf(model, ids, mask, streamer=TextStreamer(tokenizer))
    async with split_pipeline(model, "local", tokenizer=tokenizer) as pipeline:
        with pytest.raises(ConfigError, match=r"a streamer cannot be used with beam search \(num_beams=3\)"):
            await pipeline.generate(ids, mask, **BEAMS, streamer=TextStreamer(tokenizer))
        with pytest.raises(ConfigError, match=r"SplitPipeline.stream\(\) cannot be used with beam search"):
            async for _ in pipeline.stream(ids, mask, **BEAMS):
                pass
        assert torch.equal(await pipeline.generate(ids, mask, **BEAMS), _hf(model, ids, mask))  # the pipeline goes on


@pytest.mark.parametrize("spare", [0, -1])
async def test_the_server_s_token_budget_counts_every_beam_row(spare):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([5, 3], seed=2)
    settings = dict(num_beams=3, eos_token_id=None)  # no eos: the search runs its 9 tokens
    rows, columns = ids.shape[0] * 3, ids.shape[1] + BEAMS["max_new_tokens"] - 1  # the trunk never sees the last token
    bottom, trunk, top = split_model(model, (2, 4))
    async with served(trunk, max_session_tokens=rows * columns + spare) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote, SplitPipeline(bottom, remote, top) as pipeline:
            if spare < 0:
                with pytest.raises(TrunkBusy, match="max_session_tokens"):
                    await pipeline.generate(ids, mask, **{**BEAMS, **settings})
            else:
                assert torch.equal(await pipeline.generate(ids, mask, **{**BEAMS, **settings}), _hf(model, ids, mask, **settings))
