"""The model's GenerationConfig travels with its stages, and generation settings resolve as
``model.generate`` resolves them (keywords > given config > the model's > defaults)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from splitlearn_async import BundleCorruptError, ConfigError, ModelFactory, load_stages, save_stages, split_model
from splitlearn_async.models.decoding import generate_local, stream_local
from splitlearn_async.models.generation import resolve_generation
from tests.support.generation import transformers_warnings
from tests.support.tiny_models import left_padded_batch, tiny_model


def _chat_model(family: str = "llama"):
    """A tiny model whose generation config differs from its config, as chat models ship them."""
    model = tiny_model(family)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=[7, 11], pad_token_id=0, do_sample=True, top_k=12, temperature=0.8
    )
    return model


def test_split_model_keeps_the_generation_config():
    model = _chat_model()
    stages = split_model(model, (2, 4))
    for stage in stages:
        assert stage.generation_config.to_dict() == model.generation_config.to_dict()
    assert stages.generation_config is stages.top.generation_config
    assert stages.top.generation_config is not model.generation_config  # a copy: the model is left alone


def test_a_bundle_saves_and_loads_the_generation_config(tmp_path):
    model = _chat_model()
    save_stages(split_model(model, (2, 4)), tmp_path / "bundle")
    for part in ("bottom", "trunk", "top"):
        assert (tmp_path / "bundle" / part / "generation_config.json").is_file()
        manifest = json.loads((tmp_path / "bundle" / part / "manifest.json").read_text())
        assert "generation_config.json" in manifest["files"]  # checksummed like the weights
    loaded = load_stages(tmp_path / "bundle")
    assert loaded.top.generation_config.to_dict() == model.generation_config.to_dict()
    alone = load_stages(tmp_path / "bundle" / "trunk", parts=("trunk",))  # a part alone keeps it too
    assert alone.trunk.generation_config.eos_token_id == [7, 11]


def test_a_tampered_generation_config_is_refused(tmp_path):
    save_stages(split_model(_chat_model(), (2, 4)), tmp_path)
    path = tmp_path / "top" / "generation_config.json"
    path.write_text(path.read_text().replace("0.8", "0.9"))
    with pytest.raises(BundleCorruptError, match="generation_config.json"):
        load_stages(tmp_path, parts=("top",))


def test_a_bundle_without_one_gets_the_default_transformers_derives(tmp_path):
    model = tiny_model("gpt2")
    save_stages(split_model(model, (2, 4)), tmp_path)
    for part in ("bottom", "trunk", "top"):  # as a bundle written before generation configs travelled
        (tmp_path / part / "generation_config.json").unlink()
        manifest_path = tmp_path / part / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        del manifest["files"]["generation_config.json"]
        manifest_path.write_text(json.dumps(manifest))
    loaded = load_stages(tmp_path)
    assert loaded.top.generation_config.to_dict() == GenerationConfig.from_model_config(model.config).to_dict()


@pytest.mark.parametrize("with_file", [True, False])
def test_a_hugging_face_folder_gives_what_from_pretrained_gives(tmp_path, with_file):
    model = _chat_model("qwen2")
    model.save_pretrained(tmp_path)
    if not with_file:
        (tmp_path / "generation_config.json").unlink()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = load_stages(tmp_path, (2, 4))
    assert loaded.top.generation_config.to_dict() == reference.generation_config.to_dict()
    bottom, trunk, top = ModelFactory.create_split_models("qwen2", str(tmp_path), 2, 4)
    assert top.generation_config.to_dict() == reference.generation_config.to_dict()


def test_keywords_override_the_given_config_which_overrides_the_model_s():
    model = _chat_model()
    ids, mask = left_padded_batch([4, 6])
    given = GenerationConfig(top_k=5, max_new_tokens=7)
    resolved = resolve_generation(model.config, model.generation_config, ids, mask, given, temperature=0.5)
    config = resolved.config
    assert (config.temperature, config.top_k, config.max_new_tokens, config.do_sample) == (0.5, 5, 7, True)
    assert config.max_length == ids.shape[1] + 7
    assert resolved.eos == [7, 11] and resolved.pad_token_id == 0
    assert given.temperature is None  # the caller's config is not modified


def test_eos_none_explicitly_means_no_eos_and_pad_defaults_to_the_first_eos_with_the_warning():
    model = tiny_model("gpt2")
    ids = left_padded_batch([5, 5])[0]
    assert resolve_generation(model.config, model.generation_config, ids, eos_token_id=None,
                              max_new_tokens=3).eos == []
    config = GenerationConfig(eos_token_id=[9, 4])  # no pad: generate pads with the first eos
    with transformers_warnings() as warnings:
        resolved = resolve_generation(model.config, config, ids, max_new_tokens=3)
    assert resolved.pad_token_id == 9
    assert any("pad token id were not set" in w for w in warnings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=4, num_beam_groups=2), "group_beam_search generation.*num_beam_groups"),
        (dict(num_beams=4, low_memory=True), "low_memory=True is not supported with beam search"),
        (dict(penalty_alpha=0.6, top_k=4), "contrastive"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(max_new_token=5), "max_new_token"),
        (dict(position_ids=torch.zeros(1, 3)), "position_ids"),
        (dict(guidance_scale=1.5), "guidance_scale"),
    ],
)
def test_unsupported_options_raise_config_error_naming_them(kwargs, message):
    model = tiny_model("llama")
    ids = left_padded_batch([3])[0]
    with pytest.raises(ConfigError, match=message):
        resolve_generation(model.config, model.generation_config, ids, **{"max_new_tokens": 3, **kwargs})


def test_without_an_attention_mask_it_is_inferred_from_padding_as_generate_does():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([3, 6], pad_id=0)
    resolved = resolve_generation(model.config, model.generation_config, ids, max_new_tokens=4)
    assert torch.equal(resolved.attention_mask, mask)
    expected = model.generate(input_ids=ids, max_new_tokens=4)
    assert torch.equal(generate_local(*split_model(model, (2, 4)), ids, max_new_tokens=4), expected)


def test_the_local_loop_samples_as_generate_does_with_the_same_seed():
    model = tiny_model("gemma3")
    ids, mask = left_padded_batch([4, 7, 2], seed=2)
    kwargs = dict(max_new_tokens=9, do_sample=True, top_k=20, temperature=0.9, num_return_sequences=2)
    torch.manual_seed(11)
    expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    torch.manual_seed(11)
    got = generate_local(*split_model(model, (2, 4)), ids, mask, **kwargs)
    assert torch.equal(got, expected)


def test_the_local_loop_runs_beam_search_as_generate_does_and_stream_local_refuses_it():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch([4, 7, 2], seed=2)
    kwargs = dict(max_new_tokens=9, num_beams=4, num_return_sequences=3, length_penalty=1.5, pad_token_id=0)
    stages = split_model(model, (2, 4))
    got = generate_local(*stages, ids, mask, **kwargs)
    assert got.shape[0] == 9 and torch.equal(got, model.generate(input_ids=ids, attention_mask=mask, **kwargs))
    with pytest.raises(ConfigError, match="stream_local yields each step's tokens, but beam search"):
        next(stream_local(*stages, ids, mask, **kwargs))


@pytest.mark.slow
def test_the_embedded_model_keeps_the_generation_config_transformers_gives_it():
    from splitlearn_async.models.default import default_gguf_path

    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    stages = load_stages("default")
    assert stages.top.generation_config.to_dict() == reference.generation_config.to_dict()
