"""A trunk split across servers: TrunkChain generates and trains as the unsplit model does."""

from __future__ import annotations

import pytest
import torch

from splitlearn_async import (
    ConfigError,
    LocalTrunk,
    OptimizerConfig,
    RemoteTrunk,
    SplitPipeline,
    SplitPointError,
    SplitTrainer,
    TrainingConfig,
    TrunkChain,
    load_stages,
    save_stages,
    split_model,
)
from splitlearn_async.server import ServerProcess
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.training_reference import TOL, clone_model, make_batch, max_diff, record_grads, unsplit_step

POINTS = (2, 3, 4)  # of 6 tiny layers: bottom [0, 2), trunk segments [2, 3) and [3, 4), top [4, 6)
OPT = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)


def test_split_model_cuts_the_trunk_into_segments():
    model = tiny_model("llama")
    stages = split_model(model, POINTS)
    bottom, first, second, top = stages  # unpacks as bottom, trunk_0, trunk_1, top
    assert (bottom.layer_range, first.layer_range, second.layer_range, top.layer_range) == ((0, 2), (2, 3), (3, 4), (4, 6))
    assert stages.trunk is None and stages.segments == (first, second)
    assert stages.split_points == POINTS and list(stages.present()) == ["bottom", "trunk.0", "trunk.1", "top"]
    for bad in [(3, 2, 4), (2, 2, 4), (2, 3, 9), (2,), "ab"]:
        with pytest.raises(SplitPointError):
            split_model(model, bad)


def test_each_segment_is_a_bundle_part_of_its_own(tmp_path):
    model = tiny_model("qwen2")
    save_stages(split_model(model, POINTS), tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["bottom", "top", "trunk.0", "trunk.1"]
    for k, lo_hi in enumerate([(2, 3), (3, 4)]):
        (segment,) = [s for s in load_stages(tmp_path / "bundle" / f"trunk.{k}", parts=("trunk",)) if s is not None]
        assert segment.layer_range == lo_hi
        reference = split_model(model, lo_hi, parts=("trunk",)).trunk
        for (name, p), (_, q) in zip(segment.named_parameters(), reference.named_parameters(), strict=True):
            assert torch.equal(p, q), name
    client = load_stages(tmp_path / "bundle", parts=("bottom", "top"))
    assert client.bottom.layer_range == (0, 2) and client.top.layer_range == (4, 6)


async def test_a_local_chain_generates_what_model_generate_does(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch([4, 9, 6], seed=5)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    bottom, first, second, top = split_model(model, POINTS)
    chain = TrunkChain([LocalTrunk(first), LocalTrunk(second)])
    async with chain, SplitPipeline(bottom, chain, top) as pipeline:
        got = await pipeline.generate(ids, mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert (await chain.info())["layer_range"] == [2, 4]
    assert torch.equal(got, expected)


async def test_hops_whose_layers_do_not_join_up_are_refused():
    model = tiny_model("llama")
    bottom, first, second, top = split_model(model, POINTS)
    chain = TrunkChain([LocalTrunk(second), LocalTrunk(first)])  # the wrong order
    async with chain, SplitPipeline(bottom, chain, top) as pipeline:
        with pytest.raises(ConfigError, match=r"run layers \[3, 4\), \[2, 3\).*hop 1 starts at layer 2"):
            await pipeline.generate(*left_padded_batch([3]), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="at least one trunk"):
        TrunkChain([])


def _client_grads(bottom, top) -> dict[str, torch.Tensor]:
    named = {}
    for stage in (bottom, top):
        for n, p in stage.named_parameters(remove_duplicate=False):
            named.setdefault(id(p), (stage.checkpoint_name(n), p))
    return record_grads(named.values())


async def _check_training_step(model, bottom, chain, top):
    """One full-trunk step through ``chain``: loss and client gradients as the unsplit step's; returns that step."""
    reference = unsplit_step(clone_model(model), make_batch(), OPT)
    grads = _client_grads(bottom, top)
    async with SplitTrainer(bottom, chain, top, TrainingConfig(optimizer=OPT, trunk="full")) as trainer:
        loss = await trainer.step(make_batch())
    assert abs(loss - reference.loss) <= TOL
    for name, g in grads.items():
        assert max_diff(g, reference.grads[name]) <= TOL, name
    return reference


async def test_a_training_step_through_a_local_chain_equals_the_unsplit_step(family):
    model = tiny_model(family)
    bottom, first, second, top = split_model(model, POINTS)
    async with TrunkChain([LocalTrunk(first), LocalTrunk(second)]) as chain:
        reference = await _check_training_step(model, bottom, chain, top)
    updated = dict(reference.model.named_parameters())  # every weight, both segments' included
    for name, p in model.named_parameters():  # the segments share their parameters with `model`
        assert max_diff(p, updated[name]) <= TOL, name


@pytest.mark.slow
async def test_a_chain_of_two_server_processes_equals_the_unsplit_model(tmp_path):
    model = tiny_model("llama", num_layers=6)
    save_stages(split_model(model, POINTS), tmp_path / "bundle")
    ids, mask = left_padded_batch([6, 3], seed=2)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    extra = ["--torch-threads", "1", "--allow-full-training"]
    with ServerProcess(tmp_path / "bundle" / "trunk.0", extra_args=extra) as one, ServerProcess(
        tmp_path / "bundle" / "trunk.1", extra_args=extra
    ) as two:
        bottom, _, _, top = split_model(model, POINTS)
        chain = TrunkChain([RemoteTrunk(one.address), RemoteTrunk(two.address)])
        async with chain, SplitPipeline(bottom, chain, top) as pipeline:
            got = await pipeline.generate(ids, mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(got, expected)
            await _check_training_step(model, bottom, chain, top)


def test_splitlearn_split_writes_one_part_per_segment(tmp_path, capsys):
    from splitlearn_async.cli import main

    tiny_model("gpt2").save_pretrained(tmp_path / "hf")
    assert main(["split", "--model", str(tmp_path / "hf"), "--split", "2,3,4", "--out", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bottom", "top", "trunk.0", "trunk.1"]
    assert "trunk.1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # argparse: one point is not a split
        main(["split", "--model", str(tmp_path / "hf"), "--split", "2", "--out", str(tmp_path / "c")])
    assert refused.value.code == 2 and "cut the trunk into segments" in capsys.readouterr().err
