"""Replicas of one trunk behind gRPC's round robin: spread, failover by replay, drain on SIGTERM.

Three ``splitlearn serve`` processes on loopback serve the same tiny bundle; one
``RemoteTrunk`` is given the list of their addresses.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearn_async import ClientConfig, ConfigError, RemoteTrunk, SplitPipeline, save_stages, split_model
from splitlearn_async import protocol as proto
from splitlearn_async.client._connection import check_address
from splitlearn_async.server import ServerProcess
from tests.support.rpc import channel, unary
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

SPLIT = (2, 4)


@pytest.fixture(scope="module")
def model_and_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = tiny_model("llama", num_layers=6)
    bundle = tmp_path_factory.mktemp("replicas") / "bundle"
    save_stages(split_model(model, SPLIT), bundle)
    return model, bundle


@pytest.fixture
def replicas(model_and_bundle) -> Iterator[list[ServerProcess]]:
    _, bundle = model_and_bundle
    servers = [ServerProcess(bundle, extra_args=["--torch-threads", "1", "--drain-s", "20"]) for _ in range(3)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.close()


async def _info(port: int) -> dict:
    async with channel(port) as chan:
        return proto.parse_info(await unary(chan, proto.METHOD_INFO, proto.build_info_request()))


def _addresses(servers: list[ServerProcess]) -> list[str]:
    return [f"127.0.0.1:{s.port}" for s in servers]


def test_a_list_of_addresses_becomes_one_balanced_target():
    assert check_address(["127.0.0.1:5001", "127.0.0.1:5002"]) == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert check_address(["[::1]:5001", "[::1]:5002"]) == "ipv6:[::1]:5001,[::1]:5002"
    assert check_address("dns:///trunk.svc.cluster.local:50051") == "dns:///trunk.svc.cluster.local:50051"
    for bad, words in [
        ([], "at least one address"),
        (["trunk-0:5001"], "takes IP addresses"),
        (["127.0.0.1:5001", "[::1]:5002"], "all IPv4 or all IPv6"),
        (["127.0.0.1"], "lacks a valid port"),
        ("ipv4:127.0.0.1:5001,127.0.0.1", "lacks a valid port"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_address(bad)


async def test_sessions_spread_evenly_over_three_replicas(model_and_bundle, replicas):
    model, _ = model_and_bundle
    bottom, _, top = split_model(model, SPLIT)
    async with RemoteTrunk(_addresses(replicas)) as remote, SplitPipeline(bottom, remote, top) as pipeline:
        await pipeline.generate(*left_padded_batch([3]), max_new_tokens=1, pad_token_id=0)  # connect to all
        before = [(await _info(s.port))["sessions_opened"] for s in replicas]
        ids, mask = left_padded_batch([5], seed=3)
        for _ in range(32):  # one after another: each new stream goes to the next healthy replica
            await pipeline.generate(ids, mask, max_new_tokens=2, pad_token_id=0)
    shares = [(await _info(s.port))["sessions_opened"] - b for s, b in zip(replicas, before, strict=True)]
    assert sum(shares) == 32
    assert max(shares) - min(shares) <= 1, shares  # within one session of equal shares


async def test_a_replica_killed_mid_generation_replays_its_sessions_on_another(model_and_bundle, replicas):
    model, _ = model_and_bundle
    bottom, _, top = split_model(model, SPLIT)
    ids, mask = left_padded_batch([6, 3], seed=2)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    config = ClientConfig(retry_deadline_s=30.0, initial_backoff_s=0.05, max_backoff_s=0.5)
    async with RemoteTrunk(_addresses(replicas), config) as remote, SplitPipeline(bottom, remote, top) as pipeline:
        await pipeline.generate(*left_padded_batch([3]), max_new_tokens=1, pad_token_id=0)
        before = [(await _info(s.port))["sessions_open"] for s in replicas]
        assert before == [0, 0, 0]
        steps = []
        async for chunk in pipeline.stream(ids, mask, max_new_tokens=10, pad_token_id=0):
            steps.append(chunk.tokens[:, None])
            if len(steps) == 3:  # kill the replica that holds this session
                (victim,) = [s for s in replicas if (await _info(s.port))["sessions_open"] == 1]
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
        assert remote.replays == 1
    assert torch.equal(torch.cat([ids, *steps], dim=1), expected)


async def test_a_draining_replica_takes_no_new_session_and_finishes_its_open_one(model_and_bundle, replicas):
    model, _ = model_and_bundle
    bottom, _, top = split_model(model, SPLIT)
    ids, mask = left_padded_batch([4], seed=5)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    async with RemoteTrunk(_addresses(replicas)) as remote, SplitPipeline(bottom, remote, top) as pipeline:
        await pipeline.generate(*left_padded_batch([3]), max_new_tokens=1, pad_token_id=0)
        stream = pipeline.stream(ids, mask, max_new_tokens=8, pad_token_id=0)
        steps = [(await anext(stream)).tokens[:, None]]
        (draining,) = [s for s in replicas if (await _info(s.port))["sessions_open"] == 1]
        assert draining.proc is not None
        draining.proc.send_signal(signal.SIGTERM)
        async with channel(draining.port) as chan:  # its health turns NOT_SERVING at once
            health = health_pb2_grpc.HealthStub(chan)

            async def not_serving() -> bool:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=proto.SERVICE_NAME))
                except grpc.aio.AioRpcError:
                    return True
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            for _ in range(200):
                if await not_serving():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the draining replica never turned NOT_SERVING")
        others = [s for s in replicas if s is not draining]
        before = [(await _info(s.port))["sessions_opened"] for s in others]
        for _ in range(4):  # new sessions meanwhile: all on the two others
            await pipeline.generate(*left_padded_batch([3], seed=7), max_new_tokens=2, pad_token_id=0)
        after = [(await _info(s.port))["sessions_opened"] for s in others]
        assert sum(after) - sum(before) == 4
        async for chunk in stream:  # the open session finishes on the draining replica
            steps.append(chunk.tokens[:, None])
        assert remote.replays == 0
    assert torch.equal(torch.cat([ids, *steps], dim=1), expected)
    await wait_until(lambda: draining.proc is not None and draining.proc.poll() is not None, 30, "the drained exit")
    assert draining.proc is not None and draining.proc.returncode == 0
