"""The options of `splitlearn serve` (running it loads a real model: covered elsewhere)."""

from __future__ import annotations

import argparse

import pytest

from splitlearn_async.errors import ConfigError
from splitlearn_async.server._cli import add_serve_arguments, serve_main


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_options_parse():
    args = parse("--model", "default", "--split", "3,27", "--port", "0", "--metrics-port", "9100", "--token", "t")
    assert (args.model, args.split, args.port, args.metrics_port, args.token) == (["default"], "3,27", 0, 9100, "t")
    named = parse("--model", "a=/b1", "--model", "b=/b2", "--max-model-bytes", "1000")
    assert (named.model, named.max_model_bytes) == (["a=/b1", "b=/b2"], 1000)


@pytest.mark.parametrize("argv, fragment", [
    (("--model", "x"), "--split a,b is required"),
    (("--model", "x", "--split", "3"), "two integers"),
    (("--model", "x", "--split", "1,2", "--tls-cert", "c.pem"), "together"),
    (("--model", "a=/no/such/bundle"), r"--model a=/no/such/bundle: no such file"),
    (("--model", "x", "--split", "1,2", "--max-model-bytes", "10"), "several named models"),
    (("--model", "a=/x", "--model", "b=/y", "--max-model-bytes", "0"), "max_model_bytes must be an int >= 1"),
])
def test_bad_options_fail_before_loading(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        serve_main(parse(*argv))


def test_batching_options_parse():
    args = parse("--no-batching", "--max-batch-size", "8", "--max-batch-delay-s", "0.002", "--prefill-chunk-tokens", "0")
    assert (args.batching, args.max_batch_size, args.max_batch_delay_s, args.prefill_chunk_tokens) == (False, 8, 0.002, 0)
    defaults = parse()
    assert (defaults.batching, defaults.max_batch_size, defaults.max_batch_delay_s) == (True, 32, 0.0)


def test_bad_batching_options_fail_before_loading():
    with pytest.raises(ConfigError, match="max_batch_size"):
        serve_main(parse("--model", "x", "--split", "1,2", "--max-batch-size", "0"))


def test_checkpoint_cap_option():
    assert parse().max_checkpoint_bytes == 2 << 30
    assert parse("--max-checkpoint-bytes", "1000000").max_checkpoint_bytes == 1_000_000
    with pytest.raises(ConfigError, match="max_checkpoint_bytes"):
        serve_main(parse("--model", "x", "--split", "1,2", "--max-checkpoint-bytes", "0"))
