"""A whole SmolLM2 trunk and its AdamW state saved and loaded back in chunks, timed.

    python benchmarks/checkpoints.py [--split 3,27] [--chunk-mib 4] [--out benchmarks/results/checkpoints.json]

A ``splitlearn serve --allow-full-training`` child process serves SmolLM2's trunk with
the default ``max_message_bytes`` (256 MiB); this process is its client. One full-trunk
training step gives AdamW its moments; then the state is saved (``TrainSave``, into
memory and straight into files), and loaded back into a new full-training session
(``TrainOpen`` with weights and optimizer state), whose state is saved again. that the state loaded back is the state saved, tensor for tensor, and reports
the bytes, chunks, and for each phase its seconds and the resident memory of the server
and of the client before it and at its peak (VmHWM, reset at the start of the phase).
Writes benchmarks/results/checkpoints.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splitlearn_async import ClientConfig, OptimizerConfig, RemoteTrunk, default_bundle
from splitlearn_async.server import ServerProcess
from splitlearn_async.training import from_safetensors


def memory_mib(pid: int | str, field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Phase:
    """Seconds, and each process's resident memory before and at its peak during a phase (Linux)."""

    def __init__(self, pids: dict[str, int | str]) -> None:
        self.pids = pids
        self.report: dict[str, Any] = {}

    def __enter__(self) -> Phase:
        for pid in self.pids.values():
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the resident memory now
        self.report["before_mib"] = {k: round(memory_mib(p, "VmRSS")) for k, p in self.pids.items()}
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.started, 2)
        self.report["peak_mib"] = {k: round(memory_mib(p, "VmHWM")) for k, p in self.pids.items()}


def same(got: bytes, want: bytes) -> bool:
    """Whether two safetensors files hold equal tensors (exactly) under equal names."""
    a, _ = from_safetensors(got)
    b, _ = from_safetensors(want)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


async def run(args: argparse.Namespace, address: str, server_pid: int, hidden_size: int) -> dict[str, Any]:
    config = ClientConfig(chunk_bytes=args.chunk_mib << 20, step_timeout_s=600.0)
    opt = OptimizerConfig("adamw", lr=1e-5)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, hidden_size, generator=g)
    mask, positions = torch.ones(1, 8, dtype=torch.long), torch.arange(8)[None]
    async with RemoteTrunk(address, config) as remote:
        session = await remote.open_training("full", optimizer=opt)
        out, step = await session.forward(hidden, mask, positions)
        await session.backward(step, torch.randn(out.shape, generator=g) * 1e-3)

        pids: dict[str, int | str] = {"server": server_pid, "client": "self"}
        with Phase(pids) as save:
            state = await session.state()
        with tempfile.TemporaryDirectory() as tmp, Phase(pids) as save_files:
            files = await session.save(tmp)
            on_disk = {f.name: f.stat().st_size for f in files}
        await session.aclose()

        with Phase(pids) as load:  # a new full-training session from the state saved
            resumed = await remote.open_training(
                "full", optimizer=opt, weights=state.weights, optimizer_state=state.optimizer
            )
        again = await resumed.state()
        exact = same(again.weights, state.weights) and same(again.optimizer or b"", state.optimizer or b"")
        await resumed.aclose()
    chunk = config.effective_chunk_bytes
    sizes = {"weights": len(state.weights), "optimizer_state": len(state.optimizer or b"")}
    return {
        "split": args.split,
        "max_message_bytes": 256 << 20,
        "chunk_bytes": chunk,
        "bytes": sizes,
        "chunks": {k: math.ceil(v / chunk) for k, v in sizes.items()},
        "files": on_disk,
        "save_to_memory": save.report,
        "save_to_files": save_files.report,
        "load": load.report,
        "exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="3,27")
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoints.json"))
    args = parser.parse_args()
    split = tuple(int(x) for x in args.split.split(","))
    bundle = default_bundle(split)
    with ServerProcess(bundle, extra_args=["--allow-full-training"]) as server:
        report = asyncio.run(run(args, server.address, server.pid, 576))
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
