"""SplitPipeline.generate resolves its settings and processes logits as ``model.generate``:
the model's generation config, eos as an int or a list, pad defaults, every logits processor
and stopping criterion of transformers, and the user's own; over LocalTrunk and a server."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from splitlearn_async import ConfigError
from tests.support.generation import TRUNK_KINDS, char_tokenizer, split_pipeline, transformers_warnings
from tests.support.tiny_models import left_padded_batch, tiny_model


@pytest.fixture(params=TRUNK_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The trunk in-process (LocalTrunk) or on a server (RemoteTrunk)."""
    return str(request.param)


def _greedy(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
@pytest.mark.parametrize("eos", [None, "list"])
async def test_the_model_s_generation_config_decides_eos_as_generate_does(family, eos, kind):
    # the case: generation_config.eos_token_id differs from config.eos_token_id (2)
    model = tiny_model(family)
    ids, mask = left_padded_batch([4, 9, 6], seed=5)
    free = _greedy(model, ids, mask, pad_token_id=0)
    emitted = [int(free[1, ids.shape[1] + 2]), int(free[0, ids.shape[1] + 4])]  # tokens rows really emit
    model.generation_config.eos_token_id = emitted if eos == "list" else None
    model.generation_config.pad_token_id = 0
    expected = _greedy(model, ids, mask)
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, max_new_tokens=12)
        explicit_none = await pipeline.generate(ids, mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(got, expected)
    assert torch.equal(explicit_none, _greedy(model, ids, mask, eos_token_id=None))
    if eos == "list":
        assert (got[:, ids.shape[1]:] == 0).any()  # rows stopped at either eos and were padded


async def test_pad_defaults_to_the_first_eos_with_transformers_warning(kind):
    model = tiny_model("llama")
    ids, _ = left_padded_batch([5, 5], seed=3)  # no padding and no mask: the warning's case
    free = model.generate(input_ids=ids, max_new_tokens=10, pad_token_id=0)
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = [int(free[0, 7]), 2]
    with transformers_warnings() as hf_warnings:
        expected = model.generate(input_ids=ids, max_new_tokens=10)
    async with split_pipeline(model, kind) as pipeline:
        with transformers_warnings() as our_warnings:
            got = await pipeline.generate(ids, max_new_tokens=10)
    assert torch.equal(got, expected)
    assert (got[0, 8:] == model.generation_config.eos_token_id[0]).all()  # padded with the first eos
    pad_warnings = [w for w in our_warnings if "pad token id were not set" in w]
    assert len(pad_warnings) == 1 and pad_warnings == [w for w in hf_warnings if "pad token id were not set" in w]


async def test_a_given_generation_config_and_keywords_resolve_as_in_generate(kind):
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch([3, 7], seed=4)
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.4, pad_token_id=0, eos_token_id=None)
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=9)
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, config, max_new_tokens=9)
    assert got.shape[1] == ids.shape[1] + 9 and torch.equal(got, expected)


def _settings(free: torch.Tensor, prompt: int) -> dict[str, dict]:
    """Settings of each processor and criterion, made from tokens a free greedy run emits, so
    that each one changes the output."""
    new = free[:, prompt:]
    early, bigram = int(new[0, 1]), [int(new[1, 2]), int(new[1, 3])]
    return {
        "repetition_penalty": dict(repetition_penalty=1.8),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "min_new_tokens": dict(min_new_tokens=6, eos_token_id=early),
        "min_length": dict(min_length=prompt + 5, eos_token_id=early),
        "bad_words_ids": dict(bad_words_ids=[[early], bigram]),
        "suppress_tokens": dict(suppress_tokens=[early, int(new[1, 0])]),
        "temperature_top_k": dict(do_sample=True, temperature=0.7, top_k=10),
        "top_p": dict(do_sample=True, top_p=0.6),
        "min_p": dict(do_sample=True, min_p=0.5, temperature=0.05),
        "typical_p": dict(do_sample=True, typical_p=0.5),
        "epsilon_cutoff": dict(do_sample=True, epsilon_cutoff=0.0104),
        "eta_cutoff": dict(do_sample=True, eta_cutoff=0.01),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[int(new[0, 0]), int(new[1, 0])]),
        "sequence_bias": dict(sequence_bias={(early,): -5.0, tuple(bigram): -5.0}),
        "forced_eos_token_id": dict(forced_eos_token_id=early, max_length=prompt + 10),
        "max_length": dict(max_length=prompt + 7),
    }


CASES = [
    "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length", "bad_words_ids",
    "suppress_tokens", "temperature_top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "begin_suppress_tokens", "sequence_bias", "forced_eos_token_id", "max_length",
]


@pytest.mark.parametrize("case", CASES)
async def test_each_logits_processor_equals_generate(case, kind):
    model = tiny_model("llama", seed=2)
    ids, mask = left_padded_batch([4, 8, 6], seed=7)
    plain = _greedy(model, ids, mask, pad_token_id=0)
    settings = {"pad_token_id": 0, **_settings(plain, ids.shape[1])[case]}
    length = {} if "max_length" in settings else {"max_new_tokens": 12}
    torch.manual_seed(21)
    expected = model.generate(input_ids=ids, attention_mask=mask, **length, **settings)
    baseline = _greedy(model, ids, mask, **{k: v for k, v in settings.items() if k in ("pad_token_id", "eos_token_id")})
    assert not torch.equal(expected, baseline)  # the setting matters here
    async with split_pipeline(model, kind) as pipeline:
        torch.manual_seed(21)
        got = await pipeline.generate(ids, mask, **length, **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma", "gemma3"])
async def test_processors_together_equal_generate_in_every_family(family, kind):
    model = tiny_model(family, seed=1)
    ids, mask = left_padded_batch([5, 2, 7], seed=8)
    plain = _greedy(model, ids, mask, pad_token_id=0)
    new = plain[:, ids.shape[1]:]
    settings = dict(
        repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=4, eos_token_id=[int(new[0, 1]), 2],
        bad_words_ids=[[int(new[2, 0])]], suppress_tokens=[int(new[1, 1])], pad_token_id=0,
    )
    expected = _greedy(model, ids, mask, **settings)
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, max_new_tokens=12, **settings)
    assert torch.equal(got, expected)


async def test_stop_strings_stop_rows_as_generate_does(kind):
    model = tiny_model("llama", seed=2)
    tokenizer = char_tokenizer()
    ids, mask = left_padded_batch([4, 8, 6], seed=7)
    plain = _greedy(model, ids, mask, pad_token_id=0, eos_token_id=2)
    stop = tokenizer.decode(plain[1, ids.shape[1] + 3 : ids.shape[1] + 5])  # two characters row 1 emits
    expected = _greedy(model, ids, mask, pad_token_id=0, eos_token_id=2, stop_strings=[stop], tokenizer=tokenizer)
    assert not torch.equal(expected, plain)
    async with split_pipeline(model, kind, tokenizer=tokenizer) as pipeline:  # the pipeline's tokenizer serves
        got = await pipeline.generate(ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=2,
                                      stop_strings=[stop])
    assert torch.equal(got, expected)


class _BanToken(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.token] = -float("inf")
        return scores


class _StopAfterToken(StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return (input_ids[:, -1] == self.token).to(torch.bool)


async def test_user_logits_processors_and_stopping_criteria_merge_as_in_generate(kind):
    model = tiny_model("gemma", seed=2)
    ids, mask = left_padded_batch([4, 8, 6], seed=7)
    new = _greedy(model, ids, mask, pad_token_id=0)[:, ids.shape[1]:]

    def lists():  # a user processor of a type generate also builds replaces generate's one
        processors = LogitsProcessorList([_BanToken(int(new[0, 0])), RepetitionPenaltyLogitsProcessor(2.0)])
        return processors, StoppingCriteriaList([_StopAfterToken(int(new[2, 3]))])

    processors, criteria = lists()
    settings = dict(pad_token_id=0, eos_token_id=2, repetition_penalty=1.1, prefix_allowed_tokens_fn=None)
    expected = _greedy(model, ids, mask, logits_processor=processors, stopping_criteria=criteria, **settings)
    processors, criteria = lists()
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, max_new_tokens=12, logits_processor=processors,
                                      stopping_criteria=criteria, **settings)
    assert torch.equal(got, expected)


async def test_prefix_allowed_tokens_fn_constrains_as_in_generate(kind):
    model = tiny_model("qwen2", seed=2)
    ids, mask = left_padded_batch([4, 6], seed=7)

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return list(range(10 + 5 * batch_id, 30 + 5 * batch_id + int(sent[-1]) % 7))

    expected = _greedy(model, ids, mask, pad_token_id=0, prefix_allowed_tokens_fn=allowed)
    async with split_pipeline(model, kind) as pipeline:
        got = await pipeline.generate(ids, mask, max_new_tokens=12, pad_token_id=0, prefix_allowed_tokens_fn=allowed)
    assert torch.equal(got, expected)


async def test_unsupported_options_fail_with_a_sentence_before_any_trunk_work():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([3])
    async with split_pipeline(model, "local") as pipeline:
        with pytest.raises(ConfigError, match=r"select group_beam_search generation.*Unset .* num_beam_groups"):
            await pipeline.generate(ids, mask, max_new_tokens=3, num_beams=4, num_beam_groups=2)
        with pytest.raises(ConfigError, match="max_tokens"):
            await pipeline.generate(ids, mask, max_tokens=3)
        with pytest.raises(ConfigError, match="streamer must have put"):
            await pipeline.generate(ids, mask, max_new_tokens=3, streamer=object())
        with pytest.raises(ValueError, match="stop strings"):  # transformers' own sentence
            await pipeline.generate(ids, mask, max_new_tokens=3, stop_strings=["ab"])
        assert pipeline.trunk.sessions_open == 0
