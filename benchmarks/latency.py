"""Concurrency benchmark: a trunk server process, many generate() calls, batching on and off.

    python benchmarks/latency.py            # the full run (several minutes on 2 cores)
    python benchmarks/latency.py --quick    # a tiny run for CI: checks that everything works

The embedded SmolLM2-135M-Instruct, split (3, 27), fp32, greedy. In one run it measures:

a) one session: tokens/s of SplitPipeline (client process) -> RemoteTrunk -> trunk server
   process, against in-process ``model.generate`` at batch 1, and that the tokens are identical;
b) N concurrent ``generate()`` calls in one client process: aggregate tokens/s, p50/p99
   per-token latency, time to first token, with batching on and off (server started with
   ``--no-batching`` and a client worker with ``batching=False``), against in-process
   ``model.generate`` at batch N (the same prompts, left-padded);
c) the trunk server alone, driven by a load generator that sends hidden states for N
   sessions, against the trunk stage run in-process at batch N (decode steps/s);
d) the server process's thread count and RSS while N sessions are open (/proc/<pid>/status).

Prints a table, writes ``benchmarks/results/latency.json`` and ``latency.png``. Timings are
only meaningful on an otherwise idle machine; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe the history of the city of Rome.",
    "What are the benefits of regular exercise? Give many examples.",
    "Write a poem about the sea and the stars.",
    "Explain how computers store numbers.",
    "Tell me about the life of bees in a hive.",
    "Describe a journey by train across a snowy country.",
]
RESULTS = Path(__file__).parent / "results"


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (bytes) of process ``pid`` from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            out["rss_bytes"] = int(line.split()[1]) * 1024
    return out


class StatusSampler:
    """Samples a process's thread count and RSS every ``interval_s`` and keeps the largest."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.threads: set[int] = set()
        self.rss_max = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            s = proc_status(self.pid)
            self.threads.add(s["threads"])
            self.rss_max = max(self.rss_max, s["rss_bytes"])
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> StatusSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def summary(self) -> dict[str, Any]:
        return {"threads_min": min(self.threads), "threads_max": max(self.threads), "rss_mb": round(self.rss_max / 2**20, 1)}


def encode(tokenizer: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` prompts (cycled) as chat inputs, left-padded: ``(n, T)`` ids and mask."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                      add_generation_prompt=True, tokenize=False)
        for i in range(n)
    ]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def unpadded(ids: torch.Tensor, mask: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row`` without its left padding: ``(1, T_row)`` ids and mask."""
    keep = mask[row].bool()
    return ids[row][keep][None], mask[row][keep][None]


def full_model(stages: Any) -> Any:
    """The unsplit ``*ForCausalLM`` rebuilt from the bundle's three stages (the same tensors).

    Loading the GGUF again would take 10-15 s of dequantizing; the bundle holds the same
    weights (tests/client/test_pipeline_local.py checks the split model against the GGUF one).

    Raises:
        RuntimeError: a tensor of the model is missing from the stages, or is extra.
    """
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(stages.bottom.config)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    state: dict[str, torch.Tensor] = {}
    for stage in stages:
        state.update(stage.checkpoint_tensors())
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected name
    return model


def inprocess_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new: int, pad: int) -> tuple[torch.Tensor, float]:
    """``model.generate`` greedy; returns the output and its seconds."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    return out, time.perf_counter() - t0


async def concurrent_generate(pipeline: Any, prompts: list[tuple[torch.Tensor, torch.Tensor]], new: int, pad: int) -> dict[str, Any]:
    """Run one stream per prompt at once; aggregate tokens/s, per-token latency and TTFT."""
    gaps: list[float] = []
    ttfts: list[float] = []
    outputs: list[torch.Tensor] = []

    async def one(ids: torch.Tensor, mask: torch.Tensor) -> int:
        start = last = time.perf_counter()
        steps = []
        async for chunk in pipeline.stream(ids, mask, max_new_tokens=new, pad_token_id=pad):
            now = time.perf_counter()
            (gaps if steps else ttfts).append(now - last if steps else now - start)
            last = now
            steps.append(chunk.tokens[:, None])
        outputs.append(torch.cat([ids, *steps], dim=1))
        return len(steps) * ids.shape[0]

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, m) for i, m in prompts)))
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(gaps, n=100) if len(gaps) >= 2 else [gaps[0] if gaps else 0.0] * 99
    return {
        "tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2),
        "p50_token_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "p99_token_ms": round(1000 * q[98], 1) if gaps else None,
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "outputs": outputs,
    }


async def load_generator(address: str, n: int, prompt: int, steps: int, hidden: int) -> dict[str, Any]:
    """N sessions sending random hidden states: a prefill of ``prompt`` tokens, then ``steps`` decode steps each."""
    from splitlearn_async.client import RemoteTrunk

    g = torch.Generator().manual_seed(0)
    async with RemoteTrunk(address) as trunk:
        sessions = [await trunk.open_session() for _ in range(n)]
        mask = torch.ones(1, prompt, dtype=torch.long)
        await asyncio.gather(*(s.forward(torch.randn(1, prompt, hidden, generator=g), mask, torch.arange(prompt)[None])
                               for s in sessions))
        step_inputs = [[torch.randn(1, 1, hidden, generator=g) for _ in range(steps)] for _ in sessions]

        async def decode(session: Any, inputs: list[torch.Tensor]) -> None:
            for k, h in enumerate(inputs):
                await session.forward(h, torch.ones(1, 1, dtype=torch.long), torch.tensor([[prompt + k]]))

        t0 = time.perf_counter()
        await asyncio.gather(*(decode(s, x) for s, x in zip(sessions, step_inputs)))
        seconds = time.perf_counter() - t0
        for s in sessions:
            await s.aclose()
    return {"steps_s": round(n * steps / seconds, 2), "seconds": round(seconds, 3)}


def inprocess_trunk(trunk: Any, n: int, prompt: int, steps: int) -> dict[str, Any]:
    """The trunk stage in-process at batch N: a prefill, then timed decode steps (steps/s = N x steps / s)."""
    from splitlearn_async.models.stages import run_stage

    g = torch.Generator().manual_seed(0)
    cache = trunk.new_cache(n)
    run_stage(trunk, torch.randn(n, prompt, trunk.hidden_size, generator=g), torch.ones(n, prompt, dtype=torch.long),
              torch.arange(prompt).expand(n, prompt), cache)
    xs = [torch.randn(n, 1, trunk.hidden_size, generator=g) for _ in range(steps)]
    t0 = time.perf_counter()
    for k, x in enumerate(xs):
        run_stage(trunk, x, torch.ones(n, 1, dtype=torch.long), torch.full((n, 1), prompt + k), cache)
    seconds = time.perf_counter() - t0
    return {"steps_s": round(n * steps / seconds, 2), "seconds": round(seconds, 3)}


async def client_runs(args: argparse.Namespace, address: str, pid: int, batching: bool, tokenizer: Any,
                      stages: Any, bar: Any) -> dict[str, Any]:
    """(a)/(b)/(c)/(d) against one server process."""
    from splitlearn_async.client import RemoteTrunk, SplitPipeline
    from splitlearn_async.worker import StageWorker

    bottom, trunk_stage, top = stages
    out: dict[str, Any] = {"generate": {}, "loadgen": {}}
    worker = StageWorker("benchmark-client", batching=batching, max_batch_size=max(args.concurrency), max_gather_wait_s=0.01)
    async with worker, RemoteTrunk(address) as remote:
        pipeline = SplitPipeline(bottom, remote, top, tokenizer, worker=worker)
        ids, mask = encode(tokenizer, 1)
        await pipeline.generate(ids, mask, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)  # warm-up
        for n in args.concurrency:
            ids, mask = encode(tokenizer, n)
            prompts = [unpadded(ids, mask, r) for r in range(n)]
            with StatusSampler(pid) as sampler:
                r = await concurrent_generate(pipeline, prompts, args.new_tokens, tokenizer.pad_token_id)
            r.update(server=sampler.summary())
            out["generate"][n] = r
            bar.update(1)
        for n in args.concurrency:
            with StatusSampler(pid) as sampler:
                r = await load_generator(address, n, args.loadgen_prompt, args.loadgen_steps, trunk_stage.hidden_size)
            r.update(server=sampler.summary())
            out["loadgen"][n] = r
            bar.update(1)
    return out


def run_server_phase(args: argparse.Namespace, bundle: Path, batching: bool, tokenizer: Any, stages: Any, bar: Any) -> dict[str, Any]:
    from splitlearn_async.server._process import ServerProcess

    extra = ["--max-batch-size", str(max(args.concurrency))] + ([] if batching else ["--no-batching"])
    with ServerProcess(bundle, extra_args=extra) as server:
        idle = proc_status(server.pid)
        result = asyncio.run(client_runs(args, server.address, server.pid, batching, tokenizer, stages, bar))
        result["server_idle"] = {"threads": idle["threads"], "rss_mb": round(idle["rss_bytes"] / 2**20, 1)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Concurrency benchmark of the split pipeline against a trunk server process.")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI (N in 1,2; 4 new tokens)")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated N")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--loadgen-prompt", type=int, default=64, help="prompt tokens of each load-generator session")
    parser.add_argument("--loadgen-steps", type=int, default=32, help="decode steps of each load-generator session")
    parser.add_argument("--out", default=str(RESULTS / "latency.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.new_tokens, args.loadgen_prompt, args.loadgen_steps = "1,2", 3, 8, 2
    args.concurrency = [int(x) for x in str(args.concurrency).split(",")]

    from splitlearn_async import default_bundle, load_stages
    from splitlearn_async.models.default import load_tokenizer

    bundle = default_bundle()
    tokenizer = load_tokenizer(bundle)
    stages = load_stages(bundle)
    model = full_model(stages)
    pad = tokenizer.pad_token_id

    steps_total = 5 * len(args.concurrency)
    report: dict[str, Any] = {
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "inprocess_generate": {}, "inprocess_trunk": {},
    }
    ids, mask = encode(tokenizer, 1)
    inprocess_generate(model, ids, mask, 2, pad)  # warm-up
    inprocess_trunk(stages.trunk, 1, 4, 1)
    with tqdm(total=steps_total, desc="latency", file=sys.stderr) as bar:
        for n in args.concurrency:
            ids, mask = encode(tokenizer, n)
            out, seconds = inprocess_generate(model, ids, mask, args.new_tokens, pad)
            report["inprocess_generate"][n] = {"tok_s": round(n * (out.shape[1] - ids.shape[1]) / seconds, 2),
                                               "seconds": round(seconds, 3), "output": out}
            report["inprocess_trunk"][n] = inprocess_trunk(stages.trunk, n, args.loadgen_prompt, args.loadgen_steps)
            bar.update(1)
        report["batching_on"] = run_server_phase(args, bundle, True, tokenizer, stages, bar)
        report["batching_off"] = run_server_phase(args, bundle, False, tokenizer, stages, bar)
    summarize(report, args)
    return 0


def summarize(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Check tokens, print the table, write JSON and PNG."""
    on, off = report["batching_on"], report["batching_off"]
    ref1 = report["inprocess_generate"][1]["output"]
    one = on["generate"][1]["outputs"][0]
    report["one_session"] = {
        "tok_s": on["generate"][1]["tok_s"], "inprocess_tok_s": report["inprocess_generate"][1]["tok_s"],
        "ratio": round(on["generate"][1]["tok_s"] / report["inprocess_generate"][1]["tok_s"], 3),
        "identical_tokens": bool(torch.equal(one, ref1)),
    }
    rows = []
    for n in args.concurrency:
        g_on, g_off = on["generate"][n], off["generate"][n]
        inproc = report["inprocess_generate"][n]
        rows.append({
            "n": n, "on_tok_s": g_on["tok_s"], "off_tok_s": g_off["tok_s"], "inproc_tok_s": inproc["tok_s"],
            "on_vs_off": round(g_on["tok_s"] / g_off["tok_s"], 2), "on_vs_inproc": round(g_on["tok_s"] / inproc["tok_s"], 3),
            "p50_ms": g_on["p50_token_ms"], "p99_ms": g_on["p99_token_ms"], "ttft_ms": g_on["ttft_p50_ms"],
            "off_p50_ms": g_off["p50_token_ms"], "off_ttft_ms": g_off["ttft_p50_ms"],
            "loadgen_steps_s": on["loadgen"][n]["steps_s"], "loadgen_off_steps_s": off["loadgen"][n]["steps_s"],
            "trunk_inproc_steps_s": report["inprocess_trunk"][n]["steps_s"],
            "loadgen_vs_inproc": round(on["loadgen"][n]["steps_s"] / report["inprocess_trunk"][n]["steps_s"], 3),
            "server_threads": sorted({on["generate"][n]["server"]["threads_max"], on["loadgen"][n]["server"]["threads_max"]}),
            "server_rss_mb": max(on["generate"][n]["server"]["rss_mb"], on["loadgen"][n]["server"]["rss_mb"]),
        })
    report["table"] = rows
    threads = sorted({t for r in rows for t in r["server_threads"]})
    report["server_threads_by_n"] = threads
    report["server_threads_constant"] = len(threads) == 1  # from 1 to max N open sessions
    # drop token tensors before writing
    for phase in (on, off):
        for g in phase["generate"].values():
            g.pop("outputs", None)
    for g in report["inprocess_generate"].values():
        g.pop("output", None)

    o = report["one_session"]
    print(f"\none session: {o['tok_s']} tok/s vs in-process model.generate {o['inprocess_tok_s']} tok/s "
          f"= {o['ratio']}x, identical tokens: {o['identical_tokens']}")
    head = (f"{'N':>3} {'on tok/s':>9} {'off tok/s':>9} {'inproc':>8} {'on/off':>7} {'on/inp':>7} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'ttft ms':>8} {'trunk srv':>9} {'trunk inp':>9} {'srv/inp':>7} {'threads':>8} {'RSS MB':>7}")
    print(head)
    for r in rows:
        print(f"{r['n']:>3} {r['on_tok_s']:>9} {r['off_tok_s']:>9} {r['inproc_tok_s']:>8} {r['on_vs_off']:>7} "
              f"{r['on_vs_inproc']:>7} {r['p50_ms']!s:>7} {r['p99_ms']!s:>7} {r['ttft_ms']:>8} {r['loadgen_steps_s']:>9} "
              f"{r['trunk_inproc_steps_s']:>9} {r['loadgen_vs_inproc']:>7} {','.join(map(str, r['server_threads'])):>8} "
              f"{r['server_rss_mb']:>7}")
    print(f"server threads with 1..{rows[-1]['n']} sessions: {threads} (idle, no session: "
          f"{on['server_idle']['threads']}) -> constant: {report['server_threads_constant']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(rows, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Aggregate tokens/s and trunk steps/s by N, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("on_tok_s", "split, batching on"), ("off_tok_s", "split, batching off"),
                       ("inproc_tok_s", "in-process model.generate")):
        left.plot(ns, [r[key] for r in rows], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="concurrent generate() calls N", ylabel="tokens/s (all streams)",
             title="Generation throughput")
    for key, label in (("loadgen_steps_s", "trunk server, batching on"), ("loadgen_off_steps_s", "trunk server, batching off"),
                       ("trunk_inproc_steps_s", "trunk in-process, batch N")):
        right.plot(ns, [r[key] for r in rows], marker="o", label=label)
    right.set(xscale="log", yscale="log", xlabel="sessions N", ylabel="decode steps/s", title="Trunk alone")
    for ax in (left, right):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
