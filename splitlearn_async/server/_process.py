"""``ServerProcess``: a ``splitlearn serve`` child process, for demos, examples and benchmarks.

It starts ``python -m splitlearn_async serve`` on a free (or given) port, waits until the
server writes its bound port, and stops it with SIGTERM (SIGKILL after a grace period).
The child's log goes to a file so that a failed start can say why.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from splitlearn_async.errors import StateError

__all__ = ["ServerProcess"]

logger = logging.getLogger(__name__)


class ServerProcess:
    """A trunk server in a child process.

    Use ``with ServerProcess(bundle) as server: RemoteTrunk(server.address)``.

    Args:
        bundle: Bundle directory (or its ``trunk/``) to serve; None when ``extra_args`` name
            the models (``["--model", "a=BUNDLE_A", "--model", "b=BUNDLE_B"]``).
        port: Port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        host: Address to bind.
        extra_args: More ``splitlearn serve`` options, e.g. ``["--torch-threads", "1"]``.
        start_timeout_s: How long :meth:`start` waits for the server to listen.
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str] | None,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 180.0,
    ) -> None:
        self.bundle = None if bundle is None else Path(bundle)
        self.requested_port = port
        self.host = host
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="splitlearn-serve-")
        self.log_path = Path(self._dir.name) / "server.log"
        self._port_file = Path(self._dir.name) / "port"
        self.proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: the server has not been started.
        """
        if self._port is None:
            raise StateError("the server process has no port yet; call start() first.")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` for :class:`RemoteTrunk`."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The child's process id.

        Raises:
            RuntimeError: the server has not been started.
        """
        if self.proc is None:
            raise StateError("the server process has not been started; call start() first.")
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the child's log (empty if none yet)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def start(self) -> ServerProcess:
        """Start the child and wait until it listens.

        Returns:
            ``self``.

        Raises:
            RuntimeError: the child exited or did not listen within ``start_timeout_s``;
                the message includes the end of its log.
        """
        if self.proc is not None:
            raise StateError("this ServerProcess was already started; create a new one to start another.")
        cmd = [
            sys.executable,
            "-m",
            "splitlearn_async",
            "serve",
            *(["--bundle", str(self.bundle)] if self.bundle is not None else []),
            "--host",
            self.host,
            "--port",
            str(self.requested_port),
            "--port-file",
            str(self._port_file),
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._port_file.exists():
            if self.proc.poll() is not None:
                raise StateError(
                    f"the trunk server exited with code {self.proc.returncode} before listening; its log ends:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StateError(
                    f"the trunk server did not listen within {self.start_timeout_s} s; its log ends:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self._port = int(self._port_file.read_text())
        logger.debug("trunk server process %d listening on %s", self.proc.pid, self.address)
        return self

    def stop(self, grace_s: float = 15.0) -> int | None:
        """Stop the child with SIGTERM (SIGKILL after ``grace_s``); returns its exit code.

        A second call returns the same code.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("trunk server %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        """Stop the child and delete its temporary files."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
