"""The UI's work, without Gradio: chat answers streamed through bottom -> trunk -> top, and a short LoRA run.

:class:`UIBackend` holds the client's bottom, top and tokenizer, and one
:class:`~splitlearn_async.client.RemoteTrunk` per wire dtype to the trunk server (made on
first use, in the event loop of the UI's handlers). :meth:`UIBackend.answer` yields an
:class:`~._stats.AnswerStats` after each token; :meth:`UIBackend.train` yields a
:class:`TrainProgress` after each training step, then the answers before and after.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitlearn_async.client import ClientConfig, RemoteTrunk, SplitPipeline, SplitTrainer
from splitlearn_async.errors import ConfigError
from splitlearn_async.training import LoraConfig, OptimizerConfig, TrainingConfig

from ._stats import WIRE_DTYPES, AnswerStats, GenerationSettings, generation_kwargs

__all__ = ["SHIPPED_TEXT", "TrainProgress", "UIBackend"]

logger = logging.getLogger(__name__)

#: The text the training tab fine-tunes on (public domain, in the repository's examples).
SHIPPED_TEXT = Path(__file__).resolve().parents[2] / "examples" / "data" / "alice_chapter1.txt"
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class TrainProgress:
    """Where the training tab's run stands.

    Attributes:
        losses: The training loss of each step so far.
        held_out_before: Held-out loss before the first step.
        held_out_after: Held-out loss after the last step (None until then).
        answer_before: The answer to the probe prompt before training (base weights).
        answer_after: The answer with the trained adapter (None until the end).
        adapter_id: The adapter trained on the server.
    """

    losses: list[float] = field(default_factory=list)
    held_out_before: float = 0.0
    held_out_after: float | None = None
    answer_before: str = ""
    answer_after: str | None = None
    adapter_id: str = ""


class UIBackend:
    """Chat and training against one trunk server, for the UI.

    Args:
        address: The trunk server, ``host:port``.
        stages: The client's stages (``bottom`` and ``top``), e.g. from ``load_stages``.
        tokenizer: The model's tokenizer (chat template).
        model_dtype: The trunk's dtype name (the exact wire dtype).
        auth_token: The server's bearer token, if it has one.
        status_url: The server's status page, if it serves one (shown in the UI).
    """

    def __init__(
        self,
        address: str,
        stages: Any,
        tokenizer: Any,
        model_dtype: str = "float32",
        auth_token: str | None = None,
        status_url: str | None = None,
    ) -> None:
        self.address = address
        self.bottom, self.top = stages.bottom, stages.top
        self.tokenizer = tokenizer
        self.model_dtype = model_dtype
        self.auth_token = auth_token
        self.status_url = status_url
        self._trunks: dict[str | None, RemoteTrunk] = {}
        self._pipelines: dict[tuple[str | None, str | None], SplitPipeline] = {}
        self._runs = itertools.count(1)

    def _wire(self, choice: str) -> str | None:
        return None if choice == WIRE_DTYPES[0] else choice

    def trunk(self, wire_dtype: str | None) -> RemoteTrunk:
        """The connection whose sessions send hidden states as ``wire_dtype`` (None: the model's), made once."""
        if wire_dtype not in self._trunks:
            config = ClientConfig(auth_token=self.auth_token, wire_dtype=wire_dtype)
            self._trunks[wire_dtype] = RemoteTrunk(self.address, config)
        return self._trunks[wire_dtype]

    def pipeline(self, wire_dtype: str | None, adapter_id: str | None = None) -> SplitPipeline:
        """The pipeline of ``wire_dtype`` and ``adapter_id`` (None: base weights), made once.

        Pipelines share the bottom and the top (their calls take turns).
        """
        key = (wire_dtype, adapter_id)
        if key not in self._pipelines:
            self._pipelines[key] = SplitPipeline(
                self.bottom, self.trunk(wire_dtype), self.top, tokenizer=self.tokenizer, adapter_id=adapter_id
            )
        return self._pipelines[key]

    async def answer(
        self, messages: Sequence[dict[str, str]], settings: GenerationSettings, adapter_id: str | None = None
    ) -> AsyncIterator[AnswerStats]:
        """Stream the answer to the chat ``messages``: the stats (with the text so far) after each token.

        Raises:
            ConfigError: a setting is out of range, or there is no user message.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ConfigError("the conversation must end with a user message.")
        kwargs = generation_kwargs(settings)
        wire = self._wire(settings.wire_dtype)
        pipeline = self.pipeline(wire, adapter_id)
        ids, mask = pipeline.encode(list(messages))
        dtype = wire or self.model_dtype
        stats = AnswerStats(
            prompt_tokens=int(ids.shape[1]),
            hidden_size=int(self.bottom.hidden_size),
            vocab_size=int(self.top.config.vocab_size),
            wire_dtype=dtype,
            wire_bytes_per_value=_BYTES.get(dtype, 4),
        )
        async for chunk in pipeline.stream(ids, mask, **kwargs):
            if chunk.timings is not None:
                stats.add(chunk.timings, chunk.text[0] if chunk.text else "")
            yield stats

    async def train(
        self, steps: int, probe: str, lr: float = 1e-3, seq_len: int = 48, batch: int = 2
    ) -> AsyncIterator[TrainProgress]:
        """A few LoRA steps on the shipped text: progress after each step, then the answers before and after.

        Raises:
            ConfigError: ``steps`` is not 1..200, or the shipped text is missing.
        """
        if not isinstance(steps, int) or not 1 <= steps <= 200:
            raise ConfigError(f"training steps must be 1..200, got {steps!r}.")
        if not SHIPPED_TEXT.is_file():
            raise ConfigError(f"the shipped text {SHIPPED_TEXT} is missing; run the UI from a clone of the repository.")
        import torch

        body = SHIPPED_TEXT.read_text(encoding="utf-8").split("\n\n", 1)[1]  # skip the source note
        ids = self.tokenizer(body, return_tensors="pt").input_ids[0]
        rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
        held_out, train_rows = rows[-2:], rows[:-2]
        progress = TrainProgress(adapter_id=f"ui-run-{next(self._runs)}")
        settings = GenerationSettings(max_new_tokens=32)
        chat = [{"role": "user", "content": probe}]
        async for stats in self.answer(chat, settings):
            progress.answer_before = stats.text
        config = TrainingConfig(
            optimizer=OptimizerConfig("adamw", lr=lr),
            lora=LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0),
            adapter_id=progress.adapter_id,
            train_bottom=False,
            train_top=False,
        )
        async with SplitTrainer(self.bottom, self.trunk(None), self.top, config) as trainer:
            progress.held_out_before = await trainer.evaluate({"input_ids": held_out})
            yield progress
            for step in range(steps):
                picks = torch.tensor([(step * batch + i) % len(train_rows) for i in range(batch)])
                progress.losses.append(await trainer.step({"input_ids": train_rows[picks]}))
                yield progress
            progress.held_out_after = await trainer.evaluate({"input_ids": held_out})
        async for stats in self.answer(chat, settings, adapter_id=progress.adapter_id):
            progress.answer_after = stats.text
        yield progress

    async def aclose(self) -> None:
        """Close the pipelines and the connections."""
        for pipeline in self._pipelines.values():
            await pipeline.aclose()
        for trunk in self._trunks.values():
            await trunk.aclose()
        self._pipelines.clear()
        self._trunks.clear()
