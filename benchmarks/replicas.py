"""The ``--replicas K`` phase of ``benchmarks/latency.py``: K trunk server processes behind one balanced client.

Each replica runs on its own core (round robin over the cores this process may use) with
one torch thread; the client (this process) may use every core. The client is one
``RemoteTrunk`` given the list of the replicas' addresses, so gRPC balances new sessions
round-robin over the healthy ones.

It reports, for N concurrent ``generate()`` calls: tokens/s, per-replica sessions (from
each replica's ``Info``) and per-replica CPU-seconds; then the failover: while N sessions
generate, the replica holding the most of them is killed with SIGKILL, and it reports the
time from the kill to the first token of each of its sessions after their replay on
another replica, and whether every session's tokens equal those of the run without a kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from splitlearn_async import RemoteTrunk, SplitPipeline
from splitlearn_async.server import ServerProcess


async def _info(address: str) -> dict[str, Any]:
    async with RemoteTrunk(address) as trunk:
        return await trunk.info()


async def _stream_all(pipeline: SplitPipeline, prompts: list[tuple[torch.Tensor, torch.Tensor]], new: int, pad: int,
                      on_token: Any = None) -> list[list[tuple[float, int]]]:
    """Each prompt streamed concurrently: per session, ``(clock, token)`` of each step."""

    async def one(i: int, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, int]]:
        out = []
        async for chunk in pipeline.stream(ids, mask, max_new_tokens=new, pad_token_id=pad):
            out.append((time.perf_counter(), int(chunk.tokens[0])))
            if on_token is not None:
                await on_token(i, len(out))
        return out

    return list(await asyncio.gather(*(one(i, ids, mask) for i, (ids, mask) in enumerate(prompts))))


async def _client(addresses: list[str], stages: Any, prompts: list[tuple[torch.Tensor, torch.Tensor]], new: int,
                  pad: int, servers: list[ServerProcess]) -> dict[str, Any]:
    async with RemoteTrunk(addresses) as remote, SplitPipeline(stages.bottom, remote, stages.top) as pipeline:
        for ids, mask in prompts[: len(addresses)]:  # connect to every replica, warm every cache
            await pipeline.generate(ids, mask, max_new_tokens=2, pad_token_id=pad)
        before = [(await _info(a))["sessions_opened"] for a in addresses]
        cpu0 = [psutil.Process(s.pid).cpu_times() for s in servers]
        started = time.perf_counter()
        quiet = await _stream_all(pipeline, prompts, new, pad)
        seconds = time.perf_counter() - started
        cpu1 = [psutil.Process(s.pid).cpu_times() for s in servers]
        shares = [(await _info(a))["sessions_opened"] - b for a, b in zip(addresses, before, strict=True)]

        # failover: the replica with the most open sessions dies after every session has 3 tokens
        state: dict[str, Any] = {}

        async def on_token(i: int, count: int) -> None:
            if count == 3:
                state.setdefault("ready", set()).add(i)
                if len(state["ready"]) == len(prompts) and "killed_at" not in state:
                    opens = [(await _info(a))["sessions_open"] for a in addresses]
                    victim = max(range(len(addresses)), key=lambda k: opens[k])
                    state["victim"], state["victim_sessions"] = victim, opens[victim]
                    os.kill(servers[victim].pid, signal.SIGKILL)
                    state["killed_at"] = time.perf_counter()

        loud = await _stream_all(pipeline, prompts, new, pad, on_token)
        replays = remote.replays
    killed_at = state["killed_at"]
    # each session's first token after the kill; the replayed ones are the slow ones
    firsts = sorted(next((t for t, _ in steps if t > killed_at), killed_at) - killed_at for steps in loud)
    replayed = firsts[-state["victim_sessions"]:] if state["victim_sessions"] else []
    tokens = sum(len(s) for s in quiet)
    return {
        "sessions": len(prompts),
        "tok_s": round(tokens / seconds, 2),
        "per_replica_sessions": shares,
        "per_replica_cpu_s": [round((c1.user + c1.system) - (c0.user + c0.system), 2)
                              for c0, c1 in zip(cpu0, cpu1, strict=True)],
        "failover": {
            "killed_replica": state["victim"],
            "its_sessions": state["victim_sessions"],
            "replays": replays,
            "kill_to_first_token_ms": [round(1000 * f, 1) for f in replayed],
            "kill_to_first_token_ms_max": round(1000 * max(replayed), 1) if replayed else None,
            "others_first_token_ms_median": round(1000 * statistics.median(firsts[: len(firsts) - len(replayed)]), 1)
            if len(firsts) > len(replayed) else None,
            "identical_tokens": [[t for _, t in s] for s in quiet] == [[t for _, t in s] for s in loud],
        },
    }


def run_replicas(replicas: int, bundle: Path, stages: Any, prompts: list[tuple[torch.Tensor, torch.Tensor]], new: int,
                 pad: int) -> dict[str, Any]:
    """Start ``replicas`` server processes, one core each, and measure them behind one client."""
    cores = sorted(os.sched_getaffinity(0))
    servers = [
        ServerProcess(bundle, extra_args=["--torch-threads", "1", "--cpus", str(cores[k % len(cores)]), "--drain-s", "5"])
        for k in range(replicas)
    ]
    try:
        for server in servers:
            server.start()
        addresses = [server.address for server in servers]
        result = asyncio.run(_client(addresses, stages, prompts, new, pad, servers))
        result["placement"] = {"replica_cpus": [cores[k % len(cores)] for k in range(replicas)],
                               "client_cpus": cores, "torch_threads": 1}
        return result
    finally:
        for server in servers:
            server.close()

