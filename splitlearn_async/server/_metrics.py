"""Optional Prometheus metrics of the trunk server.

``prometheus_client`` is imported only when a metrics port is configured. Each server has
its own ``CollectorRegistry``, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import html
import logging
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any, ClassVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["NullMetrics", "ServerMetrics", "serve_http", "status_page"]

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

    def for_model(self, model: str) -> NullMetrics:
        """The metrics of one model: its observations carry its name (here: these same null ones)."""
        return self

    def stop(self) -> None:
        """Nothing to stop."""


class ServerMetrics(NullMetrics):
    """Prometheus gauges and histograms, and a status page, served over HTTP on ``port``.

    ``/metrics`` is Prometheus text; ``/`` (or ``/status``) is a small HTML page of the same
    figures that refreshes itself every two seconds.

    Metrics: ``splitlearn_trunk_sessions_open``, ``splitlearn_trunk_queue_depth``,
    ``splitlearn_trunk_cache_bytes``, ``splitlearn_trunk_training_sessions`` and
    ``splitlearn_trunk_pending_steps`` (gauges of the whole server, read at scrape time);
    per model, with a ``model`` label: ``splitlearn_trunk_model_loaded`` (1 or 0),
    ``splitlearn_trunk_model_bytes`` and ``splitlearn_trunk_model_sessions_open`` (gauges),
    ``splitlearn_trunk_batch_size`` (histogram of rows per trunk call, all sessions of a
    batched call together) and ``splitlearn_trunk_step_latency_seconds`` (histogram,
    queueing included). ``deploy/grafana/splitlearn-trunk.json`` is a dashboard of them.

    Args:
        host: Address to bind the HTTP endpoint to.
        port: Port to bind; 0 picks a free one (see :attr:`port`).
        gauges: For each server gauge above, by its short name (``sessions_open``,
            ``queue_depth``, ``cache_bytes``, ``training_sessions``, ``pending_steps``), a
            function called at scrape time.
        models: For each model name, its gauges by short name (``loaded``, ``bytes``,
            ``sessions_open``), functions called at scrape time.

    Raises:
        OSError: the port cannot be bound.
    """

    GAUGES: ClassVar[dict[str, str]] = {
        "sessions_open": "Sessions open.",
        "queue_depth": "Items waiting for the worker.",
        "cache_bytes": "Bytes held by the open sessions' KV caches.",
        "training_sessions": "Training sessions open.",
        "pending_steps": "Training forwards waiting for their backward.",
    }

    MODEL_GAUGES: ClassVar[dict[str, str]] = {
        "loaded": "1 while the model is in memory, else 0.",
        "bytes": "Bytes of the model's weights in memory.",
        "sessions_open": "Sessions open on the model.",
    }

    def __init__(
        self,
        host: str,
        port: int,
        gauges: dict[str, Callable[[], float]],
        models: dict[str, dict[str, Callable[[], float]]] | None = None,
    ) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self._gauges = gauges
        for name, text in self.GAUGES.items():
            gauge = prom.Gauge(f"splitlearn_trunk_{name}", text, registry=self.registry)
            gauge.set_function(gauges.get(name, lambda: 0.0))
        models = models or {}
        for name, text in self.MODEL_GAUGES.items():
            family = prom.Gauge(f"splitlearn_trunk_model_{name}", text, ["model"], registry=self.registry)
            for model, functions in models.items():
                family.labels(model=model).set_function(functions.get(name, lambda: 0.0))
        self._batch = prom.Histogram(
            "splitlearn_trunk_batch_size",
            "Rows per trunk call.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._latency = prom.Histogram(
            "splitlearn_trunk_step_latency_seconds",
            "Seconds per trunk call, queueing included.",
            ["model"],
            registry=self.registry,
        )
        self._model = next(iter(models), "default")
        self._httpd, self._thread = serve_http(host, port, self._app(prom.make_wsgi_app(self.registry)))
        self.port = int(self._httpd.server_port)
        logger.info("metrics on http://%s:%d/metrics, status page on http://%s:%d/", host, self.port, host, self.port)

    def _app(self, metrics_app: Any) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            if environ.get("PATH_INFO", "/") in ("/", "/status"):
                body = status_page(self.registry).encode()
                start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
                return [body]
            result: list[bytes] = metrics_app(environ, start_response)
            return result

        return app

    def observe_step(self, rows: int, seconds: float) -> None:
        """Record one unbatched trunk call of ``rows`` rows that took ``seconds`` (the first model's)."""
        self.for_model(self._model).observe_step(rows, seconds)

    def observe_batch(self, rows: int) -> None:
        """Record one trunk call over ``rows`` rows (the first model's)."""
        self.for_model(self._model).observe_batch(rows)

    def observe_latency(self, seconds: float) -> None:
        """Record that one message took ``seconds``, queueing included (the first model's)."""
        self.for_model(self._model).observe_latency(seconds)

    def for_model(self, model: str) -> NullMetrics:
        """The metrics of ``model``: the histograms' series labelled with its name."""
        return _ModelMetrics(self._batch.labels(model=model), self._latency.labels(model=model))

    def stop(self) -> None:
        """Shut the HTTP endpoint down and join its thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _ModelMetrics(NullMetrics):
    """One model's series of the server's histograms (thread-safe: the worker observes batches)."""

    def __init__(self, batch: Any, latency: Any) -> None:
        self._batch = batch
        self._latency = latency

    def observe_step(self, rows: int, seconds: float) -> None:
        """Record one unbatched trunk call of ``rows`` rows that took ``seconds``."""
        self._batch.observe(rows)
        self._latency.observe(seconds)

    def observe_batch(self, rows: int) -> None:
        """Record one trunk call over ``rows`` rows of one or more sessions."""
        self._batch.observe(rows)

    def observe_latency(self, seconds: float) -> None:
        """Record that one message took ``seconds``, queueing included."""
        self._latency.observe(seconds)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_http(host: str, port: int, app: Any) -> tuple[WSGIServer, threading.Thread]:
    """Serve the WSGI ``app`` on ``host:port`` from a daemon thread, as ``prometheus_client`` does."""
    httpd = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="splitlearn-metrics-http", daemon=True)
    thread.start()
    return httpd, thread


def status_page(registry: Any) -> str:
    """The HTML status page: the gauges, and the batch-size histogram as a table; refreshes every 2 s."""
    gauges: list[tuple[str, float]] = []
    buckets: dict[str, float] = {}  # le -> count over all models
    per_model: dict[str, dict[str, float]] = {}
    latency_sum = latency_count = 0.0
    for family in registry.collect():
        for sample in family.samples:
            name = sample.name.removeprefix("splitlearn_trunk_")
            if family.type == "gauge" and "model" in sample.labels:
                per_model.setdefault(sample.labels["model"], {})[name.removeprefix("model_")] = sample.value
            elif family.type == "gauge":
                gauges.append((name, sample.value))
            elif sample.name == "splitlearn_trunk_batch_size_bucket":
                le = sample.labels["le"]
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == "splitlearn_trunk_step_latency_seconds_sum":
                latency_sum += sample.value
            elif sample.name == "splitlearn_trunk_step_latency_seconds_count":
                latency_count += sample.value
    rows = "".join(f"<tr><th>{html.escape(n.replace('_', ' '))}</th><td id='{n}'>{v:g}</td></tr>" for n, v in gauges)
    mean_ms = 1000 * latency_sum / latency_count if latency_count else 0.0
    rows += f"<tr><th>mean step latency</th><td id='step_latency_ms'>{mean_ms:.1f} ms over {latency_count:g} steps</td></tr>"
    previous, bars = 0.0, ""
    peak = max(buckets.values(), default=0.0) or 1.0
    for le, cumulative in sorted(buckets.items(), key=lambda item: float(item[0])):
        count, previous = cumulative - previous, cumulative
        width = int(200 * count / peak)
        bars += (
            f"<tr><th>&le; {html.escape(le)}</th><td>{count:g}</td><td><div style='width:{width}px'></div></td></tr>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>splitlearn trunk server</title>
<style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:1em}}
td div{{background:#4a7;height:0.8em}}</style></head>
<body><h1>splitlearn trunk server</h1>
<table id="gauges">{rows}</table>
{_models_table(per_model)}<h2>Rows per trunk call</h2><table id="batch_size">{bars}</table>
<p><a href="/metrics">/metrics</a> (Prometheus text). This page refreshes every 2 s.</p>
</body></html>
"""


def _models_table(per_model: dict[str, dict[str, float]]) -> str:
    """The models' table of the status page, when the server serves several."""
    if len(per_model) < 2:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(m)}</th><td>{'yes' if g.get('loaded') else 'no'}</td>"
        f"<td>{g.get('bytes', 0.0) / 2**20:.1f}</td><td>{g.get('sessions_open', 0.0):g}</td></tr>"
        for m, g in per_model.items()
    )
    return (
        "<h2>Models</h2><table id='models'><tr><th>model</th><th>loaded</th><th>MiB</th>"
        f"<th>sessions open</th></tr>{rows}</table>"
    )
