"""The ``splitlearn`` command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from splitlearn_async import ServerProcess, default_bundle, load_stages
from splitlearn_async.cli import main
from splitlearn_async.models.decoding import generate_local
from splitlearn_async.models.default import load_tokenizer
from tests.support.tiny_models import tiny_model


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
def test_demo_runs_a_server_process_streams_and_stops_it():
    out = subprocess.run(
        [sys.executable, "-m", "splitlearn_async", "demo", "Say hello.", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "assistant:" in out.stdout and "tokens/s" in out.stdout
    pid = int(re.search(r"trunk server: pid (\d+) on 127\.0\.0\.1:(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert "trunk server stopped (exit code 0)" in out.stdout
    assert not os.path.exists(f"/proc/{pid}")  # the child is gone, not left running


@pytest.mark.slow
def test_generate_streams_from_a_running_server_the_same_text_as_in_process():
    bundle = default_bundle((3, 27))
    tokenizer = load_tokenizer(bundle)
    bottom, trunk, top = load_stages(bundle)
    chat = [{"role": "user", "content": "Name a colour."}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = generate_local(bottom, trunk, top, enc["input_ids"], enc["attention_mask"], 10,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # the server names its model (serve --model NAME=BUNDLE), and the client names it too
    with ServerProcess(None, extra_args=["--model", f"smol={bundle}", "--torch-threads", "1"]) as server:
        out = subprocess.run(
            [sys.executable, "-m", "splitlearn_async", "generate", "--server", server.address, "--bundle", str(bundle),
             "--server-model", "smol", "--max-new-tokens", "10", "Name a colour."],
            capture_output=True, text=True, timeout=300,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"assistant: {expected}\n" in out.stdout
    assert "10 tokens" in out.stdout or "tokens in" in out.stdout


def test_generate_with_a_bundle_lacking_a_tokenizer_fails_in_one_line(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    out = subprocess.run(
        [sys.executable, "-m", "splitlearn_async", "generate", "--server", "127.0.0.1:1", "--bundle", str(tmp_path),
         "hello"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "no tokenizer/ directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_command_line_parser_imports_neither_torch_nor_gradio():
    code = (
        "import sys, splitlearn_async.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_generate_with_a_bad_defense_fails_in_one_line_before_connecting(capsys):
    argv = ["generate", "--server", "127.0.0.1:1", "--bundle", "nowhere", "--defense", "gaussian:-1", "hello"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sigma must be a finite number >= 0" in err
    assert main([*argv[:-3], "--defense", "noise:1", "hello"]) == 1
    assert "'gaussian:SIGMA' or 'dchi:ETA'" in capsys.readouterr().err


def test_generate_hands_its_defense_to_the_pipeline(monkeypatch):
    from splitlearn_async import DChiNoise, GaussianNoise
    from splitlearn_async import cli

    seen = []

    async def stream_answer(bundle, address, prompt, args, client_config, defense=None):
        seen.append(defense)

    monkeypatch.setattr(cli, "_stream_answer", stream_answer)
    argv = ["generate", "--server", "127.0.0.1:1", "--bundle", "b", "hello"]
    assert main(argv) == 0
    assert main([*argv[:-1], "--defense", "dchi:250", "hello"]) == 0
    assert main([*argv[:-1], "--defense", "gaussian:0.5", "hello"]) == 0
    assert seen[0] is None
    assert isinstance(seen[1], DChiNoise) and seen[1].eta == 250.0
    assert isinstance(seen[2], GaussianNoise) and seen[2].sigma == 0.5
