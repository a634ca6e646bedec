"""A trunk server process killed mid-generation and restarted on the same port: same tokens.

The server runs as a real ``splitlearn serve`` process; the test kills it with SIGKILL between
two decode steps, starts a new one on the same port, and the client (which retries only
``UNAVAILABLE``, with backoff) reopens its session and replays what it had sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitlearn_async import (
    ClientConfig,
    RemoteTrunk,
    SplitPipeline,
    TrunkUnavailable,
    save_stages,
    split_model,
)
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.waiting import wait_until


def _start_server(bundle: Path, port: int, port_file: Path) -> subprocess.Popen[bytes]:
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "splitlearn_async", "serve", "--bundle", str(bundle),
        "--port", str(port), "--port-file", str(port_file), "--torch-threads", "1",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _wait_port(proc: subprocess.Popen[bytes], port_file: Path, timeout_s: float = 120.0) -> int:
    """The port the server child wrote; the timeout is a hang guard, not a speed assertion."""

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited early: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        return port_file.exists()

    await wait_until(started, timeout_s)
    return int(port_file.read_text())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
def tiny_bundle(tmp_path: Path):
    model = tiny_model("llama", num_layers=6)
    save_stages(split_model(model, (2, 4)), tmp_path / "bundle")
    return model, tmp_path / "bundle"


async def test_kill_and_restart_mid_generation_gives_identical_tokens(tiny_bundle, tmp_path):
    model, bundle = tiny_bundle
    bottom, _, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([6, 3], seed=2)
    new_tokens = 12
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    port_file = tmp_path / "port"
    proc = _start_server(bundle, 0, port_file)
    try:
        port = await _wait_port(proc, port_file)
        config = ClientConfig(retry_deadline_s=90.0, initial_backoff_s=0.05, max_backoff_s=0.5)
        async with RemoteTrunk(f"127.0.0.1:{port}", config) as remote, SplitPipeline(bottom, remote, top) as pipeline:
            steps = []
            async for chunk in pipeline.stream(ids, mask, max_new_tokens=new_tokens, pad_token_id=0):
                steps.append(chunk.tokens[:, None])
                if len(steps) == 4:  # kill the server between two decode steps, start a new one
                    proc.kill()
                    proc.wait()
                    _stop(proc)
                    proc = _start_server(bundle, port, port_file)
            got = torch.cat([ids, *steps], dim=1)
            assert remote.replays == 1
        assert torch.equal(got, expected)
    finally:
        _stop(proc)


async def test_server_that_does_not_come_back_gives_trunk_unavailable(tiny_bundle, tmp_path):
    model, bundle = tiny_bundle
    bottom, _, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([4], seed=1)
    port_file = tmp_path / "port"
    proc = _start_server(bundle, 0, port_file)
    try:
        port = await _wait_port(proc, port_file)
        config = ClientConfig(retry_deadline_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.2)
        async with RemoteTrunk(f"127.0.0.1:{port}", config) as remote, SplitPipeline(bottom, remote, top) as pipeline:
            with pytest.raises(TrunkUnavailable, match="stayed unreachable for retry_deadline_s=1.0 s"):
                async for _ in pipeline.stream(ids, mask, max_new_tokens=10):
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait()
    finally:
        _stop(proc)


class _RestartingTrunk:
    """A trunk (delegating to ``remote``) whose session kills the server before its ``at``-th call
    and starts a new one on the same port: a restart between two decode steps of ``generate``."""

    def __init__(self, remote: RemoteTrunk, at: int, restart) -> None:
        self.remote, self.at, self.restart = remote, at, restart
        self.beam_steps = 0  # steps that carried a beam_idx, for the test to check

    async def info(self):
        return await self.remote.info()

    async def open_session(self, adapter_id=None):
        return _RestartingSession(await self.remote.open_session(adapter_id), self)


class _RestartingSession:
    def __init__(self, inner, owner: _RestartingTrunk) -> None:
        self.inner, self.owner, self.calls = inner, owner, 0

    async def forward(self, hidden, attention_mask, position_ids, *, beam_idx=None):
        self.calls += 1
        if self.calls == self.owner.at:
            self.owner.restart()
        self.owner.beam_steps += beam_idx is not None
        return await self.inner.forward(hidden, attention_mask, position_ids, beam_idx=beam_idx)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.inner.aclose()


async def test_beam_search_survives_a_restart_by_replaying_its_reorders(tiny_bundle, tmp_path):
    model, bundle = tiny_bundle
    bottom, _, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([6, 3], seed=5)  # prompts whose answer needs the trunk's reorders before the kill
    settings = dict(
        max_new_tokens=10, num_beams=3, num_return_sequences=2, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True, output_scores=True,
    )
    expected = model.generate(input_ids=ids, attention_mask=mask, **settings)
    port_file = tmp_path / "port"
    procs = [_start_server(bundle, 0, port_file)]
    try:
        port = await _wait_port(procs[0], port_file)

        def restart() -> None:  # SIGKILL, then a new server process on the same port
            procs[-1].kill()
            procs[-1].wait()
            _stop(procs[-1])
            procs.append(_start_server(bundle, port, port_file))

        config = ClientConfig(retry_deadline_s=90.0, initial_backoff_s=0.05, max_backoff_s=0.5)
        async with RemoteTrunk(f"127.0.0.1:{port}", config) as remote:
            trunk = _RestartingTrunk(remote, at=6, restart=restart)  # the prompt, 4 steps, then the restart
            async with SplitPipeline(bottom, trunk, top) as pipeline:
                got = await pipeline.generate(ids, mask, **settings)
            assert remote.replays == 1 and len(procs) == 2
            assert trunk.beam_steps == 9  # every step after the prompt carried its beam_idx
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-5)
    finally:
        for proc in procs:
            _stop(proc)
