"""``splitlearn serve``: load a trunk and serve it until SIGINT/SIGTERM.

``add_serve_arguments(parser)`` adds the options; ``serve_main(args)`` runs the server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any

from splitlearn_async.errors import ConfigError, MissingPartError

from ._config import ServerConfig

__all__ = ["add_serve_arguments", "serve_main"]

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``serve`` to ``parser``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", help="stage bundle directory (written by `splitlearn split`)")
    source.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[NAME=]SOURCE",
        help="model directory, .gguf file or 'default' (with --split); or NAME=BUNDLE, repeated, to serve "
        "several models by name (a call names one in the 'splitlearn-model' metadata; the first is the "
        "default; each loads on its first call)",
    )
    parser.add_argument("--split", default=None, help="split points a,b (required with --model), e.g. 3,27")
    parser.add_argument(
        "--max-model-bytes",
        type=int,
        default=None,
        help="with several --model NAME=BUNDLE: budget for the models' weights in memory; idle models are "
        "evicted least-recently-used to load another (default: no budget)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    parser.add_argument("--token", default=None, help="require 'authorization: Bearer <token>'")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads of the worker")
    parser.add_argument(
        "--cpus",
        default=None,
        help="run the server on these CPU cores only, e.g. 0 or 0,1 (Linux; set before any thread starts)",
    )
    parser.add_argument("--device", default=None, help="device of the trunk, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument(
        "--dtype", default=None, help="dtype of the trunk, e.g. float32, bfloat16 (default: the source's)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="most session steps per batched trunk call (default 32)"
    )
    parser.add_argument(
        "--max-batch-delay-s",
        type=float,
        default=0.0,
        help="seconds the worker waits for a batch to fill (default 0: batch only what is waiting)",
    )
    parser.add_argument(
        "--max-gather-wait-s",
        type=float,
        default=0.01,
        help="seconds the worker waits for the next steps of sessions in a decode loop (default 0.01; 0 = off)",
    )
    parser.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="run every session step alone (for comparisons)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=256,
        help="cut longer prompts into chunks of this many tokens so other sessions' steps run between them "
        "(default 256; 0 never cuts)",
    )
    parser.add_argument(
        "--training-segment-layer-tokens",
        type=int,
        default=ServerConfig.training_segment_layer_tokens,
        help="run training forwards and backwards in segments of whole layers, each at most this many "
        "layer-tokens (batch tokens x layers, at least one layer), so decode steps run between them "
        f"(default {ServerConfig.training_segment_layer_tokens}; 0 never cuts)",
    )
    parser.add_argument(
        "--training-batch-tokens",
        type=int,
        default=ServerConfig.training_batch_tokens,
        help="run training forwards and backwards of different sessions (equal length) that wait together as "
        "one batch of at most this many tokens, each row with its own LoRA adapter "
        f"(default {ServerConfig.training_batch_tokens}; 0 runs each alone)",
    )
    parser.add_argument(
        "--training-batch-wait",
        type=float,
        default=ServerConfig.training_batch_wait_s,
        metavar="SECONDS",
        help="how long a batched training forward's backward waits for its batch-mates' backwards, to run as "
        f"one (default {ServerConfig.training_batch_wait_s}; 0 never waits)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=ServerConfig.max_message_bytes,
        help=f"largest message body either way (default {ServerConfig.max_message_bytes})",
    )
    parser.add_argument(
        "--max-checkpoint-bytes",
        type=int,
        default=ServerConfig.max_checkpoint_bytes,
        help="most bytes of checkpoints (sent in chunks by TrainOpen, LoadAdapter, TrainSave) held at once "
        f"(default {ServerConfig.max_checkpoint_bytes})",
    )
    parser.add_argument(
        "--allow-full-training",
        action="store_true",
        help="let clients train every trunk weight (mode 'full'); off by default: it changes the weights "
        "every session is served with",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="on SIGTERM or SIGINT: health turns NOT_SERVING and new calls are refused at once; open "
        "sessions get this many seconds to finish, then the server exits (default 30)",
    )
    parser.add_argument(
        "--port-file",
        default=None,
        help="once serving, write the bound port to this file (for scripts that start the server with --port 0)",
    )


def named_models(values: list[str] | None) -> dict[str, str] | None:
    """``--model NAME=SOURCE ...`` as ``{name: source}``; None for the one-model forms.

    Raises:
        ConfigError: named and unnamed forms mixed, a name given twice, or a bad name.
    """
    from ._models import check_model_name  # here: the protocol (and torch) only when a command runs

    if not values or not any("=" in v for v in values):
        if values and len(values) > 1:
            raise ConfigError(
                f"--model was given {len(values)} times without names; serve several models as "
                "--model NAME=BUNDLE --model NAME2=BUNDLE2."
            )
        return None
    models: dict[str, str] = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not sep or not source:
            raise ConfigError(f"--model {value!r} needs the form NAME=BUNDLE when several models are named.")
        if name in models:
            raise ConfigError(f"--model names {name!r} twice; give each model its own name.")
        models[check_model_name(name)] = source
    return models


def _split_points(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--split must be two integers a,b such as 3,27, got {text!r}.") from None
    return a, b


def _cpu_set(text: str | None) -> set[int] | None:
    if text is None:
        return None
    try:
        cpus = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        cpus = set()
    if not cpus or min(cpus) < 0:
        raise ConfigError(f"--cpus must be core numbers separated by commas such as 0 or 0,1, got {text!r}.")
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else cpus
    if not cpus <= available:
        raise ConfigError(f"--cpus {text} names cores this process may not use; it may use {sorted(available)}.")
    return cpus


def _write_port_file(path: str, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def serve_main(args: argparse.Namespace) -> int:
    """Load the trunk named by ``args`` and serve it until SIGINT or SIGTERM.

    Returns:
        The process exit code (0).

    Raises:
        ConfigError: the options are inconsistent (e.g. --model without --split).
        ModelError: the model or bundle cannot be loaded.
    """
    from splitlearn_async.models.loading import load_stages
    from splitlearn_async.server._service import AsyncGRPCComputeServer
    from splitlearn_async.worker import pin_malloc_thresholds

    from ._models import ModelSource

    pin_malloc_thresholds()  # before the first large tensor: see splitlearn_async/worker/_malloc.py
    named = named_models(args.model)
    source = args.bundle or (args.model[0] if args.model else "default")
    split = _split_points(args.split)
    cpus = _cpu_set(getattr(args, "cpus", None))
    if cpus is not None:  # before torch starts its thread pools, so every thread inherits it
        os.sched_setaffinity(0, cpus)
    import torch

    # torch work belongs to the worker thread alone: an OpenMP team started here while loading
    # would throttle the worker's (see splitlearn_async.worker)
    torch.set_num_threads(1)
    if named is None and args.bundle is None and split is None:
        raise ConfigError("--split a,b is required with --model (e.g. --split 3,27); bundles record their own.")
    if args.max_model_bytes is not None and named is None:
        raise ConfigError("--max-model-bytes applies to several named models (--model NAME=BUNDLE ...).")
    if not args.drain_s >= 0:
        raise ConfigError(f"--drain-s must be a number of seconds >= 0, got {args.drain_s}; e.g. 30.")
    config = ServerConfig(
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        max_checkpoint_bytes=args.max_checkpoint_bytes,
        allow_full_training=args.allow_full_training,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        auth_token=args.token,
        torch_threads=args.torch_threads,
        max_batch_size=args.max_batch_size,
        max_batch_delay_s=args.max_batch_delay_s,
        batching=args.batching,
        max_gather_wait_s=args.max_gather_wait_s,
        prefill_chunk_tokens=args.prefill_chunk_tokens or None,
        max_model_bytes=args.max_model_bytes,
        training_segment_layer_tokens=args.training_segment_layer_tokens or None,
        training_batch_tokens=args.training_batch_tokens or None,
        training_batch_wait_s=args.training_batch_wait,
    )
    dtype, device = getattr(args, "dtype", None), getattr(args, "device", None)
    served: Any
    if named is not None:  # each loads on its first call; a missing path fails now, not then
        for name, path in named.items():
            if path != "default" and not os.path.exists(path):
                raise ConfigError(f"--model {name}={path}: no such file or directory.")
        served = {name: ModelSource.from_path(path, split, dtype, device) for name, path in named.items()}
    else:
        served = load_stages(source, split, parts=("trunk",), dtype=dtype, device=device).trunk
        if served is None:  # pragma: no cover (load_stages raises MissingPartError first)
            raise MissingPartError(f"{source} has no trunk part to serve.")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with AsyncGRPCComputeServer(served, args.host, args.port, config) as server:
            logger.info("serving models %s on %s:%s", server.models.names, args.host, server.port)
            if args.port_file:
                _write_port_file(args.port_file, server.port)
            await stop.wait()
            logger.info("draining: NOT_SERVING, refusing new calls, %s s for open sessions", args.drain_s)
            await server.stop(grace=args.drain_s)

    asyncio.run(run())
    return 0
