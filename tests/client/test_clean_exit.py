"""A script that generates and exits prints nothing at exit, whether or not it closes the
pipeline, its trunk and their workers: no ``terminate called``, no worker warnings, no
``Task was destroyed``. Each script runs as a child process (bounded in time)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from splitlearn_async import split_model
from tests.support.rpc import served
from tests.support.tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, sys
from splitlearn_async import LocalTrunk, RemoteTrunk, SplitPipeline, split_model
from tests.support.tiny_models import left_padded_batch, tiny_model

async def main(address, close):
    bottom, trunk, top = split_model(tiny_model("llama"), (2, 4))
    trunk = LocalTrunk(trunk) if address == "local" else RemoteTrunk(address)
    pipeline = SplitPipeline(bottom, trunk, top)
    ids, mask = left_padded_batch([3, 5])
    out = await pipeline.generate(ids, mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    chunks = [c async for c in pipeline.stream(ids, mask, max_new_tokens=3, pad_token_id=0)]
    print("generated", tuple(out.shape), len(chunks), flush=True)
    if close:
        await pipeline.aclose()
        await trunk.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2] == "close"))
"""


async def _run_script(address: str, close: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, address, close, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=300)  # a hang guard, not a timing check
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("close", ["close", "no-close"])
@pytest.mark.parametrize("where", ["local", "remote"])
async def test_a_generating_script_exits_silently(where, close):
    if where == "local":
        code, out, err = await _run_script("local", close)
    else:
        trunk = split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk
        async with served(trunk) as server:
            code, out, err = await _run_script(f"127.0.0.1:{server.port}", close)
    assert code == 0, err
    assert out == "generated (2, 11) 3\n"
    assert err == ""
