"""Batching across sessions on the server: batched steps equal unbatched ones.

Batches are forced, not timed: a gate item holds the worker thread while every session of
a round queues its message, so the worker then finds them all waiting at once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
import torch

from splitlearn_async import split_model
from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig
from splitlearn_async.server._steps import chunk_bounds
from tests.support.rpc import RawSession, channel, make_case, reference
from tests.support.tiny_models import tiny_model
from tests.support.waiting import wait_until

ATOL = 1e-5  # batched matmuls may differ from batch-1 ones in the last bits


def tiny_trunk(family: str = "llama"):
    return split_model(tiny_model(family), (2, 4), parts=("trunk",)).trunk


@dataclass
class Plan:
    """One session of a schedule: it opens at round ``start`` and closes after ``steps`` steps."""

    start: int
    rows: int
    prompt: int
    steps: int
    seed: int


class Gate:
    """Holds the server's worker thread until :meth:`release`, so that work piles up in its queue."""

    def __init__(self, server: AsyncGRPCComputeServer) -> None:
        self.server = server
        self.started = threading.Event()
        self.opened = threading.Event()
        self.task: asyncio.Task | None = None

    async def hold(self) -> None:
        def wait() -> None:
            self.started.set()
            self.opened.wait(30)

        self.task = asyncio.create_task(self.server.worker.run(wait))
        await wait_until(self.started.is_set)

    async def release(self, queued: int) -> None:
        await wait_until(lambda: self.server.worker.queue_depth >= queued)
        self.opened.set()
        await self.task


async def run_schedule(server, chan, trunk, plans: list[Plan]) -> list[list[torch.Tensor]]:
    """Run the sessions of ``plans`` round by round, each round's messages queued together."""
    cases = [make_case(p.rows, p.prompt, p.steps, trunk.hidden_size, p.seed) for p in plans]
    got: list[list[torch.Tensor]] = [[] for _ in plans]
    sessions: list[RawSession | None] = [None] * len(plans)
    last_round = max(p.start + p.steps for p in plans)
    for rnd in range(last_round + 1):
        sends = []
        for i, (plan, case) in enumerate(zip(plans, cases)):
            k = rnd - plan.start  # message index of this session in this round
            if k < 0 or k > plan.steps:
                continue
            if k == 0:
                sessions[i] = RawSession(chan)
                sends.append((i, sessions[i].open(*case[0])))
            else:
                sends.append((i, sessions[i].step(*case[k])))
        gate = Gate(server)
        await gate.hold()
        tasks = [(i, asyncio.create_task(coro)) for i, coro in sends]
        await gate.release(len(tasks))
        for i, task in tasks:
            got[i].append((await task).hidden_states)
        for i, plan in enumerate(plans):  # sessions whose last step was this round leave
            if rnd - plan.start == plan.steps:
                assert (await sessions[i].close()).closed
    return got


# sessions of different rows and prompt lengths, joining and leaving at different rounds
PLANS = [
    Plan(start=0, rows=1, prompt=5, steps=6, seed=1),
    Plan(start=0, rows=2, prompt=3, steps=3, seed=2),
    Plan(start=1, rows=1, prompt=7, steps=5, seed=3),
    Plan(start=2, rows=3, prompt=4, steps=2, seed=4),
    Plan(start=2, rows=1, prompt=4, steps=6, seed=5),
    Plan(start=5, rows=2, prompt=9, steps=3, seed=6),
]


async def test_batched_sessions_equal_unbatched(family):
    trunk = tiny_trunk(family)
    expected = [reference(trunk, make_case(p.rows, p.prompt, p.steps, trunk.hidden_size, p.seed)) for p in PLANS]
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        got = await run_schedule(server, chan, trunk, PLANS)
        stats = server.worker.stats
        assert server.sessions_open == 0 and server.cache_bytes == 0
    assert stats.largest_batch == 5  # round 3: five sessions decode together
    assert sum(n for size, n in stats.batch_size_counts.items() if size > 1) >= 5
    for g_session, e_session in zip(got, expected):
        assert len(g_session) == len(e_session)
        for g, e in zip(g_session, e_session):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=0, atol=ATOL)


async def test_batching_off_runs_every_step_alone_and_exactly():
    trunk = tiny_trunk("qwen2")
    expected = [reference(trunk, make_case(p.rows, p.prompt, p.steps, trunk.hidden_size, p.seed)) for p in PLANS]
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(batching=False)) as server, \
            channel(server.port) as chan:
        got = await run_schedule(server, chan, trunk, PLANS)
        stats = server.worker.stats
    assert stats.largest_batch == 1
    for g_session, e_session in zip(got, expected):
        assert all(torch.equal(g, e) for g, e in zip(g_session, e_session))


async def test_max_batch_size_caps_a_batch():
    trunk = tiny_trunk()
    plans = [Plan(start=0, rows=1, prompt=3, steps=2, seed=i) for i in range(5)]
    expected = [reference(trunk, make_case(p.rows, p.prompt, p.steps, trunk.hidden_size, p.seed)) for p in plans]
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(max_batch_size=2)) as server, \
            channel(server.port) as chan:
        got = await run_schedule(server, chan, trunk, plans)
        stats = server.worker.stats
    assert stats.largest_batch == 2
    for g_session, e_session in zip(got, expected):
        for g, e in zip(g_session, e_session):
            torch.testing.assert_close(g, e, rtol=0, atol=ATOL)


async def test_sessions_with_different_adapters_share_a_batch():
    trunk = tiny_trunk()
    cases = [make_case(1, 3, 1, trunk.hidden_size, seed=i) for i in range(4)]
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        sessions = [RawSession(chan) for _ in cases]
        for s, case in zip(sessions, cases):
            await s.open(*case[0])
        for i, session in enumerate(server.store.sessions()):
            session.adapter_id = "a" if i % 2 else "b"  # each row gets its own (tests/training/test_mixed_adapters.py)
        before = server.worker.stats.batch_size_counts
        gate = Gate(server)
        await gate.hold()
        tasks = [asyncio.create_task(s.step(*case[1])) for s, case in zip(sessions, cases)]
        await gate.release(len(tasks))
        await asyncio.gather(*tasks)
        after = server.worker.stats.batch_size_counts
        for s in sessions:
            await s.close()
    new = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert new.get(4) == 1 and not any(n for size, n in new.items() if size != 4)  # one batch of all four


async def test_long_prefill_is_chunked_and_decode_steps_run_between_chunks():
    trunk = tiny_trunk("gemma3")
    config = ServerConfig(prefill_chunk_tokens=4)
    long_case = make_case(2, 18, 2, trunk.hidden_size, seed=11)  # 18 tokens: chunks 4+4+4+4+2
    short_case = make_case(1, 3, 6, trunk.hidden_size, seed=12)
    expected_long, expected_short = reference(trunk, long_case), reference(trunk, short_case)
    async with AsyncGRPCComputeServer(trunk, config=config) as server, channel(server.port) as chan:
        calls: list[tuple[int, ...]] = []  # new tokens of each session in each trunk call
        compute = server.inference.compute_batch

        def recording(trunk, works, metrics):
            calls.append(tuple(int(w.hidden.shape[1]) for w in works))
            return compute(trunk, works, metrics)

        server.inference.compute_batch = recording
        short = RawSession(chan)
        got_short = [(await short.open(*short_case[0])).hidden_states]
        long = RawSession(chan)
        gate = Gate(server)
        await gate.hold()
        opening = asyncio.create_task(long.open(*long_case[0]))
        first_step = asyncio.create_task(short.step(*short_case[1]))
        await gate.release(2)

        async def decode_rest():
            got_short.append((await first_step).hidden_states)
            for msg in short_case[2:]:
                got_short.append((await short.step(*msg)).hidden_states)

        got_long_open, _ = await asyncio.gather(opening, decode_rest())
        got_long = [got_long_open.hidden_states] + [(await long.step(*m)).hidden_states for m in long_case[1:]]
        await short.close()
        await long.close()
    chunk_calls = [i for i, c in enumerate(calls) if c in ((4,), (2,))]
    assert len(chunk_calls) == 5
    decode_between = [i for i, c in enumerate(calls) if c == (1,) and chunk_calls[0] < i < chunk_calls[-1]]
    assert decode_between  # the short session's decode steps did not wait for the whole prompt
    for g, e in zip(got_long + got_short, expected_long + expected_short):
        torch.testing.assert_close(g, e, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("length", "chunk", "bounds"), [
    (5, None, [(0, 5)]),
    (5, 8, [(0, 5)]),
    (8, 8, [(0, 8)]),
    (9, 4, [(0, 4), (4, 8), (8, 9)]),
    (1, 1, [(0, 1)]),
])
def testchunk_bounds(length, chunk, bounds):
    assert chunk_bounds(length, chunk) == bounds
