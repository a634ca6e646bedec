"""The ``splitlearn`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitlearn_async import load_stages
from splitlearn_async.cli import main
from tiny_models import tiny_model


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "split" in out and "demo" in out


def test_split_writes_a_bundle(tmp_path, capsys):
    tiny_model("qwen2").save_pretrained(tmp_path / "hf")
    assert main(["split", "--model", str(tmp_path / "hf"), "--split", "2,4", "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "trunk" / "manifest.json").read_text())
    assert manifest["layer_range"] == [2, 4]
    assert load_stages(tmp_path / "b").top.layer_range == (4, 6)
    assert "copy" in capsys.readouterr().out


def test_bad_split_is_a_clear_error(tmp_path, capsys):
    tiny_model("gpt2").save_pretrained(tmp_path / "hf")
    assert main(["split", "--model", str(tmp_path / "hf"), "--split", "5,2", "--out", str(tmp_path / "b")]) == 1
    assert "0 <= a < b <= 6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["split", "--model", "x", "--split", "five", "--out", "y"])


@pytest.mark.slow
def test_demo_streams_an_answer():
    out = subprocess.run(
        [sys.executable, "-m", "splitlearn_async", "demo", "Say hello.", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "assistant:" in out.stdout and "tokens/s" in out.stdout
