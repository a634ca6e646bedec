"""The trunk on one device: our stage and our server against Hugging Face's own decoder layers.

    python benchmarks/trunk_device.py --device cuda --dtype bfloat16   # on a GPU machine
    python benchmarks/trunk_device.py --device cpu --concurrency 1,8 --steps 4   # a quick look here

A llama model of SmolLM2-135M's shapes (30 layers, hidden 576, 9 query / 3 key-value heads)
with random weights (speed does not depend on the values, and nothing is downloaded),
split (3, 27). For each batch size N, decode steps/s after a prefill of ``--prompt`` tokens:

- ``hf``: the model's decoder layers ``[3, 27)`` as Hugging Face runs them, with a
  ``DynamicCache`` at batch N (every row the same length, no mask): the reference;
- ``stage``: our trunk stage in-process at batch N: N sessions of one row each, batched
  as the server batches them (one attention call per layer over the KV pool), with
  ragged prompt lengths (``prompt - 2 * (i % 16)``) so the padded/masked path is exercised;
- ``server`` (with ``--server``): a ``splitlearn serve --device ...`` process, driven
  over loopback by N client sessions of one row each.

Writes ``benchmarks/results/trunk-<device>-<dtype>.json``. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SPLIT = (3, 27)


def smollm2_shaped_model(dtype: torch.dtype, device: str) -> Any:
    """A llama ``*ForCausalLM`` with SmolLM2-135M's config and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


async def server_steps(address: str, n: int, prompt: int, steps: int) -> float:
    """Decode steps/s of a trunk server driven by N one-row sessions over loopback."""
    from splitlearn_async.client import RemoteTrunk

    g = torch.Generator().manual_seed(0)
    async with RemoteTrunk(address) as trunk:
        sessions = [await trunk.open_session() for _ in range(n)]
        await asyncio.gather(*(s.forward(torch.randn(1, prompt, 576, generator=g), torch.ones(1, prompt, dtype=torch.long),
                                         torch.arange(prompt)[None]) for s in sessions))
        one = torch.ones(1, 1, dtype=torch.long)

        async def decode(session: Any) -> None:
            for k in range(steps):
                await session.forward(torch.randn(1, 1, 576), one, torch.tensor([[prompt + k]]))

        t0 = time.perf_counter()
        await asyncio.gather(*(decode(s) for s in sessions))
        seconds = time.perf_counter() - t0
        for s in sessions:
            await s.aclose()
    return n * steps / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--concurrency", default="1,8,32,64,128,256")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--server", action="store_true", help="also measure a server process on --device")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ns = [int(x) for x in args.concurrency.split(",")]

    from references import hf_decode_times, stage_decode_times  # benchmarks/ is on the path (run as a script)

    from splitlearn_async import save_stages, split_model

    model = smollm2_shaped_model(dtype, args.device)
    trunk = split_model(model, SPLIT, parts=("trunk",)).trunk
    hf_decode_times(model, SPLIT, 2, 4, 2)  # warm-up (kernels, allocator)
    stage_decode_times(trunk, 2, 4, 2)
    rows = []
    for n in ns:
        hf = n * args.steps / sum(hf_decode_times(model, SPLIT, n, args.prompt, args.steps)[0])
        ours = n * args.steps / sum(stage_decode_times(trunk, n, args.prompt, args.steps)[0])
        rows.append({"n": n, "hf_steps_s": round(hf, 1), "stage_steps_s": round(ours, 1), "stage_vs_hf": round(ours / hf, 3)})
    if args.server:
        from splitlearn_async.server import ServerProcess

        with tempfile.TemporaryDirectory() as tmp:
            cpu_trunk = split_model(model.to("cpu", torch.float32), SPLIT, parts=("trunk",))
            save_stages(cpu_trunk, tmp)
            extra = ["--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(max(ns))]
            with ServerProcess(tmp, extra_args=extra) as server:
                asyncio.run(server_steps(server.address, 2, 4, 2))  # warm-up
                for row in rows:
                    row["server_steps_s"] = round(asyncio.run(server_steps(server.address, row["n"], args.prompt, args.steps)), 1)
                    row["server_vs_hf"] = round(row["server_steps_s"] / row["hf_steps_s"], 3)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "split": SPLIT,
              "prompt": args.prompt, "steps": args.steps, "rows": rows}
    print(f"{name}, {args.dtype}, torch {torch.__version__}: decode steps/s of trunk layers {list(SPLIT)}")
    print(f"{'N':>4} {'HF layers':>10} {'stage':>10} {'stage/HF':>9} {'server':>10} {'server/HF':>9}")
    for r in rows:
        print(f"{r['n']:>4} {r['hf_steps_s']:>10} {r['stage_steps_s']:>10} {r['stage_vs_hf']:>9} "
              f"{r.get('server_steps_s', '-')!s:>10} {r.get('server_vs_hf', '-')!s:>9}")
    out = Path(args.out or RESULTS / f"trunk-{'cuda' if args.device.startswith('cuda') else 'cpu'}-{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
