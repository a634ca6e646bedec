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

import torch


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
    from references import hf_decode_times, stage_decode_times

    stages = load_stages(default_bundle())
    model = full_model(stages)
    rows = {}
    for n in (int(x) for x in args.concurrency.split(",")):
        ours, _ = stage_decode_times(stages.trunk, n, 64, args.steps)
        hf, _ = hf_decode_times(model, stages.trunk.layer_range, n, 64, args.steps)
        rows[n] = {"ours_ms": round(1000 * statistics.median(ours[2:]), 1),
                   "hf_ms": round(1000 * statistics.median(hf[2:]), 1)}
        rows[n]["hf_over_ours"] = round(rows[n]["hf_ms"] / rows[n]["ours_ms"], 3)
        print(f"{args.label}: N={n}: {rows[n]['ours_ms']} ms per step, HF layers {rows[n]['hf_ms']} ms "
              f"-> {rows[n]['hf_over_ours']}x HF's speed", flush=True)
    print(json.dumps({"label": args.label, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
