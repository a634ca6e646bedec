"""KV memory follows the tokens held: many one-token sessions against one long session.

    python benchmarks/kv_memory.py            # 2048 tokens either way
    python benchmarks/kv_memory.py --tokens 1024

The embedded SmolLM2's trunk (24 layers, 3 KV heads of 64, fp32: 36,864 bytes a token).
Each case runs in a fresh process: ``--tokens`` sessions of a one-token prompt, or one
session of a ``--tokens``-token prompt, each a cache of the trunk's KV pool. Reports the
pool's storage, the bytes the caches say they hold, and the process's RSS growth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import psutil
import torch


def measure(case: str, tokens: int) -> dict[str, float]:
    from splitlearn_async import default_bundle, load_stages
    from splitlearn_async.models.stages import run_stage

    torch.set_num_threads(1)
    trunk = load_stages(default_bundle(), parts=("trunk",)).trunk
    run_stage(trunk, torch.randn(1, 1, trunk.hidden_size), None, None, trunk.new_cache(1))  # warm-up, then freed
    trunk.kv_pool.reclaim()
    rss0 = psutil.Process().memory_info().rss
    if case == "many":
        caches = [trunk.new_cache(1) for _ in range(tokens)]
        for cache in caches:
            run_stage(trunk, torch.randn(1, 1, trunk.hidden_size), None, torch.zeros(1, 1, dtype=torch.long), cache)
    else:
        caches = [trunk.new_cache(1)]
        for start in range(0, tokens, 256):  # chunks, as the server runs a long prompt
            n = min(256, tokens - start)
            run_stage(trunk, torch.randn(1, n, trunk.hidden_size), None, torch.arange(start, start + n)[None], caches[0])
    return {
        "sessions": len(caches), "tokens": sum(c.length for c in caches),
        "pool_mib": round(trunk.kv_pool.nbytes() / 2**20, 1),
        "held_mib": round(sum(c.nbytes() for c in caches) / 2**20, 1),
        "rss_growth_mib": round((psutil.Process().memory_info().rss - rss0) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--case", choices=("many", "one"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # the child
        print(json.dumps(measure(args.case, args.tokens)))
        return 0
    rows = {}
    for case in ("many", "one"):
        out = subprocess.run([sys.executable, __file__, "--case", case, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        rows[case] = json.loads(out.stdout.strip().splitlines()[-1])
    for case, label in (("many", f"{args.tokens} sessions of 1 token"), ("one", f"1 session of {args.tokens} tokens")):
        r = rows[case]
        print(f"{label:>28}: pool {r['pool_mib']} MiB, held {r['held_mib']} MiB, RSS growth {r['rss_growth_mib']} MiB")
    ratio = rows["many"]["rss_growth_mib"] / max(rows["one"]["rss_growth_mib"], 1e-9)
    print(f"RSS growth, many short / one long: {ratio:.2f}x; pool storage: "
          f"{rows['many']['pool_mib'] / rows['one']['pool_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
