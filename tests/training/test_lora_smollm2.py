"""A short LoRA fine-tune of SmolLM2's trunk (real weights) over a trunk server lowers the loss."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import (
    AsyncGRPCComputeServer,
    LoraConfig,
    OptimizerConfig,
    RemoteTrunk,
    SplitTrainer,
    TrainingConfig,
    default_bundle,
    load_stages,
)
from splitlearn_async.models.default import load_tokenizer

pytestmark = pytest.mark.slow


async def test_a_few_lora_steps_lower_the_loss_of_smollm2_on_the_shipped_text():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "data" / "alice_chapter1.txt").read_text()
    bundle = default_bundle((3, 27))
    bottom, trunk, top = load_stages(bundle)
    ids = load_tokenizer(bundle)(text.split("\n\n", 1)[1], return_tensors="pt").input_ids[0]
    batch = {"input_ids": ids[: 2 * 48].view(2, 48)}  # (2, 48)
    base_weights = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    config = TrainingConfig(
        optimizer=OptimizerConfig("adamw", lr=2e-3), lora=LoraConfig(rank=8, target_modules=("q_proj", "v_proj"), seed=0),
        train_bottom=False, train_top=False,
    )
    async with AsyncGRPCComputeServer(trunk, "127.0.0.1", 0) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitTrainer(bottom, remote, top, config) as trainer:
            before = await trainer.evaluate(batch)
            losses = [await trainer.step(batch) for _ in range(5)]
            after = await trainer.evaluate(batch)
    assert abs(losses[0] - before) < 1e-4  # a new adapter starts as the base model (B = 0)
    assert after < before - 0.3, (before, losses, after)
    assert all(torch.equal(p, base_weights[n]) for n, p in trunk.named_parameters())
