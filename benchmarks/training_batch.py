"""Training steps of many LoRA sessions on one trunk: batched together against each alone.

    python benchmarks/training_batch.py --device cuda      # on a GPU machine
    python benchmarks/training_batch.py --device cpu --sessions 4 --steps 2   # a quick look here

A llama trunk of SmolLM2-135M's shapes (layers 3..26, random weights: speed does not
depend on the values, and nothing is downloaded) in a ``LocalTrunk`` (one worker thread,
as the server runs it). ``--sessions`` training sessions, each with its own rank-8 q/k/v/o
adapter, send their forward (``--rows`` x ``--tokens`` tokens) and their backward at the
same time, ``--steps`` times (after one warm-up step):

- ``batched``: the trunk's defaults: the sessions' forwards and backwards run as one
  batch (``TrainingLimits.batch_tokens``), each row with its own adapter;
- ``alone``: ``batch_tokens=None``: each session's forward and backward runs on its own.

Both keep the default layer segments unless ``--no-segments``. Reports trunk steps/s
(session steps over wall time) and, on the CPU, the process's CPU-seconds per step; and
checks that both ways give the same adapters (max abs difference). Writes
``benchmarks/results/training_batch-<device>.json``. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trunk_device import SPLIT, smollm2_shaped_model  # noqa: E402  (benchmarks/ is this script's folder)

from splitlearn_async import LocalTrunk, LoraConfig, OptimizerConfig, split_model  # noqa: E402
from splitlearn_async.training import TrainingLimits  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


async def _steps(trunk: Any, limits: TrainingLimits, sessions: int, steps: int, rows: int, tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(rows, tokens, trunk.hidden_size, generator=g) for _ in range(sessions)]
    grads = [torch.randn(rows, tokens, trunk.hidden_size, generator=g) * 1e-3 for _ in range(sessions)]
    async with LocalTrunk(trunk, training=limits) as local:
        opened = []
        for i in range(sessions):
            lora = LoraConfig(rank=8, target_modules=TARGETS, seed=i)
            opened.append(
                await local.open_training("lora", lora=lora, optimizer=OptimizerConfig("sgd", lr=1e-2), adapter_id=f"s{i}")
            )

        async def step(session: Any, x: torch.Tensor, grad: torch.Tensor) -> None:
            _, step_id = await session.forward(x, None, None)
            await session.backward(step_id, grad)

        async def round_() -> None:
            await asyncio.gather(*(step(s, x, gr) for s, x, gr in zip(opened, hidden, grads, strict=True)))

        await round_()  # warm-up
        if trunk.device.type == "cuda":
            torch.cuda.synchronize()
        cpu0, started = time.process_time(), time.perf_counter()
        for _ in range(steps):
            await round_()
        if trunk.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
        adapters = [{n: p.detach().float().cpu().clone() for n, p in local.training.adapter(f"s{i}").named_parameters()}
                    for i in range(sessions)]
    total = sessions * steps
    return {
        "session_steps_per_s": round(total / elapsed, 2),
        "ms_per_round": round(1000 * elapsed / steps, 1),
        "process_cpu_s_per_step": round(cpu / total, 4),
        "adapters": adapters,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-segments", action="store_true", help="run each forward/backward in one work item")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    segment = None if args.no_segments else TrainingLimits().segment_layer_tokens
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "sessions": args.sessions,
        "batch": [args.rows, args.tokens],
        "segment_layer_tokens": segment,
        "torch_threads": args.threads,
        "cpus": sorted(os.sched_getaffinity(0)),
        "torch": torch.__version__,
    }
    ways = {
        "batched": TrainingLimits(segment_layer_tokens=segment, batch_tokens=args.sessions * args.rows * args.tokens),
        "alone": TrainingLimits(segment_layer_tokens=segment, batch_tokens=None),
    }
    adapters = {}
    for name, limits in ways.items():
        trunk = split_model(smollm2_shaped_model(dtype, args.device), SPLIT, parts=("trunk",)).trunk
        got = await _steps(trunk, limits, args.sessions, args.steps, args.rows, args.tokens)
        adapters[name] = got.pop("adapters")
        result[name] = got
        print(f"{name:<8} {got['session_steps_per_s']:8.2f} session steps/s, {got['ms_per_round']:8.1f} ms per round "
              f"of {args.sessions}, {got['process_cpu_s_per_step']} CPU-s per step")
    result["batched_over_alone"] = round(
        result["batched"]["session_steps_per_s"] / result["alone"]["session_steps_per_s"], 2
    )
    result["max_adapter_difference"] = max(
        float((a[n] - b[n]).abs().max()) for a, b in zip(adapters["batched"], adapters["alone"], strict=True) for n in a
    )
    print(f"batched / alone: {result['batched_over_alone']}x; adapters differ by at most "
          f"{result['max_adapter_difference']:.2e}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"training_batch-{args.device}-{args.dtype}{'-unsegmented' if args.no_segments else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
