"""Decode-step latency of an inference session while a LoRA training client shares the trunk server.

    python benchmarks/train_decode_latency.py [--steps 200] [--train-batch 2] [--train-len 64]
        [--placement isolated|shared] [--trainer process|thread] [--trainers N]
        [--segment-layer-tokens N ...]

One process runs an AsyncGRPCComputeServer with SmolLM2's trunk (layers 3..26, fp32) and
one inference client (a RemoteTrunk session: a 16-token prompt, then one-token steps with
random hidden states). In each training phase a SplitTrainer trains LoRA adapters on the
same server: by default in a child process (``--trainer process``), as a training client
on another machine would, or in this process (``--trainer thread``: its bottom and top on
a worker thread of this process, sharing its GIL and cores). The server's one worker
thread runs both; the figure is the decode step's latency as the client sees it.
``--trainers N`` (child processes only) runs N training clients at once, each with its
own adapter.

Placement (Linux affinity):

- ``isolated`` (default): the server's worker thread alone on the first core with 1 torch
  thread; every other thread (the event loop, gRPC's, the trainer: its process, or its
  worker thread) on the other cores, the trainer at the lowest priority (nice 19) and
  with 1 torch thread, so that the trainer's client-side work, which a deployment runs on
  the client's machine, slows the server's event loop as little as two cores allow.
- ``shared``: every thread on every core with torch's default threads.

``--segment-layer-tokens`` (ServerConfig.training_segment_layer_tokens; several values: one
training phase each, ``0`` = the whole trunk in one item) sets how training forwards and
backwards are cut. Each training phase runs between two phases without training; its
ratios (p50, p90, p99 with training over the same quantile of those two phases together)
are thus measured under the same background load. Run against another checkout with
``PYTHONPATH=<checkout>`` (one that does not segment takes ``--segment-layer-tokens 0``).
Writes benchmarks/results/train_decode_latency-<placement>[-thread].json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import torch

from splitlearn_async import (
    AsyncGRPCComputeServer,
    LoraConfig,
    OptimizerConfig,
    RemoteTrunk,
    ServerConfig,
    SplitTrainer,
    StageWorker,
    TrainingConfig,
    default_bundle,
    load_stages,
)

try:
    from splitlearn_async.worker import pin_malloc_thresholds
except ImportError:  # an older checkout (PYTHONPATH=...), which does not pin

    def pin_malloc_thresholds() -> bool:
        return False


SPLIT = (3, 27)


def isolate(server_thread: int, server_cpus: tuple[int, ...], other_cpus: tuple[int, ...]) -> None:
    """Pin the thread ``server_thread`` (a native id) to ``server_cpus``, every other thread of this
    process to ``other_cpus`` (threads started later inherit their starter's)."""
    for task in os.listdir("/proc/self/task"):
        tid = int(task)
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, server_cpus if tid == server_thread else other_cpus)


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


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, by linear interpolation (numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": 1000 * percentile(ordered, 0.5),
        "p90_ms": 1000 * percentile(ordered, 0.9),
        "p99_ms": 1000 * percentile(ordered, 0.99),
        "max_ms": 1000 * ordered[-1],
    }


# --- the trainer ----------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainerSpec:
    port: int
    train_batch: int
    train_len: int
    cpus: tuple[int, ...] | None  # None: every core
    threads: int | None
    low_priority: bool


def training_config() -> TrainingConfig:
    return TrainingConfig(
        optimizer=OptimizerConfig("adamw", lr=3e-4), lora=LoraConfig(rank=8, target_modules=("q_proj", "v_proj"), seed=0),
        train_bottom=False, train_top=False,
    )


def training_batch(spec: TrainerSpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(10, 40000, (spec.train_batch, spec.train_len), generator=g)}


async def train_until(spec: TrainerSpec, bottom: Any, top: Any, remote: RemoteTrunk, worker: StageWorker | None,
                      ready: Any, stop: Any) -> int:
    """Step a SplitTrainer until ``stop`` is set (after one warm-up step, then ``ready``); the steps run."""
    steps = 0
    batch = training_batch(spec)
    async with SplitTrainer(bottom, remote, top, training_config(), worker=worker) as trainer:
        await trainer.step(batch)  # warm-up, before the measured phase
        ready.set()
        while not stop.is_set():
            await trainer.step(batch)
            steps += 1
    return steps


def trainer_process(spec: TrainerSpec, ready: Any, stop: Any, result: Any) -> None:
    """(child process) The training client: its own bottom and top, the server over gRPC."""
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    if spec.low_priority:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    torch.set_num_threads(1)  # loading; the worker sets its own
    bottom, _, top = load_stages(default_bundle(SPLIT), parts=("bottom", "top"))

    async def run() -> int:
        async with RemoteTrunk(f"127.0.0.1:{spec.port}") as remote:
            worker = StageWorker("splitlearn-trainer", torch_threads=spec.threads)
            try:
                return await train_until(spec, bottom, top, remote, worker, ready, stop)
            finally:
                await worker.stop()

    result.put(asyncio.run(run()))


async def with_training(server: AsyncGRPCComputeServer, remote: RemoteTrunk, segment: int | None, steps: int,
                        hidden_size: int, spec: TrainerSpec, in_process: Any, trainers: int = 1) -> dict[str, Any]:
    """One training phase: decode latencies while a trainer steps, with ``segment`` layer-tokens per item."""
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    if "training_segment_layer_tokens" in fields:  # the host reads its limits for every step
        server.training.host.limits = dataclasses.replace(server.training.host.limits, segment_layer_tokens=segment)
    elif segment is not None:
        raise SystemExit("this version of the server does not segment training; pass --segment-layer-tokens 0.")
    if in_process is None:
        ctx = mp.get_context("spawn")
        stop, result = ctx.Event(), ctx.Queue()
        readies = [ctx.Event() for _ in range(trainers)]
        children = [ctx.Process(target=trainer_process, args=(spec, ready, stop, result), daemon=True)
                    for ready in readies]
        for child in children:
            child.start()
        for ready in readies:
            await asyncio.to_thread(ready.wait)
    else:
        bottom, top, worker = in_process
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(train_until(spec, bottom, top, remote, worker, ready, stop))
        await ready.wait()
    started = time.perf_counter()
    shared = await decode(remote, steps, hidden_size)
    elapsed = time.perf_counter() - started
    stop.set()
    if in_process is None:
        train_steps = sum([await asyncio.to_thread(result.get) for _ in children])
        for child in children:
            child.join()
    else:
        train_steps = await task
    return {
        "segment_layer_tokens": segment,
        "trainers": trainers,
        "with_training": summary(shared),
        "training_steps_during": train_steps,
        "training_steps_per_s": train_steps / elapsed,
    }


# --- the run ---------------------------------------------------------------------------------------


async def main(steps: int, train_batch: int, train_len: int, placement: str, trainer: str,
               segments: list[int | None], trainers: int = 1, pin_malloc: bool = True) -> dict:
    # as `splitlearn serve` does at start (splitlearn_async/worker/_malloc.py)
    pinned = pin_malloc_thresholds() if pin_malloc else False
    bottom, trunk, top = load_stages(default_bundle(SPLIT))
    hidden_size = trunk.hidden_size
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    isolated = placement == "isolated"
    if isolated and len(cpus) < 2:
        raise SystemExit("--placement isolated needs at least 2 cores.")
    server_cpus, other_cpus = (cpus[:1], cpus[1:]) if isolated else (None, None)
    threads = 1 if isolated else None
    server = AsyncGRPCComputeServer(trunk, "127.0.0.1", 0, ServerConfig(torch_threads=threads))
    await server.start()
    spec = TrainerSpec(server.port, train_batch, train_len, other_cpus, threads, isolated)
    worker = StageWorker("splitlearn-trainer", torch_threads=threads) if trainer == "thread" else None
    phases: list[dict[str, Any]] = []
    try:
        if worker is not None:
            await worker.start()
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
            await decode(remote, 1, hidden_size)  # the client's threads exist now
            if server_cpus and other_cpus:
                thread = server.worker.thread
                if thread is None or thread.native_id is None:
                    raise SystemExit("the server's worker thread is not running")
                isolate(thread.native_id, server_cpus, other_cpus)
                if worker is not None and worker.thread is not None and worker.thread.native_id is not None:
                    os.setpriority(os.PRIO_PROCESS, worker.thread.native_id, 19)
            await decode(remote, 4, hidden_size)  # warm-up
            alone = [await decode(remote, steps, hidden_size)]
            in_process = None if worker is None else (bottom, top, worker)
            for segment in segments:  # each training phase between two phases without training
                phases.append(
                    await with_training(server, remote, segment, steps, hidden_size, spec, in_process, trainers)
                )
                alone.append(await decode(remote, steps, hidden_size))
    finally:
        if worker is not None:
            await worker.stop()
        await server.stop()
    for i, phase in enumerate(phases):  # against the phases without training just before and after it
        base = summary(alone[i] + alone[i + 1])
        phase["alone"] = base
        for q in ("p50", "p90", "p99"):
            phase[f"{q}_ratio"] = phase["with_training"][f"{q}_ms"] / base[f"{q}_ms"]
    return {
        "placement": placement,
        "malloc_pinned": pinned,
        "trainer": trainer,
        "decode_steps": steps,
        "training_batch": [train_batch, train_len],
        "server_torch_threads": threads or torch.get_num_threads(),
        "cpu_count": len(cpus),
        "loadavg_after": os.getloadavg(),
        "alone": summary([t for run in alone for t in run]),
        "phases": phases,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-len", type=int, default=64)
    parser.add_argument("--placement", choices=("isolated", "shared"), default="isolated")
    parser.add_argument("--trainer", choices=("process", "thread"), default="process")
    parser.add_argument("--trainers", type=int, default=1, help="training clients at once (child processes)")
    parser.add_argument("--no-pin-malloc", action="store_true",
                        help="leave glibc's dynamic mmap threshold on (splitlearn serve pins it)")
    parser.add_argument("--segment-layer-tokens", type=int, nargs="+", default=None,
                        help="one training phase per value; 0: the whole trunk in one item (default: the server's)")
    parser.add_argument("--out", default=None, help="the JSON file to write (default: benchmarks/results/...)")
    args = parser.parse_args()
    if args.segment_layer_tokens is None:
        segments: list[int | None] = [ServerConfig().__dict__.get("training_segment_layer_tokens")]
    else:
        segments = [value or None for value in args.segment_layer_tokens]
    if args.trainers > 1 and args.trainer == "thread":
        raise SystemExit("--trainers N runs child processes; leave --trainer at process.")
    result = asyncio.run(
        main(args.steps, args.train_batch, args.train_len, args.placement, args.trainer, segments, args.trainers,
             not args.no_pin_malloc)
    )
    print(json.dumps(result, indent=2))
    suffix = ("" if args.trainer == "process" else "-thread") + (f"-{args.trainers}trainers" if args.trainers > 1 else "")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"train_decode_latency-{args.placement}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
