"""``splitlearn ui``: start (or reach) a trunk server, load the client's stages, serve the Gradio page."""

from __future__ import annotations

import argparse
import logging
import signal
import socket

__all__ = ["add_ui_arguments", "ui_main"]

logger = logging.getLogger(__name__)


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``ui`` to ``parser``."""
    parser.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="use this running trunk server (default: start one on the embedded model, as `splitlearn demo` does)",
    )
    parser.add_argument(
        "--bundle",
        default=None,
        help="bundle with bottom/, top/ and the tokenizer (default: the embedded SmolLM2, split 3,27)",
    )
    parser.add_argument("--token", default=None, help="bearer token of the trunk server")
    parser.add_argument("--host", default="127.0.0.1", help="address the page is served on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="the started trunk server's metrics and status page port (default: a free one)",
    )
    parser.add_argument("--status-url", default=None, help="with --server: the server's status page, to link to")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ui_main(args: argparse.Namespace) -> int:
    """Run ``splitlearn ui`` until interrupted; returns the exit code.

    Raises:
        ConfigError: the options are inconsistent.
        ModelError: the bundle cannot be loaded.
    """
    import torch

    from splitlearn_async.errors import MissingPartError
    from splitlearn_async.models.default import default_bundle, load_tokenizer
    from splitlearn_async.models.loading import load_stages
    from splitlearn_async.server import ServerProcess

    from ._app import build_app
    from ._backend import UIBackend

    torch.set_num_threads(1)  # the pipelines' workers set their own; no OpenMP team on this thread
    # SIGTERM ends the page like Ctrl-C does: through the `finally` below, which stops the trunk
    # server this command started (the default action would leave it running, orphaned)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    bundle = args.bundle or str(default_bundle((3, 27), progress=True))
    server: ServerProcess | None = None
    address, status_url = args.server, args.status_url
    if address is None:
        metrics_port = args.metrics_port or _free_port("127.0.0.1")
        server = ServerProcess(bundle, extra_args=["--torch-threads", "1", "--metrics-port", str(metrics_port)])
        logger.info("starting the trunk server ...")
        server.start()
        address, status_url = server.address, f"http://127.0.0.1:{metrics_port}/status"
        logger.info("trunk server: pid %d on %s; status page %s", server.pid, address, status_url)
    try:
        stages = load_stages(bundle, parts=("bottom", "top"))
        if stages.bottom is None or stages.top is None:  # pragma: no cover (load_stages raises first)
            raise MissingPartError(f"{bundle} lacks the bottom or the top part the client needs.")
        dtype = str(stages.bottom.dtype).removeprefix("torch.")
        backend = UIBackend(address, stages, load_tokenizer(bundle), dtype, args.token, status_url)
        app = build_app(backend)
        logger.info("the page: http://%s:%d/", args.host, args.port)
        app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True)
    finally:
        if server is not None:
            server.close()
    return 0
