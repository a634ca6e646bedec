"""Many adapters on one trunk server: mixed-adapter batches, and 8 trainers at once.

    python benchmarks/adapters.py            # the embedded SmolLM2, split (3, 27)
    python benchmarks/adapters.py --quick    # a tiny random model (CI smoke run)

Two phases, each against a ``splitlearn serve`` process on core 0 with one torch thread
(``--cpus 0 --torch-threads 1``); the clients run in this process on the other cores with
one torch thread. CPU-seconds are the server process's (user + system).

1. **Inference, 8 sessions with 8 different LoRA adapters** (rank 8 on q/k/v/o), a
   16-token prompt then ``--tokens`` greedy tokens each, all at once:
   - ``mixed``: the server batches the 8 sessions' steps into one trunk call, each row
     with its own adapter (``RowAdapters``);
   - ``one_by_one``: ``--no-batching``: each session's step runs alone, which is what a
     server whose batches hold one adapter at a time does when every session has its own;
   - ``base``: the same 8 sessions without adapters, batched (the cost of the adapters).
2. **Training, 8 clients each fine-tuning its own adapter** (``SplitTrainer``, LoRA on
   the trunk, bottom and top frozen, a batch of 1 x ``--train-len`` tokens): the 8 run
   ``--train-steps`` steps each concurrently, with the server batching their training
   forwards and backwards (``concurrent``, the default) and with each run alone
   (``concurrent_unbatched``: ``--training-batch-tokens 0``), then the same 8 one after
   another; steps/s, per-step latency and the server's CPU-seconds per step of each way.

``--phases training`` runs the second phase only and keeps the first's figures in the
results file.

Writes ``benchmarks/results/adapters.json``. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from splitlearn_async import LoraConfig, OptimizerConfig, RemoteTrunk, SplitPipeline, SplitTrainer, TrainingConfig
from splitlearn_async import load_stages, save_stages, split_model
from splitlearn_async.server import ServerProcess

CLIENTS = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _bundle(quick: bool, root: Path) -> Path:
    if not quick:
        from splitlearn_async.models.default import default_bundle

        return default_bundle((3, 27))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.tiny_models import tiny_model

    save_stages(split_model(tiny_model("llama"), (2, 4)), root / "tiny")
    return root / "tiny"


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def _make_adapters(address: str, n: int) -> list[str]:
    """``n`` LoRA adapters on the server, made by opening (and closing) a training session each."""
    names = []
    async with RemoteTrunk(address) as remote:
        for i in range(n):
            session = await remote.open_training(
                "lora", lora=LoraConfig(rank=8, target_modules=TARGETS, seed=i), adapter_id=f"user{i}"
            )
            await session.aclose()
            names.append(f"user{i}")
    return names


async def _inference(address: str, stages: Any, adapters: list[str | None], tokens: int, proc: psutil.Process) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 90, (1, 16), generator=g) for _ in adapters]
    gaps: list[float] = []
    async with RemoteTrunk(address) as remote:

        async def one(adapter: str | None, ids: torch.Tensor, n: int) -> list[int]:
            async with SplitPipeline(stages.bottom, remote, stages.top, adapter_id=adapter) as pipeline:
                out, last = [], time.perf_counter()
                async for chunk in pipeline.stream(ids, max_new_tokens=n, pad_token_id=0):
                    now = time.perf_counter()
                    if out:  # after the first token: one decode step each
                        gaps.append(now - last)
                    last = now
                    out.append(int(chunk.tokens[0]))
                return out

        await asyncio.gather(*(one(a, p, 2) for a, p in zip(adapters, prompts, strict=True)))  # warm-up
        gaps.clear()
        cpu0, started = _cpu(proc), time.perf_counter()
        outs = await asyncio.gather(*(one(a, p, tokens) for a, p in zip(adapters, prompts, strict=True)))
        elapsed, cpu = time.perf_counter() - started, _cpu(proc) - cpu0
    total = sum(len(o) for o in outs)
    return {
        "tokens": total,
        "tokens_per_s": round(total / elapsed, 1),
        "step_p50_ms": round(_pct(gaps, 0.5), 1),
        "step_p90_ms": round(_pct(gaps, 0.9), 1),
        "server_cpu_s_per_1k_tokens": round(1000 * cpu / total, 2),
        "outputs": outs,
    }


async def _training(
    address: str, stages: Any, steps: int, length: int, concurrent: bool, proc: psutil.Process
) -> dict:
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(10, 90, (1, length), generator=g)} for _ in range(CLIENTS)]
    latencies: list[float] = []
    async with RemoteTrunk(address) as remote:

        async def client(i: int) -> None:
            config = TrainingConfig(
                optimizer=OptimizerConfig("adamw", lr=1e-4),
                lora=LoraConfig(rank=8, target_modules=TARGETS, seed=100 + i),
                adapter_id=f"{'c' if concurrent else 's'}{i}",
                train_bottom=False,
                train_top=False,
            )
            async with SplitTrainer(stages.bottom, remote, stages.top, config) as trainer:
                await trainer.step(batches[i])  # warm-up: opens the session, builds the optimizer
                for _ in range(steps):
                    started = time.perf_counter()
                    await trainer.step(batches[i])
                    latencies.append(time.perf_counter() - started)

        cpu0, started = _cpu(proc), time.perf_counter()
        if concurrent:
            await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        else:
            for i in range(CLIENTS):
                await client(i)
        elapsed, cpu = time.perf_counter() - started, _cpu(proc) - cpu0
    return {
        "steps": CLIENTS * steps,
        "server_cpu_s_per_step": round(cpu / (CLIENTS * (steps + 1)), 3),
        "wall_s": round(elapsed, 2),
        "steps_per_s": round(CLIENTS * (steps + 1) / elapsed, 3),  # warm-up steps count: they ran too
        "step_p50_ms": round(_pct(latencies, 0.5), 1),
        "step_p90_ms": round(_pct(latencies, 0.9), 1),
    }


async def run(quick: bool, tokens: int, train_steps: int, train_len: int, phases: list[str]) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    client_cores = set(cores[1:]) or set(cores)
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "quick": quick,
        "clients": CLIENTS,
        "server": f"core {cores[0]}, 1 torch thread",
        "client": f"cores {sorted(client_cores)}, 1 torch thread",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _bundle(quick, Path(tmp))
        stages = load_stages(bundle, parts=("bottom", "top"))
        base_args = ["--cpus", str(cores[0]), "--torch-threads", "1"]
        if "inference" in phases:
            result["inference"] = await _inference_phase(bundle, stages, base_args, cores, client_cores, tokens)
        if "training" in phases:
            result["training"] = await _training_phase(bundle, stages, base_args, cores, client_cores, train_steps,
                                                       train_len)
    return result


async def _inference_phase(bundle: Path, stages: Any, base_args: list[str], cores: list[int], client_cores: set[int],
                           tokens: int) -> dict:
    inference: dict[str, Any] = {}
    for name, extra in (("mixed", []), ("one_by_one", ["--no-batching"]), ("base", [])):
        with ServerProcess(bundle, extra_args=[*base_args, *extra]) as server:
            os.sched_setaffinity(0, client_cores)
            adapters: list[str | None] = [None] * CLIENTS
            if name != "base":
                adapters = list(await _make_adapters(server.address, CLIENTS))
            proc = psutil.Process(server.pid)
            inference[name] = await _inference(server.address, stages, adapters, tokens, proc)
            os.sched_setaffinity(0, set(cores))
        print(f"inference {name:<10} {inference[name]['tokens_per_s']:7.1f} tokens/s, step p50 "
              f"{inference[name]['step_p50_ms']:6.1f} ms, server {inference[name]['server_cpu_s_per_1k_tokens']} "
              "CPU-s / 1k tokens")
    same = inference["mixed"]["outputs"] == inference["one_by_one"]["outputs"]
    for entry in inference.values():
        entry.pop("outputs")
    inference["identical_tokens_mixed_vs_one_by_one"] = same
    inference["mixed_over_one_by_one"] = round(
        inference["mixed"]["tokens_per_s"] / inference["one_by_one"]["tokens_per_s"], 2
    )
    print(f"mixed / one-by-one inference: {inference['mixed_over_one_by_one']}x (tokens identical: {same})")
    return inference


async def _training_phase(bundle: Path, stages: Any, base_args: list[str], cores: list[int], client_cores: set[int],
                          train_steps: int, train_len: int) -> dict:
    training: dict[str, Any] = {}
    ways = (("concurrent", True, []), ("concurrent_unbatched", True, ["--training-batch-tokens", "0"]),
            ("one_after_another", False, []))
    for name, concurrent, extra in ways:
        with ServerProcess(bundle, extra_args=[*base_args, *extra]) as server:
            os.sched_setaffinity(0, client_cores)
            proc = psutil.Process(server.pid)
            training[name] = await _training(server.address, stages, train_steps, train_len, concurrent, proc)
            os.sched_setaffinity(0, set(cores))
        print(f"training {name:<20} {training[name]['steps_per_s']:.3f} steps/s, step p50 "
              f"{training[name]['step_p50_ms']} ms, p90 {training[name]['step_p90_ms']} ms, server "
              f"{training[name]['server_cpu_s_per_step']} CPU-s/step")
    training["throughput_ratio"] = round(
        training["concurrent"]["steps_per_s"] / training["one_after_another"]["steps_per_s"], 2
    )
    training["batched_over_unbatched"] = round(
        training["concurrent"]["steps_per_s"] / training["concurrent_unbatched"]["steps_per_s"], 2
    )
    print(f"concurrent / sequential training: {training['throughput_ratio']}x; batched / unbatched: "
          f"{training['batched_over_unbatched']}x")
    return training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model (a smoke run)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each inference session generates")
    parser.add_argument("--train-steps", type=int, default=3, help="measured training steps per client")
    parser.add_argument("--train-len", type=int, default=32, help="tokens per training batch")
    parser.add_argument("--phases", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.train_steps, args.train_len = 4, 1, 8
    result = asyncio.run(run(args.quick, args.tokens, args.train_steps, args.train_len, args.phases))
    if not args.quick:
        out = Path(__file__).resolve().parent / "results" / "adapters.json"
        if out.exists():  # a phase not run keeps its last figures
            result = {**json.loads(out.read_text()), **result}
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
