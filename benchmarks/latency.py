"""Concurrency benchmark: a trunk server process, many generate() calls, batching on and off.

    python benchmarks/latency.py                          # --placement isolated, N in 1,8,32,64
    python benchmarks/latency.py --placement shared       # every process on every core
    python benchmarks/latency.py --quick                  # a tiny run for CI: checks that everything works
    python benchmarks/latency.py --replicas 2             # two server processes behind one balanced client

The embedded SmolLM2-135M-Instruct, split (3, 27), fp32, greedy.

Placement separates the runtime's own overhead from CPU contention (Linux affinity):

- ``isolated``: the server process runs on core 0 with 1 torch thread; the client or load
  generator (this process) on the other cores with 1 torch thread. The trunk references
  run in this process on core 0 with 1 thread, as the server does; ``model.generate``
  runs on all cores with as many threads.
- ``shared``: every process may use every core, with torch's default threads.

In one run it measures:

a) one session: tokens/s of SplitPipeline (client process) -> RemoteTrunk -> trunk server
   process, against in-process ``model.generate`` at batch 1, and that the tokens are identical;
b) N concurrent ``generate()`` calls in one client process: aggregate tokens/s, p50/p99
   per-token latency, time to first token, CPU-seconds per 1000 tokens of the server and
   of the client, with batching on and off, against ``model.generate`` at batch N;
c) the trunk server alone, driven by a load generator that sends hidden states for N
   sessions (a prefill, then decode steps), against the reference: the same decoder layers
   as Hugging Face runs them in-process, with a ``DynamicCache``, at batch N; our trunk
   stage in-process at batch N is reported beside it. Steps/s and server CPU-ms per step;
d) the server process's thread count and RSS while N sessions are open.

Prints a table, writes ``benchmarks/results/latency-<placement>.json`` and ``.png``. Timings
are only meaningful on an otherwise idle machine; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar, cast

import psutil
import torch
from references import hf_decode_times  # benchmarks/ is on the path: this file runs as a script from there
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
T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """Where each process runs and with how many torch threads (None: all cores / torch's default)."""

    name: str
    server_cpus: tuple[int, ...] | None
    server_threads: int | None
    client_cpus: tuple[int, ...] | None
    client_threads: int | None
    all_cpus: tuple[int, ...]

    @classmethod
    def make(cls, name: str) -> Placement:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        if name == "shared":
            return cls(name, None, None, None, None, cpus)
        if len(cpus) < 2:
            raise SystemExit("--placement isolated needs at least 2 cores.")
        return cls(name, cpus[:1], 1, cpus[1:], 1, cpus)

    def server_args(self) -> list[str]:
        args = [] if self.server_cpus is None else ["--cpus", ",".join(map(str, self.server_cpus))]
        return args + ([] if self.server_threads is None else ["--torch-threads", str(self.server_threads)])


@contextlib.contextmanager
def bound_to(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run the block on ``cpus`` (this thread; the threads it starts, a StageWorker's too, inherit it)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus or old)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def run_pinned(cpus: tuple[int, ...] | None, threads: int | None, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread bound to ``cpus`` with ``threads`` torch threads.

    The thread, and the OpenMP team its torch calls start, end with the call, so the
    reference leaves no team behind to throttle the client's worker (see splitlearn_async.worker).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        available = cpus or tuple(sorted(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, available)
        torch.set_num_threads(threads or len(available))
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="benchmark-reference")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return cast(T, box["result"])


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU-seconds of a process (this one by default), all its threads."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


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


def inprocess_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new: int, pad: int) -> tuple[torch.Tensor, float, float]:
    """``model.generate`` greedy; returns the output, its seconds and its CPU-seconds."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    return out, time.perf_counter() - t0, cpu_seconds() - c0


async def concurrent_generate(pipeline: Any, prompts: list[tuple[torch.Tensor, torch.Tensor]], new: int, pad: int,
                              server_pid: int) -> dict[str, Any]:
    """Run one stream per prompt at once; aggregate tokens/s, per-token latency, TTFT and CPU-seconds."""
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

    s0, c0, t0 = cpu_seconds(server_pid), cpu_seconds(), time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, m) for i, m in prompts)))
    seconds = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - s0, cpu_seconds() - c0
    q = statistics.quantiles(gaps, n=100) if len(gaps) >= 2 else [gaps[0] if gaps else 0.0] * 99
    return {
        "tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2),
        "p50_token_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "p99_token_ms": round(1000 * q[98], 1) if gaps else None,
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "server_cpu_s_per_1k": round(1000 * server_cpu / tokens, 2),
        "client_cpu_s_per_1k": round(1000 * client_cpu / tokens, 2),
        "outputs": outputs,
    }


async def load_generator(address: str, n: int, prompt: int, steps: int, hidden: int, server_pid: int) -> dict[str, Any]:
    """N sessions sending random hidden states: a prefill of ``prompt`` tokens, then ``steps`` decode steps each."""
    from splitlearn_async.client import RemoteTrunk

    g = torch.Generator().manual_seed(0)
    async with RemoteTrunk(address) as trunk:
        sessions = [await trunk.open_session() for _ in range(n)]
        mask = torch.ones(1, prompt, dtype=torch.long)
        await asyncio.gather(*(s.forward(torch.randn(1, prompt, hidden, generator=g), mask, torch.arange(prompt)[None])
                               for s in sessions))
        step_inputs = [[torch.randn(1, 1, hidden, generator=g) for _ in range(steps)] for _ in sessions]
        one = torch.ones(1, 1, dtype=torch.long)

        async def decode(session: Any, inputs: list[torch.Tensor]) -> None:
            for k, h in enumerate(inputs):
                await session.forward(h, one, torch.tensor([[prompt + k]]))

        s0, c0, t0 = cpu_seconds(server_pid), cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(decode(s, x) for s, x in zip(sessions, step_inputs)))
        seconds = time.perf_counter() - t0
        server_cpu, client_cpu = cpu_seconds(server_pid) - s0, cpu_seconds() - c0
        for s in sessions:
            await s.aclose()
    return {"steps_s": round(n * steps / seconds, 2), "seconds": round(seconds, 3),
            "server_cpu_ms_per_step": round(1000 * server_cpu / (n * steps), 3),
            "loadgen_cpu_ms_per_step": round(1000 * client_cpu / (n * steps), 3)}


def inprocess_trunk(trunk: Any, n: int, prompt: int, steps: int) -> dict[str, Any]:
    """Our trunk stage in-process at batch N: a prefill, then timed decode steps (steps/s = N x steps / s)."""
    from splitlearn_async.models.stages import run_stage

    g = torch.Generator().manual_seed(0)
    cache = trunk.new_cache(n)
    run_stage(trunk, torch.randn(n, prompt, trunk.hidden_size, generator=g), torch.ones(n, prompt, dtype=torch.long),
              torch.arange(prompt).expand(n, prompt), cache)
    xs = [torch.randn(n, 1, trunk.hidden_size, generator=g) for _ in range(steps)]
    c0, t0 = cpu_seconds(), time.perf_counter()
    for k, x in enumerate(xs):
        run_stage(trunk, x, torch.ones(n, 1, dtype=torch.long), torch.full((n, 1), prompt + k), cache)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    cache.release()
    return {"steps_s": round(n * steps / seconds, 2), "seconds": round(seconds, 3),
            "cpu_ms_per_step": round(1000 * cpu / (n * steps), 3)}


def hf_trunk_layers(model: Any, layer_range: tuple[int, int], n: int, prompt: int, steps: int) -> dict[str, Any]:
    """The reference: the model's own decoder layers ``[a, b)`` as Hugging Face runs them, batch N.

    A ``DynamicCache``, the model's rotary embedding, sdpa with no mask (every row has the
    same length): a prefill of ``prompt`` tokens, then timed decode steps (``references.py``).
    """
    times, cpu = hf_decode_times(model, layer_range, n, prompt, steps)
    return {"steps_s": round(n * steps / sum(times), 2), "seconds": round(sum(times), 3),
            "cpu_ms_per_step": round(1000 * cpu / (n * steps), 3)}


async def client_runs(args: argparse.Namespace, address: str, pid: int, batching: bool, tokenizer: Any,
                      stages: Any, bar: Any, concurrency: list[int]) -> dict[str, Any]:
    """(a)/(b)/(c)/(d) against one server process."""
    from splitlearn_async.client import RemoteTrunk, SplitPipeline
    from splitlearn_async.client._pipeline import GATHER_WAIT_S
    from splitlearn_async.worker import StageWorker

    bottom, trunk_stage, top = stages
    out: dict[str, Any] = {"generate": {}, "loadgen": {}}
    worker = StageWorker("benchmark-client", batching=batching, max_batch_size=max(concurrency),
                         max_gather_wait_s=GATHER_WAIT_S, torch_threads=args.placement.client_threads)
    async with worker, RemoteTrunk(address) as remote:
        pipeline = SplitPipeline(bottom, remote, top, tokenizer, worker=worker)
        ids, mask = encode(tokenizer, 1)
        await pipeline.generate(ids, mask, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)  # warm-up
        for n in concurrency:
            ids, mask = encode(tokenizer, n)
            prompts = [unpadded(ids, mask, r) for r in range(n)]
            with StatusSampler(pid) as sampler:
                r = await concurrent_generate(pipeline, prompts, args.new_tokens, tokenizer.pad_token_id, pid)
            r.update(server=sampler.summary())
            out["generate"][n] = r
            bar.update(1)
        if batching:
            for n in concurrency:
                with StatusSampler(pid) as sampler:
                    r = await load_generator(address, n, args.loadgen_prompt, args.loadgen_steps,
                                             trunk_stage.hidden_size, pid)
                r.update(server=sampler.summary())
                out["loadgen"][n] = r
                bar.update(1)
    return out


def run_server_phase(args: argparse.Namespace, bundle: Path, batching: bool, tokenizer: Any, stages: Any, bar: Any,
                     concurrency: list[int]) -> dict[str, Any]:
    from splitlearn_async.server import ServerProcess

    placement: Placement = args.placement
    extra = ["--max-batch-size", str(max(concurrency))] + placement.server_args() + ([] if batching else ["--no-batching"])
    with ServerProcess(bundle, extra_args=extra) as server, bound_to(placement.client_cpus):
        idle = proc_status(server.pid)
        result = asyncio.run(client_runs(args, server.address, server.pid, batching, tokenizer, stages, bar, concurrency))
        result["server_idle"] = {"threads": idle["threads"], "rss_mb": round(idle["rss_bytes"] / 2**20, 1)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Concurrency benchmark of the split pipeline against a trunk server process.")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI (N in 1,2; 3 new tokens)")
    parser.add_argument("--placement", choices=("isolated", "shared"), default="isolated",
                        help="isolated: server on core 0 (1 thread), client on the others; shared: all on all")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated N")
    parser.add_argument("--off-concurrency", default="1,32",
                        help="N for the batching-off comparison (each step runs alone: slow at large N)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--loadgen-prompt", type=int, default=64, help="prompt tokens of each load-generator session")
    parser.add_argument("--loadgen-steps", type=int, default=32, help="decode steps of each load-generator session")
    parser.add_argument("--replicas", type=int, default=1,
                        help="K > 1: only the replicas phase (benchmarks/replicas.py): K server processes, one core "
                        "each, behind one balanced client, N = the last --concurrency; writes latency-replicas.json")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/latency-<placement>.json)")
    parser.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.off_concurrency, args.new_tokens, args.loadgen_prompt, args.loadgen_steps = "1,2", "1,2", 3, 8, 2
    args.concurrency = [int(x) for x in str(args.concurrency).split(",")]
    args.off_concurrency = [int(x) for x in str(args.off_concurrency).split(",")]
    args.placement = Placement.make(args.placement)
    args.out = args.out or str(RESULTS / f"latency-{args.placement.name}.json")

    from splitlearn_async import default_bundle, load_stages
    from splitlearn_async.models.default import load_tokenizer

    # this thread runs no torch work of its own: every measured call runs on a thread of its own
    torch.set_num_threads(1)
    bundle = default_bundle()
    tokenizer = load_tokenizer(bundle)
    stages = load_stages(bundle)
    if args.replicas > 1:
        return replicas_main(args, bundle, tokenizer, stages)
    model = full_model(stages)
    pad = tokenizer.pad_token_id
    placement = args.placement
    trunk_range = stages.trunk.layer_range

    steps_total = 2 * len(args.concurrency) + len(args.concurrency) + len(args.off_concurrency)
    report: dict[str, Any] = {
        "machine": {"cpus": len(placement.all_cpus), "python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
        "placement": asdict(placement),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "placement")},
        "inprocess_generate": {}, "inprocess_trunk": {}, "hf_trunk": {},
    }
    ids, mask = encode(tokenizer, 1)
    with tqdm(total=steps_total, desc="latency", file=sys.stderr) as bar:
        for n in args.concurrency:
            ids, mask = encode(tokenizer, n)

            def generate_ref(ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> tuple[torch.Tensor, float, float]:
                inprocess_generate(model, ids, mask, 2, pad)  # warm-up
                return inprocess_generate(model, ids, mask, args.new_tokens, pad)

            def trunk_refs(n: int = n) -> tuple[dict[str, Any], dict[str, Any]]:
                hf_trunk_layers(model, trunk_range, n, 4, 1)  # warm-up
                return (hf_trunk_layers(model, trunk_range, n, args.loadgen_prompt, args.loadgen_steps),
                        inprocess_trunk(stages.trunk, n, args.loadgen_prompt, args.loadgen_steps))

            # model.generate: all cores, as many threads; the trunk references: as the server runs
            out, seconds, cpu = run_pinned(None, None, generate_ref)
            tokens = n * (out.shape[1] - ids.shape[1])
            report["inprocess_generate"][n] = {"tok_s": round(tokens / seconds, 2), "seconds": round(seconds, 3),
                                               "cpu_s_per_1k": round(1000 * cpu / tokens, 2), "output": out}
            report["hf_trunk"][n], report["inprocess_trunk"][n] = run_pinned(
                placement.server_cpus, placement.server_threads, trunk_refs)
            bar.update(1)
        report["batching_on"] = run_server_phase(args, bundle, True, tokenizer, stages, bar, args.concurrency)
        report["batching_off"] = run_server_phase(args, bundle, False, tokenizer, stages, bar, args.off_concurrency)
    summarize(report, args)
    return 0


def replicas_main(args: argparse.Namespace, bundle: Path, tokenizer: Any, stages: Any) -> int:
    """``--replicas K``: K server processes behind one balanced client (benchmarks/replicas.py)."""
    from replicas import run_replicas  # benchmarks/ is on the path: this file runs as a script from there

    n = args.concurrency[-1]
    ids, mask = encode(tokenizer, n)
    prompts = [unpadded(ids, mask, i) for i in range(n)]
    new = max(args.new_tokens, 6)  # the kill comes after 3 tokens: leave some to replay
    result = run_replicas(args.replicas, bundle, stages, prompts, new, tokenizer.pad_token_id)
    result["replicas"] = args.replicas
    out = Path(args.out) if args.out and not args.out.endswith(f"latency-{args.placement.name}.json") else (
        RESULTS / "latency-replicas.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    f = result["failover"]
    print(f"replicas {args.replicas}: {n} sessions, {result['tok_s']} tok/s; sessions per replica "
          f"{result['per_replica_sessions']}, CPU-s per replica {result['per_replica_cpu_s']}")
    print(f"failover: replica {f['killed_replica']} killed with {f['its_sessions']} sessions; kill to first token "
          f"after replay {f['kill_to_first_token_ms']} ms (other sessions' median {f['others_first_token_ms_median']} "
          f"ms); identical tokens {f['identical_tokens']}")
    return 0


def summarize(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Check tokens, print the tables, write JSON and PNG."""
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
        g_on, g_off = on["generate"][n], off["generate"].get(n)
        inproc, hf, ours, load = (report["inprocess_generate"][n], report["hf_trunk"][n],
                                  report["inprocess_trunk"][n], on["loadgen"][n])
        rows.append({
            "n": n, "on_tok_s": g_on["tok_s"], "off_tok_s": g_off["tok_s"] if g_off else None,
            "inproc_tok_s": inproc["tok_s"],
            "on_vs_off": round(g_on["tok_s"] / g_off["tok_s"], 2) if g_off else None,
            "on_vs_inproc": round(g_on["tok_s"] / inproc["tok_s"], 3),
            "p50_ms": g_on["p50_token_ms"], "p99_ms": g_on["p99_token_ms"], "ttft_ms": g_on["ttft_p50_ms"],
            "cpu_1k_server": g_on["server_cpu_s_per_1k"], "cpu_1k_client": g_on["client_cpu_s_per_1k"],
            "cpu_1k_split": round(g_on["server_cpu_s_per_1k"] + g_on["client_cpu_s_per_1k"], 2),
            "cpu_1k_inproc": inproc["cpu_s_per_1k"],
            "server_steps_s": load["steps_s"], "hf_trunk_steps_s": hf["steps_s"], "stage_steps_s": ours["steps_s"],
            "server_vs_hf": round(load["steps_s"] / hf["steps_s"], 3),
            "stage_vs_hf": round(ours["steps_s"] / hf["steps_s"], 3),
            "server_cpu_ms_step": load["server_cpu_ms_per_step"], "hf_cpu_ms_step": hf["cpu_ms_per_step"],
            "server_cpu_vs_hf": round(load["server_cpu_ms_per_step"] / hf["cpu_ms_per_step"], 3),
            "server_threads": sorted({g_on["server"]["threads_max"], load["server"]["threads_max"]}),
            "server_rss_mb": max(g_on["server"]["rss_mb"], load["server"]["rss_mb"]),
        })
    report["table"] = rows
    threads = sorted({t for r in rows for t in r["server_threads"]})
    report["server_threads_by_n"] = threads
    report["server_threads_constant"] = len(threads) == 1  # from 1 to max N open sessions
    for phase in (on, off):  # drop token tensors before writing
        for g in phase["generate"].values():
            g.pop("outputs", None)
    for g in report["inprocess_generate"].values():
        g.pop("output", None)

    p = report["placement"]
    print(f"\nplacement {p['name']}: server cpus {p['server_cpus'] or 'all'} x {p['server_threads'] or 'default'} "
          f"threads, client cpus {p['client_cpus'] or 'all'} x {p['client_threads'] or 'default'} threads "
          f"(machine: {len(p['all_cpus'])} cores); model.generate on all cores")
    o = report["one_session"]
    print(f"one session: {o['tok_s']} tok/s vs in-process model.generate {o['inprocess_tok_s']} tok/s "
          f"= {o['ratio']}x, identical tokens: {o['identical_tokens']}")
    print("\ngenerate (N concurrent calls; CPU-s per 1000 tokens: server + client vs model.generate)")
    print(f"{'N':>3} {'on tok/s':>9} {'off tok/s':>9} {'HF gen':>8} {'on/off':>7} {'on/HF':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'ttft ms':>8} {'cpu srv':>8} {'cpu cli':>8} {'cpu HF':>7}")
    for r in rows:
        print(f"{r['n']:>3} {r['on_tok_s']:>9} {r['off_tok_s']!s:>9} {r['inproc_tok_s']:>8} {r['on_vs_off']!s:>7} "
              f"{r['on_vs_inproc']:>7} {r['p50_ms']!s:>7} {r['p99_ms']!s:>7} {r['ttft_ms']:>8} "
              f"{r['cpu_1k_server']:>8} {r['cpu_1k_client']:>8} {r['cpu_1k_inproc']:>7}")
    print("\ntrunk alone (decode steps/s of N sessions; reference: HF decoder layers + DynamicCache at batch N)")
    print(f"{'N':>3} {'server':>8} {'HF ref':>8} {'srv/HF':>7} {'stage':>8} {'stage/HF':>8} {'srv cpu ms':>10} "
          f"{'HF cpu ms':>9} {'cpu ratio':>9} {'threads':>8} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['n']:>3} {r['server_steps_s']:>8} {r['hf_trunk_steps_s']:>8} {r['server_vs_hf']:>7} "
              f"{r['stage_steps_s']:>8} {r['stage_vs_hf']:>8} {r['server_cpu_ms_step']:>10} {r['hf_cpu_ms_step']:>9} "
              f"{r['server_cpu_vs_hf']:>9} {','.join(map(str, r['server_threads'])):>8} {r['server_rss_mb']:>7}")
    print(f"server threads with 1..{rows[-1]['n']} sessions: {threads} (idle, no session: "
          f"{on['server_idle']['threads']}) -> constant: {report['server_threads_constant']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(rows, Path(args.plot) if args.plot else out.with_suffix(".png"), p["name"])
    print(f"wrote {out}")


def plot(rows: list[dict[str, Any]], path: Path, placement: str) -> None:
    """Aggregate tokens/s and trunk steps/s by N, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("on_tok_s", "split, batching on"), ("inproc_tok_s", "in-process model.generate")):
        left.plot(ns, [r[key] for r in rows], marker="o", label=label)
    off = [(r["n"], r["off_tok_s"]) for r in rows if r["off_tok_s"]]
    if off:
        left.plot(*zip(*off), marker="o", label="split, batching off")
    left.set(xscale="log", yscale="log", xlabel="concurrent generate() calls N", ylabel="tokens/s (all streams)",
             title=f"Generation throughput ({placement})")
    for key, label in (("server_steps_s", "trunk server"), ("hf_trunk_steps_s", "HF decoder layers, batch N"),
                       ("stage_steps_s", "trunk stage in-process, batch N")):
        right.plot(ns, [r[key] for r in rows], marker="o", label=label)
    right.set(xscale="log", yscale="log", xlabel="sessions N", ylabel="decode steps/s", title=f"Trunk alone ({placement})")
    for ax in (left, right):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
