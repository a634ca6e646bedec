"""Global-norm gradient clipping across the cut equals torch.nn.utils.clip_grad_norm_ on the unsplit model."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import ConfigError, LocalTrunk, OptimizerConfig, RemoteTrunk, SplitTrainer, TrainingConfig, split_model
from tests.support.rpc import served
from tests.support.tiny_models import tiny_model
from tests.support.training_reference import SPLIT, TOL, clone_model, make_batch, max_diff, unsplit_step

OPT = OptimizerConfig("sgd", lr=0.5)  # plain SGD: the step is the clipped gradient itself, nothing hides it


def _total_norm(model: torch.nn.Module) -> float:
    """The unsplit gradient's global norm on the test batch (to know the clip is active)."""
    probe = clone_model(model)
    from splitlearn_async.training import causal_lm_loss

    batch = make_batch()
    logits = probe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    causal_lm_loss(logits, batch["labels"]).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in probe.parameters() if p.grad is not None]))


async def _check(model, trunk_client, bottom, top, max_norm: float) -> None:
    reference = unsplit_step(clone_model(model), make_batch(), OPT, max_grad_norm=max_norm)
    config = TrainingConfig(optimizer=OPT, trunk="full", max_grad_norm=max_norm)
    async with SplitTrainer(bottom, trunk_client, top, config) as trainer:
        loss = await trainer.step(make_batch())
    assert abs(loss - reference.loss) <= TOL
    updated = dict(reference.model.named_parameters())
    for name, p in model.named_parameters():  # every weight, the client's and the trunk's
        assert max_diff(p, updated[name]) <= TOL, name


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping hard, and not at all
async def test_clipping_over_local_trunk_equals_clip_grad_norm(family, max_norm):
    model = tiny_model(family)
    if max_norm < 1:
        assert _total_norm(model) > 4 * max_norm  # the clip really scales the step
    bottom, trunk, top = split_model(model, SPLIT)
    async with LocalTrunk(trunk) as local:
        await _check(model, local, bottom, top, max_norm)


async def test_clipping_over_a_server_equals_clip_grad_norm():
    model = tiny_model("qwen2")
    bottom, trunk, top = split_model(model, SPLIT)
    async with served(trunk, allow_full_training=True) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        await _check(model, remote, bottom, top, 0.05)


def test_max_grad_norm_is_checked():
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ConfigError, match="max_grad_norm"):
            TrainingConfig(max_grad_norm=bad)
