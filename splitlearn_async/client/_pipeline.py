"""``SplitPipeline``: bottom -> trunk -> top generation for async applications.

Bottom and top run on the client's :class:`~splitlearn_async.worker.StageWorker` thread,
never on the event loop; the trunk is any :class:`~._protocols.Trunk` (a ``LocalTrunk`` or a
``RemoteTrunk``), used through one session per generation. Each stage keeps its own KV
cache, so no step recomputes the prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ClientClosed, ConfigError, TrunkTimeout
from ..models.cache import KVCache
from ..models.decoding import DecodeState, SamplingConfig
from ..models.stages import BottomStage, TopStage
from ..worker import StageWorker
from ._pipeline_steps import TextDecoder, batch_length, bottom_steps, top_bottom_steps
from ._protocols import Trunk
from ._trunk import TrunkSession

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SplitPipeline", "StreamChunk"]

logger = logging.getLogger(__name__)

#: How long, at most, the pipeline's own worker waits for the decode steps of streams whose
#: trunk call is in flight, so that all streams batch as one. The count it waits for is
#: exact (streams between sending their trunk step and getting their next tokens), so the
#: wait ends as soon as they arrive; this bound only covers a trunk call that is slow.
GATHER_WAIT_S = 0.25


@dataclass(frozen=True)
class StreamChunk:
    """One decode step of :meth:`SplitPipeline.stream`.

    Attributes:
        tokens: ``(B,)`` the new token of every row (``pad_token_id`` once a row finished).
        finished: ``(B,)`` bool, rows that have produced eos (this step included).
        text: Per row, the new text this step adds (with a tokenizer), else ``None``.
    """

    tokens: torch.Tensor
    finished: torch.Tensor
    text: list[str] | None = None


class SplitPipeline:
    """Chains bottom -> trunk -> top into a generation loop.

    Args:
        bottom: The client's :class:`BottomStage`.
        trunk: A ``RemoteTrunk`` or ``LocalTrunk`` (any :class:`~._protocols.Trunk`).
        top: The client's :class:`TopStage`.
        tokenizer: Optional Hugging Face tokenizer, for :meth:`generate_text` and text in
            :meth:`stream`.
        worker: The worker thread for bottom and top; by default the pipeline starts its own
            on first use (batching on, at most 32 streams per call) and stops it in
            :meth:`aclose`. The bottom and top steps of concurrent :meth:`stream` /
            :meth:`generate` calls that are waiting on the worker together run as one
            batched call (each stream keeps its own KV caches); pass
            ``StageWorker(batching=False)`` to run them one by one, or another ``max_batch_size``.
        adapter_id: Generate with this LoRA adapter of the trunk (trained with
            :class:`SplitTrainer` or loaded with ``trunk.load_adapter``); ``None`` uses the
            base weights.
    """

    def __init__(
        self,
        bottom: BottomStage,
        trunk: Trunk,
        top: TopStage,
        tokenizer: Any = None,
        worker: StageWorker | None = None,
        adapter_id: str | None = None,
    ) -> None:
        self.bottom = bottom
        self.trunk = trunk
        self.top = top
        self.tokenizer = tokenizer
        self.adapter_id = adapter_id
        self._worker = worker
        self._owns_worker = worker is None
        # one batch function per stage, so concurrent streams' steps share a worker call
        self._bottom_batch = functools.partial(bottom_steps, bottom)
        self._step_batch = functools.partial(top_bottom_steps, top, bottom)
        self._closed = False
        self._trunk_checked = False
        self._streams = 0  # streams inside their decode loop
        self._stepping = 0  # streams between sending a trunk step and getting their next tokens
        self._expecting = False

    async def _ensure_worker(self) -> StageWorker:
        if self._closed:
            raise ClientClosed("Cannot generate, as the pipeline has been closed.")
        if self._worker is None:
            self._worker = StageWorker(name="splitlearn-client", max_gather_wait_s=GATHER_WAIT_S)
        if not self._expecting:
            # streams whose trunk step is in flight come back to the worker with their next
            # decode step: the worker may wait (max_gather_wait_s) for them so that every
            # stream's step runs in one batch, rather than in groups that alternate forever
            self._worker.expect(lambda: self._stepping)
            self._expecting = True
        if not self._worker.is_running:
            await self._worker.start()
        return self._worker

    async def _check_trunk(self) -> None:
        """Once per pipeline: the trunk must continue the bottom and end where the top starts."""
        if self._trunk_checked:
            return
        info = await self.trunk.info()
        lo, hi = (int(v) for v in info.get("layer_range", (-1, -1)))
        bottom_end, top_start = self.bottom.layer_range[1], self.top.layer_range[0]
        problems: list[str] = []
        if (lo, hi) != (bottom_end, top_start):
            problems.append(
                f"the trunk runs layers [{lo}, {hi}) but the bottom ends at layer {bottom_end} and the top "
                f"starts at layer {top_start}"
            )
        if int(info.get("hidden_size", self.bottom.hidden_size)) != self.bottom.hidden_size:
            problems.append(
                f"the trunk's hidden size is {info.get('hidden_size')}, the bottom's {self.bottom.hidden_size}"
            )
        model_type = info.get("model_type")
        if model_type and model_type != self.bottom.config.model_type:
            problems.append(f"the trunk is a {model_type!r} model, the bottom a {self.bottom.config.model_type!r} one")
        if problems:
            raise ConfigError(
                "The trunk does not fit this pipeline: "
                + "; ".join(problems)
                + ". Serve the trunk of the same bundle and split points as the bottom and top."
            )
        self._trunk_checked = True

    def _defaults(self, eos_token_id: Any, pad_token_id: Any) -> tuple[Any, Any]:
        config = self.bottom.config
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
            if eos_token_id is None:
                eos_token_id = getattr(config, "eos_token_id", None)
        if pad_token_id is None:
            if self.tokenizer is not None:
                pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(config, "pad_token_id", None)
        return eos_token_id, pad_token_id

    async def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Iterable[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Yield a :class:`StreamChunk` per decode step as tokens come.

        Arguments are those of :meth:`generate`. Leaving the iteration early (or cancelling
        the task) closes the trunk session.
        """
        worker = await self._ensure_worker()
        eos, pad = self._defaults(eos_token_id, pad_token_id)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        state = DecodeState(input_ids, attention_mask, max_new_tokens, eos, pad, sampling)
        if state.done:
            return
        caches = (self.bottom.new_cache(state.batch_size), self.top.new_cache(state.batch_size))
        ids, mask, pos = state.prompt_inputs()
        decoder = TextDecoder(self.tokenizer, state.batch_size) if self.tokenizer is not None else None
        await self._check_trunk()
        session = await self.trunk.open_session(adapter_id=self.adapter_id or None)
        self._streams += 1
        try:
            steps = self._decode(worker, session, state, ids, mask, pos, caches, decoder)
            async with session, contextlib.aclosing(steps):
                async for chunk in steps:
                    yield chunk
        finally:
            self._streams -= 1
            for cache in caches:
                cache.release()

    async def _decode(
        self,
        worker: StageWorker,
        session: TrunkSession,
        state: DecodeState,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        caches: tuple[KVCache, KVCache],
        decoder: TextDecoder | None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """The decode loop of :meth:`stream`: bottom -> trunk -> top, one chunk per step.

        After the prompt's bottom step, each step is one trunk call and one client worker
        item that runs the top, picks the next tokens and runs the bottom on them. Every
        stream of the pipeline is at that same point when it reaches the worker, so the
        steps of all streams gather into one batch (a top and a bottom item apart would
        batch as two half-batches that never meet again).
        """
        hidden = await worker.run_batched(
            ("bottom", id(self.bottom), batch_length(ids.shape[1])), (ids, mask, pos, caches[0]), self._bottom_batch
        )  # (B, T, H)
        key = ("step", id(self.top), id(self.bottom))
        while True:
            self._stepping += 1
            try:
                hidden = await session.forward(hidden, mask[:, -ids.shape[1] :], pos)  # (B, T, H)
                result = await worker.run_batched(
                    (*key, batch_length(hidden.shape[1])),
                    (hidden, mask, pos, caches[1], state, caches[0]),
                    self._step_batch,
                )
            finally:
                self._stepping -= 1
            if isinstance(result, Exception):  # this stream failed, the batch did not
                raise result
            ids, mask, pos, next_hidden = result  # the next tokens (B, 1) and their bottom output (B, 1, H)
            tokens = ids[:, 0]
            yield StreamChunk(tokens, ~state.unfinished, decoder.feed(tokens, state) if decoder else None)
            if next_hidden is None:
                return
            hidden = next_hidden

    async def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Iterable[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> torch.Tensor:
        """Generate with Hugging Face semantics; returns ``(B, T + new)`` token ids.

        Args:
            input_ids: ``(B, T)`` prompts, left-padded.
            attention_mask: ``(B, T)``, 1 for real tokens (default all ones).
            max_new_tokens: At most this many new tokens.
            do_sample: Sample (with ``temperature``, ``top_k``, ``top_p``); else greedy.
            eos_token_id: Token id(s) that end a row (default: tokenizer's, else config's).
            pad_token_id: Fills finished rows (default: tokenizer's, else config's, else eos).
            seed: Seed of the sampler; the same seed gives the same tokens.
            timeout_s: Deadline of the whole call; past it the generation is cancelled, its
                trunk session closed, and :class:`TrunkTimeout` raised. ``None``: no deadline
                (each trunk call still has ``ClientConfig.step_timeout_s``).

        Greedy output equals ``model.generate(..., do_sample=False)`` of the unsplit model.

        Raises:
            ValueError: bad arguments (shapes, right padding, sampling settings).
            ConfigError: the trunk's layers or model do not fit the bottom and top.
            TrunkTimeout: ``timeout_s`` passed (or one trunk call its ``step_timeout_s``).
            TrunkError: the trunk failed (see the error tree).
        """
        run = self._generate(
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            pad_token_id,
            seed,
        )
        if timeout_s is None:
            return await run
        # asyncio.wait_for, not an anyio cancel scope: see ``client/_remote_session.py``
        try:
            return await asyncio.wait_for(run, timeout_s)
        except TrunkTimeout:  # a trunk call's own deadline (a TimeoutError too): not this one
            raise
        except asyncio.TimeoutError:
            raise TrunkTimeout(
                f"generate() ran past its deadline of timeout_s={timeout_s} s and was cancelled; "
                "raise timeout_s or lower max_new_tokens."
            ) from None

    async def _generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        eos_token_id: Any,
        pad_token_id: int | None,
        seed: int | None,
    ) -> torch.Tensor:
        steps: list[torch.Tensor] = []
        stream = self.stream(
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            pad_token_id,
            seed,
        )
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                steps.append(chunk.tokens[:, None])
        return torch.cat([input_ids.to("cpu").long(), *steps], dim=1)

    async def generate_text(
        self, prompt: str | Sequence[dict[str, str]], max_new_tokens: int = 128, **kwargs: Any
    ) -> str:
        """Generate an answer to a prompt string or a list of chat messages.

        Chat messages (``[{"role": "user", "content": ...}, ...]``) go through the
        tokenizer's chat template with the generation prompt added. Returns the new text.

        Raises:
            ValueError: the pipeline has no tokenizer.
        """
        input_ids, attention_mask = self.encode(prompt)
        out = await self.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
        return str(self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))

    def encode(self, prompt: str | Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``(1, T)`` of a prompt string or chat messages."""
        if self.tokenizer is None:
            raise ConfigError("this pipeline has no tokenizer; pass tokenizer=... to SplitPipeline to use text.")
        if isinstance(prompt, str):
            enc = self.tokenizer(prompt, return_tensors="pt")
        else:
            enc = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        return enc["input_ids"], enc["attention_mask"]

    async def aclose(self) -> None:
        """Stop the pipeline's own worker (the trunk is closed by its owner)."""
        if not self._closed:
            self._closed = True
            if self._owns_worker and self._worker is not None:
                await self._worker.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
