"""Many concurrent generate() calls against one trunk server process.

    python examples/many_clients.py --clients 16 --max-new-tokens 32

Every call is its own coroutine with its own trunk session (its KV cache lives on the
server); they share one RemoteTrunk channel and the client's worker thread. The server
process keeps one torch worker thread however many sessions are open.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from splitlearn_async import RemoteTrunk, ServerProcess, SplitPipeline, default_bundle, load_stages
from splitlearn_async.models.default import load_tokenizer

TOPICS = ["the sea", "a mountain", "the wind", "a library", "autumn", "a train", "bread", "the stars"]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


async def run(address: str, bundle: str, clients: int, max_new_tokens: int, server_pid: int) -> None:
    stages = load_stages(bundle, parts=("bottom", "top"))
    async with RemoteTrunk(address) as trunk, SplitPipeline(
        stages.bottom, trunk, stages.top, tokenizer=load_tokenizer(bundle)
    ) as pipeline:

        async def one(i: int) -> tuple[int, str]:
            prompt = [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}]
            ids, mask = pipeline.encode(prompt)
            out = await pipeline.generate(ids, mask, max_new_tokens=max_new_tokens)
            new = out[0, ids.shape[1]:]
            return len(new), pipeline.tokenizer.decode(new, skip_special_tokens=True)

        threads_before = _threads(server_pid)
        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        threads_after = _threads(server_pid)
    for i, (_, text) in enumerate(results[:4]):
        print(f"client {i}: {text.strip()[:100]}")
    tokens = sum(n for n, _ in results)
    print(
        f"{clients} concurrent clients: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s; "
        f"server threads {threads_before} before, {threads_after} after"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    bundle = default_bundle((3, 27))
    with ServerProcess(bundle, extra_args=["--torch-threads", "1"]) as server:
        asyncio.run(run(server.address, str(bundle), args.clients, args.max_new_tokens, server.pid))


if __name__ == "__main__":
    main()
