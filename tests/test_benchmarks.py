"""The benchmarks' --quick runs go to the end and report what the full runs report (no timings checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LATENCY = Path(__file__).resolve().parent.parent / "benchmarks" / "latency.py"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("placement", ["isolated", "shared"])
def test_latency_quick(tmp_path, placement):
    out = tmp_path / "latency.json"
    run = subprocess.run(
        [sys.executable, str(LATENCY), "--quick", "--placement", placement, "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "one session:" in run.stdout and "server threads" in run.stdout
    assert f"placement {placement}:" in run.stdout
    report = json.loads(out.read_text())
    assert report["placement"]["name"] == placement
    if placement == "isolated":  # the server on one core with one thread, the client on the others
        assert len(report["placement"]["server_cpus"]) == 1 and report["placement"]["server_threads"] == 1
    assert report["one_session"]["identical_tokens"] is True
    assert [row["n"] for row in report["table"]] == [1, 2]
    for row in report["table"]:
        for key in ("on_tok_s", "off_tok_s", "inproc_tok_s", "p50_ms", "ttft_ms", "server_steps_s", "hf_trunk_steps_s",
                    "stage_steps_s", "cpu_1k_server", "cpu_1k_client", "cpu_1k_inproc", "server_cpu_ms_step",
                    "hf_cpu_ms_step"):
            assert row[key] is not None and row[key] > 0, key
    assert report["server_threads_constant"] is True
    assert out.with_suffix(".png").stat().st_size > 0


def test_soak_quick(tmp_path):
    soak = LATENCY.with_name("soak.py")
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(soak), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["identical_tokens"] is True  # the adversary changed nothing of the honest answers
    assert report["adversary_calls"] > 0
    codes = {code for per_kind in report["adversary_codes"].values() for code in per_kind}
    assert codes <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, report["adversary_codes"]  # never INTERNAL


def test_latency_replicas_quick(tmp_path):
    out = tmp_path / "replicas.json"
    run = subprocess.run(
        [sys.executable, str(LATENCY), "--quick", "--replicas", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sum(report["per_replica_sessions"]) == report["sessions"] == 2
    assert report["per_replica_sessions"] == [1, 1]  # round robin: one each
    failover = report["failover"]
    assert failover["identical_tokens"] is True and failover["replays"] == failover["its_sessions"] >= 1
    assert len(failover["kill_to_first_token_ms"]) == failover["its_sessions"]


def test_privacy_quick(tmp_path):
    out = tmp_path / "privacy.json"
    run = subprocess.run(
        [sys.executable, str(LATENCY.with_name("privacy.py")), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pinned to CPUs" in run.stdout
    report = json.loads(out.read_text())
    assert [(row["depth"], row["defense"]) for row in report["rows"]] == [(1, "none"), (1, "gaussian"), (1, "dchi")]
    for row in report["rows"]:  # accuracies are shares of the client's tokens, at most the ceiling
        for key in ("linear_probe_accuracy", "mlp_decoder_accuracy"):
            assert 0.0 <= row[key] <= report["ceiling"] <= 1.0, (key, row)
        assert row["held_out_loss"] > 0
    plain, gaussian, dchi = report["rows"]
    assert plain["mean_noise_norm"] == 0 and plain["parameter"] is None
    for noised in (gaussian, dchi):  # level 1: the noise is about as large as the states themselves
        assert 0.8 < noised["mean_noise_norm"] / noised["median_state_norm"] < 1.25, noised
        assert noised["held_out_loss"] > plain["held_out_loss"]
    (lora,) = report["lora"]
    assert lora["defense"] == "gaussian" and lora["steps"] == 2 and lora["held_out_loss_after"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_models_quick():
    """Two named models, a budget for one: every switch evicts and reloads, and answers the same."""
    script = LATENCY.parent / "models.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--switches", "2"], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "a: first use" in run.stdout and "b: switch: evict a, load b" in run.stdout
    assert "a: switch: evict b, load a" in run.stdout


def test_adapters_quick():
    """Mixed-adapter batches answer as each session alone, and both training schedules run."""
    script = LATENCY.parent / "adapters.py"
    run = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(tokens identical: True)" in run.stdout
    assert "training concurrent" in run.stdout and "training one_after_another" in run.stdout
