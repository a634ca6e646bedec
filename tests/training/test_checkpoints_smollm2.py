"""SmolLM2's whole trunk (real weights) saves and loads back exactly under the default message limit."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import (
    AsyncGRPCComputeServer,
    OptimizerConfig,
    RemoteTrunk,
    ServerConfig,
    default_bundle,
    load_stages,
)
from splitlearn_async.training import from_safetensors

pytestmark = pytest.mark.slow


async def test_a_full_smollm2_trunk_and_its_adamw_state_save_and_load_back_exactly():
    trunk = load_stages(default_bundle((3, 27)), parts=("trunk",)).trunk
    config = ServerConfig(allow_full_training=True)  # the default max_message_bytes: 256 MiB
    names = {n: trunk.checkpoint_name(n) for n, _ in trunk.named_parameters()}
    opt = OptimizerConfig("adamw", lr=1e-5)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, trunk.hidden_size, generator=g)
    mask, positions = torch.ones(1, 8, dtype=torch.long), torch.arange(8)[None]
    async with AsyncGRPCComputeServer(trunk, "127.0.0.1", 0, config) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        session = await remote.open_training("full", optimizer=opt)
        out, step = await session.forward(hidden, mask, positions)
        await session.backward(step, torch.randn(out.shape, generator=g) * 1e-3)  # AdamW now holds its moments
        state = await session.state()
        assert len(state.weights) > config.max_message_bytes  # it could not have crossed in one message
        saved, _ = from_safetensors(state.weights)
        for n, p in trunk.named_parameters():
            assert torch.equal(saved[names[n]], p.detach()), n
        await session.aclose()

        with torch.no_grad():
            for p in trunk.parameters():
                p.mul_(0.5)  # the served trunk drifts away from the saved state
        resumed = await remote.open_training("full", optimizer=opt, weights=state.weights, optimizer_state=state.optimizer)
        for n, p in trunk.named_parameters():
            assert torch.equal(saved[names[n]], p.detach()), n  # loaded back exactly
        saved_optimizer = state.optimizer
        del saved, state  # about 1 GB this test no longer needs
        want, _ = from_safetensors(saved_optimizer)
        got, meta = from_safetensors((await resumed.state()).optimizer)
        assert set(got) == set(want) and meta["optimizer_steps"] == "1"
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert server.training.transfers.in_flight == 0
