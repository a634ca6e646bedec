"""Soak: honest sessions generate while an adversary sends malformed messages and bombs.

    python benchmarks/soak.py                 # 4 honest sessions x 32 tokens, adversary every 20 ms
    python benchmarks/soak.py --quick         # a tiny run for CI: checks that everything works

The embedded SmolLM2-135M-Instruct, split (3, 27), fp32, greedy, served by a
``splitlearn serve`` child process on loopback. Placement (Linux affinity): the server on
core 0 with 1 torch thread; this process (honest clients and the adversary) on the other
cores with 1 torch thread.

Two phases, the same honest work in each:

1. without the adversary;
2. with the adversary: at a fixed rate it sends, round-robin, a msgpack bomb (millions of
   empty arrays), a deeply nested body, a long string, a body over the size limit, a body
   with unknown fields, random bytes, a truncated valid body, a LoadAdapter claiming a
   huge rank, a TrainOpen with target modules given as a map, and a Forward whose hidden
   states hold NaN; every call gets a status, counted by code.

It reports whether the honest tokens are identical in both phases, the p50/p99 of the
honest per-token latency in each (and their ratio), the server's RSS growth, and the
adversary's calls by status code. Writes ``benchmarks/results/soak.json``. Timings are
only meaningful on an otherwise idle machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import msgpack
import torch

from splitlearn_async import RemoteTrunk, SplitPipeline, default_bundle, load_stages
from splitlearn_async import protocol as proto
from splitlearn_async.models.default import load_tokenizer
from splitlearn_async.server import ServerProcess
from splitlearn_async.wire import pack

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe the history of the city of Rome.",
    "What are the benefits of regular exercise? Give many examples.",
]
HIDDEN = 576


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _bad_bodies() -> list[tuple[str, str, bytes | list[bytes]]]:
    """``(name, method, body)`` of everything the adversary sends, round-robin (a list: a client stream)."""
    ones = torch.ones(1, 4, dtype=torch.long)
    nan = torch.full((1, 4, HIDDEN), float("nan"))
    valid = proto.build_forward(torch.randn(1, 4, HIDDEN), ones, torch.arange(4)[None])
    from safetensors.torch import save

    huge_rank = save({"x": torch.zeros(1)}, metadata={"format": "splitlearn-lora/1", "rank": "40000", "alpha": "1"})
    return [
        ("bomb-flat", proto.METHOD_FORWARD, msgpack.packb({"kind": "forward", "x": [[]] * 4_000_000})),
        ("bomb-deep", proto.METHOD_FORWARD, b"\x81\xa4kind" + b"\x91" * 4_000_000 + b"\x90"),
        ("long-string", proto.METHOD_TRAIN_OPEN, pack({"kind": "open", "mode": "x" * 1_000_000})),
        ("over-limit", proto.METHOD_FORWARD, pack({"kind": "forward", "pad": b"\0" * (9 << 20)})),
        ("unknown-field", proto.METHOD_FORWARD, pack(msgpack.unpackb(valid) | {"extra": 1})),
        ("random-bytes", proto.METHOD_BACKWARD, os.urandom(4096)),
        ("truncated", proto.METHOD_FORWARD, valid[: len(valid) // 2]),
        ("huge-rank", proto.METHOD_LOAD_ADAPTER, _load_adapter_stream("evil", huge_rank)),
        ("targets-map", proto.METHOD_TRAIN_OPEN, pack({"kind": "open", "mode": "lora", "lora": {"target_modules": {"q_proj": 1}}})),
        ("nan-hidden", proto.METHOD_FORWARD, proto.build_forward(nan, ones, torch.arange(4)[None])),
    ]


def _load_adapter_stream(adapter_id: str, weights: bytes) -> list[bytes]:
    """A whole ``LoadAdapter`` stream: the header declaring the file, then its chunks."""
    blobs = proto.describe_blobs({"weights": weights})
    chunks = proto.chunk_bodies(blobs, {"weights": weights}, 4096)
    return [proto.build_load_adapter(adapter_id, blobs[0], 4096), *chunks]


async def _adversary(address: str, period_s: float, stop: asyncio.Event, codes: dict[str, dict[str, int]]) -> None:
    bodies = _bad_bodies()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as chan:
        i = 0
        while not stop.is_set():
            name, method, body = bodies[i % len(bodies)]
            i += 1
            io = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
            try:
                if isinstance(body, list):  # a client-streaming method (LoadAdapter)
                    await chan.stream_unary(method, **io)(iter(body), timeout=30)
                else:
                    await chan.unary_unary(method, **io)(body, timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes.setdefault(name, {}).setdefault(code, 0)
            codes[name][code] += 1
            await asyncio.sleep(period_s)


async def _honest(pipeline: SplitPipeline, prompts: list[str], new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Each prompt generated concurrently; ``(tokens of each, per-token latencies)``."""
    latencies: list[float] = []

    async def one(prompt: str) -> list[int]:
        ids, mask = pipeline.encode([{"role": "user", "content": prompt}])
        tokens: list[int] = []
        last = time.perf_counter()
        async for chunk in pipeline.stream(ids, mask, max_new_tokens=new_tokens):
            now = time.perf_counter()
            latencies.append(now - last)
            last = now
            tokens.extend(int(t) for t in chunk.tokens.reshape(-1))
        return tokens

    results = await asyncio.gather(*(one(p) for p in prompts))
    return list(results), latencies


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


async def _run(args: argparse.Namespace, address: str, pid: int, stages: Any, tokenizer: Any) -> dict[str, Any]:
    prompts = PROMPTS[: args.sessions] if args.sessions <= len(PROMPTS) else [PROMPTS[i % 4] for i in range(args.sessions)]
    async with RemoteTrunk(address) as trunk, SplitPipeline(stages.bottom, trunk, stages.top, tokenizer=tokenizer) as p:
        await _honest(p, prompts[:1], 2)  # warm-up: caches, threads
        rss0 = _rss_mb(pid)
        quiet_tokens, quiet_lat = await _honest(p, prompts, args.new_tokens)
        rss1 = _rss_mb(pid)
        stop, codes = asyncio.Event(), {}
        adversary = asyncio.create_task(_adversary(address, args.period_s, stop, codes))
        loud_tokens, loud_lat = await _honest(p, prompts, args.new_tokens)
        stop.set()
        await adversary
        rss2 = _rss_mb(pid)
    quiet, loud = _quantiles(quiet_lat), _quantiles(loud_lat)
    return {
        "identical_tokens": quiet_tokens == loud_tokens,
        "without_adversary": quiet,
        "with_adversary": loud,
        "p99_ratio": round(loud["p99_ms"] / quiet["p99_ms"], 2),
        "server_rss_mb": {"before": round(rss0, 1), "after_quiet": round(rss1, 1), "after_adversary": round(rss2, 1)},
        "adversary_calls": sum(sum(c.values()) for c in codes.values()),
        "adversary_codes": codes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Honest sessions beside an adversary, on loopback.")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI (2 sessions x 3 tokens)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--period-s", type=float, default=0.02, help="seconds between the adversary's calls")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.new_tokens = 2, 3
    cores = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = [cores[0]], cores[1:] or cores
    torch.set_num_threads(1)
    bundle = default_bundle((3, 27))
    stages, tokenizer = load_stages(bundle, parts=("bottom", "top")), load_tokenizer(bundle)
    extra = ["--torch-threads", "1", "--cpus", ",".join(map(str, server_cpus)), "--max-message-bytes", str(8 << 20)]
    with ServerProcess(bundle, extra_args=extra) as server:
        os.sched_setaffinity(0, client_cpus)  # after the child started: it takes its cores from --cpus
        result = asyncio.run(_run(args, server.address, server.pid, stages, tokenizer))
    result["setup"] = {
        "sessions": args.sessions, "new_tokens": args.new_tokens, "adversary_period_s": args.period_s,
        "server_cpus": server_cpus, "client_cpus": client_cpus, "torch_threads": 1,
        "max_message_bytes": 8 << 20, "python": sys.version.split()[0], "torch": torch.__version__,
        "machine": platform.machine(), "quick": args.quick,
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
