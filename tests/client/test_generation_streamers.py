"""``generate(streamer=...)`` feeds transformers' streamers, or anything with put/end, exactly
as ``model.generate`` feeds them; over LocalTrunk and a server."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer

from tests.support.generation import TRUNK_KINDS, char_tokenizer, split_pipeline
from tests.support.tiny_models import left_padded_batch, tiny_model


@pytest.fixture(params=TRUNK_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The trunk in-process (LocalTrunk) or on a server (RemoteTrunk)."""
    return str(request.param)


class Recorder:
    """A streamer that is no transformers class: it records what it is given."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


async def test_put_and_end_are_called_as_generate_calls_them(kind):
    model = tiny_model("gpt2")
    ids, mask = left_padded_batch([3, 6], seed=2)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    settings = dict(max_new_tokens=10, pad_token_id=0, eos_token_id=int(free[0, ids.shape[1] + 3]))
    theirs, ours = Recorder(), Recorder()
    model.generate(input_ids=ids, attention_mask=mask, streamer=theirs, **settings)
    async with split_pipeline(model, kind) as pipeline:
        await pipeline.generate(ids, mask, streamer=ours, **settings)
    assert ours.ended == theirs.ended == 1
    assert len(ours.puts) == len(theirs.puts)  # the prompt, then one (B,) tensor per step
    for a, b in zip(ours.puts, theirs.puts):
        assert torch.equal(a, b)


async def test_text_streamer_prints_what_it_prints_under_generate(kind, capsys):
    model = tiny_model("llama", seed=2)
    tokenizer = char_tokenizer()
    ids, mask = left_padded_batch([7], seed=5)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, streamer=TextStreamer(tokenizer))
    theirs = capsys.readouterr().out
    async with split_pipeline(model, kind, tokenizer=tokenizer) as pipeline:
        await pipeline.generate(ids, mask, max_new_tokens=12, streamer=TextStreamer(tokenizer))
    ours = capsys.readouterr().out
    assert ours == theirs and len(theirs.strip()) >= 12


async def test_text_iterator_streamer_is_read_while_generating(kind):
    model = tiny_model("qwen2", seed=2)
    tokenizer = char_tokenizer()
    ids, mask = left_padded_batch([5], seed=6)
    theirs = TextIteratorStreamer(tokenizer, skip_prompt=True)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, streamer=theirs)
    expected = "".join(theirs)
    ours = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)  # a hang guard, not a timing check
    async with split_pipeline(model, kind) as pipeline:
        reader = asyncio.create_task(asyncio.to_thread(lambda: "".join(ours)))
        await pipeline.generate(ids, mask, max_new_tokens=12, streamer=ours)
        text = await reader
    assert text == expected and len(text) >= 10


async def test_stream_feeds_a_streamer_too_and_a_cancelled_call_ends_it(kind):
    model = tiny_model("gemma3")
    ids, mask = left_padded_batch([4], seed=1)
    recorder = Recorder()
    async with split_pipeline(model, kind) as pipeline:
        chunks = [c.tokens async for c in pipeline.stream(ids, mask, max_new_tokens=5, streamer=recorder)]
        assert recorder.ended == 1 and torch.equal(torch.stack(recorder.puts[1:]), torch.stack(chunks))
        cancelled = Recorder()
        task = asyncio.create_task(pipeline.generate(ids, mask, max_new_tokens=100, streamer=cancelled))
        while len(cancelled.puts) < 3 and not task.done():
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cancelled.ended == 1  # a reader of the streamer is never left waiting
