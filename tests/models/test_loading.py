"""load_stages from Hugging Face directories: parts, dtypes, sharding, memory and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from splitlearn_async import (
    CheckpointError,
    ModelError,
    ModelFactory,
    SplitPointError,
    load_stages,
    split_model,
)
from tests.support.tiny_models import left_padded_batch, tiny_model


@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    return model, tmp_path / "gpt2"


def test_directory_load_matches_live_split(hf_dir):
    model, path = hf_dir
    loaded = load_stages(path, (2, 4))
    live = split_model(model, (2, 4))
    ids, mask = left_padded_batch([3, 6])
    with torch.no_grad():
        a = live.top(live.trunk(live.bottom(ids, mask), mask), mask)
        b = loaded.top(loaded.trunk(loaded.bottom(ids, mask), mask), mask)
    assert torch.equal(a, b)


def test_sharded_checkpoint(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "q", max_shard_size="50KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 1
    loaded = load_stages(tmp_path / "q", (1, 5), parts=("trunk",))
    for name, tensor in loaded.trunk.checkpoint_tensors().items():
        assert torch.equal(tensor, model.get_parameter(name)), name


def test_dtype_and_device(hf_dir):
    _, path = hf_dir
    loaded = load_stages(path, (2, 4), dtype="bf16", device="cpu")
    assert {p.dtype for s in loaded for p in s.parameters()} == {torch.bfloat16}
    ids, mask = left_padded_batch([3])
    with torch.no_grad():
        logits = loaded.top(loaded.trunk(loaded.bottom(ids, mask), mask), mask)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_only_asked_parts_are_built(hf_dir):
    _, path = hf_dir
    loaded = load_stages(path, (2, 4), parts=("trunk",))
    assert loaded.bottom is None and loaded.top is None
    names = set(loaded.trunk.checkpoint_tensors())
    assert names and all(n.startswith("transformer.h.2.") or n.startswith("transformer.h.3.") for n in names)


def test_split_points_required_for_directories(hf_dir):
    with pytest.raises(SplitPointError, match="split_points are required"):
        load_stages(hf_dir[1])


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_model("gpt2").config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ModelError, match="never unpickles"):
        load_stages(tmp_path, (1, 2))


def test_missing_path_and_wrong_shape(tmp_path, hf_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_stages(tmp_path / "nope", (1, 2))
    _, path = hf_dir
    config = json.loads((path / "config.json").read_text())
    config["n_embd"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape .* but the bottom stage expects"):
        load_stages(path, (2, 4))


def test_model_factory_compatibility(hf_dir):
    _, path = hf_dir
    bottom, trunk, top = ModelFactory.create_split_models("gpt2", str(path), 2, 4, device="cpu")
    assert (bottom.layer_range, trunk.layer_range, top.layer_range) == ((0, 2), (2, 4), (4, 6))
    with pytest.raises(ModelError, match="never downloads"):
        ModelFactory.create_split_models("gpt2", "gpt2-hub-name", 2, 10)
    with pytest.raises(Exception, match="does not match the checkpoint"):
        ModelFactory.create_split_models("llama", str(path), 2, 4)


_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch, transformers, safetensors, accelerate  # baseline includes the libraries
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # and the model code
    from splitlearn_async import load_stages
    import splitlearn_async.models.loading, splitlearn_async.models.bundle

    def rss():  # resident bytes now; safetensors may map the file, so we touch every tensor
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    base = rss()
    parts = tuple(sys.argv[2].split(","))
    stages = load_stages(sys.argv[1], (4, 8), parts=parts)
    params = [p for s in stages.present().values() for p in s.parameters()]
    touched = sum(float(p.detach().sum()) for p in params)
    held = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps({"delta": rss() - base, "held": held}))
    """
)


def test_loading_the_trunk_alone_keeps_memory_near_the_trunk_size(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "m")
    del model

    def measure(parts: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(tmp_path / "m"), parts], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    trunk = measure("trunk")
    assert trunk["held"] < 0.25 * full_bytes  # 4 of 12 layers, no embeddings or head
    # peak growth while loading the trunk stays near the trunk itself, far below the model
    assert trunk["delta"] < trunk["held"] * 1.5 + 48 * 2**20
    assert trunk["delta"] < 0.5 * full_bytes
    everything = measure("bottom,trunk,top")
    assert everything["delta"] > 0.8 * full_bytes  # the same measurement sees a full load
