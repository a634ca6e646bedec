"""Training steps cut into layer segments: the same numbers bit for bit, decode steps between segments.

A training forward or backward runs one work item per segment of whole layers
(``TrainingLimits.segment_layer_tokens``). These tests hold it to the math of one call
(``torch.equal`` for segments of 1, 2 and all 4 trunk layers: outputs, input gradients,
updated weights, the squared gradient norm, clipping) and to the unsplit model (1e-5);
show that a decode step queued during a training forward runs between two segments; and
that a session closed, a call cancelled, or an error in a segment frees what the
segments kept.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest
import torch

from splitlearn_async import (
    LocalTrunk,
    LoraConfig,
    OptimizerConfig,
    SessionNotFound,
    SplitTrainer,
    StageWorker,
    TrainingConfig,
    TrunkRejected,
    split_model,
)
from splitlearn_async.errors import ConfigError
from splitlearn_async.server import ServerConfig
from splitlearn_async.training import TrainingLimits, from_safetensors
from splitlearn_async.training._segments import segment_bounds
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import TOL, clone_model, lora_targets, make_batch, max_diff, unsplit_step
from tests.support.waiting import wait_until

SEG_SPLIT = (1, 5)  # of 6 tiny layers: a trunk of 4 layers, [1, 5)
B, T, H = 2, 8, 64


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return hidden, mask, positions


def _limits(layers_per_segment: int | None) -> TrainingLimits:
    """Segments of ``layers_per_segment`` layers for steps of B x T tokens (None: one item)."""
    return TrainingLimits(segment_layer_tokens=None if layers_per_segment is None else layers_per_segment * B * T)


def _training_calls(trunk) -> list[tuple[int, int] | None]:
    """Records the layers of each trunk call made with autograd on (a training forward's segments)."""
    calls: list[tuple[int, int] | None] = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            calls.append(kwargs.get("layers"))

    trunk.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_segment_bounds():
    assert segment_bounds((3, 27), 128, None) == [None]
    assert segment_bounds((3, 27), 128, 24 * 128) == [None]  # everything fits: one call
    assert segment_bounds((3, 27), 128, 256) == [(a, a + 2) for a in range(3, 27, 2)]
    assert segment_bounds((3, 27), 128, 1) == [(a, a + 1) for a in range(3, 27)]  # at least one layer
    assert segment_bounds((0, 24), 1, 10) == [(0, 8), (8, 16), (16, 24)]  # as even as the room allows
    assert segment_bounds((1, 5), 16, 48) == [(1, 3), (3, 5)]
    assert segment_bounds((2, 2), 16, 1) == [None]  # no layers: one call, as before


def test_the_knob_is_checked_and_the_defaults_agree():
    assert ServerConfig().training_segment_layer_tokens == TrainingLimits().segment_layer_tokens
    for bad in (0, -5, 1.5, True, "256"):
        with pytest.raises(ConfigError, match="segment_layer_tokens"):
            TrainingLimits(segment_layer_tokens=bad)
        with pytest.raises(ConfigError, match="training_segment_layer_tokens"):
            ServerConfig(training_segment_layer_tokens=bad)


async def _two_steps(
    family: str, mode: str, layers_per_segment: int | None, limits: TrainingLimits | None = None, opt: str = "adamw"
) -> dict[str, object]:
    """Two forward/backward/optimizer steps and an evaluation on a fresh trunk; everything they gave."""
    trunk = split_model(tiny_model(family), SEG_SPLIT, parts=("trunk",)).trunk
    calls = _training_calls(trunk)
    got: dict[str, object] = {}
    lora = LoraConfig(rank=2, seed=3, target_modules=tuple(lora_targets(family)))
    async with LocalTrunk(trunk, training=limits or _limits(layers_per_segment)) as local:
        session = await local.open_training(mode, lora=lora, optimizer=OptimizerConfig(opt, lr=1e-2))
        for step in range(2):
            hidden, mask, positions = _inputs(step)
            out, step_id = await session.forward(hidden, mask, positions)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + step))
            got[f"out{step}"] = out
            got[f"grad_in{step}"] = await session.backward(step_id, grad, apply=True)
            got[f"norm{step}"] = session.grad_norm_sq
        got["evaluated"] = await session.evaluate(*_inputs(5))
        state = await session.state()
        got["pending_bytes"] = local.training.pending_bytes
    got["weights"] = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    got["state"] = (state.weights, state.optimizer)
    got["calls"] = calls
    return got


def _assert_same_state(got: tuple[bytes, bytes | None], expected: tuple[bytes, bytes | None]) -> None:
    """The same saved tensors (the adapter or the trunk, and the optimizer state), bit for bit."""
    for a, b in zip(got, expected, strict=True):
        assert bool(a) == bool(b)
        if a and b:
            (ta, ma), (tb, mb) = from_safetensors(a), from_safetensors(b)
            assert ma == mb and set(ta) == set(tb)
            for name, value in tb.items():
                assert torch.equal(ta[name], value), name


@pytest.mark.parametrize("mode", ["lora", "full", "frozen"])
async def test_segmented_steps_equal_one_call_bit_for_bit(family, mode):
    whole = await _two_steps(family, mode, None)
    assert whole["calls"] == [None, None]  # one call per forward
    for size, expected in ((1, [(1, 2), (2, 3), (3, 4), (4, 5)]), (2, [(1, 3), (3, 5)]), (4, [None])):
        got = await _two_steps(family, mode, size)
        assert got["calls"] == expected * 2, size
        for key in ("out0", "grad_in0", "out1", "grad_in1", "evaluated"):
            assert torch.equal(got[key], whole[key]), (size, key)
        assert got["norm0"] == whole["norm0"] and got["norm1"] == whole["norm1"], size
        assert (got["norm0"] > 0) == (mode != "frozen")
        for name, value in whole["weights"].items():
            assert torch.equal(got["weights"][name], value), (size, name)
        _assert_same_state(got["state"], whole["state"])
        assert got["pending_bytes"] == 0


def test_a_layer_over_more_than_a_segment_of_tokens_is_cut_by_rows():
    from splitlearn_async.training._segments import segment_plan

    assert segment_plan((3, 27), 2, 64, 128) == [((a, a + 1), None) for a in range(3, 27)]  # one layer fits
    assert segment_plan((3, 27), 2, 64, 64) == [((a, a + 1), r) for a in range(3, 27) for r in (slice(0, 1), slice(1, 2))]
    assert segment_plan((1, 3), 5, 10, 20) == [((a, a + 1), r) for a in (1, 2) for r in (slice(0, 1), slice(1, 3), slice(3, 5))]
    assert segment_plan((1, 3), 1, 64, 16) == [((1, 2), None), ((2, 3), None)]  # one row: cannot cut further
    assert segment_plan((1, 3), 4, 8, None) == [(None, None)]


async def _one_step(family: str, mode: str, limits: TrainingLimits) -> dict[str, torch.Tensor]:
    """One forward, backward and SGD step, then an evaluation, on a fresh trunk: what they gave."""
    trunk = split_model(tiny_model(family), SEG_SPLIT, parts=("trunk",)).trunk
    calls = _training_calls(trunk)
    lora = LoraConfig(rank=2, seed=3, target_modules=tuple(lora_targets(family)))
    async with LocalTrunk(trunk, training=limits) as local:
        session = await local.open_training(mode, lora=lora, optimizer=OptimizerConfig("sgd", lr=1e-2))
        hidden, mask, positions = _inputs(0)
        out, step_id = await session.forward(hidden, mask, positions)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
        got = {"out": out, "grad_in": await session.backward(step_id, grad), "norm": torch.tensor(session.grad_norm_sq)}
        got["evaluated"] = await session.evaluate(*_inputs(5))
        state = await session.state()
        assert local.training.pending_bytes == 0
    for name, value in (from_safetensors(state.weights)[0] if state.weights else {}).items():
        got[f"state.{name}"] = value
    got |= {f"weight.{n}": p.detach().clone() for n, p in trunk.named_parameters()}
    got["calls"] = calls  # type: ignore[assignment]
    return got


@pytest.mark.parametrize("mode", ["lora", "full", "frozen"])
async def test_steps_cut_by_rows_equal_one_call(family, mode):
    """Segments of one layer over one row (segment_layer_tokens = T): 2 items per layer, within 1e-5."""
    whole = await _one_step(family, mode, _limits(None))
    got = await _one_step(family, mode, TrainingLimits(segment_layer_tokens=T))
    assert whole["calls"] == [None]
    assert got["calls"] == [(a, a + 1) for a in range(1, 5) for _ in range(2)]  # a layer, twice (its two rows)
    assert set(got) == set(whole)
    for key in sorted(set(whole) - {"calls"}):
        assert float((got[key] - whole[key]).abs().max()) <= 1e-5 * max(1.0, float(whole[key].abs().max())), key


@pytest.mark.parametrize("trunk_mode", ["full", "lora"])
async def test_clipped_split_steps_with_segments_equal_one_call_bit_for_bit(trunk_mode):
    """SplitTrainer with max_grad_norm (the trunk reports grad_norm_sq, steps with the clip's scale)."""

    async def run(layers_per_segment: int | None) -> dict[str, torch.Tensor]:
        model = tiny_model("llama")
        bottom, trunk, top = split_model(model, SEG_SPLIT)
        config = TrainingConfig(
            optimizer=OptimizerConfig("sgd", lr=0.5),
            trunk=trunk_mode,
            max_grad_norm=0.05,
            lora=LoraConfig(rank=2, seed=1),
            accumulation_steps=2,
        )
        local = LocalTrunk(trunk, training=_limits(layers_per_segment))
        async with local, SplitTrainer(bottom, local, top, config) as trainer:
            for seed in range(4):
                await trainer.step(make_batch(seed))
            state = await (await trainer.session()).state()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {**weights, "state": state.weights}

    whole = await run(None)
    for size in (1, 2):
        got = await run(size)
        assert set(got) == set(whole)
        for name in whole:
            if name == "state":
                _assert_same_state((got[name], None), (whole[name], None))
            else:
                assert torch.equal(got[name], whole[name]), (size, name)


async def test_a_step_in_one_layer_segments_equals_the_unsplit_step(family):
    opt = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
    model = tiny_model(family)
    reference = unsplit_step(clone_model(model), make_batch(), opt)
    bottom, trunk, top = split_model(model, SEG_SPLIT)
    calls = _training_calls(trunk)
    local = LocalTrunk(trunk, training=_limits(1))
    async with local, SplitTrainer(bottom, local, top, TrainingConfig(optimizer=opt, trunk="full")) as trainer:
        loss = await trainer.step(make_batch())
    assert calls == [(1, 2), (2, 3), (3, 4), (4, 5)]
    assert abs(loss - reference.loss) <= TOL
    updated = dict(reference.model.named_parameters())
    for name, p in model.named_parameters():
        assert max_diff(p, updated[name]) <= TOL, name


# --- decode steps between segments, and failures -------------------------------------------------------


class Gate:
    """Holds the worker thread in the first training call of a layer, until the test opens it."""

    def __init__(self, forward_only: bool = True) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.armed = False
        self.forward_only = forward_only  # hold only calls with autograd on (training, not decoding)

    def __call__(self, *_: object) -> None:
        if self.armed and (torch.is_grad_enabled() or not self.forward_only):
            self.armed = False
            self.entered.set()
            assert self.go.wait(timeout=30), "the test never opened the gate"  # a hang guard

    async def wait_entered(self) -> None:
        await wait_until(self.entered.is_set, timeout_s=30, what="the training call to reach the gate")


def _record_layers(trunk, order: list[str]) -> None:
    for index, layer in trunk.iter_layers():
        layer.register_forward_pre_hook(
            lambda m, a, index=index: order.append(f"{'train' if torch.is_grad_enabled() else 'decode'}{index}")
        )


@pytest.mark.parametrize("layers_per_segment", [1, None])
async def test_a_decode_step_queued_during_a_training_forward_runs_between_two_segments(layers_per_segment):
    trunk = split_model(tiny_model("llama"), SEG_SPLIT, parts=("trunk",)).trunk
    order: list[str] = []
    _record_layers(trunk, order)
    gate = Gate()
    trunk.layers["1"].register_forward_pre_hook(gate)
    hidden, mask, positions = _inputs()
    async with (
        StageWorker("test-trunk") as worker,
        LocalTrunk(trunk, worker, training=_limits(layers_per_segment)) as local,
    ):
        training = await local.open_training("lora", lora=LoraConfig(rank=2))
        decoding = await local.open_session()
        await decoding.forward(hidden[:1], mask[:1], positions[:1])  # the prompt
        order.clear()
        gate.armed = True
        forward = asyncio.create_task(training.forward(hidden, mask, positions))
        await gate.wait_entered()  # the worker is inside the training forward's first layer
        step = asyncio.create_task(decoding.forward(hidden[:1, :1], mask[:1, :1], torch.tensor([[T]])))
        await wait_until(lambda: worker.queue_depth == 1, what="the decode step to be queued")
        gate.go.set()
        await step
        await forward
    decode = ["decode1", "decode2", "decode3", "decode4"]
    if layers_per_segment == 1:  # the decode step ran after the running segment, before the next
        assert order == ["train1", *decode, "train2", "train3", "train4"]
    else:  # one item: the decode step waited for the whole forward
        assert order == ["train1", "train2", "train3", "train4", *decode]


async def _held_forward(local: LocalTrunk, gate: Gate):
    """A LoRA training session and its forward, held by the gate inside a segment."""
    training = await local.open_training("lora", lora=LoraConfig(rank=2))
    gate.armed = True
    forward = asyncio.create_task(training.forward(*_inputs()))
    await gate.wait_entered()
    return training, forward


def _watch_outputs(trunk) -> list[weakref.ref]:
    """Weak references to every training layer output (what the segments' graphs keep)."""
    refs: list[weakref.ref] = []

    def hook(module, args, out):
        if torch.is_grad_enabled():
            refs.append(weakref.ref(out[0] if isinstance(out, tuple) else out))

    for _, layer in trunk.iter_layers():
        layer.register_forward_hook(hook)
    return refs


@pytest.mark.parametrize("how", ["closed", "cancelled"])
async def test_a_forward_ended_mid_segments_frees_what_it_kept(how):
    trunk = split_model(tiny_model("llama"), SEG_SPLIT, parts=("trunk",)).trunk
    gate = Gate()
    trunk.layers["2"].register_forward_pre_hook(gate)  # the second segment
    refs = _watch_outputs(trunk)
    async with StageWorker("test-trunk") as worker, LocalTrunk(trunk, worker, training=_limits(1)) as local:
        training, forward = await _held_forward(local, gate)
        assert len(refs) == 1  # the first segment ran and kept its graph
        if how == "closed":
            await training.aclose()
        else:
            forward.cancel()
        gate.go.set()
        if how == "closed":
            with pytest.raises(SessionNotFound, match="closed during this forward"):
                await forward
        else:
            with pytest.raises(asyncio.CancelledError):
                await forward
        await worker.run(lambda: None)  # the segment that was running has ended
        assert local.training.pending_steps == 0 and local.training.pending_bytes == 0
        assert len(refs) == 2  # no third segment ran
        gc.collect()
        assert all(ref() is None for ref in refs), "a segment's output is still alive"


async def test_a_backward_whose_session_closes_mid_segments_frees_the_graph_and_steps_nothing():
    trunk = split_model(tiny_model("llama"), SEG_SPLIT, parts=("trunk",)).trunk
    gate = Gate(forward_only=False)
    refs = _watch_outputs(trunk)

    def gate_the_backward(module, args, out):  # the gradient of layer 4's output: the first backward segment
        if torch.is_grad_enabled():
            out.register_hook(lambda grad: gate())

    trunk.layers["4"].register_forward_hook(gate_the_backward)
    async with StageWorker("test-trunk") as worker, LocalTrunk(trunk, worker, training=_limits(1)) as local:
        training = await local.open_training("lora", lora=LoraConfig(rank=2))
        adapter = local.training.adapter(training.adapter_id)
        before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
        out, step_id = await training.forward(*_inputs())
        gate.armed = True
        backward = asyncio.create_task(training.backward(step_id, torch.ones_like(out)))
        await gate.wait_entered()
        await training.aclose()
        gate.go.set()
        with pytest.raises(SessionNotFound, match="closed during this backward"):
            await backward
        await worker.run(lambda: None)
        assert local.training.pending_steps == 0
        gc.collect()
        assert all(ref() is None for ref in refs), "a segment's output is still alive"
    for name, p in adapter.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name


async def test_an_error_in_a_segment_reaches_the_caller_and_the_trunk_carries_on():
    trunk = split_model(tiny_model("llama"), SEG_SPLIT, parts=("trunk",)).trunk
    refs = _watch_outputs(trunk)
    fail = {"forward": False}

    def broken(module, args):
        if fail["forward"] and torch.is_grad_enabled():
            raise ValueError("layer 3 refuses these hidden states")

    trunk.layers["3"].register_forward_pre_hook(broken)
    async with LocalTrunk(trunk, training=_limits(1)) as local:
        training = await local.open_training("lora", lora=LoraConfig(rank=2, seed=7))
        fail["forward"] = True
        with pytest.raises(TrunkRejected, match="layer 3 refuses these hidden states"):
            await training.forward(*_inputs())
        assert local.training.pending_steps == 0
        gc.collect()
        assert len(refs) == 2 and all(ref() is None for ref in refs)
        fail["forward"] = False
        out, step_id = await training.forward(*_inputs())  # the session and the trunk carry on
        huge = torch.full_like(out, 3e38)
        with pytest.raises(TrunkRejected, match="NaN or infinite gradients"):
            await training.backward(step_id, huge)
        assert training.pending_steps == 1  # the step is kept: nothing was accumulated
        grad_in = await training.backward(step_id, torch.ones_like(out))
    reference = await _two_steps_once()
    assert torch.equal(grad_in, reference)


async def _two_steps_once() -> torch.Tensor:
    """The input gradient of one unsegmented forward and backward with ones, on a fresh equal trunk."""
    trunk = split_model(tiny_model("llama"), SEG_SPLIT, parts=("trunk",)).trunk
    async with LocalTrunk(trunk, training=_limits(None)) as local:
        training = await local.open_training("lora", lora=LoraConfig(rank=2, seed=7))
        out, step_id = await training.forward(*_inputs())
        return await training.backward(step_id, torch.ones_like(out))


def test_a_trunk_call_over_some_layers_is_checked():
    trunk = split_model(tiny_model("llama"), SEG_SPLIT, parts=("trunk",)).trunk
    hidden, mask, positions = _inputs()
    for bad in ((0, 2), (2, 2), (3, 6), (4, 3)):
        with pytest.raises(ConfigError, match=r"not a non-empty range of this trunk's layers \[1, 5\)"):
            trunk(hidden, mask, positions, layers=bad)
    with pytest.raises(ConfigError, match="cannot take a KV cache"):
        trunk(hidden, mask, positions, cache=trunk.new_cache(B), layers=(1, 3))
    with torch.no_grad():  # chained, the segments are the whole call
        whole = trunk(hidden, mask, positions)
        assert torch.equal(trunk(trunk(hidden, mask, positions, layers=(1, 2)), mask, positions, layers=(2, 5)), whole)
