"""Generation through SplitPipeline with a LoRA adapter trained on the server (RemoteTrunk and LocalTrunk)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from splitlearn_async import (
    AsyncGRPCComputeServer,
    LocalTrunk,
    RemoteTrunk,
    LoraConfig,
    OptimizerConfig,
    SessionNotFound,
    SplitPipeline,
    SplitTrainer,
    TrainingConfig,
    merge_adapter,
    split_model,
)
from splitlearn_async.training import TrunkState, from_safetensors
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.training_reference import SPLIT, clone_model, make_batch


@contextlib.asynccontextmanager
async def remote_trunk(trunk):
    async with AsyncGRPCComputeServer(trunk, "127.0.0.1", 0) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        yield remote


@contextlib.asynccontextmanager
async def local_trunk(trunk):
    async with LocalTrunk(trunk) as local:
        yield local


@pytest.mark.parametrize("transport", [remote_trunk, local_trunk], ids=["remote", "local"])
async def test_pipeline_with_a_trained_adapter_equals_the_merged_model(tmp_path, transport):
    model = tiny_model("llama")
    bottom, trunk, top = split_model(clone_model(model), SPLIT)
    config = TrainingConfig(
        optimizer=OptimizerConfig("adamw", lr=2e-2), lora=LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        adapter_id="tuned", train_bottom=False, train_top=False,
    )
    ids, mask = left_padded_batch([7, 4], seed=9)
    async with transport(trunk) as t:
        async with SplitTrainer(bottom, t, top, config) as trainer:
            for seed in range(3):
                await trainer.step(make_batch(seed))
            await trainer.save_trunk(tmp_path)
        async with SplitPipeline(bottom, t, top, adapter_id="tuned") as tuned, SplitPipeline(bottom, t, top) as base:
            got = await tuned.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
            plain = await base.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
        async with SplitPipeline(bottom, t, top, adapter_id="missing") as missing:
            with pytest.raises(SessionNotFound, match="missing"):
                await missing.generate(ids, mask, max_new_tokens=2)

    tensors, meta = from_safetensors(TrunkState.load(tmp_path).weights)
    merged = clone_model(model)
    merge_adapter(merged, tensors, meta)
    expected = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    unchanged = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert torch.equal(plain, unchanged)  # the base trunk is untouched by the adapter
    assert not torch.equal(expected, unchanged)  # the adapter changes the tokens: the test can fail
