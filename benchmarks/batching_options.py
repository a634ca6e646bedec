"""How to batch decode steps of sessions whose KV caches have different lengths.

Measures one trunk decode step for N sessions on SmolLM2's trunk shape (random weights:
hidden 576, 9 heads, 3 KV heads, head dim 64, MLP 1536, layers [3, 27) of 30), fp32, CPU:

- ``unbatched``: N calls of batch 1, each on its own cache (batching off);
- ``selective`` (c): one call; linear layers/MLP over all N rows, attention per session on
  its own cache (``run_stage_batched``: what the server and client use);
- ``gather`` (a): copy the N caches into one left-aligned padded cache, one call with a
  mask over the valid columns, copy each session's new column back;
- ``slots`` (b, lower bound): the same padded call on a cache that already holds every
  session in its own row, so no copy at all (a slot cache would also need per-row write
  positions; their cost is not counted here, so this is a best case for slots).

Also measures prefill time by prompt length (for the chunking decision).

Usage: ``python benchmarks/batching_options.py [--out benchmarks/results/batching_options.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def smollm2_trunk(num_layers: int = 30, split: tuple[int, int] = (3, 27)):
    """A random-weight trunk with SmolLM2-135M's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from splitlearn_async import split_model

    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=1024, max_position_embeddings=8192, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return split_model(model, split, parts=("trunk",)).trunk


def _filled_cache(trunk, length: int, seed: int):
    """A batch-1 cache holding ``length`` prompt columns."""
    from splitlearn_async.models.stages import run_stage

    g = torch.Generator().manual_seed(seed)
    cache = trunk.new_cache(1)
    hidden = torch.randn(1, length, trunk.hidden_size, generator=g)  # (1, T, H)
    run_stage(trunk, hidden, torch.ones(1, length, dtype=torch.long), torch.arange(length)[None], cache)
    return cache


def _step_inputs(trunk, caches, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, 1, trunk.hidden_size, generator=g), torch.ones(1, 1, dtype=torch.long),
         torch.tensor([[c.length]]))
        for c in caches
    ]


def _rewind(caches, lengths):
    for cache, length in zip(caches, lengths):
        cache.length = length


def _gather(caches, layers):
    """(a) Copy batch-1 caches into one padded KVCache ``(N, Hkv, Lmax + 1, D)`` per layer."""
    from splitlearn_async.models.cache import KVCache

    n, lmax = len(caches), max(c.length for c in caches)
    padded = KVCache(n, capacity=lmax + 1)
    for layer in layers:
        k0 = caches[0].keys[layer]
        k = torch.zeros(n, k0.shape[1], lmax + 1, k0.shape[3])
        v = torch.zeros_like(k)
        for row, c in enumerate(caches):
            k[row, :, : c.length] = c.keys[layer][0, :, : c.length]
            v[row, :, : c.length] = c.values[layer][0, :, : c.length]
        padded.keys[layer], padded.values[layer] = k, v
    for row, c in enumerate(caches):
        padded.valid[row, : c.length] = True
    padded.length = lmax
    return padded


def _scatter_back(padded, caches, layers):
    """(a) Copy each session's new column from the padded cache into its own cache."""
    col = padded.length - 1
    for layer in layers:
        for row, c in enumerate(caches):
            c.keys[layer][0, :, c.length] = padded.keys[layer][row, :, col]
            c.values[layer][0, :, c.length] = padded.values[layer][row, :, col]
    for c in caches:
        c.length += 1


def measure_step(trunk, lengths: list[int], repeats: int) -> dict[str, float]:
    """Least ms (over ``repeats``) of one decode step for sessions with these cache lengths, per option."""
    from splitlearn_async.models.stages import run_stage, run_stage_batched

    caches = [_filled_cache(trunk, n, seed=i) for i, n in enumerate(lengths)]
    layers = list(range(*trunk.layer_range))
    calls = _step_inputs(trunk, caches, seed=99)
    ragged_pos = torch.cat([p for _, _, p in calls])  # (N, 1): each session's own position
    hidden = torch.cat([h for h, _, _ in calls])  # (N, 1, H)
    slots = _gather(caches, layers)

    def unbatched():
        for (h, m, p), c in zip(calls, caches):
            run_stage(trunk, h, m, p, c)

    def selective():
        run_stage_batched(trunk, [(h, m, p, c) for (h, m, p), c in zip(calls, caches)])

    def gather():
        padded = _gather(caches, layers)
        run_stage(trunk, hidden, torch.ones(len(caches), 1, dtype=torch.long), ragged_pos, padded)
        _scatter_back(padded, caches, layers)

    def slot():
        run_stage(trunk, hidden, torch.ones(len(caches), 1, dtype=torch.long), ragged_pos, slots)
        slots.length -= 1  # rewind the slot cache for the next repeat

    options = {"unbatched": unbatched, "selective": selective, "gather": gather, "slots": slot}
    times: dict[str, list[float]] = {name: [] for name in options}
    for name, fn in options.items():  # warm-up
        fn()
        _rewind(caches, lengths)
    for _ in range(repeats):  # round robin, so that other people's load hits every option alike
        for name, fn in options.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            _rewind(caches, lengths)
    # the minimum: on a shared 2-core machine the median catches other people's work
    out = {name: round(1000 * min(t), 2) for name, t in times.items()}
    return out


def measure_prefill(trunk, lengths: list[int], chunk: int) -> list[dict[str, float]]:
    """ms of a one-session prefill of each length, whole and in chunks of ``chunk`` tokens."""
    from splitlearn_async.models.stages import run_stage

    rows = []
    for n in lengths:
        hidden = torch.randn(1, n, trunk.hidden_size)
        whole = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            run_stage(trunk, hidden, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], trunk.new_cache(1))
            whole = min(whole, time.perf_counter() - t0)
        cache = trunk.new_cache(1)
        t0 = time.perf_counter()
        slowest = 0.0
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            t1 = time.perf_counter()
            run_stage(trunk, hidden[:, a:b], torch.ones(1, b - a, dtype=torch.long), torch.arange(a, b)[None], cache)
            slowest = max(slowest, time.perf_counter() - t1)
        chunked = time.perf_counter() - t0
        rows.append({"tokens": n, "whole_ms": round(1000 * whole, 1), "chunked_ms": round(1000 * chunked, 1),
                     "longest_chunk_ms": round(1000 * slowest, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk size to compare")
    parser.add_argument("--out", default="benchmarks/results/batching_options.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trunk = smollm2_trunk()
    scenarios = {
        "N=1 len 128": [128],
        "N=8 ragged 32..256": [32 + 32 * i for i in range(8)],
        "N=32 ragged 32..280": [32 + 8 * i for i in range(32)],
        "N=32 equal 128": [128] * 32,
        "N=32 ragged 32..1024": [32 + 32 * i for i in range(32)],
        "N=64 ragged 32..536": [32 + 8 * i for i in range(64)],
    }
    results = {"torch_threads": torch.get_num_threads(), "step_ms": {}, "prefill": None}
    print(f"{'scenario':24s} {'unbatched':>10s} {'selective':>10s} {'gather':>10s} {'slots':>10s}  (ms per step)")
    for name, lengths in scenarios.items():
        r = measure_step(trunk, lengths, args.repeats)
        results["step_ms"][name] = r
        print(f"{name:24s} {r['unbatched']:10.2f} {r['selective']:10.2f} {r['gather']:10.2f} {r['slots']:10.2f}")
    results["prefill_chunk"] = args.chunk
    results["prefill"] = measure_prefill(trunk, [128, 512, 1024, 2048], args.chunk)
    for row in results["prefill"]:
        print(f"prefill {row['tokens']:5d} tokens: whole {row['whole_ms']:8.1f} ms, in chunks of {args.chunk}: "
              f"{row['chunked_ms']:8.1f} ms (longest chunk {row['longest_chunk_ms']:.1f} ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
