"""One split training step over LocalTrunk equals one unsplit step, for every family (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import LocalTrunk, split_model
from splitlearn_async import OptimizerConfig, SplitTrainer, TrainingConfig
from splitlearn_async.training import from_safetensors
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

OPTIMIZERS = {
    "adamw": OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01),
    "sgd": OptimizerConfig("sgd", lr=0.1, momentum=0.9),
}


def client_grads(bottom, top) -> dict[str, torch.Tensor]:
    named = {}
    for stage in (bottom, top):
        for n, p in stage.named_parameters(remove_duplicate=False):
            named.setdefault(id(p), (stage.checkpoint_name(n), p))
    return record_grads(named.values())


def compare_client_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got, "no client gradient was recorded"
    worst = 0.0
    for name, g in got.items():
        ref_name = name if name in ref else f"base_model.model.{name}"
        worst = max(worst, max_diff(g, ref[ref_name]))
    return worst


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
async def test_full_trunk_step_equals_unsplit_step(family, opt_name):
    opt = OPTIMIZERS[opt_name]
    model = tiny_model(family)
    reference = unsplit_step(clone_model(model), make_batch(), opt)

    bottom, trunk, top = split_model(model, SPLIT)
    grads = client_grads(bottom, top)
    config = TrainingConfig(optimizer=opt, trunk="full")
    async with LocalTrunk(trunk) as local, SplitTrainer(bottom, local, top, config) as trainer:
        loss = await trainer.step(make_batch())
        assert local.pending_steps == 0

    assert abs(loss - reference.loss) <= TOL
    assert compare_client_grads(grads, reference.grads) <= TOL
    updated = dict(reference.model.named_parameters())
    changed = 0
    for name, p in model.named_parameters():  # the stages share their parameters with `model`
        assert max_diff(p, updated[name]) <= TOL, name
        changed += int(name.startswith(("model.layers.2.", "transformer.h.2.")) and max_diff(p, tiny_model(family).get_parameter(name)) > 0)
    assert changed > 0, "the trunk's weights did not change"


async def test_lora_trunk_step_equals_unsplit_peft_step(family):
    opt = OPTIMIZERS["adamw"]
    model = tiny_model(family)
    peft_model, adapter_bytes = peft_reference(clone_model(model), family)
    batch = make_batch()
    reference = unsplit_step(peft_model, batch, opt)

    bottom, trunk, top = split_model(model, SPLIT)
    grads = client_grads(bottom, top)
    trunk_before = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    config = TrainingConfig(optimizer=opt, trunk="lora", adapter_id="init")
    async with LocalTrunk(trunk) as local, SplitTrainer(bottom, local, top, config) as trainer:
        await local.load_adapter("init", adapter_bytes)
        loss = await trainer.step(batch)
        state = await (await trainer.session()).state()

    assert abs(loss - reference.loss) <= TOL
    assert compare_client_grads(grads, reference.grads) <= TOL
    from peft import get_peft_model_state_dict

    trained_ref = get_peft_model_state_dict(peft_model)
    trained, _ = from_safetensors(state.weights)
    assert set(trained) == set(trained_ref) and trained
    initial, _ = from_safetensors(adapter_bytes)
    for name, value in trained.items():
        assert max_diff(value, trained_ref[name]) <= TOL, name
        assert max_diff(value, initial[name]) > 1e-4, f"{name} did not train"
    for n, p in trunk.named_parameters():  # LoRA leaves the trunk's own weights alone
        assert torch.equal(p, trunk_before[n]), n
    ref_base = dict(peft_model.base_model.model.named_parameters(remove_duplicate=False))
    for n, p in list(bottom.named_parameters()) + list(top.named_parameters()):
        name = bottom.checkpoint_name(n) if n in dict(bottom.named_parameters()) else top.checkpoint_name(n)
        assert max_diff(p, ref_base[name]) <= TOL, name


async def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches with accumulation_steps=2 equal one step on both batches' mean loss (SGD)."""
    opt = OptimizerConfig("sgd", lr=0.5)
    model = tiny_model("llama")
    a, b = make_batch(seed=1), make_batch(seed=2)
    ref = clone_model(model)
    optimizer = opt.build(list(ref.parameters()))
    from splitlearn_async.training import causal_lm_loss

    for batch in (a, b):
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        (causal_lm_loss(logits, batch["labels"]) / 2).backward()
    optimizer.step()

    bottom, trunk, top = split_model(model, SPLIT)
    config = TrainingConfig(optimizer=opt, trunk="full", accumulation_steps=2)
    async with LocalTrunk(trunk) as local, SplitTrainer(bottom, local, top, config) as trainer:
        await trainer.step(a)
        assert trainer.optimizer_steps == 0
        assert max_diff(model.get_parameter("model.layers.2.mlp.up_proj.weight"),
                        tiny_model("llama").get_parameter("model.layers.2.mlp.up_proj.weight")) == 0
        await trainer.step(b)
        assert trainer.optimizer_steps == 1
    updated = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert max_diff(p, updated[name]) <= TOL, name


async def test_frozen_trunk_passes_gradients_and_keeps_its_weights():
    opt = OPTIMIZERS["sgd"]
    model = tiny_model("qwen2")
    ref_model = clone_model(model)
    for i in range(*SPLIT):
        for p in ref_model.model.layers[i].parameters():
            p.requires_grad_(False)
    reference = unsplit_step(ref_model, make_batch(), opt)
    bottom, trunk, top = split_model(model, SPLIT)
    grads = client_grads(bottom, top)
    before = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    async with LocalTrunk(trunk) as local, SplitTrainer(bottom, local, top, TrainingConfig(optimizer=opt, trunk="frozen")) as trainer:
        loss = await trainer.step(make_batch())
    assert abs(loss - reference.loss) <= TOL
    assert compare_client_grads(grads, reference.grads) <= TOL
    assert all(torch.equal(p, before[n]) for n, p in trunk.named_parameters())


async def test_evaluate_gives_the_loss_of_the_trained_model_without_training(family):
    """evaluate() over LocalTrunk equals the unsplit model's loss with the adapter merged, and changes nothing."""
    from splitlearn_async import merge_adapter
    from splitlearn_async.training import LoraConfig, causal_lm_loss

    model = tiny_model(family)
    bottom, trunk, top = split_model(model, SPLIT)
    config = TrainingConfig(optimizer=OptimizerConfig(lr=1e-2), lora=LoraConfig(rank=2, seed=0))
    async with LocalTrunk(trunk) as local, SplitTrainer(bottom, local, top, config) as trainer:
        await trainer.step(make_batch(1))
        state = await (await trainer.session()).state(optimizer=False)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        got = await trainer.evaluate(make_batch(2))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert local.pending_steps == 0
    merged = clone_model(model)
    merge_adapter(merged, *from_safetensors(state.weights))
    batch = make_batch(2)
    with torch.no_grad():
        logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    assert abs(got - float(causal_lm_loss(logits, batch["labels"]))) <= TOL
