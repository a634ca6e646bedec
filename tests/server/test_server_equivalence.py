"""Trunk results over gRPC equal the trunk run in-process, exactly, for every family."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from splitlearn_async import split_model
from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig
from tests.support.rpc import RawSession, channel, make_case, reference, run_session
from tests.support.tiny_models import tiny_model


def tiny_trunk(family: str = "llama"):
    return split_model(tiny_model(family), (2, 4), parts=("trunk",)).trunk


async def test_prefill_and_decode_equal_in_process(family):
    trunk = tiny_trunk(family)
    case = make_case(batch=3, prompt=6, steps=8, hidden_size=trunk.hidden_size, seed=1)
    expected = reference(trunk, case)
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        got = await run_session(chan, case)
        assert server.sessions_open == 0
        assert server.cache_bytes == 0
    assert len(got) == len(expected) == 9
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)


async def test_step_lengths_count_cache_columns():
    trunk = tiny_trunk()
    case = make_case(batch=2, prompt=5, steps=3, hidden_size=trunk.hidden_size, seed=2)
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        s = RawSession(chan)
        first = await s.open(*case[0], session_id="abc")
        assert (first.session_id, first.length) == ("abc", 5)
        assert server.sessions_open == 1 and server.cache_bytes > 0
        for i, msg in enumerate(case[1:]):
            r = await s.step(*msg)
            assert r.length == 6 + i
        assert (await s.close()).closed
        assert server.cache_bytes == 0


async def test_forward_is_stateless_and_exact(family):
    from splitlearn_async import protocol as proto
    from tests.support.rpc import unary

    trunk = tiny_trunk(family)
    hidden, mask, positions = make_case(batch=2, prompt=7, steps=0, hidden_size=trunk.hidden_size, seed=3)[0]
    with torch.no_grad():
        expected = trunk(hidden, mask, positions)
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        for _ in range(2):
            body = await unary(chan, proto.METHOD_FORWARD, proto.build_forward(hidden, mask, positions))
            assert torch.equal(proto.parse_result(body).hidden_states, expected)
        assert server.sessions_open == 0


async def test_64_parallel_sessions_equal_sequential():
    # exact with batching off; batched steps differ in the last bits (tests/server/test_batching.py)
    trunk = tiny_trunk("qwen2")
    cases = [make_case(batch=1 + i % 3, prompt=3 + i % 4, steps=4, hidden_size=trunk.hidden_size, seed=100 + i) for i in range(64)]
    expected = [reference(trunk, c) for c in cases]
    config = ServerConfig(batching=False)
    async with AsyncGRPCComputeServer(trunk, config=config) as server, channel(server.port) as chan:
        sequential = [await run_session(chan, c) for c in cases]
        parallel = await asyncio.gather(*(run_session(chan, c) for c in cases))
        assert server.sessions_open == 0
    for seq, par, exp in zip(sequential, parallel, expected):
        for s, p, e in zip(seq, par, exp):
            assert torch.equal(s, p) and torch.equal(p, e)


async def test_thread_count_does_not_grow_with_sessions():
    trunk = tiny_trunk()
    case = make_case(batch=1, prompt=2, steps=0, hidden_size=trunk.hidden_size, seed=5)[0]
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        first = RawSession(chan)
        await first.open(*case)
        threads_at_1 = threading.active_count()
        others = [RawSession(chan) for _ in range(255)]
        await asyncio.gather(*(s.open(*case) for s in others))
        assert server.sessions_open == 256
        threads_at_256 = threading.active_count()
        await asyncio.gather(*(s.close() for s in [first, *others]))
        assert server.sessions_open == 0 and server.cache_bytes == 0
    assert threads_at_256 == threads_at_1


async def test_wire_dtype_float16_round_trip():
    trunk = tiny_trunk()
    case = make_case(batch=2, prompt=4, steps=2, hidden_size=trunk.hidden_size, seed=6)
    expected = reference(trunk, [(h.half().float(), m, p) for h, m, p in case])
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        got = await run_session(chan, case, wire_dtype=torch.float16)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float16
        assert torch.equal(g, e.half())


async def test_config_wire_dtype_forces_reply_dtype():
    trunk = tiny_trunk()
    case = make_case(batch=1, prompt=3, steps=1, hidden_size=trunk.hidden_size, seed=7)
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(wire_dtype="bfloat16")) as server, channel(server.port) as chan:
        got = await run_session(chan, case)
    assert all(g.dtype == torch.bfloat16 for g in got)


@pytest.mark.parametrize("grace", [0.0, 1.0])
async def test_stop_leaves_no_worker_thread(grace):
    trunk = tiny_trunk()
    server = AsyncGRPCComputeServer(trunk)
    await server.start()
    worker_thread = server.worker.thread
    assert worker_thread is not None and worker_thread.is_alive()
    await server.stop(grace)
    assert not worker_thread.is_alive()
    await server.stop(grace)  # harmless
