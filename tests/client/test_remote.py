"""RemoteTrunk against an in-process AsyncGRPCComputeServer: equivalence, lifecycle, errors, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import grpc
import pytest
import torch

from splitlearn_async import (
    AsyncGRPCComputeServer,
    ClientClosed,
    ClientConfig,
    ConfigError,
    LocalTrunk,
    RemoteTrunk,
    ServerConfig,
    SessionNotFound,
    SplitPipeline,
    TrunkBusy,
    TrunkError,
    TrunkRejected,
    TrunkTimeout,
    TrunkUnavailable,
    Unauthenticated,
    split_model,
)
from splitlearn_async.client._errors import is_retryable, translate_rpc_error
from splitlearn_async.errors import SplitLearnError
from tests.support.rpc import served
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.waiting import wait_until


async def test_remote_generate_equals_model_generate_with_left_padding_and_eos(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch([4, 9, 6], seed=5)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 2])
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    bottom, trunk, top = split_model(model, (2, 4))
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitPipeline(bottom, remote, top) as pipeline:
            got = await pipeline.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
            sampled = [
                await pipeline.generate(ids, mask, max_new_tokens=6, do_sample=True, top_k=10, seed=3) for _ in range(2)
            ]
        assert server.sessions_open == 0
    assert torch.equal(got, expected)
    assert torch.equal(sampled[0], sampled[1])


async def test_remote_stateless_forward_and_info_match_local():
    model = tiny_model("qwen2")
    bottom, trunk, top = split_model(model, (1, 5))
    hidden = torch.randn(2, 7, model.config.hidden_size)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        got = await remote.forward(hidden, mask)
        info = await remote.info()
    async with LocalTrunk(trunk) as local:
        expected = await local.forward(hidden, mask)
    assert torch.equal(got, expected)
    assert info["layer_range"] == [1, 5]
    assert info["hidden_size"] == model.config.hidden_size


async def test_use_after_close_fails_with_a_sentence():
    model = tiny_model("llama")
    _, trunk, _ = split_model(model, (2, 4))
    async with served(trunk) as server:
        remote = RemoteTrunk(f"127.0.0.1:{server.port}")
        session = await remote.open_session()
        await remote.aclose()
        await remote.aclose()  # idempotent
        with pytest.raises(ClientClosed, match=r"^Cannot open a session, as the RemoteTrunk has been closed\.$"):
            await remote.open_session()
        with pytest.raises(ClientClosed, match="has been closed"):
            await session.forward(torch.randn(1, 2, 64), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None])
        with pytest.raises(ClientClosed, match="has been closed"):
            await remote.info()


def test_bad_address_and_config_are_clear():
    with pytest.raises(ConfigError, match="lacks a valid port"):
        RemoteTrunk("localhost")
    with pytest.raises(ConfigError, match="needs an address"):
        RemoteTrunk("")
    with pytest.raises(ConfigError, match="must be a ClientConfig"):
        RemoteTrunk("127.0.0.1:1", config={"step_timeout_s": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="step_timeout_s must be a number > 0"):
        ClientConfig(step_timeout_s=0)
    with pytest.raises(ConfigError, match="max_backoff_s"):
        ClientConfig(initial_backoff_s=3.0, max_backoff_s=1.0)
    with pytest.raises(ConfigError, match="wire_dtype"):
        ClientConfig(wire_dtype="int8")


async def test_server_errors_map_to_the_tree_and_are_never_retried():
    model = tiny_model("gpt2")
    bottom, trunk, top = split_model(model, (2, 4))
    config = ServerConfig(max_session_tokens=16, auth_token="s3cret")
    async with served(trunk, config) as server:
        address = f"127.0.0.1:{server.port}"
        async with RemoteTrunk(address, ClientConfig(auth_token="wrong")) as remote:
            with pytest.raises(Unauthenticated, match="UNAUTHENTICATED: .*wrong bearer token"):
                await remote.info()
        async with RemoteTrunk(address, ClientConfig(auth_token="s3cret")) as remote:
            session = await remote.open_session()
            with pytest.raises(TrunkRejected, match="INVALID_ARGUMENT: .*hidden_states"):  # wrong hidden size
                await session.forward(torch.randn(1, 3, 65), torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None])
            assert session.replays == 0
            session = await remote.open_session()
            with pytest.raises(TrunkBusy, match="RESOURCE_EXHAUSTED"):  # 2 x 9 tokens > 16
                await session.forward(torch.randn(2, 9, 64), torch.ones(2, 9, dtype=torch.long), torch.arange(9).repeat(2, 1))
            await session.aclose()
            # a good session still works on the same channel after those failures
            async with await remote.open_session() as good:
                out = await good.forward(torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None])
            assert out.shape == (1, 3, 64)
        await wait_until(lambda: server.sessions_open == 0)


def test_translation_covers_codes_and_retries_only_unavailable():
    empty = grpc.aio.Metadata()
    cases = {
        grpc.StatusCode.UNAVAILABLE: TrunkUnavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: TrunkTimeout,
        grpc.StatusCode.RESOURCE_EXHAUSTED: TrunkBusy,
        grpc.StatusCode.INVALID_ARGUMENT: TrunkRejected,
        grpc.StatusCode.NOT_FOUND: SessionNotFound,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.INTERNAL: TrunkError,
    }
    for code, cls in cases.items():
        err = translate_rpc_error(grpc.aio.AioRpcError(code, empty, empty, "the reason."), "a test call")
        assert type(err) is cls
        assert isinstance(err, SplitLearnError)
        assert str(err) == f"a test call failed with {code.name}: the reason."
        assert is_retryable(code) == (code is grpc.StatusCode.UNAVAILABLE)


class _SlowTrunk:
    """A trunk proxy whose forward sleeps first: a stand-in for an overloaded server."""

    def __init__(self, trunk, delay_s: float) -> None:
        self._trunk = trunk
        self.delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._trunk, name)

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay_s)  # runs on the server's worker thread
        return self._trunk(*args, **kwargs)


async def test_step_deadline_raises_trunk_timeout_and_frees_the_session():
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([4])
    async with served(_SlowTrunk(trunk, 1.0)) as server:
        config = ClientConfig(step_timeout_s=0.2)
        async with RemoteTrunk(f"127.0.0.1:{server.port}", config) as remote, SplitPipeline(bottom, remote, top) as p:
            with pytest.raises(TrunkTimeout, match=r"step_timeout_s=0\.2 s"):
                await p.generate(ids, mask, max_new_tokens=3)
            with pytest.raises(TrunkTimeout, match="unary|did not finish"):
                await remote.forward(torch.randn(1, 2, 64))
        await wait_until(lambda: server.sessions_open == 0)


async def test_generate_deadline_cancels_and_closes_the_session():
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([4])
    async with served(_SlowTrunk(trunk, 0.05)) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote, SplitPipeline(bottom, remote, top) as p:
            with pytest.raises(TrunkTimeout, match=r"timeout_s=0\.3 s"):
                await p.generate(ids, mask, max_new_tokens=50, timeout_s=0.3)
            await wait_until(lambda: server.sessions_open == 0)
            assert remote.sessions_open == 0


async def test_generate_deadline_during_the_prompt_raises_trunk_timeout():
    # the deadline lands while the session's stream starts (grpc.aio's most delicate moment
    # for cancellation): still our TrunkTimeout, never a bare CancelledError
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([4])
    async with served(_SlowTrunk(trunk, 1.0)) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote, SplitPipeline(bottom, remote, top) as p:
            with pytest.raises(TrunkTimeout, match=r"^generate\(\) ran past its deadline of timeout_s=0\.2 s"):
                await p.generate(ids, mask, max_new_tokens=3, timeout_s=0.2)
            assert remote.sessions_open == 0
        await wait_until(lambda: server.sessions_open == 0)


async def test_a_step_deadline_inside_a_generate_deadline_keeps_its_own_message():
    # TrunkTimeout is a TimeoutError too: generate() must not take it for its own deadline
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([4])
    async with served(_SlowTrunk(trunk, 1.0)) as server:
        config = ClientConfig(step_timeout_s=0.2)
        async with RemoteTrunk(f"127.0.0.1:{server.port}", config) as remote, SplitPipeline(bottom, remote, top) as p:
            with pytest.raises(TrunkTimeout, match=r"got no answer within step_timeout_s=0\.2 s"):
                await p.generate(ids, mask, max_new_tokens=3, timeout_s=60.0)
        await wait_until(lambda: server.sessions_open == 0)


async def test_cancelling_generate_closes_the_server_session():
    model = tiny_model("gemma")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([4, 2])
    async with served(_SlowTrunk(trunk, 0.02)) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote, SplitPipeline(bottom, remote, top) as p:
            task = asyncio.create_task(p.generate(ids, mask, max_new_tokens=200))
            await wait_until(lambda: server.sessions_open == 1)
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: server.sessions_open == 0)
            assert server.cache_bytes == 0


async def test_unreachable_server_gives_trunk_unavailable_after_the_retry_deadline():
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    async with served(trunk) as server:
        port = server.port
    # the server is gone: nothing listens on the port any more
    config = ClientConfig(retry_deadline_s=0.5, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with RemoteTrunk(f"127.0.0.1:{port}", config) as remote, SplitPipeline(bottom, remote, top) as p:
        with pytest.raises(TrunkUnavailable, match=r"stayed unreachable for retry_deadline_s=0\.5 s \((\d+) attempts\)") as info:
            await p.generate(*left_padded_batch([3]), max_new_tokens=2)
        attempts = int(re.search(r"\((\d+) attempts\)", str(info.value)).group(1))  # type: ignore[union-attr]
        assert attempts >= 3  # it did retry, with backoff


async def test_pipeline_refuses_a_trunk_of_other_split_points():
    model = tiny_model("llama")
    bottom, _, top = split_model(model, (2, 4))
    _, other_trunk, _ = split_model(model, (1, 4))
    async with served(other_trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitPipeline(bottom, remote, top) as p:
            with pytest.raises(ConfigError, match=r"the trunk runs layers \[1, 4\) but the bottom ends at layer 2"):
                await p.generate(*left_padded_batch([3]), max_new_tokens=2)
        assert server.sessions_open == 0


async def test_half_precision_wire_keeps_greedy_tokens_on_a_tiny_model():
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([5, 3])
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    async with served(trunk) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}", ClientConfig(wire_dtype="float32")) as remote:
            async with SplitPipeline(bottom, remote, top) as p:
                got = await p.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(got, expected)


@contextlib.asynccontextmanager
async def failing_server(code: grpc.StatusCode):
    """A server whose every Forward call fails with ``code``; yields (port, the bodies it was sent)."""
    calls: list[bytes] = []

    async def forward(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.append(body)
        await context.abort(code, "made to fail.")
        return b""  # pragma: no cover

    from splitlearn_async import protocol as proto

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(forward)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE_NAME, {"Forward": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, calls
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    "code, error",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, TrunkRejected),
        (grpc.StatusCode.NOT_FOUND, SessionNotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, TrunkBusy),
        (grpc.StatusCode.INTERNAL, TrunkError),
    ],
)
async def test_only_unavailable_is_retried(code, error):
    config = ClientConfig(retry_deadline_s=0.5, initial_backoff_s=0.05, max_backoff_s=0.1)
    async with failing_server(code) as (port, calls), RemoteTrunk(f"127.0.0.1:{port}", config) as remote:
        with pytest.raises(error, match="made to fail"):
            await remote.forward(torch.randn(1, 2, 8))
    assert len(calls) == 1  # one call, no retry


async def test_unavailable_is_retried_with_growing_backoff():
    config = ClientConfig(retry_deadline_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.4, backoff_multiplier=2.0)
    async with failing_server(grpc.StatusCode.UNAVAILABLE) as (port, calls), RemoteTrunk(f"127.0.0.1:{port}", config) as remote:
        waits: list[float] = []

        async def recording_sleep(seconds: float) -> None:
            waits.append(seconds)
            await asyncio.sleep(seconds)

        remote._connection.sleep = recording_sleep
        with pytest.raises(TrunkUnavailable, match="made to fail"):
            await remote.forward(torch.randn(1, 2, 8))
    # the waits asked for: 0.05, 0.1, 0.2, 0.4, 0.4 ... each within +-20% jitter, until 1 s would pass
    assert len(calls) == len(waits) + 1 >= 3  # a handful of attempts, each after a wait
    for tries, wait in enumerate(waits):
        base = min(0.05 * 2.0**tries, 0.4)
        assert 0.8 * base <= wait <= 1.2 * base, (tries, wait)


async def test_a_stream_ended_by_a_server_restart_between_steps_is_replayed():
    model = tiny_model("qwen2")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([5, 3], seed=4)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    server = AsyncGRPCComputeServer(trunk, "127.0.0.1", 0)
    await server.start()
    port = server.port
    config = ClientConfig(retry_deadline_s=30.0, initial_backoff_s=0.05, max_backoff_s=0.2)
    try:
        async with RemoteTrunk(f"127.0.0.1:{port}", config) as remote, SplitPipeline(bottom, remote, top) as pipeline:
            steps = []
            async for chunk in pipeline.stream(ids, mask, max_new_tokens=8, pad_token_id=0):
                steps.append(chunk.tokens[:, None])
                if len(steps) == 3:  # a graceful stop ends the open stream; a new server takes the port
                    await server.stop(grace=0)
                    server = AsyncGRPCComputeServer(trunk, "127.0.0.1", port)
                    await server.start()
            assert remote.replays == 1
        assert torch.equal(torch.cat([ids, *steps], dim=1), expected)
    finally:
        await server.stop(grace=0)


async def test_each_streamed_token_says_where_its_time_went_and_what_crossed_the_wire():
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([5])
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitPipeline(bottom, remote, top) as pipeline:
            chunks = [c async for c in pipeline.stream(ids, mask, max_new_tokens=4, pad_token_id=0)]
    hidden = model.config.hidden_size
    assert len(chunks) == 4
    for i, chunk in enumerate(chunks):
        t = chunk.timings
        assert t is not None and t.bottom_s > 0 and t.trunk_s > 0 and t.top_s > 0
        tokens = 5 if i == 0 else 1  # the prompt, then one token a step, fp32 on the wire both ways
        assert t.bytes_sent > tokens * hidden * 4 and t.bytes_received > tokens * hidden * 4
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top) as pipeline:
        chunk = [c async for c in pipeline.stream(ids, mask, max_new_tokens=1, pad_token_id=0)][0]
    assert chunk.timings is not None and chunk.timings.bytes_sent == 0
