"""One decode step of N sessions with ragged caches: how the trunk's attention is batched.

    python benchmarks/attention_paths.py                 # this checkout
    git worktree add /tmp/prev 289aad0 && PYTHONPATH=/tmp/prev python benchmarks/attention_paths.py --label previous

The embedded SmolLM2's trunk (layers 3..26), fp32, on core 0 with 1 torch thread. N
sessions of one row each hold 34..64 cached tokens (ragged); one decode step of all N runs
through ``run_stage_batched`` (the server's batched call). The reference is the same
decoder layers as Hugging Face runs them at batch N with a ``DynamicCache`` (uniform
length 64, no mask). Prints the median ms per step over 14 steps.

Commit 289aad0 is the last one with *selective batching* (projections and MLPs over all
rows, attention per session: a Python loop of N kernel calls in each layer); this
checkout makes one attention call per layer over the KV pool (``models/cache.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def hf_step_ms(model, layer_range, n: int, length: int, steps: int) -> float:
    from transformers import DynamicCache

    try:
        from splitlearn_async.models.hf_compat import cache_kwargs
    except ImportError:  # a checkout from before the compatibility point
        def cache_kwargs(module, cache):
            return {"past_key_values": cache}

    layers = list(model.model.layers)[layer_range[0]:layer_range[1]]
    cache = DynamicCache(config=model.config)
    kw = cache_kwargs(layers[0], cache)
    g = torch.Generator().manual_seed(0)

    def run(h, start):
        pos = torch.arange(start, start + h.shape[1]).expand(n, h.shape[1])
        pe = model.model.rotary_emb(h, pos)
        for layer in layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True, **kw)

    times = []
    with torch.no_grad():
        run(torch.randn(n, length, model.config.hidden_size, generator=g), 0)
        for k in range(steps):
            x = torch.randn(n, 1, model.config.hidden_size, generator=g)
            t0 = time.perf_counter()
            run(x, length + k)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def ours_step_ms(trunk, n: int, steps: int) -> float:
    from splitlearn_async.models.stages import run_stage, run_stage_batched

    g = torch.Generator().manual_seed(0)
    caches = [trunk.new_cache(1) for _ in range(n)]
    for i, cache in enumerate(caches):
        length = 64 - (i % 16) * 2  # ragged: 34..64
        run_stage(trunk, torch.randn(1, length, trunk.hidden_size, generator=g), None, torch.arange(length)[None], cache)
    times = []
    for _ in range(steps):
        x = torch.randn(n, 1, trunk.hidden_size, generator=g)
        calls = [(x[i : i + 1], None, torch.tensor([[c.length]]), c) for i, c in enumerate(caches)]
        t0 = time.perf_counter()
        run_stage_batched(trunk, calls)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ms per trunk decode step of N ragged sessions, batched.")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    from splitlearn_async import default_bundle, load_stages

    from latency import full_model  # benchmarks/ is on the path: this file runs as a script from there

    stages = load_stages(default_bundle())
    model = full_model(stages)
    rows = {}
    for n in (int(x) for x in args.concurrency.split(",")):
        rows[n] = {"ours_ms": round(ours_step_ms(stages.trunk, n, args.steps), 1),
                   "hf_ms": round(hf_step_ms(model, stages.trunk.layer_range, n, 64, args.steps), 1)}
        rows[n]["hf_over_ours"] = round(rows[n]["hf_ms"] / rows[n]["ours_ms"], 3)
        print(f"{args.label}: N={n}: {rows[n]['ours_ms']} ms per step, HF layers {rows[n]['hf_ms']} ms "
              f"-> {rows[n]['hf_over_ours']}x HF's speed", flush=True)
    print(json.dumps({"label": args.label, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
