"""Bad split requests fail with messages that name the value, the range and the fix."""

from __future__ import annotations

import pytest

from splitlearn_async import SplitPointError, UnsupportedModelError, split_model
from splitlearn_async.models.families import family_for
from tests.support.tiny_models import tiny_model


@pytest.mark.parametrize("split", [(4, 2), (3, 3), (-1, 3), (2, 7), (0, 0)])
def test_split_points_out_of_range_or_unordered(split):
    model = tiny_model("llama")
    with pytest.raises(SplitPointError) as info:
        split_model(model, split)
    message = str(info.value)
    assert str(split) in message and "0 <= a < b <= 6" in message and "e.g." in message


@pytest.mark.parametrize("split", [(1,), "2,4", (1.0, 3), (True, 3), None])
def test_split_points_of_the_wrong_type(split):
    with pytest.raises(SplitPointError, match="split_points"):
        split_model(tiny_model("gpt2"), split)


def test_unknown_family_lists_supported_ones():
    with pytest.raises(UnsupportedModelError) as info:
        family_for("mamba")
    message = str(info.value)
    assert "'mamba'" in message and "llama" in message and "gpt2" in message and "families.py" in message


def test_unknown_family_from_a_model():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        split_model(model, (1, 2))
