"""Checkpoints in chunks: TrainSave, TrainOpen and LoadAdapter over a real server.

The states here are many times the message limit of both ends (``LIMIT``), so each
crossed in many chunks: exact round trips of an adapter and of a whole trunk prove that a
checkpoint of any size saves and loads back under the limit. Then every way a stream can
be wrong, each answered with its status and sentence while the server serves on.
"""

from __future__ import annotations

import contextlib
import hashlib

import grpc
import msgpack
import pytest
import torch

from splitlearn_async import (
    ClientConfig,
    LoraConfig,
    OptimizerConfig,
    PreconditionFailed,
    RemoteTrunk,
    TrunkError,
    TrunkRejected,
    split_model,
)
from splitlearn_async import protocol as proto
from splitlearn_async.errors import WireError
from splitlearn_async.training import from_safetensors, to_safetensors
from splitlearn_async.training._lora import LoraAdapter
from splitlearn_async.wire import pack
from tests.support.rpc import channel, load_adapter_bodies, make_case, reference, run_session, served
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import SPLIT
from tests.support.waiting import wait_until

H = 64
LIMIT = 16 << 10  # max_message_bytes of server and client: far below every state saved here
ADAMW = OptimizerConfig("adamw", lr=1e-2)


def fresh_trunk():
    """A tiny llama trunk of its own (full training changes the served weights)."""
    return split_model(tiny_model("llama"), SPLIT, parts=("trunk",)).trunk


def client(port: int, chunk_bytes: int | None = None) -> RemoteTrunk:
    return RemoteTrunk(f"127.0.0.1:{port}", ClientConfig(max_message_bytes=LIMIT, chunk_bytes=chunk_bytes))


async def one_step(session, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, H, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    out, step = await session.forward(hidden, mask, torch.arange(5).expand(2, 5))
    await session.backward(step, torch.randn(out.shape, generator=g), apply=True)


def tensors(blob: bytes) -> dict[str, torch.Tensor]:
    return from_safetensors(blob)[0]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def assert_same_file(got: bytes, want: bytes) -> None:
    """Two safetensors files with equal tensors (exactly) and metadata (its order is not kept)."""
    (got_tensors, got_meta), (want_tensors, want_meta) = from_safetensors(got), from_safetensors(want)
    assert_same(got_tensors, want_tensors)
    assert got_meta == want_meta


def adapter_file(trunk, rank: int = 4, targets=("q_proj", "v_proj")) -> bytes:
    adapter = LoraAdapter(trunk, rank, 8.0, targets, 0.0, seed=0, adapter_id="file")
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.normal_()  # B = 0 at creation; a file with values everywhere is a better witness
    return to_safetensors(adapter.state_tensors(), adapter.metadata())


def optimizer_tensors(trainer) -> dict[str, torch.Tensor]:
    return {f"{n}::{k}": torch.as_tensor(v) for n, p in trainer.named_params for k, v in trainer.optimizer.state[p].items()}


# --- the protocol's reader, alone --------------------------------------------------------------


def _stream(data: bytes, chunk_bytes: int = 512):
    blobs = proto.describe_blobs({"weights": data})
    chunks = [proto.parse_chunk(msgpack.unpackb(b)) for b in proto.chunk_bodies(blobs, {"weights": data}, chunk_bytes)]
    return blobs, chunks


def test_the_assembler_takes_a_stream_back_whole_and_names_each_fault():
    data = bytes(range(256)) * 9  # 2304 bytes: 5 chunks of 512
    blobs, chunks = _stream(data)
    good = proto.BlobAssembler(blobs, 512)
    assert [good.add(c) for c in chunks][-1] == blobs[0] and good.take() == {"weights": data}

    def fails(sequence, words):
        assembler = proto.BlobAssembler(blobs, 512)
        with pytest.raises(WireError) as err:
            for chunk in sequence:
                assembler.add(chunk)
            assembler.check_complete()
        assert words in str(err.value) and str(err.value).endswith("."), str(err.value)

    flipped = proto.Chunk("weights", 512, bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:])
    fails([chunks[0], flipped, *chunks[2:]], "SHA-256 is")
    fails(chunks[:-1], "cut short")
    fails([chunks[0], chunks[2]], "offset 1024 arrived where offset 512")  # out of order
    fails([chunks[0], chunks[0]], "offset 0 arrived where offset 512")  # sent twice
    fails([proto.Chunk("weights", 0, chunks[0].data[:100])], "carries 100 bytes, expected 512")
    fails([proto.Chunk("optimizer_state", 0, chunks[0].data)], "in the declared order")
    fails([*chunks, chunks[-1]], "after every declared blob")


def test_declarations_are_checked_before_any_chunk():
    digest = hashlib.sha256(b"x").hexdigest()
    ok = {"kind": "load", "adapter_id": "a", "chunk_bytes": 1024, "weights": {"bytes": 1, "sha256": digest}}
    for change, words in [
        ({"weights": b"inline bytes"}, "carries the bytes themselves"),
        ({"weights": {"bytes": 0, "sha256": digest}}, "weights'.bytes is 0"),
        ({"weights": {"bytes": 1, "sha256": "XYZ"}}, "64 lowercase hex digits"),
        ({"weights": {"bytes": 1, "sha256": digest, "md5": "x"}}, "unknown field(s) 'md5'"),
        ({"chunk_bytes": 100}, "at least 512"),
        ({"chunk_bytes": LIMIT}, f"at most {LIMIT - proto.CHUNK_OVERHEAD}"),
        ({"chunk_bytes": None}, "'chunk_bytes' is missing"),
        ({"weights": None}, "'weights' is missing"),
    ]:
        with pytest.raises(ValueError) as err:
            proto.parse_load_adapter(pack(ok | change), max_message_bytes=LIMIT)
        assert words in str(err.value), (change, str(err.value))


# --- exact round trips under a small message limit ---------------------------------------------


async def test_an_adapter_and_its_optimizer_round_trip_exactly_in_many_chunks(tmp_path):
    trunk = fresh_trunk()
    lora = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=0)
    async with served(trunk, max_message_bytes=LIMIT) as server, client(server.port, chunk_bytes=1024) as remote:
        session = await remote.open_training("lora", lora=lora, optimizer=ADAMW, adapter_id="tuned")
        await one_step(session)
        state = await session.state()
        assert len(state.weights) > 8 * 1024 and len(state.optimizer) > LIMIT  # many chunks each way
        host = server.training.host
        trainer = host.entry(session.training_id).trainer
        assert_same(tensors(state.weights), host.adapter("tuned").state_tensors())
        assert_same(tensors(state.optimizer), optimizer_tensors(trainer))

        files = await session.save(tmp_path)  # streamed to disk chunk by chunk
        assert sorted(f.name for f in files) == ["adapter.safetensors", "trunk_optimizer.safetensors"]
        assert_same_file((tmp_path / "adapter.safetensors").read_bytes(), state.weights)
        assert_same_file((tmp_path / "trunk_optimizer.safetensors").read_bytes(), state.optimizer)
        assert not list(tmp_path.glob("*.partial"))

        await remote.load_adapter("copy", state.weights)  # LoadAdapter: client-streaming
        assert_same(host.adapter("copy").state_tensors(), tensors(state.weights))

        resumed = await remote.open_training(  # TrainOpen with a checkpoint: client-streaming
            "lora", optimizer=ADAMW, adapter_id="resumed", weights=state.weights, optimizer_state=state.optimizer
        )
        again = await resumed.state()
        assert_same(tensors(again.weights), tensors(state.weights))
        assert_same_file(again.optimizer, state.optimizer)  # names, values, settings, step count
        assert server.training.transfers.in_flight == 0


async def test_a_full_trunk_saves_and_loads_back_exactly_in_many_chunks():
    trunk = fresh_trunk()
    async with (
        served(trunk, max_message_bytes=LIMIT, allow_full_training=True) as server,
        client(server.port) as remote,
    ):
        session = await remote.open_training("full", optimizer=ADAMW)
        await one_step(session)
        state = await session.state()
        assert len(state.weights) > 10 * LIMIT and len(state.optimizer) > 20 * LIMIT
        served_weights = {trunk.checkpoint_name(n): p.detach() for n, p in trunk.named_parameters()}
        assert_same(tensors(state.weights), served_weights)
        assert_same(tensors(state.optimizer), optimizer_tensors(server.training.host.entry(session.training_id).trainer))
        await session.aclose()

        with torch.no_grad():
            for p in trunk.parameters():
                p.add_(1.0)  # the served trunk drifts away from the saved state
        resumed = await remote.open_training("full", optimizer=ADAMW, weights=state.weights, optimizer_state=state.optimizer)
        assert_same({trunk.checkpoint_name(n): p.detach() for n, p in trunk.named_parameters()}, tensors(state.weights))
        again = await resumed.state()
        assert_same_file(again.weights, state.weights)  # loaded back exactly
        assert_same_file(again.optimizer, state.optimizer)
        trainer = server.training.host.entry(resumed.training_id).trainer
        assert trainer.optimizer_steps == 1


# --- a corrupt or short TrainSave stream, seen by the client ----------------------------------


@pytest.mark.parametrize("fault, words", [("flip", "SHA-256 is"), ("drop", "cut short"), ("repeat", "offset")])
async def test_a_corrupt_save_stream_is_a_trunk_error_and_leaves_no_file(tmp_path, monkeypatch, fault, words):
    trunk = fresh_trunk()
    real = proto.chunk_bodies

    def faulty(blobs, data, chunk_bytes):
        bodies = list(real(blobs, data, chunk_bytes))
        if fault == "flip":
            msg = msgpack.unpackb(bodies[1])
            msg["data"] = bytes([msg["data"][0] ^ 1]) + msg["data"][1:]
            bodies[1] = msgpack.packb(msg)
        elif fault == "drop":
            bodies.pop()
        else:
            bodies.insert(2, bodies[1])
        return iter(bodies)

    async with served(trunk, max_message_bytes=LIMIT) as server, client(server.port, chunk_bytes=1024) as remote:
        session = await remote.open_training("lora", lora=LoraConfig(rank=4, seed=0), optimizer=ADAMW)
        await one_step(session)
        (tmp_path / "adapter.safetensors").write_bytes(b"an earlier save")
        monkeypatch.setattr(proto, "chunk_bodies", faulty)
        with pytest.raises(TrunkError) as err:
            await session.state()
        assert "is corrupt" in str(err.value) and words in str(err.value), str(err.value)
        with pytest.raises(TrunkError):
            await session.save(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
        assert (tmp_path / "adapter.safetensors").read_bytes() == b"an earlier save"
        monkeypatch.setattr(proto, "chunk_bodies", real)
        assert len((await session.state()).weights) > 0  # the session is unharmed
        assert server.training.transfers.in_flight == 0


# --- hostile uploads ---------------------------------------------------------------------------


async def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _upload(chan: grpc.aio.Channel, method: str, bodies: list[bytes] | None = None):
    """A client-streaming call: ``bodies`` sent and the stream ended, or (None) left open to write by hand."""
    stub = chan.stream_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return stub(iter(bodies)) if bodies is not None else stub()


def _rebuilt(body: bytes, **change) -> bytes:
    return msgpack.packb(msgpack.unpackb(body) | change)


async def test_bad_adapter_uploads_get_their_status_and_sentence_and_the_server_serves_on():
    trunk = fresh_trunk()
    weights = adapter_file(trunk)
    good = load_adapter_bodies("a", weights, 1024)
    assert len(good) > 8
    flipped = msgpack.unpackb(good[3])
    flipped["data"] = bytes([flipped["data"][0] ^ 0xFF]) + flipped["data"][1:]
    invalid = [
        ("corrupted bytes", [*good[:3], msgpack.packb(flipped), *good[4:]], "SHA-256 is"),
        ("truncated", good[:-1], "cut short"),
        ("out of order", [good[0], good[2], good[1], *good[3:]], "offset 1024 arrived where offset 0"),
        ("duplicate", [*good[:3], good[2], *good[3:]], "offset 1024 arrived where offset 2048"),
        ("short chunk", [good[0], _rebuilt(good[1], data=b"x" * 1000), *good[2:]], "carries 1000 bytes, expected 1024"),
        ("chunk over the limit", [good[0], _rebuilt(good[1], data=b"x" * LIMIT)], f"max_message_bytes={LIMIT}"),
        ("chunk_bytes over the limit", [_rebuilt(good[0], chunk_bytes=LIMIT), *good[1:]], "'chunk_bytes' is"),
        ("unknown header field", [_rebuilt(good[0], note="hi"), *good[1:]], "unknown field(s) 'note'"),
        ("unknown chunk field", [good[0], _rebuilt(good[1], crc=1), *good[2:]], "unknown field(s) 'crc'"),
        ("after the last chunk", [*good, good[-1]], "followed the last chunk"),
        ("a chunk first", good[1:], "a 'chunk' message arrived where 'load' was expected"),
        ("nothing", [], "ended before its first message"),
        ("inline bytes", [pack({"kind": "load", "adapter_id": "a", "weights": weights})], "bytes themselves"),
        ("over max_checkpoint_bytes", [_rebuilt(good[0], weights={"bytes": 1 << 40, "sha256": "0" * 64})],
         "max_checkpoint_bytes=2147483648"),
        ("not an adapter", load_adapter_bodies("a", b"\x00" * 5000), "not a valid safetensors file"),
        ("too big a rank", load_adapter_bodies("a", adapter_file(trunk, rank=80)), "max_lora_rank=64"),
    ]
    async with served(trunk, max_message_bytes=LIMIT) as server, channel(server.port) as chan:
        for name, bodies, words in invalid:
            code, details = await _code(_upload(chan, proto.METHOD_LOAD_ADAPTER, bodies))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
            assert words in details and details.endswith("."), (name, details)
        assert server.training.host.adapters.adapters == {} and server.training.transfers.in_flight == 0
        case = make_case(batch=1, prompt=3, steps=2, hidden_size=H, seed=0)
        got = await run_session(chan, case)  # other sessions are served as before
        assert all(torch.equal(g, e) for g, e in zip(got, reference(trunk, case), strict=True))
        code, details = await _code(_upload(chan, proto.METHOD_LOAD_ADAPTER, good))
        assert code == grpc.StatusCode.OK, details
        assert_same(server.training.host.adapter("a").state_tensors(), tensors(weights))


async def test_uploads_are_refused_before_their_bytes_and_share_one_budget():
    trunk = fresh_trunk()
    weights = adapter_file(trunk, rank=1, targets=("q_proj",))
    good = load_adapter_bodies("a", weights, 512)
    async with (
        served(trunk, max_message_bytes=LIMIT, max_checkpoint_bytes=len(weights) * 3 // 2, session_ttl_s=0.5) as server,
        channel(server.port) as chan,
    ):
        # a TrainOpen the rules refuse is answered after its header, though its chunks never come
        digest = hashlib.sha256(b"x").hexdigest()
        header = proto.build_train_open("full", {}, blobs=[proto.Blob("weights", 10_000, digest)], chunk_bytes=1024)
        call = _upload(chan, proto.METHOD_TRAIN_OPEN)
        await call.write(header)
        code, details = await _code(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "allow_full_training" in details, details

        # one upload holds the budget: a second one that does not fit beside it waits for nothing
        first = _upload(chan, proto.METHOD_LOAD_ADAPTER)
        await first.write(good[0])
        await first.write(good[1])
        await wait_until(lambda: server.training.transfers.in_flight > 0, what="the first upload's reservation")
        code, details = await _code(_upload(chan, proto.METHOD_LOAD_ADAPTER, load_adapter_bodies("b", weights, 512)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "does not fit beside" in details, details
        # and an idle upload is dropped after session_ttl_s, freeing its share
        code, details = await _code(first)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "session_ttl_s=0.5" in details, details
        assert server.training.transfers.in_flight == 0

        # a cancelled upload frees its share at once, too
        cancelled = _upload(chan, proto.METHOD_LOAD_ADAPTER)
        await cancelled.write(good[0])
        await wait_until(lambda: server.training.transfers.in_flight > 0, what="the upload's reservation")
        cancelled.cancel()
        await wait_until(lambda: server.training.transfers.in_flight == 0, what="the cancelled upload's release")
        code, details = await _code(_upload(chan, proto.METHOD_LOAD_ADAPTER, good))
        assert code == grpc.StatusCode.OK, details
        assert sorted(server.training.host.adapters.adapters) == ["a"]


async def test_save_rules_one_stream_per_session_the_budget_and_the_chunk_floor():
    trunk = fresh_trunk()
    async with served(trunk, max_message_bytes=LIMIT, max_checkpoint_bytes=4000) as server, client(server.port) as remote:
        lora = LoraConfig(rank=2, target_modules=("q_proj",), seed=0)
        session = await remote.open_training("lora", lora=lora, optimizer=ADAMW)
        state = await session.state(optimizer=False)  # a small adapter: a few kB
        with server.training.transfers.one_save(session.training_id), pytest.raises(PreconditionFailed) as busy:
            await session.state()
        assert "still streaming" in str(busy.value)
        await one_step(session)
        with pytest.raises(TrunkRejected) as big:  # with its AdamW state, over 4 kB
            await session.state()
        assert big.value.code is grpc.StatusCode.INVALID_ARGUMENT and "max_checkpoint_bytes=4000" in str(big.value)
        body = proto.build_training_call(proto.Kind.SAVE, session.training_id, chunk_bytes=100)
        with pytest.raises(TrunkRejected) as small:
            async with contextlib.aclosing(remote.download(proto.METHOD_TRAIN_SAVE, body, what="a save")) as replies:
                async for _ in replies:
                    pass
        assert "at least 512" in str(small.value)
        assert 0 < len(state.weights) < 4000 and server.training.transfers.in_flight == 0
        await session.aclose()
        frozen = await remote.open_training("frozen", optimizer=ADAMW)
        nothing = await frozen.state()  # a frozen trunk: no weights blob, an empty optimizer state
        kept, meta = from_safetensors(nothing.optimizer)
        assert nothing.weights == b"" and kept == {} and meta["format"] == "splitlearn-optimizer/1"
        assert (await frozen.state(optimizer=False)).optimizer is None


async def test_on_a_server_of_several_models_uploads_reach_their_model_and_share_one_budget():
    from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig

    trunk_a, trunk_b = fresh_trunk(), fresh_trunk()
    weights = adapter_file(trunk_b, rank=1, targets=("q_proj",))
    good = load_adapter_bodies("x", weights, 512)
    config = ServerConfig(max_message_bytes=LIMIT, max_checkpoint_bytes=len(weights) * 3 // 2)
    server = AsyncGRPCComputeServer({"a": trunk_a, "b": trunk_b}, "127.0.0.1", 0, config)
    await server.start()
    try:
        async with channel(server.port) as chan:
            stub = chan.stream_unary(proto.METHOD_LOAD_ADAPTER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            held = stub(metadata=((proto.MODEL_METADATA, "a"),))  # an upload to model a holds the budget
            await held.write(good[0])
            await wait_until(lambda: server.models.slot("a").services.training.transfers.in_flight > 0)
            code, details = await _code(stub(iter(good), metadata=((proto.MODEL_METADATA, "b"),)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "does not fit beside" in details, details
            held.cancel()
            await wait_until(lambda: server.models.slot("b").services.training.transfers.in_flight == 0)
        async with RemoteTrunk(f"127.0.0.1:{server.port}", ClientConfig(max_message_bytes=LIMIT), model="b") as remote:
            await remote.load_adapter("x", weights)
        hosts = {name: server.models.slot(name).services.training.host for name in "ab"}
        assert sorted(hosts["a"].adapters.adapters) == [] and sorted(hosts["b"].adapters.adapters) == ["x"]
        assert_same(hosts["b"].adapter("x").state_tensors(), tensors(weights))
    finally:
        await server.stop(grace=1.0)
