"""Split the embedded SmolLM2 in three and chat through the stages in one process.

    python examples/split_local.py "What is the tallest mountain?"

The trunk runs on its own worker thread through LocalTrunk, the same interface a remote
trunk server offers; bottom and top run on the pipeline's worker thread.
"""

from __future__ import annotations

import asyncio
import sys

from splitlearn_async import LocalTrunk, SplitPipeline, default_bundle, load_stages
from splitlearn_async.models.default import load_tokenizer


async def main(question: str, max_new_tokens: int = 48) -> None:
    bundle = default_bundle((3, 27))
    bottom, trunk, top = load_stages(bundle)
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top, load_tokenizer(bundle)) as pipeline:
        input_ids, attention_mask = pipeline.encode([{"role": "user", "content": question}])
        print(f"user: {question}\nassistant: ", end="", flush=True)
        async for chunk in pipeline.stream(input_ids, attention_mask, max_new_tokens=max_new_tokens):
            print(chunk.text[0], end="", flush=True)
        print()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"))
