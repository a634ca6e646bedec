"""The ``splitlearn`` command line.

``splitlearn split``  writes stage bundles (bottom/, trunk/, top/) from a model.
``splitlearn serve``  serves a trunk over gRPC.
``splitlearn demo``   starts a local trunk server process and streams a chat answer from the embedded SmolLM2.
``splitlearn generate`` streams an answer from a running trunk server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._version import __version__

__all__ = ["build_parser", "main"]


def _split_arg(text: str) -> tuple[int, ...]:
    try:
        points = tuple(int(v) for v in text.split(","))
    except ValueError:
        points = ()
    if len(points) < 2:
        raise argparse.ArgumentTypeError(
            f"--split takes two integers 'a,b' such as 3,27 (or more, 'a,b,c', to cut the trunk into segments "
            f"for a chain of servers), got {text!r}"
        )
    return points


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
    split.add_argument(
        "--split",
        required=True,
        type=_split_arg,
        metavar="A,B[,C...]",
        help="split points, e.g. 3,27; more points cut the trunk into segments trunk.0/, trunk.1/, ... (3,15,27)",
    )
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
    from .server import add_serve_arguments

    add_serve_arguments(serve)

    demo = sub.add_parser(
        "demo",
        help="start a local trunk server and stream a chat answer from the embedded SmolLM2",
        description="Start a trunk server in a child process on a free port (embedded SmolLM2-135M-Instruct, "
        "split at --split), stream a chat answer through bottom -> server trunk -> top, print tokens/s, "
        "and stop the server.",
    )
    demo.add_argument("prompt", nargs="?", default="What is split learning, in two sentences?")
    demo.add_argument("--split", type=_split_arg, default=(3, 27), metavar="A,B", help="split points (default 3,27)")
    _add_generation_arguments(demo, max_new_tokens=96)

    generate = sub.add_parser(
        "generate",
        help="stream an answer from a running trunk server",
        description="Load bottom and top from --bundle, connect to the trunk server at --server and stream "
        "the answer to PROMPT (through the chat template, unless --raw).",
    )
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--server", required=True, metavar="HOST:PORT", help="address of the trunk server")
    generate.add_argument("--bundle", required=True, help="bundle directory with bottom/, top/ and the tokenizer")
    generate.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    generate.add_argument(
        "--server-model", default=None, metavar="NAME", help="on a server of several models, the one to use"
    )
    generate.add_argument("--token", default=None, help="bearer token of the server")
    generate.add_argument("--tls-root-cert", default=None, help="PEM root certificate to trust (turns TLS on)")
    generate.add_argument(
        "--wire-dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of hidden states on the wire (default: the model's, exact)",
    )
    _add_generation_arguments(generate, max_new_tokens=128)

    ui = sub.add_parser(
        "ui",
        help="a web page: chat through bottom -> trunk -> top with a live panel, and a training tab",
        description="Serve a Gradio page on the embedded model (a local trunk server is started as `splitlearn "
        "demo` starts one) or on --server: a chat streamed through the split model, with the time of each stage "
        "per token, the bytes on the wire and what left the client; and a few LoRA steps with a live loss curve. "
        "Needs the 'ui' extra (gradio).",
    )
    from .ui import add_ui_arguments

    add_ui_arguments(ui)
    return parser


def _add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible sampling)")
    parser.add_argument(
        "--defense",
        default=None,
        metavar="gaussian:SIGMA|dchi:ETA",
        help="noise on the hidden states before they leave the client: Gaussian with standard deviation SIGMA "
        "per coordinate, or d_chi-privacy noise (density exp(-ETA |z|)); default none (README, 'Privacy at the cut')",
    )


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
        if args.command == "ui":
            from .ui import ui_main

            return ui_main(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "serve":
            from .server import serve_main

            return serve_main(args)
    except SplitLearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_usage(sys.stderr)
    print(f"splitlearn: error: unknown command {args.command!r}", file=sys.stderr)
    return 2


def _cmd_split(args: argparse.Namespace) -> int:
    from .models.bundle import save_stages
    from .models.loading import load_stages

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    tokenizer = None
    if args.model == "default":
        from .models.default import default_bundle, default_gguf_path, load_tokenizer

        if len(args.split) == 2:
            source = default_bundle(args.split, progress=True)
            tokenizer = load_tokenizer(source)
        else:  # a trunk in segments: from the GGUF file itself, the tokenizer from the cached bundle
            tokenizer = load_tokenizer(default_bundle((args.split[0], args.split[-1]), progress=True))
            source = default_gguf_path()
    else:
        source = args.model
    started = time.perf_counter()
    stages = load_stages(source, args.split, parts=parts, dtype=args.dtype, progress=True)
    out = save_stages(stages, args.out, tokenizer=tokenizer)
    for part, stage in stages.present().items():
        lo, hi = stage.layer_range
        print(f"{part:>6}: layers [{lo}, {hi}) -> {out / part}")
    servers = [p for p in stages.present() if p.startswith("trunk")]
    print(
        f"done in {time.perf_counter() - started:.1f}s; copy {', '.join(str(out / p) for p in servers)} to the server(s)."
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .models.default import default_bundle
    from .server import ServerProcess

    defense = _defense(args)
    bundle = default_bundle(args.split, progress=True)
    server = ServerProcess(bundle, extra_args=["--torch-threads", "1"])
    print("starting the trunk server ...", flush=True)
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"trunk server: pid {server.pid} on {server.address} (layers {args.split[0]}..{args.split[1] - 1})")
        chat = [{"role": "user", "content": args.prompt}]
        asyncio.run(_stream_answer(bundle, server.address, chat, args, client_config=None, defense=defense))
    finally:
        code = server.stop()
        server.close()
    print(f"trunk server stopped (exit code {code})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .client import ClientConfig

    config = ClientConfig(auth_token=args.token, tls_root_cert_file=args.tls_root_cert, wire_dtype=args.wire_dtype)
    defense = _defense(args)
    prompt: Any = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    asyncio.run(_stream_answer(args.bundle, args.server, prompt, args, client_config=config, defense=defense))
    return 0


def _defense(args: argparse.Namespace) -> Any:
    """The defense that ``--defense`` names, or ``None``; raises ConfigError for a bad spec."""
    if args.defense is None:
        return None
    from .client import defense_from_spec

    return defense_from_spec(args.defense)


async def _stream_answer(
    bundle: Any, address: str, prompt: Any, args: argparse.Namespace, client_config: Any, defense: Any = None
) -> None:
    """Load bottom and top, stream the answer from the trunk at ``address``, print tokens/s."""
    from .client import RemoteTrunk, SplitPipeline
    from .errors import MissingPartError
    from .models.default import load_tokenizer
    from .models.loading import load_stages

    tokenizer = load_tokenizer(bundle)
    import torch

    torch.set_num_threads(
        1
    )  # no OpenMP team on this thread: it would throttle the worker's (see splitlearn_async.worker)
    stages = load_stages(bundle, parts=("bottom", "top"))
    if stages.bottom is None or stages.top is None:  # pragma: no cover (load_stages raises MissingPartError first)
        raise MissingPartError(f"{bundle} lacks the bottom or the top part the client needs.")
    shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    async with (
        RemoteTrunk(address, client_config, model=getattr(args, "server_model", None)) as trunk,
        SplitPipeline(stages.bottom, trunk, stages.top, tokenizer=tokenizer, defense=defense) as pipeline,
    ):
        ids, mask = pipeline.encode(prompt)
        if defense is not None:
            print(f"defense: {defense!r} on the hidden states sent to the trunk")
        print(f"user: {shown}\nassistant: ", end="", flush=True)
        started = time.perf_counter()
        first: float | None = None
        count = 0
        async for chunk in pipeline.stream(
            ids,
            mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        ):
            first = first if first is not None else time.perf_counter() - started
            count += 1  # one generated token per step (the final eos included)
            print(chunk.text[0] if chunk.text else "", end="", flush=True)
        elapsed = time.perf_counter() - started
    rate = count / elapsed if elapsed > 0 else 0.0
    print(
        f"\n[{count} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s, first token after {first or 0.0:.2f} s; "
        f"bottom and top here, trunk at {address}]"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
