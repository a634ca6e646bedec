"""The ``splitlearn`` command line.

``splitlearn split``  writes stage bundles (bottom/, trunk/, top/) from a model.
``splitlearn serve``  serves a trunk over gRPC.
``splitlearn demo``   generates a chat answer from the embedded SmolLM2, streaming to the terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from . import __version__

__all__ = ["main", "build_parser"]


def _split_arg(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split takes two integers 'a,b' such as 3,27, got {text!r}") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitlearn",
        description=(
            "Split-learning runtime for causal LMs: the client keeps the bottom (embeddings + first layers) "
            "and the top (last layers + head); a grpc.aio server runs the trunk."
        ),
        epilog="Run 'splitlearn COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"splitlearn-async {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    split = sub.add_parser(
        "split",
        help="write stage bundles from a model",
        description="Split a model and write DIR/bottom, DIR/trunk and DIR/top (safetensors + manifest). "
        "Copy only DIR/trunk to the server.",
    )
    split.add_argument("--model", required=True, help="Hugging Face model directory, a .gguf file, or 'default'")
    split.add_argument("--split", required=True, type=_split_arg, metavar="A,B", help="split points, e.g. 3,27")
    split.add_argument("--out", required=True, help="bundle directory to write")
    split.add_argument("--dtype", default=None, help="cast weights: float32, float16 or bfloat16")
    split.add_argument(
        "--parts", default="bottom,trunk,top", help="comma-separated parts to write (default: all three)"
    )

    serve = sub.add_parser(
        "serve",
        help="serve a trunk over gRPC (grpc.aio, one torch worker thread)",
        description="Load the trunk of a bundle or model and serve it until SIGINT/SIGTERM.",
    )
    from .server._cli import add_serve_arguments

    add_serve_arguments(serve)

    demo = sub.add_parser(
        "demo",
        help="stream a chat answer from the embedded SmolLM2 through the three stages",
        description="Generate a chat answer with the embedded SmolLM2-135M-Instruct split at --split, "
        "streaming tokens to the terminal, then print tokens/s.",
    )
    demo.add_argument("prompt", nargs="?", default="What is split learning, in two sentences?")
    demo.add_argument("--split", type=_split_arg, default=(3, 27), metavar="A,B", help="split points (default 3,27)")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``splitlearn`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    from .errors import SplitLearnError

    try:
        if args.command == "split":
            return _cmd_split(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "serve":
            from .server._cli import serve_main

            return serve_main(args)
    except SplitLearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


def _cmd_split(args: argparse.Namespace) -> int:
    from .models.bundle import save_stages
    from .models.loading import load_stages

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    tokenizer = None
    if args.model == "default":
        from .models.default import default_bundle, load_tokenizer

        source = default_bundle(args.split, progress=True)
        tokenizer = load_tokenizer(source)
    else:
        source = args.model
    started = time.perf_counter()
    stages = load_stages(source, args.split, parts=parts, dtype=args.dtype, progress=True)
    out = save_stages(stages, args.out, tokenizer=tokenizer)
    for part, stage in stages.present().items():
        lo, hi = stage.layer_range
        print(f"{part:>6}: layers [{lo}, {hi}) -> {out / part}")
    print(f"done in {time.perf_counter() - started:.1f}s; copy {out / 'trunk'} to the server.")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .models.decoding import stream_local
    from .models.default import default_bundle, load_tokenizer
    from .models.loading import load_stages

    bundle = default_bundle(args.split, progress=True)
    tokenizer = load_tokenizer(bundle)
    bottom, trunk, top = load_stages(bundle)
    chat = [{"role": "user", "content": args.prompt}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
    started = time.perf_counter()
    new: list[int] = []
    shown = ""
    for tokens in stream_local(
        bottom, trunk, top, enc["input_ids"], enc["attention_mask"], args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ):
        token = int(tokens[0])
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text
    elapsed = time.perf_counter() - started
    print(f"\n[{len(new)} tokens in {elapsed:.2f}s: {len(new) / elapsed:.1f} tokens/s, split {args.split}]")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
