"""Training on the gRPC server: bad input, bounds, memory after a vanished client, adapters, fairness."""

from __future__ import annotations

import asyncio
import gc
import weakref

import grpc
import pytest
import torch

from splitlearn_async import (
    LoraConfig,
    RemoteTrunk,
    SessionNotFound,
    TrunkBusy,
    TrunkRejected,
    merge_adapter,
    split_model,
)
from splitlearn_async import protocol as proto
from splitlearn_async.wire import pack
from splitlearn_async.client._remote_training import (
    delete_remote_adapter,
    load_remote_adapter,
    open_remote_training,
)
from splitlearn_async.client._training import TrunkState
from splitlearn_async import OptimizerConfig, SplitTrainer, TrainingConfig
from splitlearn_async.training import from_safetensors
from tests.support.rpc import load_adapter_bodies, served, unary, upload
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import (
    SPLIT,
    TOL,
    clone_model,
    make_batch,
    max_diff,
)

H = 64  # hidden size of the tiny models


def _identity(body: bytes) -> bytes:
    return body


def tiny_trunk(family: str = "llama", seed: int = 0):
    model = tiny_model(family, seed=seed)
    (trunk,) = [s for s in split_model(clone_model(model), SPLIT, parts=("trunk",)) if s is not None]
    return model, trunk


def inputs(batch: int = 2, tokens: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, H, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    return hidden, mask, torch.arange(tokens).expand(batch, tokens)


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    """Poll ``predicate()`` until true (a bound on test time, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_backward_errors_map_to_not_found_and_invalid_argument():
    _, trunk = tiny_trunk()
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        session = await open_remote_training(remote, "lora", lora=LoraConfig(rank=2))
        hidden, mask, pos = inputs()
        out, step_id = await session.forward(hidden, mask, pos)
        assert out.shape == hidden.shape and server.training.pending_steps == 1

        with pytest.raises(SessionNotFound) as unknown:
            await session.backward(step_id + 1000, torch.ones_like(out))
        assert unknown.value.code is grpc.StatusCode.NOT_FOUND and "unknown" in str(unknown.value)

        with pytest.raises(TrunkRejected) as wrong:
            await session.backward(step_id, torch.ones(2, 4, H))
        assert wrong.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "grad_output has shape [2, 4, 64]" in str(wrong.value) and "[2, 5, 64]" in str(wrong.value)

        bad = torch.ones_like(out)
        bad[0, 0, 0] = float("nan")
        with pytest.raises(TrunkRejected) as nan:
            await session.backward(step_id, bad)
        assert nan.value.code is grpc.StatusCode.INVALID_ARGUMENT

        # the step survived the bad gradients; the right one works, and only once
        grad_in = await session.backward(step_id, torch.ones_like(out))
        assert grad_in.shape == hidden.shape and bool(grad_in.abs().sum() > 0)
        with pytest.raises(SessionNotFound):
            await session.backward(step_id, torch.ones_like(out))
        assert server.training.pending_steps == 0

        await session.aclose()
        with pytest.raises(SessionNotFound) as closed:
            body = proto.build_backward(session.training_id, step_id, torch.ones_like(out))
            await remote.unary(proto.METHOD_BACKWARD, body, what="a backward", retry=False)
        assert "training session" in str(closed.value)


async def test_malformed_bodies_are_invalid_argument_and_the_server_carries_on():
    _, trunk = tiny_trunk()
    async with served(trunk) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            for method, body in [
                (proto.METHOD_TRAIN_OPEN, b"\x01\x02"),
                (proto.METHOD_TRAIN_OPEN, pack({"kind": "open", "mode": "everything"})),
                (proto.METHOD_TRAIN_OPEN, pack({"kind": "open", "mode": "lora", "optimizer": {"lr": -1}})),
                (proto.METHOD_BACKWARD, pack({"kind": "backward", "training_id": "x", "step_id": -3})),
                (proto.METHOD_TRAIN_FORWARD, pack({"kind": "forward"})),
                (proto.METHOD_LOAD_ADAPTER, load_adapter_bodies("a", b"not safetensors")),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if isinstance(body, list):
                        await upload(chan, method, body)
                    else:
                        await unary(chan, method, body)
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
                assert err.value.details().endswith(".")
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:  # still serving
            assert (await remote.info())["training"] is True


async def test_pending_steps_are_bounded_and_apply_waits_for_the_others():
    _, trunk = tiny_trunk()
    async with served(trunk, max_pending_steps=2) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        session = await open_remote_training(remote, "lora", lora=LoraConfig(rank=2))
        hidden, mask, pos = inputs()
        _, first = await session.forward(hidden, mask, pos)
        _, second = await session.forward(hidden, mask, pos)
        with pytest.raises(TrunkBusy) as full:
            await session.forward(hidden, mask, pos)
        assert full.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_steps=2" in str(full.value)
        with pytest.raises(TrunkRejected) as early:
            await session.backward(first, torch.ones_like(hidden), apply=True)
        assert early.value.code is grpc.StatusCode.FAILED_PRECONDITION
        await session.backward(first, torch.ones_like(hidden), apply=False)  # accumulate
        await session.backward(second, torch.ones_like(hidden), apply=True)
        assert server.training.pending_steps == 0
        _, third = await session.forward(hidden, mask, pos)  # room again
        await session.backward(third, torch.ones_like(hidden), apply=False)
        assert await session.optimizer_step() == 2


async def test_memory_returns_after_a_client_vanishes_mid_step():
    _, trunk = tiny_trunk()
    async with served(trunk, pending_step_ttl_s=0.3, session_ttl_s=0.6) as server:
        remote = RemoteTrunk(f"127.0.0.1:{server.port}")
        session = await open_remote_training(remote, "lora", lora=LoraConfig(rank=2))
        hidden, mask, pos = inputs(batch=4, tokens=16)
        _, step_id = await session.forward(hidden, mask, pos)
        (graph,) = server.training.host.pending.of_owner(session.training_id)
        kept = weakref.ref(graph.outputs)
        assert server.training.pending_bytes > hidden.numel() * 4  # activations of several layers
        await remote.aclose()  # the client vanishes: no backward, no close

        await wait_until(lambda: server.training.pending_steps == 0)
        gc.collect()
        assert kept() is None, "the graph's output tensor is still alive"
        assert server.training.pending_bytes == 0
        await wait_until(lambda: not server.training.host.sessions)  # the idle training session expires too
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as again:
            with pytest.raises(SessionNotFound):
                body = proto.build_backward(session.training_id, step_id, torch.ones_like(hidden))
                await again.unary(proto.METHOD_BACKWARD, body, what="a late backward", retry=False)


async def test_full_training_needs_the_server_opt_in():
    _, trunk = tiny_trunk()
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        with pytest.raises(TrunkRejected) as refused:
            await open_remote_training(remote, "full")
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "allow_full_training" in str(refused.value)
    async with served(trunk, allow_full_training=True) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        lora = await open_remote_training(remote, "lora")
        with pytest.raises(TrunkRejected, match="beside other training sessions"):
            await open_remote_training(remote, "full")
        await lora.aclose()
        full = await open_remote_training(remote, "full")
        assert full.trainable_parameters == sum(p.numel() for p in trunk.parameters())


async def _trunk_session_outputs(port: int, case, adapter_id: str | None) -> list[torch.Tensor]:
    """Open a raw inference session (prompt + one-token steps) with ``adapter_id``; its outputs."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        call = chan.stream_stream(proto.METHOD_SESSION, request_serializer=_identity, response_deserializer=_identity)()
        outs = []
        for i, (h, m, p) in enumerate(case):
            body = proto.build_open(h, m, p, adapter_id=adapter_id) if i == 0 else proto.build_step(h, m, p)
            await call.write(body)
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(await call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(), await call.details())
            outs.append(proto.parse_result(reply).hidden_states.clone())
        await call.write(proto.build_close())
        await call.read()
        await call.done_writing()
        return outs


def decode_case(seed: int = 3):
    hidden, mask, pos = inputs(batch=2, tokens=6, seed=seed)
    steps = [(torch.randn(2, 1, H, generator=torch.Generator().manual_seed(seed + i)), torch.ones(2, 1, dtype=torch.long),
              torch.full((2, 1), 6 + i)) for i in range(3)]
    return [(hidden, mask, pos), *steps]


def in_process(trunk, case) -> list[torch.Tensor]:
    cache = trunk.new_cache(case[0][0].shape[0])
    with torch.no_grad():
        return [trunk(h, m, p, cache=cache) for h, m, p in case]


async def test_trained_adapter_saves_loads_and_serves_like_the_merged_model(tmp_path, family):
    model, trunk = tiny_trunk(family)
    bottom, _, top = split_model(model, SPLIT, parts=("bottom", "top"))
    opt = OptimizerConfig("adamw", lr=1e-2)
    targets = ("c_attn",) if family == "gpt2" else ("q_proj", "v_proj")
    config = TrainingConfig(optimizer=opt, lora=LoraConfig(rank=4, alpha=8, target_modules=targets, seed=0), adapter_id="tuned")
    case = decode_case()
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitTrainer(bottom, remote, top, config) as trainer:
            for seed in range(3):
                await trainer.step(make_batch(seed))
            files = await trainer.save_trunk(tmp_path)
            assert trainer.adapter_id == "tuned"
            evaluated = await trainer.evaluate(make_batch(5))
            assert server.training.pending_steps == 0
        assert {f.name for f in files} == {"adapter.safetensors", "trunk_optimizer.safetensors"}
        state = TrunkState.load(tmp_path)
        await load_remote_adapter(remote, "reloaded", state.weights)
        with_adapter = await _trunk_session_outputs(server.port, case, "reloaded")
        trained = await _trunk_session_outputs(server.port, case, "tuned")
        base = await _trunk_session_outputs(server.port, case, None)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await _trunk_session_outputs(server.port, case, "no-such-adapter")
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        await delete_remote_adapter(remote, "reloaded")
        with pytest.raises(SessionNotFound):
            await delete_remote_adapter(remote, "reloaded")

    tensors, meta = from_safetensors(state.weights)
    merged = clone_model(model)
    assert merge_adapter(merged, tensors, meta) == len(tensors) // 2 > 0
    (merged_trunk,) = [s for s in split_model(merged, SPLIT, parts=("trunk",)) if s is not None]
    expected = in_process(merged_trunk, case)
    plain = in_process(trunk, case)
    from splitlearn_async.training import causal_lm_loss

    batch = make_batch(5)
    full_merged = clone_model(model)  # trained bottom and top (they share `model`'s weights), base trunk
    merge_adapter(full_merged, tensors, meta)
    with torch.no_grad():
        logits = full_merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    assert abs(evaluated - float(causal_lm_loss(logits, batch["labels"]))) <= TOL
    for got, again, want, b, p in zip(with_adapter, trained, expected, base, plain):
        assert max_diff(got, want) <= TOL
        assert torch.equal(got, again)  # the reloaded file serves exactly as the trained adapter
        assert torch.equal(b, p)  # sessions without an adapter see the base weights, bit for bit
        assert max_diff(got, p) > 1e-4  # and the adapter does change the output


async def test_optimizer_state_round_trip_resumes_training_exactly():
    """Save after step 1, resume on a fresh trunk: step 2 equals step 2 of the uninterrupted run."""
    from splitlearn_async import LocalTrunk

    model = tiny_model("llama")
    opt = OptimizerConfig("adamw", lr=1e-2)
    hidden, mask, pos = inputs(seed=7)
    grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(8))

    async def two_steps(trunk_stage, resume=None):
        async with LocalTrunk(trunk_stage) as local:
            if resume is None:
                session = await local.open_training("lora", lora=LoraConfig(rank=2, seed=1), optimizer=opt)
                out, step = await session.forward(hidden, mask, pos)
                await session.backward(step, grad)
                saved = await session.state()
            else:
                session = await local.open_training("lora", optimizer=opt, weights=resume.weights, optimizer_state=resume.optimizer)
                saved = resume
            out, step = await session.forward(hidden, mask, pos)
            await session.backward(step, grad)
            return saved, from_safetensors((await session.state()).weights)[0]

    (t1,) = [s for s in split_model(clone_model(model), SPLIT, parts=("trunk",)) if s is not None]
    (t2,) = [s for s in split_model(clone_model(model), SPLIT, parts=("trunk",)) if s is not None]
    saved, uninterrupted = await two_steps(t1)
    _, resumed = await two_steps(t2, resume=saved)
    assert set(resumed) == set(uninterrupted)
    for name in resumed:
        assert max_diff(resumed[name], uninterrupted[name]) <= 1e-7, name


async def test_decode_steps_interleave_with_training_steps():
    """Inference is not starved: between two decode steps of a session the worker runs at most
    the training forward that was running or queued when the step arrived (FIFO, one item each)."""
    model, trunk = tiny_trunk("llama")
    order: list[str] = []
    trunk.register_forward_pre_hook(lambda m, a: order.append("train" if torch.is_grad_enabled() else "decode"))
    bottom, _, top = split_model(model, SPLIT, parts=("bottom", "top"))
    big = {k: v.repeat(4, 4) for k, v in make_batch().items()}  # (8, 32): a training step outweighs a decode step
    big["position_ids"] = torch.arange(32).expand(8, 32)
    big["attention_mask"] = torch.ones(8, 32, dtype=torch.long)
    big["labels"] = big["input_ids"]
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        stop = asyncio.Event()

        async def train() -> int:
            steps = 0
            async with SplitTrainer(bottom, remote, top, TrainingConfig(optimizer=OptimizerConfig(lr=1e-4))) as trainer:
                while not stop.is_set():
                    await trainer.step(big)
                    steps += 1
            return steps

        task = asyncio.create_task(train())
        await wait_until(lambda: "train" in order)
        case = [decode_case()[0]] + [step for step in decode_case()[1:] for _ in range(13)]
        for i, (h, m, p) in enumerate(case[1:]):
            case[i + 1] = (h, m, torch.full((2, 1), 6 + i))
        await _trunk_session_outputs(server.port, case, None)
        stop.set()
        steps = await task
    decodes = [i for i, kind in enumerate(order) if kind == "decode"]
    assert len(decodes) == len(case) and steps >= 1
    first, last = decodes[0], decodes[-1]
    assert "train" in order[first:last], "training did not run while the session decoded"
    gaps = [b - a - 1 for a, b in zip(decodes, decodes[1:])]
    assert max(gaps) <= 2, f"a decode step waited behind {max(gaps)} training forwards: {order[first:last + 1]}"


async def test_concurrent_sessions_with_different_adapters_batch_apart_and_stay_exact():
    """Sessions with adapter a, adapter b and none decode at once on a batching server; each equals
    its own in-process run (decode steps are batched only within the same adapter)."""
    from splitlearn_async.training import to_safetensors
    from splitlearn_async.training._lora import LoraAdapter, bind_adapter

    _, trunk = tiny_trunk("qwen2")
    files = {}
    for seed, name in ((1, "a"), (2, "b")):
        adapter = LoraAdapter(trunk, 2, 4.0, ("q_proj", "down_proj"), seed=seed, adapter_id=name)
        with torch.no_grad():
            for _, b in adapter.pairs.values():
                b.normal_(generator=torch.Generator().manual_seed(seed))
        files[name] = (adapter, to_safetensors(adapter.state_tensors(), adapter.metadata()))
    case = decode_case()
    expected = {}
    for name in ("a", "b", None):
        cache = trunk.new_cache(2)
        if name is not None:
            bind_adapter(cache, files[name][0])
        with torch.no_grad():
            expected[name] = [trunk(h, m, p, cache=cache) for h, m, p in case]
    async with served(trunk, max_batch_delay_s=0.005) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        for name, (_, data) in files.items():
            await load_remote_adapter(remote, name, data)
        runs = [("a", 0), ("b", 1), (None, 2), ("a", 3), (None, 4)]
        results = await asyncio.gather(*[_trunk_session_outputs(server.port, case, name) for name, _ in runs])
        batches = server.worker.stats.batch_size_counts
    for (name, _), outs in zip(runs, results):
        for got, want in zip(outs, expected[name]):
            assert max_diff(got, want) <= TOL, name
    assert max_diff(expected["a"][-1], expected[None][-1]) > 1e-3  # the adapters matter
    assert any(size > 1 for size in batches), f"no step was batched: {batches}"
