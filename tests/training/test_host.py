"""The TrainingHost's rules are the same in-process as on a server: one home, one set of errors."""

from __future__ import annotations

import grpc
import pytest
import torch

from splitlearn_async import (
    AdapterNotFound,
    AlreadyExists,
    LocalTrunk,
    LoraConfig,
    PreconditionFailed,
    RemoteTrunk,
    SessionNotFound,
    StepNotFound,
    TrunkBusy,
    TrunkRejected,
    split_model,
)
from splitlearn_async.errors import (
    CheckpointError,
    ConfigError,
    TrunkError,
    TrunkTimeout,
    TrunkUnavailable,
    Unauthenticated,
    WireError,
    WorkerDied,
    WorkerStopped,
)
from splitlearn_async.protocol.status import STATUS_TABLE, error_for, status_for
from splitlearn_async.training import TrainingLimits
from tests.support.rpc import served
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import SPLIT

H = 64


def _trunk():
    return split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk


def _inputs(batch: int = 1, tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(batch, tokens, H)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    return hidden, mask, torch.arange(tokens).expand(batch, tokens)


async def _rules(trunk_client) -> dict[str, type[Exception]]:
    """Break each rule once on ``trunk_client``; the class of each error raised, by rule."""
    seen: dict[str, type[Exception]] = {}

    async def expect(rule: str, coro) -> None:
        with pytest.raises(TrunkError) as info:
            await coro
        seen[rule] = type(info.value)

    first = await trunk_client.open_training("lora", lora=LoraConfig(rank=2), adapter_id="a1")
    await expect("adapter trained twice", trunk_client.open_training("lora", adapter_id="a1"))
    await expect("full beside others", trunk_client.open_training("full"))
    await expect("delete a trained adapter", trunk_client.delete_adapter("a1"))
    await expect("delete an unknown adapter", trunk_client.delete_adapter("nope"))
    await expect("session on an unknown adapter", _open_session(trunk_client, "nope"))
    state = await first.state(optimizer=False)
    await expect("load a taken name", trunk_client.load_adapter("a1", state.weights))
    out1, step1 = await first.forward(*_inputs())
    _, step2 = await first.forward(*_inputs())
    await expect("apply with other steps waiting", first.backward(step1, torch.ones_like(out1), apply=True))
    await expect("optimizer step with steps waiting", first.optimizer_step())
    await expect("gradient of the wrong shape", first.backward(step1, torch.ones(1, 2, H), apply=False))
    await expect("unknown step", first.backward(12345, torch.ones_like(out1), apply=False))
    await expect("too many kept steps", first.forward(*_inputs()))
    await first.backward(step1, torch.ones_like(out1), apply=False)
    await first.backward(step2, torch.ones_like(out1), apply=False)
    assert await first.optimizer_step() == 1
    await first.aclose()
    return seen


async def _open_session(trunk_client, adapter_id: str):
    session = await trunk_client.open_session(adapter_id=adapter_id)
    try:
        await session.forward(*_inputs())
    finally:
        await session.aclose()


EXPECTED = {
    "adapter trained twice": PreconditionFailed,
    "full beside others": PreconditionFailed,
    "delete a trained adapter": PreconditionFailed,
    "delete an unknown adapter": AdapterNotFound,
    "session on an unknown adapter": AdapterNotFound,
    "load a taken name": AlreadyExists,
    "apply with other steps waiting": PreconditionFailed,
    "optimizer step with steps waiting": PreconditionFailed,
    "gradient of the wrong shape": TrunkRejected,
    "unknown step": StepNotFound,
    "too many kept steps": TrunkBusy,
}


async def test_local_trunk_keeps_the_servers_training_rules():
    limits = TrainingLimits(max_pending_steps=2, allow_full_training=True)
    async with LocalTrunk(_trunk(), training=limits) as local:
        seen = await _rules(local)
    assert seen == EXPECTED


async def test_remote_trunk_meets_the_same_rules_with_the_matching_classes():
    async with served(_trunk(), max_pending_steps=2, allow_full_training=True) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
            seen = await _rules(remote)
    # the client reads NOT_FOUND as SessionNotFound: the wire does not say which kind
    expected = {rule: (SessionNotFound if issubclass(cls, SessionNotFound) else cls) for rule, cls in EXPECTED.items()}
    assert seen == expected


async def test_local_load_adapter_beyond_the_cap_is_trunk_busy():
    # once a plain RuntimeError (PendingFull) escaped LocalTrunk.load_adapter here
    async with LocalTrunk(_trunk(), training=TrainingLimits(max_adapters=2)) as local:
        session = await local.open_training("lora", lora=LoraConfig(rank=2), adapter_id="first")
        weights = (await session.state(optimizer=False)).weights
        await session.aclose()
        with pytest.raises(ConfigError, match="adapter_id"):
            await local.load_adapter("../bad", weights)
        with pytest.raises(CheckpointError):
            await local.load_adapter("garbage", b"not safetensors")
        await local.load_adapter("second", weights)
        with pytest.raises(TrunkBusy, match="max_adapters=2"):
            await local.load_adapter("third", weights)
        assert local.adapters == ["first", "second"]


def test_every_row_of_the_status_table_round_trips():
    first_code: dict[type[Exception], grpc.StatusCode] = {}
    for cls, code in STATUS_TABLE:
        first_code.setdefault(cls, code)
    for cls, code in first_code.items():
        error = cls("x")
        assert status_for(error) is code  # no row hides a later one
        if issubclass(cls, TrunkError):
            assert error_for(code) is cls  # the client reads back what the server sent
    assert error_for(grpc.StatusCode.INTERNAL) is TrunkError
    assert error_for(None) is TrunkError
    assert status_for(RuntimeError("a bug")) is None  # answered INTERNAL, with a log line
    # server-side errors reach the user as the trunk error of their code
    for error, cls in [
        (WireError("x"), TrunkRejected),
        (ConfigError("x"), TrunkRejected),
        (CheckpointError("x"), TrunkRejected),
        (ValueError("x"), TrunkRejected),
        (WorkerStopped("x"), TrunkUnavailable),
        (WorkerDied("x"), TrunkUnavailable),
        (StepNotFound("x"), SessionNotFound),
        (AdapterNotFound("x"), SessionNotFound),
        (PreconditionFailed("x"), PreconditionFailed),
        (AlreadyExists("x"), AlreadyExists),
        (TrunkTimeout("x"), TrunkTimeout),
        (Unauthenticated("x"), Unauthenticated),
    ]:
        assert error_for(status_for(error)) is cls, error
