"""A chat of several turns against a trunk server running in another process.

    python examples/async_chat.py                 # three scripted turns
    python examples/async_chat.py --interactive   # type your own (empty line ends)

Each turn sends the whole conversation through the tokenizer's chat template and streams
the answer as it comes; the answer joins the history for the next turn.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from splitlearn_async import RemoteTrunk, ServerProcess, SplitPipeline, default_bundle, load_stages
from splitlearn_async.models.default import load_tokenizer

SCRIPTED_TURNS = [
    "Hi! Give me a one-line fact about the Moon.",
    "How far away is it, roughly?",
    "Thanks. Summarise our chat in five words.",
]


async def chat(address: str, bundle: str, turns: list[str] | None, max_new_tokens: int) -> None:
    stages = load_stages(bundle, parts=("bottom", "top"))
    messages: list[dict[str, str]] = []
    async with RemoteTrunk(address) as trunk, SplitPipeline(
        stages.bottom, trunk, stages.top, tokenizer=load_tokenizer(bundle)
    ) as pipeline:
        for turn in _turns(turns):
            messages.append({"role": "user", "content": turn})
            ids, mask = pipeline.encode(messages)
            print(f"\nuser: {turn}\nassistant: ", end="", flush=True)
            answer = ""
            async for chunk in pipeline.stream(ids, mask, max_new_tokens=max_new_tokens):
                piece = chunk.text[0] if chunk.text else ""
                answer += piece
                print(piece, end="", flush=True)
            print(f"   [{ids.shape[1]} prompt tokens]")
            messages.append({"role": "assistant", "content": answer})


def _turns(scripted: list[str] | None):
    if scripted is not None:
        yield from scripted
        return
    while True:
        line = input("\nyou> ").strip()
        if not line:
            return
        yield line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactive", action="store_true", help="type the turns yourself")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    bundle = default_bundle((3, 27))
    with ServerProcess(bundle, extra_args=["--torch-threads", "1"]) as server:
        print(f"trunk server pid {server.pid} on {server.address}", file=sys.stderr)
        turns = None if args.interactive else SCRIPTED_TURNS
        asyncio.run(chat(server.address, str(bundle), turns, args.max_new_tokens))


if __name__ == "__main__":
    main()
