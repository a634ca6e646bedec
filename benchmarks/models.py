"""Several models on one server: what a first use, a warm call and an eviction cost.

    python benchmarks/models.py            # two SmolLM2 trunks, a budget that holds one
    python benchmarks/models.py --quick    # tiny random models (CI smoke run)

One ``splitlearn serve`` process serves two models by name (``--model a=BUNDLE_A --model
b=BUNDLE_B``): the embedded SmolLM2-135M split (3, 27) and (2, 28), both from bundles on
disk. With ``--max-model-bytes`` set to hold one of them, the client alternates between
them (``--switches`` times), so every switch evicts the idle one and loads the other. It
reports, per phase, the
wall time of one ``generate()`` of ``--tokens`` tokens (first use: load included; warm;
switch: eviction and load included), the server's resident memory (RSS) after each, and
the loaded bytes the server reports in ``Info``.

The server runs on core 0 with one torch thread (``--cpus 0 --torch-threads 1``); the
client (this process) on the other cores with one torch thread. Writes
``benchmarks/results/models.json``. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from splitlearn_async import RemoteTrunk, SplitPipeline, load_stages, save_stages, split_model
from splitlearn_async.server import ServerProcess

SPLITS = {"a": (3, 27), "b": (2, 28)}


def _bundles(quick: bool, root: Path) -> tuple[dict[str, Path], dict[str, Any], Any]:
    """Bundle paths by model name, client stages by name, and a tokenizer (None when quick)."""
    paths, stages = {}, {}
    if quick:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.support.tiny_models import tiny_model

        for i, name in enumerate(SPLITS):
            model = tiny_model("llama", seed=i)
            paths[name] = root / name
            stages[name] = split_model(model, (2, 4))
            save_stages(stages[name], paths[name])
        return paths, stages, None
    from splitlearn_async.models.default import default_bundle, load_tokenizer

    for name, split in SPLITS.items():
        paths[name] = default_bundle(split)
        stages[name] = load_stages(paths[name], parts=("bottom", "top"))
    return paths, stages, load_tokenizer(paths["a"])


async def _generate(address: str, name: str, stages: Any, ids: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    async with RemoteTrunk(address, model=name) as remote, SplitPipeline(stages.bottom, remote, stages.top) as p:
        out = await p.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, out


async def _loaded_bytes(address: str, name: str) -> int:
    async with RemoteTrunk(address, model=name) as remote:  # the model just used: no load, no eviction
        info = await remote.info()
    return sum(m["bytes"] for m in info["models"])


async def run(quick: bool, tokens: int, switches: int) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    client_cores = set(cores[1:]) or set(cores)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths, stages, tokenizer = _bundles(quick, Path(tmp))
        one = max((p / "trunk" / "model.safetensors").stat().st_size for p in paths.values())
        budget = int(one * 1.5)  # holds one model, not two
        ids = (
            torch.tensor([tokenizer.encode("The capital of France is")])
            if tokenizer is not None
            else torch.tensor([[5, 7, 9, 11]])
        )
        args = [f"--model={n}={p}" for n, p in paths.items()]
        args += ["--max-model-bytes", str(budget), "--cpus", str(cores[0]), "--torch-threads", "1"]
        phases = []
        with ServerProcess(None, extra_args=args) as server:
            proc = psutil.Process(server.pid)
            os.sched_setaffinity(0, client_cores)  # after the server started: it picks its own core
            plan = [("a", "first use"), ("a", "warm")]
            for k in range(switches):
                new, old = ("b", "a") if k % 2 == 0 else ("a", "b")
                plan += [(new, f"switch: evict {old}, load {new}"), (new, "warm")]
            outputs: dict[str, torch.Tensor] = {}
            for name, phase in plan:
                seconds, out = await _generate(server.address, name, stages[name], ids, tokens)
                if name in outputs:
                    assert torch.equal(outputs[name], out), "a reloaded model answered differently"
                outputs[name] = out
                phases.append({
                    "model": name,
                    "phase": phase,
                    "generate_s": round(seconds, 3),
                    "server_rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "loaded_bytes": await _loaded_bytes(server.address, name),
                })
                print(f"{name}: {phase:<24} {seconds:7.3f} s   server RSS {phases[-1]['server_rss_mib']:7.1f} MiB")
    return {
        "quick": quick,
        "tokens": tokens,
        "switches": switches,
        "budget_bytes": budget,
        "model_file_bytes": one,
        "server": f"core {cores[0]}, 1 torch thread",
        "client": f"cores {sorted(client_cores)}, 1 torch thread",
        "torch": torch.__version__,
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models (a smoke run)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per generate() (default 8)")
    parser.add_argument("--switches", type=int, default=6, help="times the client switches model (default 6)")
    args = parser.parse_args()
    result = asyncio.run(run(args.quick, args.tokens, args.switches))
    if not args.quick:
        out = Path(__file__).resolve().parent / "results" / "models.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
