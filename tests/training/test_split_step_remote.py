"""One split training step over a real AsyncGRPCComputeServer equals one unsplit step (fp32, 1e-5)."""

from __future__ import annotations

import torch

from splitlearn_async import (
    RemoteTrunk,
    split_model,
)
from splitlearn_async.client._remote_training import load_remote_adapter
from splitlearn_async import OptimizerConfig, SplitTrainer, TrainingConfig
from splitlearn_async.training import from_safetensors
from tests.support.rpc import served
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import (
    SPLIT,
    TOL,
    clone_model,
    make_batch,
    max_diff,
    peft_reference,
    record_grads,
    unsplit_step,
)

OPT = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)


def client_stages(model):
    """Bottom and top of ``model`` (the client's copy) and a gradient recorder over them."""
    bottom, _, top = split_model(model, SPLIT, parts=("bottom", "top"))
    named = {}
    for stage in (bottom, top):
        for n, p in stage.named_parameters(remove_duplicate=False):
            named.setdefault(id(p), (stage.checkpoint_name(n), p))
    return bottom, top, record_grads(named.values())


async def test_full_trunk_step_over_grpc_equals_unsplit_step(family):
    model = tiny_model(family)
    reference = unsplit_step(clone_model(model), make_batch(), OPT)
    server_model = clone_model(model)
    (trunk,) = [s for s in split_model(server_model, SPLIT, parts=("trunk",)) if s is not None]
    bottom, top, grads = client_stages(model)
    async with served(trunk, allow_full_training=True) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
            async with SplitTrainer(bottom, remote, top, TrainingConfig(optimizer=OPT, trunk="full")) as trainer:
                loss = await trainer.step(make_batch())
                assert server.training.pending_steps == 0
    assert abs(loss - reference.loss) <= TOL
    for name, g in grads.items():
        assert max_diff(g, reference.grads[name]) <= TOL, name
    updated = dict(reference.model.named_parameters())
    for name, p in trunk.checkpoint_tensors().items():  # the server's trunk, trained by its optimizer
        assert max_diff(p, updated[name]) <= TOL, name
    for name, p in model.named_parameters():  # the client's bottom and top (and the unused trunk copy)
        if name in {n for s in (bottom, top) for n in s.checkpoint_tensors()}:
            assert max_diff(p, updated[name]) <= TOL, name


async def test_lora_step_over_grpc_equals_unsplit_peft_step(family):
    from peft import get_peft_model_state_dict

    model = tiny_model(family)
    peft_model, adapter_bytes = peft_reference(clone_model(model), family)
    reference = unsplit_step(peft_model, make_batch(), OPT)
    (trunk,) = [s for s in split_model(clone_model(model), SPLIT, parts=("trunk",)) if s is not None]
    base = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    bottom, top, grads = client_stages(model)
    config = TrainingConfig(optimizer=OPT, trunk="lora", adapter_id="init")
    async with served(trunk) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
            await load_remote_adapter(remote, "init", adapter_bytes)
            async with SplitTrainer(bottom, remote, top, config) as trainer:
                loss = await trainer.step(make_batch())
                state = await (await trainer.session()).state()
    assert abs(loss - reference.loss) <= TOL
    for name, g in grads.items():
        assert max_diff(g, reference.grads[f"base_model.model.{name}"]) <= TOL, name
    trained, _ = from_safetensors(state.weights)
    expected = get_peft_model_state_dict(peft_model)
    assert set(trained) == set(expected)
    for name, value in trained.items():
        assert max_diff(value, expected[name]) <= TOL, name
    assert all(torch.equal(p, base[n]) for n, p in trunk.named_parameters())  # base weights untouched
