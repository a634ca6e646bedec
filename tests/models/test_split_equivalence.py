"""Split stages compute exactly what the unsplit model computes, for every family."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import prompt_positions, split_model
from splitlearn_async.models.decoding import generate_local
from splitlearn_async.models.hf_compat import cache_kwargs, output_cache
from tests.support.tiny_models import left_padded_batch, tiny_model

TOL = 1e-5
SPLITS = [(2, 4), (0, 6), (1, 2), (5, 6), (3, 5)]


def _split_logits(stages, ids, mask, pos=None, caches=(None, None, None)):
    bottom, trunk, top = stages
    h = bottom(ids, mask, pos, cache=caches[0])
    h = trunk(h, mask, pos, cache=caches[1])
    return top(h, mask, pos, cache=caches[2])


@pytest.mark.parametrize("split", SPLITS)
@torch.no_grad()
def test_full_forward_left_padded_matches_unsplit(family, split):
    model = tiny_model(family)
    stages = split_model(model, split)
    ids, mask = left_padded_batch([7, 3, 9, 1])
    ref = model(input_ids=ids, attention_mask=mask).logits
    out = _split_logits(stages, ids, mask)
    valid = mask.bool()
    assert (ref - out)[valid].abs().max().item() <= TOL
    assert out.shape == ref.shape


@torch.no_grad()
def test_incremental_decoding_with_caches_matches_unsplit_cache(family):
    model = tiny_model(family)
    stages = split_model(model, (2, 4))
    ids, mask = left_padded_batch([6, 2, 11])
    batch = ids.shape[0]
    caches = [s.new_cache(batch) for s in stages]
    pos = prompt_positions(mask)
    out = _split_logits(stages, ids, mask, pos, caches)
    ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    assert (out[:, -1] - ref.logits[:, -1]).abs().max().item() <= TOL
    hf_cache = output_cache(ref)
    for _ in range(14):  # past the sliding windows (5) of qwen2/gemma3's sliding layers
        nxt = out[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt, ref.logits[:, -1].argmax(-1, keepdim=True))
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = _split_logits(stages, nxt, mask, pos, caches)
        ref = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(model, hf_cache))
        hf_cache = output_cache(ref)
        assert (out[:, -1] - ref.logits[:, -1]).abs().max().item() <= TOL
    assert all(c.length == mask.shape[1] for c in caches)


@torch.no_grad()
def test_generate_local_equals_model_generate_with_eos(family):
    model = tiny_model(family)
    stages = split_model(model, (2, 5))
    ids, mask = left_padded_batch([5, 8, 3], seed=3)
    # choose an eos that some row actually emits, so stopping and padding are exercised
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 3])
    ref = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    out = generate_local(*stages, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_eager_attention_kernel_matches_unsplit_eager():
    model = tiny_model("llama", attn_implementation=None)
    model.config._attn_implementation = "eager"
    stages = split_model(model, (2, 4))
    assert stages.trunk.attn_kernel == "eager"
    ids, mask = left_padded_batch([4, 7])
    ref = model(input_ids=ids, attention_mask=mask).logits
    out = _split_logits(stages, ids, mask)
    assert (ref - out)[mask.bool()].abs().max().item() <= TOL


@torch.no_grad()
def test_stages_share_parameters_and_leave_model_usable(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch([5, 2])
    before = model(input_ids=ids, attention_mask=mask).logits.clone()
    bottom, trunk, top = split_model(model, (2, 4))
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for s in (bottom, trunk, top) for p in s.parameters())
    assert model.config._attn_implementation != trunk.config._attn_implementation


def test_stage_boundaries_have_documented_shapes():
    model = tiny_model("llama")
    bottom, trunk, top = split_model(model, (2, 4))
    ids, mask = left_padded_batch([3, 5])
    with torch.no_grad():
        h = bottom(ids, mask)
        assert h.shape == (2, 5, 64)  # (B, T, hidden)
        assert trunk(h, mask).shape == (2, 5, 64)
        assert top(h, mask).shape == (2, 5, 96)  # (B, T, vocab)
    assert (bottom.layer_range, trunk.layer_range, top.layer_range) == ((0, 2), (2, 4), (4, 6))
