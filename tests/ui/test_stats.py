"""The UI's figures and settings, without a browser."""

from __future__ import annotations

import pytest

from splitlearn_async import ConfigError
from splitlearn_async.client import StepTimings
from splitlearn_async.ui import WIRE_DTYPES, AnswerStats, GenerationSettings, generation_kwargs


def test_settings_become_the_keywords_of_generate():
    assert generation_kwargs(GenerationSettings()) == {"max_new_tokens": 64, "do_sample": False}
    sampled = GenerationSettings(
        max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
        repetition_penalty=1.2, no_repeat_ngram_size=3, seed=5, wire_dtype="bfloat16",
    )
    assert generation_kwargs(sampled) == {
        "max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
        "repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "seed": 5,
    }
    # sampling settings are ignored when greedy, as the UI's sliders always hold a value
    assert "temperature" not in generation_kwargs(GenerationSettings(temperature=0.5))
    with pytest.raises(ConfigError, match="max new tokens"):
        generation_kwargs(GenerationSettings(max_new_tokens=0))
    with pytest.raises(ConfigError, match="wire dtype"):
        generation_kwargs(GenerationSettings(wire_dtype="int8"))
    assert WIRE_DTYPES[1:] == ("float16", "bfloat16")


def test_the_panel_and_the_privacy_boundary_of_an_answer():
    stats = AnswerStats(prompt_tokens=7, hidden_size=64, vocab_size=96, wire_dtype="float16", wire_bytes_per_value=2)
    stats.add(StepTimings(0.010, 0.030, 0.005, 1000, 900), "Hello")
    stats.add(StepTimings(0.002, 0.020, 0.004, 200, 180), " world")
    assert stats.text == "Hello world" and stats.tokens == 2
    assert (stats.bytes_sent, stats.bytes_received) == (1200, 1080)
    assert stats.latency_rows() == [{"token": 1, "ms": 45.0}, {"token": 2, "ms": 26.0}]
    panel = stats.panel_html()
    assert "<td id='bottom-ms'>12.0</td>" in panel and "<td id='trunk-ms'>50.0</td>" in panel
    assert "<td id='top-ms'>9.0</td>" in panel and "<b id='bytes-sent'>1,200</b>" in panel
    privacy = stats.privacy_html()
    assert "(1, 7, 64), float16: 896 bytes" in privacy  # the prompt's hidden states
    assert "1 hidden-state tensor(s) of shape (1, 1, 64), float16: 128 bytes" in privacy
    assert "2 x 96 values" in privacy and "Hello" not in privacy.split("Stayed")[0]
