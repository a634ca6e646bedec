"""The metrics port: Prometheus text at /metrics, an HTML status page at /, and the Grafana dashboard's metrics exist."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig
from tests.support.rpc import RawSession, channel, make_case

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "splitlearn-trunk.json"


async def _get(url: str) -> tuple[str, str]:
    def fetch() -> tuple[str, str]:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.headers.get("Content-Type", ""), reply.read().decode()

    return await asyncio.to_thread(fetch)


async def test_status_page_shows_an_open_session_and_metrics_stay_prometheus_text(trunk):
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(metrics_port=0)) as server, channel(server.port) as chan:
        base = f"http://127.0.0.1:{server.metrics_port}"
        session = RawSession(chan)
        case = make_case(batch=1, prompt=3, steps=1, hidden_size=64, seed=0)
        await session.open(*case[0])
        kind, page = await _get(base + "/")
        assert kind.startswith("text/html")
        assert '<meta http-equiv="refresh" content="2">' in page  # it refreshes by itself
        cells = dict(re.findall(r"<td id='(\w+)'>([^<]*)</td>", page))
        assert cells["sessions_open"] == "1" and float(cells["cache_bytes"]) > 0
        for name in ("queue_depth", "training_sessions", "pending_steps", "step_latency_ms"):
            assert name in cells, name
        assert "Rows per trunk call" in page and "&le; 1.0" in page
        await session.close()
        _, page = await _get(base + "/status")
        assert "<td id='sessions_open'>0</td>" in page
        kind, text = await _get(base + "/metrics")
        assert kind.startswith("text/plain") and "splitlearn_trunk_sessions_open 0.0" in text


async def test_every_metric_of_the_grafana_dashboard_exists(trunk):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bsplitlearn_trunk_\w+", e)}
    assert len(used) >= 6
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(metrics_port=0)) as server:
        _, text = await _get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    names = exported | {f"{n}{s}" for n in exported for s in ("_bucket", "_count", "_sum")}
    assert used <= names, used - names
