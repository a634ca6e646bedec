"""Decode-step latency of an inference session while a LoRA training client shares the trunk server.

    python benchmarks/train_decode_latency.py [--steps 48] [--train-batch 2] [--train-len 64]

One process runs an AsyncGRPCComputeServer with SmolLM2's trunk (layers 3..26, fp32),
one inference client (a RemoteTrunk session: a 16-token prompt, then one-token steps
with random hidden states) and, in the second phase, a SplitTrainer training LoRA
adapters on the same server. The server's one worker thread runs both; the figure is the
decode step's latency as the client sees it, without and with training, in one run.
Bottom/top of the trainer run in this process too, so they compete for the same cores.
Writes benchmarks/results/train_decode_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

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


async def decode(remote: RemoteTrunk, steps: int, hidden_size: int) -> list[float]:
    """Latencies (s) of ``steps`` one-token steps of one session after a 16-token prompt."""
    g = torch.Generator().manual_seed(0)
    latencies = []
    async with await remote.open_session() as session:
        prompt = torch.randn(1, 16, hidden_size, generator=g)
        await session.forward(prompt, torch.ones(1, 16, dtype=torch.long), torch.arange(16)[None])
        for i in range(steps):
            h = torch.randn(1, 1, hidden_size, generator=g)
            started = time.perf_counter()
            await session.forward(h, torch.ones(1, 1, dtype=torch.long), torch.tensor([[16 + i]]))
            latencies.append(time.perf_counter() - started)
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "max_ms": 1000 * ordered[-1],
    }


async def main(steps: int, train_batch: int, train_len: int) -> dict:
    bottom, trunk, top = load_stages(default_bundle((3, 27)))
    hidden_size = trunk.hidden_size
    config = TrainingConfig(
        optimizer=OptimizerConfig("adamw", lr=3e-4), lora=LoraConfig(rank=8, target_modules=("q_proj", "v_proj"), seed=0),
        train_bottom=False, train_top=False,
    )
    batch = {"input_ids": torch.randint(10, 40000, (train_batch, train_len), generator=torch.Generator().manual_seed(1))}
    async with AsyncGRPCComputeServer(trunk, "127.0.0.1", 0) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        await decode(remote, 4, hidden_size)  # warm-up
        alone = await decode(remote, steps, hidden_size)
        stop = asyncio.Event()
        train_steps = 0

        async def train() -> None:
            nonlocal train_steps
            async with SplitTrainer(bottom, remote, top, config) as trainer:
                await trainer.step(batch)  # warm-up, before the measured phase
                ready.set()
                while not stop.is_set():
                    await trainer.step(batch)
                    train_steps += 1

        ready = asyncio.Event()
        task = asyncio.create_task(train())
        await ready.wait()
        started = time.perf_counter()
        shared = await decode(remote, steps, hidden_size)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
    result = {
        "decode_steps": steps,
        "training_batch": [train_batch, train_len],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "alone": summary(alone),
        "with_training": summary(shared),
        "training_steps_during": train_steps,
        "training_steps_per_s": train_steps / elapsed,
        "median_ratio": statistics.median(shared) / statistics.median(alone),
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-len", type=int, default=64)
    args = parser.parse_args()
    result = asyncio.run(main(args.steps, args.train_batch, args.train_len))
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / "train_decode_latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
