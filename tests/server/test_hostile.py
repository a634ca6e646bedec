"""Hostile input: each finding of the adversarial pass, and fuzzing of every method.

Every message is checked before it costs anything; every reply is finite; no input gets
INTERNAL or UNKNOWN, stalls the server, or grows its memory.
"""

from __future__ import annotations

import json
import random

import grpc
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from splitlearn_async import protocol as proto
from splitlearn_async import split_model
from splitlearn_async.server import ServerConfig
from splitlearn_async.wire import Kind, encode_tensor, pack
from tests.support.rpc import (
    RawSession,
    channel,
    load_adapter_bodies,
    make_case,
    reference,
    run_session,
    served,
    unary,
    upload,
)
from tests.support.tiny_models import tiny_model

H = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def _status(chan: grpc.aio.Channel, method: str, body: bytes | list[bytes]) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(body, list):  # a client-streaming call
            await upload(chan, method, body)
        else:
            await unary(chan, method, body)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _adapter_file(rank: object, target_modules: object = None, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A LoadAdapter body's weights: an (almost) empty adapter file claiming these settings."""
    meta = {
        "format": "splitlearn-lora/1",
        "rank": str(rank),
        "alpha": "16.0",
        "dropout": "0.0",
        "target_modules": json.dumps(target_modules),
    }
    return save(tensors or {"x": torch.zeros(1)}, metadata=meta)


@pytest.mark.parametrize(
    "rank, targets, words",
    [
        ("0", None, "rank must be an int in 1..4096"),  # once a ZeroDivisionError: INTERNAL
        ("-3", None, "rank must be an int in 1..4096"),
        ("abc", None, "out of range"),
        ("8", "5", "target_modules must be a sequence"),  # once a TypeError: INTERNAL
        ("8", {"q_proj": 1}, "target_modules must be a sequence"),
        ("8", ["no_such_layer"], "no linear layer of the trunk matches"),
        ("40000", None, "rank must be an int in 1..4096"),
        ("4000", None, "max_lora_rank=64"),  # a 200-byte file once allocated hundreds of MB
        ("64", None, "max_adapter_elements=1000"),
        ("8", [f"m{i}" for i in range(20)], "max_lora_targets=16"),
    ],
)
async def test_load_adapter_settings_are_checked_before_anything_is_built(trunk, rank, targets, words):
    async with served(trunk, max_adapter_elements=1000) as server, channel(server.port) as chan:
        before = _rss_bytes()
        code, details = await _status(chan, proto.METHOD_LOAD_ADAPTER, load_adapter_bodies("a", _adapter_file(rank, targets)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert words in details and details.endswith("."), details
        assert _rss_bytes() - before < 64 << 20  # nothing of the claimed size was allocated
        assert server.training.host.adapters.adapters == {}


async def test_train_open_shares_the_rules_of_load_adapter(trunk):
    async with served(trunk) as server, channel(server.port) as chan:
        for lora, words in [
            ({"rank": 8, "target_modules": {"q_proj": 1}}, "target_modules must be a sequence"),  # a map
            ({"rank": 4000}, "max_lora_rank=64"),
            ({"rank": 8, "target_modules": [f"m{i}" for i in range(20)]}, "max_lora_targets=16"),
        ]:
            body = pack({"kind": "open", "mode": "lora", "optimizer": {}, "lora": lora})
            code, details = await _status(chan, proto.METHOD_TRAIN_OPEN, body)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
        assert server.training.host.sessions == {}


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(msgpack.packb({"kind": "forward", "x": [[]] * 2_000_000}), id="flat"),
        pytest.param(msgpack.packb({"kind": "forward", "x": [[[[[] for _ in range(16)] for _ in range(16)] for _ in range(16)]]}), id="tree"),
        pytest.param(b"\x81\xa4kind" + b"\x91" * 2_000_000 + b"\x90", id="deep"),
        pytest.param(msgpack.packb({"kind": "forward", "s": "x" * 100_000}), id="long-string"),
    ],
)
async def test_a_msgpack_bomb_costs_nothing(trunk, bomb):
    async with served(trunk) as server, channel(server.port) as chan:
        before = _rss_bytes()
        for method in (proto.METHOD_FORWARD, proto.METHOD_TRAIN_OPEN, proto.METHOD_LOAD_ADAPTER):
            code, details = await _status(chan, method, bomb)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        # once +300 MB and a stalled loop; the limits stop the decoder within a few hundred objects
        assert _rss_bytes() - before < 32 << 20
        case = make_case(batch=1, prompt=3, steps=1, hidden_size=H, seed=0)
        got = await run_session(chan, case)  # the server serves on
        assert all(torch.equal(g, e) for g, e in zip(got, reference(trunk, case), strict=True))


async def test_unknown_fields_and_big_bodies_get_our_sentence(trunk):
    async with served(trunk, max_message_bytes=1 << 20) as server, channel(server.port) as chan:
        hidden = torch.randn(1, 2, H)
        body = proto.build_forward(hidden, torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None])
        extra = msgpack.unpackb(body) | {"sesion_id": "typo"}
        code, details = await _status(chan, proto.METHOD_FORWARD, msgpack.packb(extra))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown field(s) 'sesion_id'" in details, details
        big = pack({"kind": "forward", "pad": b"\0" * (1536 << 10)})  # 1.5 MiB: over our 1 MiB
        code, details = await _status(chan, proto.METHOD_FORWARD, big)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "max_message_bytes=1048576" in details and "--max-message-bytes" in details, details
        assert server.sessions_open == 0


async def test_a_backward_with_non_finite_gradients_keeps_its_step():
    model = tiny_model("llama")
    trunk = split_model(model, (2, 4), parts=("trunk",)).trunk
    async with served(trunk) as server, channel(server.port) as chan:
        reply = proto.parse_reply(
            await unary(chan, proto.METHOD_TRAIN_OPEN, proto.build_train_open("lora", {}, {"rank": 4}))
        )
        tid = reply["training_id"]
        hidden = torch.randn(1, 3, H)
        out, step = proto.parse_train_forward_result(
            await unary(chan, proto.METHOD_TRAIN_FORWARD, proto.build_train_forward(
                tid, hidden, torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None]))
        )
        huge = torch.full_like(out, 3e38)  # finite, but the gradients overflow float32
        code, details = await _status(chan, proto.METHOD_BACKWARD, proto.build_backward(tid, step, huge, apply=True))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert f"training step {step}" in details and "the step is kept" in details, details
        assert server.training.pending_steps == 1
        grad_in, steps = proto.parse_backward_result(
            await unary(chan, proto.METHOD_BACKWARD, proto.build_backward(tid, step, torch.ones_like(out), apply=True))
        )
        assert steps == 1 and bool(torch.isfinite(grad_in).all())  # the same step, now with a sane gradient
        adapter = server.training.host.adapters.adapters[reply["adapter_id"]]
        assert all(bool(torch.isfinite(p).all()) for _, p in adapter.named_parameters())  # nothing was poisoned


# --- fuzzing every method -------------------------------------------------------------------

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
    st.binary(max_size=64),
)
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_KINDS = [k.value for k in Kind]


def _valid_bodies() -> dict[str, bytes]:
    hidden, mask, pos = torch.randn(1, 2, H), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None]
    return {
        proto.METHOD_FORWARD: proto.build_forward(hidden, mask, pos),
        proto.METHOD_INFO: proto.build_info_request(),
        proto.METHOD_TRAIN_OPEN: proto.build_train_open("lora", {}, {"rank": 2}),
        proto.METHOD_TRAIN_FORWARD: proto.build_train_forward("t" * 24, hidden, mask, pos),
        proto.METHOD_BACKWARD: proto.build_backward("t" * 24, 1, hidden),
        proto.METHOD_OPTIMIZER_STEP: proto.build_training_call(Kind.STEP, "t" * 24),
        proto.METHOD_TRAIN_SAVE: proto.build_training_call(Kind.SAVE, "t" * 24, optimizer=True),
        proto.METHOD_TRAIN_CLOSE: proto.build_training_call(Kind.CLOSE, "t" * 24),
        proto.METHOD_LOAD_ADAPTER: load_adapter_bodies("a", _adapter_file(2))[0],  # its header
        proto.METHOD_DELETE_ADAPTER: proto.build_delete_adapter("a"),
    }


def _mutate(body: bytes, how: int, seed: int, value: object) -> bytes:
    """One mutation of a valid body: a field replaced, dropped or added, or bytes flipped or cut."""
    rng = random.Random(seed)
    msg = msgpack.unpackb(body, raw=False)
    keys = sorted(msg) or ["kind"]
    if how == 0:
        msg[rng.choice(keys)] = value
    elif how == 1:
        msg.pop(rng.choice(keys), None)
    elif how == 2:
        msg["kind"] = rng.choice(_KINDS)
    elif how == 3:
        frame = next((v for v in msg.values() if isinstance(v, dict) and "shape" in v), None)
        if frame is not None:
            frame["shape"] = [rng.randrange(-2, 9) for _ in range(rng.randrange(0, 4))]
    else:
        raw = bytearray(body)
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw[: rng.randrange(1, len(raw) + 1)]) if how == 5 else bytes(raw)
    return msgpack.packb(msg, use_bin_type=True)


async def test_fuzzing_every_method_never_gets_internal_or_unknown(trunk):
    valid = _valid_bodies()
    examples: list[tuple[str, bytes]] = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        method=st.sampled_from(sorted(valid)),
        how=st.integers(0, 6),
        seed=st.integers(0, 2**16),
        value=_value,
        random_map=st.dictionaries(st.text(max_size=12), _value, max_size=6),
    )
    def collect(method, how, seed, value, random_map):
        body = msgpack.packb(random_map) if how == 6 else _mutate(valid[method], how, seed, value)
        examples.append((method, body))

    collect()
    async with served(trunk, max_adapter_elements=1 << 20) as server, channel(server.port) as chan:
        before = _rss_bytes()
        codes: dict[grpc.StatusCode, int] = {}
        for method, body in examples:
            code, details = await _status(chan, method, body)
            codes[code] = codes.get(code, 0) + 1
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, body[:80], details)
        assert _rss_bytes() - before < 128 << 20, codes
        # and the stream: mutated 'forward' bodies as a Session's first message
        for method, body in examples:
            if method != proto.METHOD_FORWARD:
                continue
            session = RawSession(chan)
            try:
                await session.send(body)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc.details()
            finally:
                session.cancel()
        case = make_case(batch=1, prompt=3, steps=2, hidden_size=H, seed=1)
        got = await run_session(chan, case)  # the server serves on, answers unchanged
        assert all(torch.equal(g, e) for g, e in zip(got, reference(trunk, case), strict=True))
        assert server.sessions_open == 0


def test_server_config_caps_are_checked():
    from splitlearn_async import ConfigError

    for field in ("max_lora_rank", "max_lora_targets", "max_adapter_elements"):
        with pytest.raises(ConfigError, match=field):
            ServerConfig(**{field: 0})
