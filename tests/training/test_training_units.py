"""Settings validation, message round trips, adapter selection per cache, pending-step bounds (no server)."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import (
    ConfigError,
    LoraConfig,
    OptimizerConfig,
    TrainingConfig,
    WireError,
    split_model,
)
from splitlearn_async import protocol as proto
from splitlearn_async.errors import StepNotFound, TrunkBusy
from splitlearn_async.training._lora import (
    LoraAdapter,
    active_adapter,
    bind_adapter,
    use_adapter,
)
from splitlearn_async.training._pending import PendingSteps, StepGraph
from splitlearn_async.wire import pack
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import SPLIT


@pytest.mark.parametrize("bad, words", [
    (lambda: LoraConfig(rank=0), "LoraConfig.rank"),
    (lambda: LoraConfig(alpha=-1), "LoraConfig.alpha"),
    (lambda: LoraConfig(dropout=1.0), "dropout must be < 1"),
    (lambda: LoraConfig(target_modules="q_proj"), "sequence of module names"),
    (lambda: LoraConfig(target_modules=("layers.0.q_proj",)), "without dots"),
    (lambda: OptimizerConfig("lion"), "adamw, adam, sgd"),
    (lambda: OptimizerConfig(lr=0), "OptimizerConfig.lr"),
    (lambda: OptimizerConfig(betas=(0.9, 1.0)), "[0, 1)"),
    (lambda: TrainingConfig(trunk="half"), "lora, full, frozen"),
    (lambda: TrainingConfig(accumulation_steps=0), "accumulation_steps"),
    (lambda: TrainingConfig(adapter_id="no spaces"), "adapter_id"),
    (lambda: OptimizerConfig.from_wire({"lr": 1e-3, "momentun": 0.9}), "unknown fields ['momentun']"),
])
def test_settings_are_checked_with_a_sentence(bad, words):
    with pytest.raises(ConfigError) as err:
        bad()
    assert words in str(err.value)


def test_settings_travel_as_maps():
    lora = LoraConfig(rank=4, alpha=8, target_modules=("q_proj",), seed=3)
    assert LoraConfig.from_wire(lora.to_wire()) == lora
    opt = OptimizerConfig("sgd", lr=0.1, momentum=0.9)
    assert OptimizerConfig.from_wire(opt.to_wire()) == opt


def test_training_messages_round_trip_and_refuse_bad_fields():
    h = torch.randn(2, 3, 8)
    blobs = proto.describe_blobs({"weights": b"xx", "optimizer_state": None})
    body = proto.build_train_open(
        "lora", OptimizerConfig().to_wire(), LoraConfig().to_wire(), adapter_id="a-1", blobs=blobs, chunk_bytes=1024
    )
    req = proto.parse_train_open(body)
    assert (req.mode, req.adapter_id, req.blobs, req.chunk_bytes) == ("lora", "a-1", blobs, 1024)
    assert [b.name for b in blobs] == ["weights"] and blobs[0].size == 2
    tid, inputs, keep = proto.parse_train_forward(
        proto.build_train_forward("t1", h, torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3)), hidden_size=8
    )
    assert tid == "t1" and keep and torch.equal(inputs.hidden_states, h)
    back = proto.parse_backward(proto.build_backward("t1", 7, h, apply=False), hidden_size=8)
    assert (back.training_id, back.step_id, back.apply) == ("t1", 7, False) and torch.equal(back.grad_output, h)
    with pytest.raises(WireError, match="hidden_states"):
        proto.parse_train_forward(proto.build_train_forward("t1", h, torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3)), hidden_size=16)
    with pytest.raises(WireError, match="adapter_id"):
        proto.parse_load_adapter(pack({"kind": "load", "adapter_id": "../etc", "weights": b"x"}))
    with pytest.raises(WireError, match="step_id"):
        proto.parse_backward(pack({"kind": "backward", "training_id": "t", "step_id": 0, "grad_output": None}))
    opened = proto.parse_inputs(proto.build_open(h, torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3), adapter_id="a-1"))
    assert opened.adapter_id == "a-1"


def test_the_adapter_bound_to_a_cache_is_used_only_for_that_cache():
    model = tiny_model("llama")
    (trunk,) = [s for s in split_model(model, SPLIT, parts=("trunk",)) if s is not None]
    first = LoraAdapter(trunk, 2, 4.0, ("q_proj",), seed=0, adapter_id="a")
    second = LoraAdapter(trunk, 2, 4.0, ("q_proj",), seed=1, adapter_id="b")
    for adapter in (first, second):
        with torch.no_grad():
            for _, b in adapter.pairs.values():
                b.normal_()
    h = torch.randn(1, 4, 64)

    def run(adapter=None):
        cache = trunk.new_cache(1)
        if adapter is not None:
            bind_adapter(cache, adapter)
        with torch.no_grad():
            return trunk(h, cache=cache)

    base, with_a, with_b = run(), run(first), run(second)
    with torch.no_grad():
        assert torch.equal(base, trunk(h, cache=trunk.new_cache(1)))
    assert not torch.allclose(base, with_a) and not torch.allclose(with_a, with_b)
    with use_adapter(first), torch.no_grad():
        assert torch.allclose(trunk(h), with_a, atol=1e-6)  # training path: the thread's active adapter
        assert torch.equal(run(second), with_b)  # a bound cache decides over the active one
    assert active_adapter() is None

    from splitlearn_async.models.cache_group import CacheGroup

    caches = [trunk.new_cache(1), trunk.new_cache(1)]
    bind_adapter(caches[0], first)
    bind_adapter(caches[1], second)
    with torch.no_grad():  # a group of both: each row gets its own cache's adapter
        both = trunk(torch.randn(2, 1, 64), cache=CacheGroup(caches))
    assert both.shape == (2, 1, 64)
    assert active_adapter() is None


def test_pending_steps_bound_expiry_and_release():
    now = [0.0]
    pending = PendingSteps(2, ttl_s=10.0, clock=lambda: now[0])
    graphs = [StepGraph(torch.ones(1), torch.ones(1), 4) for _ in range(3)]
    a = pending.add("s", graphs[0])
    pending.add("s", graphs[1])
    with pytest.raises(TrunkBusy, match="max_pending_steps=2"):
        pending.add("s", graphs[2])
    with pytest.raises(StepNotFound):
        pending.get("other", a)
    assert pending.nbytes == 8
    now[0] = 11.0
    assert len(pending.expire()) == 2 and len(pending) == 0
    assert graphs[0].outputs is None and graphs[0].nbytes == 0
    with pytest.raises(StepNotFound, match="expired"):
        pending.pop("s", a)
