"""Training forwards and backwards of different sessions in one batch: each gets what it gets alone.

Sessions training their own LoRA adapters (and a frozen one) send their forwards and
backwards at the same time; the trunk runs them as one batch, each row with its own
session's adapter (``TrainingLimits.batch_tokens``). These tests hold every session's
outputs, input gradients, evaluation and trained adapter to the same sessions run one
after another (1e-5), in every family, with and without layer segments; and check each
way a batch can come apart: a backward that comes alone (its rows recomputed), most
backwards together (the shared graph, zero gradients for the absent), one session's NaN
or non-finite gradient (that session's error alone), a batch-mate that closes while a
backward waits for it, two forwards of one session, and a full-trunk session (never
batched). Over a server, three ``SplitTrainer`` clients trained at once equal the same
three trained one after another.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from splitlearn_async import (
    LocalTrunk,
    LoraConfig,
    OptimizerConfig,
    RemoteTrunk,
    SplitTrainer,
    TrainingConfig,
    TrunkRejected,
    split_model,
)
from splitlearn_async.errors import ConfigError
from splitlearn_async.server import ServerConfig
from splitlearn_async.training import TrainingLimits, from_safetensors
from tests.support.rpc import served
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import lora_targets, make_batch

SPLIT = (1, 5)  # of 6 tiny layers: a trunk of 4 layers
T, H = 6, 64
ATOL = 1e-5
MODES = ("lora", "lora", "frozen", "lora")
ROWS = (2, 1, 2, 1)

#: batched (the default) and alone, each with and without layer segments
TOGETHER = TrainingLimits(segment_layer_tokens=None, batch_wait_s=5.0)
ALONE = TrainingLimits(segment_layer_tokens=None, batch_tokens=None)
TOGETHER_SEGMENTS = TrainingLimits(segment_layer_tokens=6 * T, batch_wait_s=5.0)  # 1 layer per segment in a batch
ALONE_SEGMENTS = TrainingLimits(segment_layer_tokens=6 * T, batch_tokens=None)


def _inputs(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, T, H)`` hidden states, a mask with the first row left-padded, and positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g)
    mask = torch.ones(rows, T, dtype=torch.long)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return hidden, mask, positions


def _grad(shape: torch.Size, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))


def _record_calls(trunk) -> list[tuple[int, bool]]:
    """(rows, autograd on) of every trunk call."""
    calls: list[tuple[int, bool]] = []
    trunk.register_forward_pre_hook(lambda m, args: calls.append((args[0].shape[0], torch.is_grad_enabled())))
    return calls


async def _open(local: LocalTrunk, family: str, modes=MODES) -> list:
    sessions = []
    for i, mode in enumerate(modes):
        lora = LoraConfig(rank=2, alpha=4.0, seed=i, target_modules=tuple(lora_targets(family)))
        sessions.append(await local.open_training(mode, lora=lora, optimizer=OptimizerConfig("sgd", lr=0.5)))
    return sessions


async def _each(coros, together: bool) -> list:
    """Await ``coros`` at the same time, or one after another."""
    if together:
        return list(await asyncio.gather(*coros))
    return [await c for c in coros]


async def _train(family: str, limits: TrainingLimits, together: bool, steps: int = 2, device: str = "cpu") -> dict:
    """``steps`` forward/backward/optimizer steps of the four sessions, then an evaluation; what each gave."""
    trunk = split_model(tiny_model(family), SPLIT, parts=("trunk",)).trunk.to(device)
    got: dict = {"calls": _record_calls(trunk)}
    async with LocalTrunk(trunk, training=limits) as local:
        sessions = await _open(local, family)
        for step in range(steps):
            inputs = [_inputs(10 * step + i, rows) for i, rows in enumerate(ROWS)]
            forwards = await _each([s.forward(*x) for s, x in zip(sessions, inputs, strict=True)], together)
            grads = [_grad(out.shape, 10 * step + i) for i, (out, _) in enumerate(forwards)]
            backwards = [
                s.backward(sid, g, apply=True) for s, (_, sid), g in zip(sessions, forwards, grads, strict=True)
            ]
            grad_ins = await _each(backwards, together)
            for i, ((out, _), grad_in) in enumerate(zip(forwards, grad_ins, strict=True)):
                got[f"out{step}.{i}"] = out
                got[f"grad_in{step}.{i}"] = grad_in
                got[f"norm{step}.{i}"] = torch.tensor(sessions[i].grad_norm_sq)
        evaluated = await _each(
            [s.evaluate(*_inputs(50 + i, rows)) for i, (s, rows) in enumerate(zip(sessions, ROWS, strict=False))],
            together,
        )
        for i, (s, out) in enumerate(zip(sessions, evaluated, strict=True)):
            got[f"evaluated.{i}"] = out
            state = await s.state()
            for name, value in (from_safetensors(state.weights)[0] if state.weights else {}).items():
                got[f"adapter.{i}.{name}"] = value.cpu()
        got["pending_bytes"] = local.training.pending_bytes
    return got


def _assert_close(got: dict, expected: dict) -> None:
    keys = set(expected) - {"calls", "pending_bytes"}
    assert keys == set(got) - {"calls", "pending_bytes"}
    for key in sorted(keys):
        assert got[key].shape == expected[key].shape, key
        assert float((got[key].double() - expected[key].double()).abs().max()) <= ATOL, key


@pytest.mark.parametrize("segments", [False, True], ids=["one-call", "segments"])
async def test_sessions_trained_together_equal_each_alone(family, segments):
    alone = await _train(family, ALONE_SEGMENTS if segments else ALONE, together=False)
    together = await _train(family, TOGETHER_SEGMENTS if segments else TOGETHER, together=True)
    _assert_close(together, alone)
    total = sum(ROWS)
    assert (total, True) in together["calls"]  # the forwards did run as one batch: the test can fail
    assert {rows for rows, _ in together["calls"]} == {total}, together["calls"]  # all of them did, and no backward recomputed
    assert total not in {rows for rows, _ in alone["calls"]}
    assert together["pending_bytes"] == 0 and alone["pending_bytes"] == 0
    trained = [v for k, v in together.items() if k.startswith("adapter.0.") and "lora_B" in k]
    assert trained and any(bool(v.abs().sum() > 0) for v in trained)  # B starts at zero: the adapters did train


async def _forward_all(local, sessions, step: int = 0):
    inputs = [_inputs(10 * step + i, rows) for i, rows in enumerate(ROWS)]
    return await asyncio.gather(*(s.forward(*x) for s, x in zip(sessions, inputs, strict=True)))


async def test_backwards_that_come_apart_recompute_their_rows_and_equal_each_alone():
    """Three backwards of four together, then the fourth alone: each batch recomputes its own rows
    (the shared graph is used only by all four together); the same numbers as four sessions alone."""
    alone = await _train("llama", ALONE, together=False, steps=1)
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    calls = _record_calls(trunk)
    async with LocalTrunk(trunk, training=TrainingLimits(segment_layer_tokens=None, batch_wait_s=0.0)) as local:
        sessions = await _open(local, "llama")
        forwards = await _forward_all(local, sessions)
        assert calls == [(sum(ROWS), True)]
        grads = [_grad(out.shape, i) for i, (out, _) in enumerate(forwards)]
        first = await asyncio.gather(*(sessions[i].backward(forwards[i][1], grads[i], apply=True) for i in range(3)))
        assert calls == [(sum(ROWS), True), (sum(ROWS[:3]), True)]  # their 5 rows recomputed, as one batch
        last = await sessions[3].backward(forwards[3][1], grads[3], apply=True)
        assert calls[2:] == [(ROWS[3], True)]  # then the fourth's row
        for i, grad_in in enumerate([*first, last]):
            assert float((grad_in - alone[f"grad_in0.{i}"]).abs().max()) <= ATOL, i
            assert abs(sessions[i].grad_norm_sq - float(alone[f"norm0.{i}"])) <= ATOL, i
        assert local.training.pending_bytes == 0


async def test_a_backward_waits_for_its_batch_mates_and_they_run_as_one():
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    calls = _record_calls(trunk)
    async with LocalTrunk(trunk, training=TrainingLimits(segment_layer_tokens=None, batch_wait_s=600.0)) as local:
        sessions = await _open(local, "llama", MODES[:2])
        a, b = sessions
        (out_a, sa), (out_b, sb) = await asyncio.gather(a.forward(*_inputs(0, 2)), b.forward(*_inputs(1, 1)))
        first = asyncio.create_task(a.backward(sa, _grad(out_a.shape, 0)))
        await asyncio.sleep(0.05)
        assert not first.done()  # it waits for b's backward
        stats = local._worker.stats
        second = await asyncio.wait_for(b.backward(sb, _grad(out_b.shape, 1)), 30)
        await asyncio.wait_for(first, 30)
        assert second.shape == out_b.shape
        assert local._worker.stats.batch_size_counts.get(2, 0) > stats.batch_size_counts.get(2, 0)  # one backward
        assert calls == [(3, True)]


async def test_a_batch_mate_that_closes_releases_the_waiting_backward():
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    async with LocalTrunk(trunk, training=TrainingLimits(segment_layer_tokens=None, batch_wait_s=600.0)) as local:
        a, b = await _open(local, "llama", MODES[:2])
        (out_a, sa), _ = await asyncio.gather(a.forward(*_inputs(0, 2)), b.forward(*_inputs(1, 1)))
        first = asyncio.create_task(a.backward(sa, _grad(out_a.shape, 0)))
        await asyncio.sleep(0.05)
        assert not first.done()
        await b.aclose()
        grad_in = await asyncio.wait_for(first, 30)  # not the 600 s wait
        assert grad_in.shape == out_a.shape and local.training.pending_bytes == 0


async def test_one_sessions_nan_or_non_finite_gradient_is_its_own_error():
    alone = await _train("llama", ALONE, together=False, steps=1)
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    async with LocalTrunk(trunk, training=TOGETHER) as local:
        sessions = await _open(local, "llama")
        inputs = [_inputs(i, rows) for i, rows in enumerate(ROWS)]
        bad = inputs[1][0].clone()
        bad[0, 3, 5] = float("nan")
        results = await asyncio.gather(
            *(
                s.forward(bad if i == 1 else x[0], *x[1:])
                for i, (s, x) in enumerate(zip(sessions, inputs, strict=False))
            ),
            return_exceptions=True,
        )
        assert isinstance(results[1], ConfigError) and "NaN or infinite" in str(results[1])
        for i in (0, 2, 3):
            assert float((results[i][0] - alone[f"out0.{i}"]).abs().max()) <= ATOL, i
            await sessions[i].backward(results[i][1], torch.zeros_like(results[i][0]), apply=False)
        forwards = await _forward_all(local, sessions)  # again, all four
        grads = [_grad(out.shape, i) for i, (out, _) in enumerate(forwards)]
        huge = grads[0] * 1e38 * 1e2  # finite, but the gradients overflow
        results = await asyncio.gather(
            *(
                s.backward(sid, huge if i == 0 else g, apply=False)
                for i, (s, (_, sid), g) in enumerate(zip(sessions, forwards, grads, strict=False))
            ),
            return_exceptions=True,
        )
        assert isinstance(results[0], TrunkRejected) and "NaN or infinite gradients" in str(results[0])
        for i in (1, 2, 3):
            assert float((results[i] - alone[f"grad_in0.{i}"]).abs().max()) <= ATOL, i
        again = await sessions[0].backward(forwards[0][1], grads[0], apply=False)  # the step was kept
        assert float((again - alone["grad_in0.0"]).abs().max()) <= ATOL
        assert local.training.pending_bytes == 0


async def test_two_forwards_of_one_session_and_a_full_trunk_session_run_apart():
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    calls = _record_calls(trunk)
    async with LocalTrunk(trunk, training=TOGETHER) as local:
        (a,) = await _open(local, "llama", ("lora",))
        (out1, s1), (out2, s2) = await asyncio.gather(a.forward(*_inputs(0, 2)), a.forward(*_inputs(1, 2)))
        assert calls == [(2, True), (2, True)]  # one adapter's rows never meet twice in a batch
        await a.backward(s1, _grad(out1.shape, 0), apply=False)
        await a.backward(s2, _grad(out2.shape, 1), apply=True)
        await a.aclose()
        calls.clear()
        (full,) = await _open(local, "llama", ("full",))
        (out, sid), (_ev) = await asyncio.gather(full.forward(*_inputs(0, 2)), full.evaluate(*_inputs(1, 2)))
        assert calls == [(2, True), (2, False)]
        await full.backward(sid, _grad(out.shape, 0))


async def test_forwards_of_different_lengths_run_apart():
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    calls = _record_calls(trunk)
    async with LocalTrunk(trunk, training=TOGETHER) as local:
        a, b = await _open(local, "llama", MODES[:2])
        short = tuple(t[:, :4] for t in _inputs(1, 1))
        await asyncio.gather(a.forward(*_inputs(0, 2)), b.forward(*short))
        assert sorted(calls) == [(1, True), (2, True)]


def test_the_knobs_are_checked_and_the_defaults_agree():
    assert ServerConfig().training_batch_tokens == TrainingLimits().batch_tokens
    assert ServerConfig().training_batch_wait_s == TrainingLimits().batch_wait_s
    for bad in (0, -5, 1.5, True, "256"):
        with pytest.raises(ConfigError, match="batch_tokens"):
            TrainingLimits(batch_tokens=bad)
        with pytest.raises(ConfigError, match="training_batch_tokens"):
            ServerConfig(training_batch_tokens=bad)
    for bad in (-1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ConfigError, match="batch_wait_s"):
            TrainingLimits(batch_wait_s=bad)
        with pytest.raises(ConfigError, match="training_batch_wait_s"):
            ServerConfig(training_batch_wait_s=bad)


async def test_info_tells_the_training_batch_settings():
    trunk = split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk
    config = ServerConfig(training_batch_tokens=512, training_batch_wait_s=0.02, training_segment_layer_tokens=None)
    async with served(trunk, config) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        info = await remote.info()
    assert (info["batch_tokens"], info["batch_wait_s"], info["segment_layer_tokens"]) == (512, 0.02, None)


async def test_split_trainers_trained_at_once_over_a_server_equal_each_alone():
    """Three clients, each fine-tuning its own adapter with SplitTrainer, against one server."""
    config = TrainingConfig(optimizer=OptimizerConfig("sgd", lr=0.5), trunk="lora", lora=LoraConfig(rank=2, seed=7))

    async def train(config_server: ServerConfig, together: bool) -> tuple[list[bytes], dict[int, int]]:
        async with served(split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk, config_server) as server:
            async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:

                async def one(i: int) -> bytes:
                    bottom, _, top = split_model(tiny_model("llama"), (2, 4))  # each client's own
                    async with SplitTrainer(bottom, remote, top, config) as trainer:
                        for step in range(2):
                            await trainer.step(make_batch(10 * i + step))
                        return (await (await trainer.session()).state()).weights

                states = await _each([one(i) for i in range(3)], together)
            return states, server.worker.stats.batch_size_counts

    alone, _ = await train(ServerConfig(training_batch_tokens=None), together=False)
    together, batches = await train(ServerConfig(training_batch_wait_s=5.0), together=True)
    assert any(size >= 2 for size in batches)  # some training items did run as one batch
    for a, b in zip(together, alone, strict=True):
        ta, tb = from_safetensors(a)[0], from_safetensors(b)[0]
        assert set(ta) == set(tb)
        for name in ta:
            assert float((ta[name] - tb[name]).abs().max()) <= ATOL, name


def test_a_batch_holds_no_more_tokens_than_one_segment_or_batch_tokens():
    from splitlearn_async.training._segments import Member
    from splitlearn_async.training._work import _groups

    trainers = [object() for _ in range(6)]

    def members(sizes, same=()):
        return [
            Member(trainers[0 if i in same else i], torch.zeros(1, n, 1), None, None, lambda out, step: out)
            for i, n in enumerate(sizes)
        ]

    eight = members([32] * 6)
    assert _groups(eight, 1024, 128) == [[0, 1, 2, 3], [4, 5]]  # 4 x 32 = one segment's 128 layer-tokens
    assert _groups(eight, 1024, None) == [list(range(6))]  # no segments: batch_tokens alone
    assert _groups(eight, 64, None) == [[0, 1], [2, 3], [4, 5]]
    assert _groups(eight, None, 128) == [[i] for i in range(6)]  # batching off
    assert _groups(members([200, 32, 32]), 1024, 128) == [[0], [1, 2]]  # one alone may exceed a segment
    assert _groups(members([32, 32, 32], same=(0, 1)), 1024, 128) == [[0], [1, 2]]  # one step per trainer
