"""Sessions: budget, limits, TTL expiry, freeing memory on close/cancel, bad input beside good clients."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitlearn_async import protocol as proto
from splitlearn_async.errors import ConfigError
from splitlearn_async.server import (
    AsyncGRPCComputeServer,
    ServerConfig,
    SessionStore,
    SessionTooLong,
    StoreFull,
)
from splitlearn_async.wire import encode_tensor, pack
from tests.support.rpc import RawSession, channel, make_case, reference, run_session
from tests.support.waiting import wait_until

H = 64


def good(batch=1, prompt=3, steps=0, seed=0):
    return make_case(batch=batch, prompt=prompt, steps=steps, hidden_size=H, seed=seed)


async def expect_status(coro, code):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    assert details and details.endswith("."), details
    return details


# --- SessionStore without tensors ----------------------------------------------------------

def test_store_budget_and_limits():
    now = [0.0]
    store = SessionStore(max_sessions=2, max_tokens_total=100, max_session_tokens=60, session_ttl_s=10, clock=lambda: now[0])
    a = store.open(rows=2, columns=20)
    assert store.tokens_used == 40
    with pytest.raises(SessionTooLong, match="max_session_tokens"):
        store.extend(a, 11)
    b = store.open(rows=1, columns=50)
    with pytest.raises(StoreFull, match="max_sessions is 2"):
        store.open(rows=1, columns=1)
    with pytest.raises(StoreFull, match="token budget of 100"):
        store.extend(a, 6)  # 52 tokens fit the session, 102 do not fit the budget
    store.close(b)
    store.close(b)
    assert store.tokens_used == 40 and store.sessions_open == 1
    now[0] = 5.0
    store.touch(a)
    now[0] = 14.0
    assert store.expire_idle() == []
    now[0] = 15.5
    assert store.expire_idle() == [a] and a.expired
    assert store.sessions_open == 0 and store.tokens_used == 0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_sessions": 0}, "max_sessions"),
    ({"max_session_tokens": 10, "max_tokens_total": 5}, "max_session_tokens=10"),
    ({"session_ttl_s": 0}, "session_ttl_s"),
    ({"max_message_bytes": 2**31}, "2 GiB"),
    ({"wire_dtype": "int8"}, "wire_dtype='int8'"),
    ({"tls_cert_file": "x.pem"}, "together"),
    ({"metrics_port": 70000}, "metrics_port"),
    ({"max_batch_delay_s": -1}, "max_batch_delay_s"),
    ({"auth_token": ""}, "auth_token"),
])
def test_config_validation(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ServerConfig(**kwargs)


# --- over gRPC -------------------------------------------------------------------------------

async def test_budget_gives_resource_exhausted_at_once(trunk):
    config = ServerConfig(max_tokens_total=10, max_session_tokens=8, max_sessions=3)
    async with AsyncGRPCComputeServer(trunk, config=config) as server, channel(server.port) as chan:
        a = RawSession(chan)
        await a.open(*good(batch=2, prompt=3)[0])  # 6 tokens
        details = await expect_status(RawSession(chan).open(*good(batch=1, prompt=5)[0]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "token budget" in details
        details = await expect_status(RawSession(chan).open(*good(batch=3, prompt=3)[0]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_session_tokens" in details
        case = good(batch=2, prompt=3, steps=2)
        await a.step(*case[1])  # 8 tokens
        await expect_status(a.step(*case[2]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        await wait_until(lambda: server.sessions_open == 0)
        assert server.store.tokens_used == 0


async def test_max_sessions(trunk):
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(max_sessions=2)) as server, channel(server.port) as chan:
        held = [RawSession(chan), RawSession(chan)]
        for s in held:
            await s.open(*good()[0])
        details = await expect_status(RawSession(chan).open(*good()[0]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_sessions is 2" in details
        await held[0].close()
        await RawSession(chan).open(*good()[0])  # room again


async def test_closed_and_cancelled_streams_free_memory(trunk):
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        case = good(batch=2, prompt=5, steps=2)
        sessions = [RawSession(chan) for _ in range(4)]
        for s in sessions:
            await s.open(*case[0])
            await s.step(*case[1])
        assert server.sessions_open == 4 and server.cache_bytes > 0
        await sessions[0].close()
        sessions[1].cancel()
        await sessions[2].call.done_writing()  # client half-closes without "close"
        await wait_until(lambda: server.sessions_open == 1)
        sessions[3].cancel()
        await wait_until(lambda: server.sessions_open == 0)
        assert server.cache_bytes == 0 and server.store.tokens_used == 0


async def test_idle_session_expires(trunk):
    config = ServerConfig(session_ttl_s=0.2, sweep_interval_s=0.05)
    async with AsyncGRPCComputeServer(trunk, config=config) as server, channel(server.port) as chan:
        case = good(steps=1)
        s = RawSession(chan)
        await s.open(*case[0])
        await wait_until(lambda: server.sessions_open == 0)
        assert server.cache_bytes == 0
        details = await expect_status(s.step(*case[1]), grpc.StatusCode.NOT_FOUND)
        assert "expired" in details


def _frame_bytes(h, m, p, kind="step"):
    return pack({"kind": kind, "hidden_states": encode_tensor(h), "attention_mask": encode_tensor(m), "position_ids": encode_tensor(p)})


BAD_OPENS = {
    "garbage": lambda h, m, p: b"\xc1\xff not msgpack",
    "not a map": lambda h, m, p: pack({"kind": "open"})[:-1] + b"",
    "nan": lambda h, m, p: _frame_bytes(torch.full_like(h, float("nan")), m, p, "open"),
    "wrong hidden size": lambda h, m, p: _frame_bytes(torch.zeros(1, 3, H + 1), m, p, "open"),
    "wrong dtype": lambda h, m, p: _frame_bytes(h.to(torch.int64), m, p, "open"),
    "short data": lambda h, m, p: pack({"kind": "open", "hidden_states": {"dtype": "float32", "shape": [1, 3, H], "data": b"\0" * 10},
                                        "attention_mask": encode_tensor(m), "position_ids": encode_tensor(p)}),
    "step before open": lambda h, m, p: _frame_bytes(h, m, p, "step"),
    "close before open": lambda h, m, p: pack({"kind": "close"}),
    "mask rows": lambda h, m, p: _frame_bytes(h, torch.ones(2, 3, dtype=torch.long), p, "open"),
    "negative positions": lambda h, m, p: _frame_bytes(h, m, -p - 1, "open"),
    "result kind": lambda h, m, p: pack({"kind": "result"}),
}


@pytest.mark.parametrize("name", sorted(BAD_OPENS))
async def test_bad_first_message_is_invalid_argument(trunk, name):
    h, m, p = good()[0]
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        await expect_status(RawSession(chan).send(BAD_OPENS[name](h, m, p)), grpc.StatusCode.INVALID_ARGUMENT)
        await wait_until(lambda: server.sessions_open == 0)


async def test_bad_step_and_message_after_close(trunk):
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:
        case = good(batch=2, prompt=3, steps=1)
        s = RawSession(chan)
        await s.open(*case[0])
        h, m, p = case[1]
        details = await expect_status(s.step(h[:1], m[:1], p[:1]), grpc.StatusCode.INVALID_ARGUMENT)
        assert "2 rows" in details
        s2 = RawSession(chan)
        await s2.open(*case[0])
        await expect_status(s2.send(proto.build_open(*case[0])), grpc.StatusCode.INVALID_ARGUMENT)
        s3 = RawSession(chan)
        await s3.open(*case[0])
        await s3.send(proto.build_close())
        with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
            await s3.send(proto.build_step(*case[1]))
        await wait_until(lambda: server.sessions_open == 0)


async def _misbehave(chan, seed):
    g = torch.Generator().manual_seed(seed)
    h, m, p = good()[0]
    bads = list(BAD_OPENS.values())
    for i in range(6):
        s = RawSession(chan)
        try:
            if i % 2:
                await s.open(h, m, p)
            await s.send(bads[int(torch.randint(len(bads), (1,), generator=g))](h, m, p))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            s.cancel()


async def test_misbehaving_client_beside_good_ones(trunk):
    cases = [good(batch=2, prompt=4, steps=4, seed=10 + i) for i in range(6)]
    expected = [reference(trunk, c) for c in cases]
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan, channel(server.port) as bad_chan:
        results = await asyncio.gather(*(run_session(chan, c) for c in cases), *(_misbehave(bad_chan, i) for i in range(3)))
        await wait_until(lambda: server.sessions_open == 0)
    for got, exp in zip(results[: len(cases)], expected):  # batched with each other: within 1e-5
        for g, e in zip(got, exp):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


_frames = st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "float16", "int64", "bool", "complex", 3]),
    "shape": st.lists(st.integers(0, 70), max_size=4),
    "data": st.binary(max_size=64),
})
_messages = st.one_of(
    st.binary(max_size=200),
    st.builds(pack, st.fixed_dictionaries(
        {"kind": st.sampled_from(["open", "step", "close", "forward", "result", "nope", 1])},
        optional={"hidden_states": _frames, "attention_mask": _frames, "position_ids": _frames, "session_id": st.text(max_size=5)},
    )),
)


async def test_random_messages_always_end_cleanly(trunk):
    h, m, p = good()[0]
    async with AsyncGRPCComputeServer(trunk) as server, channel(server.port) as chan:

        # hypothesis drives sync functions: collect its examples, then send them on this loop
        examples = []

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(open_first=st.booleans(), bodies=st.lists(_messages, min_size=1, max_size=3))
        def collect(open_first, bodies):
            examples.append((open_first, bodies))

        collect()
        for open_first, bodies in examples:
            s = RawSession(chan)
            try:
                if open_first:
                    await s.open(h, m, p)
                for body in bodies:
                    reply = await s.send(body)
                    if proto.parse_result(reply).closed:
                        break  # the server ended the stream with OK: a client sends nothing more
                s.cancel()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # the stream's own status, not a client-side write error after the server
                # ended the stream (OK after a "close")
                final = await s.call.code()
                assert final in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED), await s.call.details()
        await wait_until(lambda: server.sessions_open == 0)
        assert server.cache_bytes == 0
        # the server still serves good clients exactly
        case = good(batch=2, steps=2, seed=99)
        got = await run_session(chan, case)
        assert all(torch.equal(g, e) for g, e in zip(got, reference(trunk, case)))
