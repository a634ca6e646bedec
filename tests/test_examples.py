"""Every script in examples/ runs to the end on the embedded model (short settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.slow

CASES = {
    "quickstart.py": (["Name a fruit.", "--max-new-tokens", "8"], ["assistant:", "server sessions open after the call: 0"]),
    "async_chat.py": (["--max-new-tokens", "8"], ["user: Hi!", "user: Thanks.", "prompt tokens]"]),
    "many_clients.py": (["--clients", "4", "--max-new-tokens", "6"], ["4 concurrent clients:", "tokens/s"]),
    "split_local.py": (["Name a fruit."], ["assistant:"]),
}


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.py")} - set(CASES) <= {"train_lora.py"}  # training has its own test


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    args, expected = CASES[script]
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for text in expected:
        assert text in out.stdout, (text, out.stdout[-2000:])
