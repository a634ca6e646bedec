"""Defenses at the cut: their noise, their checks, and what the trunk receives in generation and training."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from splitlearn_async import (
    ArgumentError,
    ConfigError,
    DChiNoise,
    GaussianNoise,
    LocalTrunk,
    OptimizerConfig,
    SplitPipeline,
    SplitTrainer,
    StageWorker,
    TrainingConfig,
    split_model,
)
from splitlearn_async.client import Defense, defense_from_spec
from tests.support.tiny_models import left_padded_batch, tiny_model
from tests.support.training_reference import SPLIT, TOL, clone_model, make_batch, unsplit_step

# --- the noise ------------------------------------------------------------------------------


def test_gaussian_noise_has_its_sigma_and_is_independent_of_the_states():
    zeros = torch.zeros(64, 32, 256)
    states = torch.randn(64, 32, 256) * 5
    noise = GaussianNoise(0.7, seed=3)(zeros)  # (B, T, H): the noise itself
    assert noise.dtype == zeros.dtype and noise.shape == zeros.shape
    assert abs(float(noise.mean())) < 0.01  # 524288 draws: the mean's standard error is 0.001
    assert abs(float(noise.std()) - 0.7) < 0.01
    assert torch.allclose(GaussianNoise(0.7, seed=3)(states) - states, noise, atol=1e-5)  # the same draws, added
    assert torch.equal(GaussianNoise(0.7, seed=3)(zeros), noise)  # a seed reproduces
    assert not torch.equal(GaussianNoise(0.7, seed=4)(zeros), noise)
    assert not torch.equal(GaussianNoise(0.7)(zeros), GaussianNoise(0.7)(zeros))  # unseeded: from the system


def test_gaussian_noise_of_sigma_zero_changes_nothing_and_dtypes_are_kept():
    states = torch.randn(2, 5, 16)
    assert torch.equal(GaussianNoise(0.0, seed=1)(states), states)
    half = GaussianNoise(0.5, seed=1)(states.to(torch.float16))
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), GaussianNoise(0.5, seed=1)(states), atol=1e-2)


def test_dchi_noise_has_a_gamma_norm_and_a_uniform_direction():
    hidden, eta = 256, 8.0
    noise = DChiNoise(eta, seed=5)(torch.zeros(16, 512, hidden))  # 8192 vectors of 256
    norms = noise.norm(dim=-1)
    # the norm is Gamma(H, 1/eta): mean H/eta = 32, standard deviation sqrt(H)/eta = 2
    assert abs(float(norms.mean()) - hidden / eta) < 0.1  # standard error 2 / sqrt(8192) = 0.022
    assert abs(float(norms.std()) - math.sqrt(hidden) / eta) < 0.1
    directions = noise / norms[..., None]
    assert float(directions.mean(dim=(0, 1)).norm()) < 0.05  # the mean direction: about 1/sqrt(8192) = 0.011
    per_coordinate = noise.reshape(-1, hidden).var(dim=0)  # E[r^2] / H = (H + 1) / eta^2 each
    assert torch.allclose(per_coordinate, torch.full((hidden,), (hidden + 1) / eta**2), rtol=0.1)
    assert torch.equal(DChiNoise(eta, seed=5)(torch.zeros(16, 512, hidden)), noise)
    assert float(DChiNoise(4 * eta, seed=5)(torch.zeros(16, 512, hidden)).norm(dim=-1).mean()) < 0.3 * hidden / eta


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: GaussianNoise(-0.1), "sigma must be a finite number >= 0"),
        (lambda: GaussianNoise(math.nan), "sigma must be a finite number >= 0"),
        (lambda: GaussianNoise(math.inf), "sigma must be a finite number >= 0"),
        (lambda: GaussianNoise("1"), "sigma must be a finite number >= 0"),
        (lambda: DChiNoise(0.0), "eta must be a finite number > 0"),
        (lambda: DChiNoise(-3), "eta must be a finite number > 0"),
        (lambda: DChiNoise(math.inf), "eta must be a finite number > 0"),
        (lambda: defense_from_spec("laplace:1"), "'gaussian:SIGMA' or 'dchi:ETA'"),
        (lambda: defense_from_spec("gaussian"), "'gaussian:SIGMA' or 'dchi:ETA'"),
        (lambda: defense_from_spec("gaussian:x"), "sigma must be a finite number >= 0"),
        (lambda: defense_from_spec("dchi:0"), "eta must be a finite number > 0"),
    ],
)
def test_bad_settings_are_config_errors_with_a_sentence(make, words):
    with pytest.raises(ConfigError, match="must be|a defense is") as info:
        make()
    assert words in str(info.value)


def test_a_bad_seed_or_defense_is_an_argument_error():
    with pytest.raises(ArgumentError, match="seed must be an int"):
        GaussianNoise(1.0, seed="7")
    bottom, trunk, top = split_model(tiny_model("llama"), SPLIT)
    with pytest.raises(ArgumentError, match="defense must be a callable"):
        SplitPipeline(bottom, LocalTrunk(trunk), top, defense=0.5)
    with pytest.raises(ArgumentError, match="defense must be a callable"):
        SplitTrainer(bottom, LocalTrunk(trunk), top, defense="gaussian:0.5")


def test_specs_name_the_defenses():
    assert isinstance(defense_from_spec("gaussian:0.5"), GaussianNoise)
    assert defense_from_spec("Gaussian:0.5").sigma == 0.5
    assert defense_from_spec("dchi:100", seed=1).eta == 100.0
    assert isinstance(defense_from_spec("dchi:100"), Defense)


# --- generation -----------------------------------------------------------------------------


def noise_at(model, layer: int, defense) -> torch.utils.hooks.RemovableHandle:
    """A hook that adds ``defense``'s noise to the input of ``model``'s decoder layer ``layer``
    (the unsplit model's view of the cut), drawn in the same order as the pipeline draws."""
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers

    def add_noise(module, args, kwargs):
        if args:
            return (defense(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": defense(kwargs["hidden_states"])}

    return layers[layer].register_forward_pre_hook(add_noise, with_kwargs=True)


async def test_without_a_defense_generate_equals_model_generate_and_the_trunk_gets_the_bottom_output():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([7, 4], seed=2)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    bottom, trunk, top = split_model(model, SPLIT)
    sent, received = [], []
    bottom.register_forward_hook(lambda mod, args, out: sent.append(out.detach().clone()))
    trunk.register_forward_pre_hook(lambda mod, args: received.append(args[0].detach().clone()))
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top) as pipeline:
        assert pipeline.defense is None
        got = await pipeline.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(got, expected)
    assert len(sent) == len(received) == 8
    assert all(torch.equal(a, b) for a, b in zip(sent, received, strict=True))  # byte for byte


@pytest.mark.parametrize("make", [lambda: GaussianNoise(0.3, seed=11), lambda: DChiNoise(40.0, seed=11)])
async def test_with_a_defense_the_trunk_receives_noised_states_and_generate_equals_the_noised_model(make):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([7, 4], seed=2)
    handle = noise_at(model, SPLIT[0], make())
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    handle.remove()
    clean = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    bottom, trunk, top = split_model(model, SPLIT)
    sent, received = [], []
    bottom.register_forward_hook(lambda mod, args, out: sent.append(out.detach().clone()))
    trunk.register_forward_pre_hook(lambda mod, args: received.append(args[0].detach().clone()))
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top, defense=make()) as pipeline:
        got = await pipeline.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(got, expected)  # the same noise at the same place: the same tokens
    assert not torch.equal(got, clean)  # and the noise mattered
    reference = make()  # the same seed: the same draws, prompt first, then one per step
    for s, r in zip(sent, received, strict=True):
        assert torch.allclose(r - s, reference(torch.zeros_like(s)), atol=1e-5)


async def test_pipelines_with_other_defenses_on_one_worker_keep_their_own():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([5], seed=4)
    bottom, trunk, top = split_model(model, SPLIT)
    async with StageWorker() as worker, LocalTrunk(trunk) as local:
        plain = SplitPipeline(bottom, local, top, worker=worker)
        noised = SplitPipeline(bottom, local, top, worker=worker, defense=GaussianNoise(0.5, seed=1))
        a, b = await asyncio.gather(
            plain.generate(ids, mask, max_new_tokens=6, pad_token_id=0),
            noised.generate(ids, mask, max_new_tokens=6, pad_token_id=0),
        )
    assert torch.equal(a, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=0))
    handle = noise_at(model, SPLIT[0], GaussianNoise(0.5, seed=1))
    assert torch.equal(b, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=0))
    handle.remove()


async def test_a_failing_defense_fails_its_generation_with_its_error():
    def broken(hidden: torch.Tensor) -> torch.Tensor:
        raise ConfigError("this defense is broken")

    bottom, trunk, top = split_model(tiny_model("llama"), SPLIT)
    ids, mask = left_padded_batch([5], seed=4)
    async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top, defense=broken) as pipeline:
        with pytest.raises(ConfigError, match="this defense is broken"):
            await pipeline.generate(ids, mask, max_new_tokens=3, pad_token_id=0)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
async def test_a_training_step_with_noise_equals_the_unsplit_step_with_the_same_noise(family):
    opt = OptimizerConfig("adamw", lr=1e-3)
    model = tiny_model(family)
    reference_model = clone_model(model)
    handle = noise_at(reference_model, SPLIT[0], GaussianNoise(0.2, seed=9))
    reference = unsplit_step(reference_model, make_batch(), opt)
    handle.remove()
    clean = unsplit_step(clone_model(model), make_batch(), opt)

    bottom, trunk, top = split_model(model, SPLIT)
    config = TrainingConfig(optimizer=opt, trunk="full")
    async with (
        LocalTrunk(trunk) as local,
        SplitTrainer(bottom, local, top, config, defense=GaussianNoise(0.2, seed=9)) as trainer,
    ):
        loss = await trainer.step(make_batch())
    assert abs(loss - reference.loss) <= TOL
    assert abs(loss - clean.loss) > 1e-4  # the noise mattered
    updated = dict(reference.model.named_parameters())
    for name, p in model.named_parameters():  # every weight, bottom included: the gradients went through the noise
        assert (p - updated[name]).abs().max() <= TOL, name


async def test_evaluate_sends_noised_states_too():
    model = tiny_model("llama")
    batch = make_batch()
    bottom, trunk, top = split_model(model, SPLIT)
    received = []
    trunk.register_forward_pre_hook(lambda mod, args: received.append(args[0].detach().clone()))
    config = TrainingConfig(trunk="lora")
    async with LocalTrunk(trunk) as local:
        async with SplitTrainer(bottom, local, top, config) as plain:
            clean = await plain.evaluate(batch)
        async with SplitTrainer(bottom, local, top, config, defense=DChiNoise(20.0, seed=2)) as trainer:
            noised = await trainer.evaluate(batch)
    assert noised != clean
    noise = received[1] - received[0]  # (B, T, H): the same bottom output, noised the second time
    assert torch.allclose(noise, DChiNoise(20.0, seed=2)(torch.zeros_like(noise)), atol=1e-5)
