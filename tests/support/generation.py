"""Helpers of the generation tests: a pipeline over either trunk, a character tokenizer,
and a catcher of transformers' log warnings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from splitlearn_async import LocalTrunk, RemoteTrunk, SplitPipeline, split_model
from tests.support.rpc import served

TRUNK_KINDS = ("local", "remote")


@contextlib.asynccontextmanager
async def split_pipeline(model: Any, kind: str, split: tuple[int, int] = (2, 4), **options: Any) -> AsyncIterator[SplitPipeline]:
    """A pipeline of ``model`` split at ``split``, its trunk in-process (``"local"``) or on a server (``"remote"``)."""
    bottom, trunk, top = split_model(model, split)
    if kind == "local":
        async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top, **options) as pipeline:
            yield pipeline
        return
    async with served(trunk) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitPipeline(bottom, remote, top, **options) as pipeline:
            yield pipeline


def char_tokenizer() -> Any:
    """A tokenizer for the tiny models' 96 tokens: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, then one
    printable character each (3 is ``!``, 95 is ``}``), so that text and stop strings work."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(30 + i): i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """The warnings transformers logs meanwhile (its logger does not propagate to pytest's)."""
    records = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(records)
    try:
        yield records.messages
    finally:
        root.removeHandler(records)
