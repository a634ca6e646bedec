"""The ``step`` message's ``beam_idx``: the server reorders the session's cache before the step,
exactly as the trunk does in-process; a bad ``beam_idx`` is refused with a sentence; a step's
reorder happens once, also when its batch fails and its works run again one by one."""

from __future__ import annotations

import grpc
import pytest
import torch

from splitlearn_async import ConfigError, LocalTrunk, split_model
from splitlearn_async import protocol as proto
from splitlearn_async.server import _steps
from splitlearn_async.server._metrics import NullMetrics
from splitlearn_async.wire import Kind, encode_tensor
from tests.support.rpc import RawSession, channel, make_case, served
from tests.support.tiny_models import tiny_model

REORDERS = [torch.tensor([2, 2, 0]), torch.tensor([1, 0, 1]), torch.tensor([0, 1, 2]), torch.tensor([2, 2, 2])]


def tiny_trunk(family: str = "llama"):
    return split_model(tiny_model(family), (2, 4), parts=("trunk",)).trunk


def _beam_reference(trunk, case) -> list[torch.Tensor]:
    """The trunk in-process with its own cache, reordered by ``REORDERS`` before each step."""
    cache = trunk.new_cache(case[0][0].shape[0])
    with torch.no_grad():
        outs = [trunk(*case[0], cache=cache)]
        for msg, beam_idx in zip(case[1:], REORDERS, strict=True):
            cache.reorder(beam_idx)
            outs.append(trunk(*msg, cache=cache))
    return outs


async def test_steps_with_beam_idx_equal_the_trunk_reordered_in_process(family):
    trunk = tiny_trunk(family)
    case = make_case(batch=3, prompt=6, steps=len(REORDERS), hidden_size=trunk.hidden_size, seed=1)
    expected = _beam_reference(trunk, case)
    async with served(trunk) as server, channel(server.port) as chan:
        session = RawSession(chan)
        got = [(await session.open(*case[0])).hidden_states]
        for msg, beam_idx in zip(case[1:], REORDERS, strict=True):
            got.append((await session.step(*msg, beam_idx=beam_idx)).hidden_states)
        assert (await session.close()).closed
        assert server.cache_bytes == 0  # a reorder neither leaks nor double-frees slots
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    assert not torch.equal(got[-1], _beam_reference_without_reorders(trunk, case))  # the reorders mattered


def _beam_reference_without_reorders(trunk, case) -> torch.Tensor:
    cache = trunk.new_cache(case[0][0].shape[0])
    with torch.no_grad():
        return [trunk(*msg, cache=cache) for msg in case][-1]


async def test_a_local_trunk_session_reorders_as_the_server_does():
    trunk = tiny_trunk("gemma3")
    case = make_case(batch=3, prompt=6, steps=len(REORDERS), hidden_size=trunk.hidden_size, seed=2)
    expected = _beam_reference(trunk, case)
    async with LocalTrunk(trunk) as local:
        async with await local.open_session() as session:
            with pytest.raises(ConfigError, match="the prompt .* cannot carry it"):
                await session.forward(*case[0], beam_idx=torch.tensor([0, 1, 2]))
            got = [await session.forward(*case[0])]
            for msg, beam_idx in zip(case[1:], REORDERS, strict=True):
                got.append(await session.forward(*msg, beam_idx=beam_idx))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def _step_body(msg: tuple[torch.Tensor, ...], beam_idx: object) -> bytes:
    return proto.inputs_message(Kind.STEP, *msg, None, {"beam_idx": beam_idx})


@pytest.mark.parametrize(
    "beam_idx, words",
    [
        (encode_tensor(torch.tensor([0, 1, 2], dtype=torch.int32)), "beam_idx has dtype int32"),
        (encode_tensor(torch.tensor([0, 1])), "beam_idx has shape [2]"),
        (encode_tensor(torch.tensor([[0, 1, 2]])), "beam_idx has shape [1, 3]"),
        (encode_tensor(torch.tensor([0, 3, 1])), r"each must be a row of the session's cache, in [0, 3)"),
        (encode_tensor(torch.tensor([-1, 0, 1])), "values from -1 to 1"),
        ([0, 1, 2], "beam_idx"),
    ],
    ids=["int32", "short", "rank-2", "too-large", "negative", "not-a-frame"],
)
async def test_a_bad_beam_idx_is_refused_with_a_sentence(beam_idx, words):
    trunk = tiny_trunk()
    case = make_case(batch=3, prompt=4, steps=1, hidden_size=trunk.hidden_size, seed=3)
    async with served(trunk) as server, channel(server.port) as chan:
        session = RawSession(chan)
        await session.open(*case[0])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await session.send(_step_body(case[1], beam_idx))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert words in (info.value.details() or "")
        assert server.sessions_open == 0  # the error ended the stream and freed the session


async def test_beam_idx_belongs_to_steps_only():
    trunk = tiny_trunk()
    hidden, mask, positions = make_case(batch=3, prompt=4, steps=0, hidden_size=trunk.hidden_size, seed=4)[0]
    extra = {"beam_idx": encode_tensor(torch.tensor([0, 1, 2]))}
    async with served(trunk) as server, channel(server.port) as chan:
        session = RawSession(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await session.send(proto.inputs_message(Kind.OPEN, hidden, mask, positions, None, extra))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "beam_idx" in (info.value.details() or "")


def test_a_failed_batch_run_again_alone_reorders_each_cache_once(monkeypatch):
    """The worker runs a failed batch's works again one by one: their reorders must not repeat."""
    trunk = tiny_trunk()
    cases = [make_case(batch=3, prompt=5, steps=1, hidden_size=trunk.hidden_size, seed=s) for s in (5, 6)]
    expected = []
    for case in cases:  # reorder once, then the step
        cache = trunk.new_cache(3)
        with torch.no_grad():
            trunk(*case[0], cache=cache)
            cache.reorder(REORDERS[0])
            expected.append(trunk(*case[1], cache=cache))
    works = []
    for case in cases:
        cache = trunk.new_cache(3)
        with torch.no_grad():
            trunk(*case[0], cache=cache)
        session = type("Session", (), {"session_id": "s", "cache_bytes": 0})()
        works.append(_steps.StepWork(*case[1], session, cache, torch.float32, beam_idx=REORDERS[0]))
    run_batched = _steps.run_stage_batched

    def fails_when_batched(stage, calls, **kw):
        if len(calls) > 1:
            raise RuntimeError("a batch failed")
        return run_batched(stage, calls, **kw)

    monkeypatch.setattr(_steps, "run_stage_batched", fails_when_batched)
    with pytest.raises(RuntimeError, match="a batch failed"):
        _steps.compute_batch(trunk, works, NullMetrics())
    alone = [_steps.compute_batch(trunk, [work], NullMetrics())[0] for work in works]  # as the worker retries
    for body, e in zip(alone, expected, strict=True):
        assert isinstance(body, bytes) and torch.equal(proto.parse_result(body).hidden_states, e)
