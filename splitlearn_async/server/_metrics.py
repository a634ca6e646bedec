"""Optional Prometheus metrics of the trunk server.

``prometheus_client`` is imported only when a metrics port is configured. Each server has
its own ``CollectorRegistry``, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["NullMetrics", "ServerMetrics"]

logger = logging.getLogger(__name__)


class NullMetrics:
    """Metrics that record nothing (no metrics port configured)."""

    port: int | None = None

    def observe_step(self, rows: int, seconds: float) -> None:
        """Record one unbatched trunk call of ``rows`` rows that took ``seconds`` (ignored here)."""

    def observe_batch(self, rows: int) -> None:
        """Record one trunk call over ``rows`` rows of one or more sessions (ignored here)."""

    def observe_latency(self, seconds: float) -> None:
        """Record that one message took ``seconds``, queueing included (ignored here)."""

    def stop(self) -> None:
        """Nothing to stop."""


class ServerMetrics(NullMetrics):
    """Prometheus gauges and histograms, served over HTTP on ``port``.

    Metrics: ``splitlearn_trunk_sessions_open`` (gauge), ``splitlearn_trunk_queue_depth``
    (gauge), ``splitlearn_trunk_batch_size`` (histogram of rows per trunk call, all sessions
    of a batched call together) and
    ``splitlearn_trunk_step_latency_seconds`` (histogram, queueing included).

    Args:
        host: Address to bind the HTTP endpoint to.
        port: Port to bind; 0 picks a free one (see :attr:`port`).
        sessions_open: Called at scrape time for the gauge.
        queue_depth: Called at scrape time for the gauge.

    Raises:
        OSError: the port cannot be bound.
    """

    def __init__(
        self, host: str, port: int, sessions_open: Callable[[], float], queue_depth: Callable[[], float]
    ) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        sessions = prom.Gauge("splitlearn_trunk_sessions_open", "Sessions open.", registry=self.registry)
        sessions.set_function(sessions_open)
        depth = prom.Gauge("splitlearn_trunk_queue_depth", "Items waiting for the worker.", registry=self.registry)
        depth.set_function(queue_depth)
        self._batch = prom.Histogram(
            "splitlearn_trunk_batch_size",
            "Rows per trunk call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._latency = prom.Histogram(
            "splitlearn_trunk_step_latency_seconds",
            "Seconds per trunk call, queueing included.",
            registry=self.registry,
        )
        self._httpd: Any
        self._httpd, self._thread = prom.start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._httpd.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def observe_step(self, rows: int, seconds: float) -> None:
        """Record one unbatched trunk call of ``rows`` rows that took ``seconds``."""
        self._batch.observe(rows)
        self._latency.observe(seconds)

    def observe_batch(self, rows: int) -> None:
        """Record one trunk call over ``rows`` rows of one or more sessions (thread-safe: the worker calls it)."""
        self._batch.observe(rows)

    def observe_latency(self, seconds: float) -> None:
        """Record that one message took ``seconds``, queueing included."""
        self._latency.observe(seconds)

    def stop(self) -> None:
        """Shut the HTTP endpoint down and join its thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
