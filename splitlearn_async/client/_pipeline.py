"""``SplitPipeline``: bottom -> trunk -> top generation for async applications.

Bottom and top run on the client's :class:`~splitlearn_async.worker.StageWorker` thread,
never on the event loop; the trunk is any :class:`~._protocols.Trunk` (a ``LocalTrunk`` or a
``RemoteTrunk``), used through one session per generation. Each stage keeps its own KV
cache, so no step recomputes the prefix. A call's settings, streamer and output are
:class:`~._generation.GenerationCall`'s; they resolve as ``model.generate`` resolves them
(see ``docs/generation.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.configuration_utils import GenerationConfig

from ..errors import ClientClosed, ConfigError, TrunkTimeout
from ..models.cache import KVCache
from ..models.decoding import Decoding
from ..models.stages import BottomStage, TopStage
from ..worker import StageWorker
from ._defenses import Defense, check_defense
from ._generation import GenerationCall
from ._pipeline_steps import StepTimings, StreamChunk, TextDecoder, batch_length, bottom_steps, top_bottom_steps
from ._protocols import Trunk
from ._trunk import TrunkSession

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SplitPipeline", "StepTimings", "StreamChunk"]

logger = logging.getLogger(__name__)

#: How long, at most, the pipeline's own worker waits for the decode steps of streams whose
#: trunk call is in flight, so that all streams batch as one. The count it waits for is
#: exact (streams between sending their trunk step and getting their next tokens), so the
#: wait ends as soon as they arrive; this bound only covers a trunk call that is slow.
GATHER_WAIT_S = 0.25


class SplitPipeline:
    """Chains bottom -> trunk -> top into a generation loop.

    Args:
        bottom: The client's :class:`BottomStage`.
        trunk: A ``RemoteTrunk`` or ``LocalTrunk`` (any :class:`~._protocols.Trunk`).
        top: The client's :class:`TopStage`.
        tokenizer: Optional Hugging Face tokenizer, for :meth:`generate_text`, text in
            :meth:`stream` and ``stop_strings``.
        worker: The worker thread for bottom and top; by default the pipeline starts its own
            on first use (batching on, at most 32 streams per call) and stops it in
            :meth:`aclose`. The bottom and top steps of concurrent :meth:`stream` /
            :meth:`generate` calls that are waiting on the worker together run as one
            batched call (each stream keeps its own KV caches); pass
            ``StageWorker(batching=False)`` to run them one by one, or another ``max_batch_size``.
        adapter_id: Generate with this LoRA adapter of the trunk (trained with
            :class:`SplitTrainer` or loaded with ``trunk.load_adapter``); ``None`` uses the
            base weights.
        defense: Applied to the bottom's output before every trunk call (prompt and decode
            steps), e.g. ``GaussianNoise(sigma)`` or ``DChiNoise(eta)`` (``_defenses.py``);
            ``None`` (the default) sends the bottom's output unchanged.

    Raises:
        ArgumentError: ``defense`` is not callable.
    """

    def __init__(
        self,
        bottom: BottomStage,
        trunk: Trunk,
        top: TopStage,
        tokenizer: Any = None,
        worker: StageWorker | None = None,
        adapter_id: str | None = None,
        defense: Defense | None = None,
    ) -> None:
        self.bottom = bottom
        self.trunk = trunk
        self.top = top
        self.tokenizer = tokenizer
        self.adapter_id = adapter_id
        self.defense = check_defense(defense)
        self._worker = worker
        self._owns_worker = worker is None
        # one batch function per stage, so concurrent streams' steps share a worker call
        self._bottom_batch = functools.partial(bottom_steps, bottom, self.defense)
        self._step_batch = functools.partial(top_bottom_steps, top, bottom, self.defense)
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

    async def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Yield a :class:`StreamChunk` per decode step as tokens come.

        Takes the arguments of :meth:`generate` (``timeout_s`` aside: stop iterating to
        stop). Leaving the iteration early (or cancelling the task) closes the trunk
        session. Beam search is refused with :class:`ConfigError` (its sequences are
        known only at the end, and ``generate`` refuses a streamer with beams too).
        """
        # forks the global generator now, as generate draws from it
        call = GenerationCall(kwargs, self.tokenizer, streaming=True)
        try:
            steps = self._steps(call, input_ids, attention_mask, generation_config)
            async with contextlib.aclosing(steps):
                async for chunk in steps:
                    yield chunk
        finally:
            call.finish()

    async def _steps(
        self,
        call: GenerationCall,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generation_config: GenerationConfig | None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """One call's generation: settings resolved on the worker, then the decode loop."""
        worker = await self._ensure_worker()
        generation = await worker.run(call.resolve, self.top, input_ids, attention_mask, generation_config)
        state = call.begin(generation)
        streams_text = self.tokenizer is not None and call.streaming  # generate() has no use for the text
        decoder = TextDecoder(self.tokenizer, state.batch_size) if streams_text else None
        await self._check_trunk()
        session = await self.trunk.open_session(adapter_id=self.adapter_id or None)
        caches = (self.bottom.new_cache(state.batch_size), self.top.new_cache(state.batch_size))
        self._streams += 1
        try:
            steps = self._decode(worker, session, state, caches, decoder)
            async with session, contextlib.aclosing(steps):
                async for chunk in steps:
                    call.put(chunk.tokens)
                    yield chunk
        finally:
            self._streams -= 1
            for cache in caches:
                cache.release()

    async def _decode(
        self,
        worker: StageWorker,
        session: TrunkSession,
        state: Decoding,
        caches: tuple[KVCache, KVCache],
        decoder: TextDecoder | None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """The decode loop of :meth:`stream`: bottom -> trunk -> top, one chunk per step.

        After the prompt's bottom step, each step is one trunk call and one client worker
        item that runs the top, picks the next tokens and runs the bottom on them. Every
        stream of the pipeline is at that same point when it reaches the worker, so the
        steps of all streams gather into one batch (a top and a bottom item apart would
        batch as two half-batches that never meet again). In beam search, that item
        reorders the bottom's and the top's caches by the state's ``beam_idx``, and the
        next trunk step carries it, so the trunk reorders its cache before that step.
        """
        ids, mask, pos = state.prompt_inputs()  # (B, T) each
        # the keys name the batch functions' stages and defense: only equal ones batch together
        started = time.perf_counter()
        first = await worker.run_batched(
            ("bottom", id(self.bottom), id(self.defense), batch_length(ids.shape[1])),
            (ids, mask, pos, caches[0]),
            self._bottom_batch,
        )
        bottom_s = time.perf_counter() - started
        if isinstance(first, Exception):  # the defense failed for this stream
            raise first
        hidden: torch.Tensor = first  # (B, T, H)
        key = ("step", id(self.top), id(self.bottom), id(self.defense))
        while True:
            self._stepping += 1
            try:
                reorder = {} if state.beam_idx is None else {"beam_idx": state.beam_idx}  # (B * K,)
                sent, received = getattr(session, "bytes_sent", 0), getattr(session, "bytes_received", 0)
                started = time.perf_counter()
                hidden = await session.forward(hidden, mask[:, -ids.shape[1] :], pos, **reorder)  # (B, T, H)
                trunk_s = time.perf_counter() - started
                sent = getattr(session, "bytes_sent", 0) - sent
                received = getattr(session, "bytes_received", 0) - received
                result = await worker.run_batched(
                    (*key, batch_length(hidden.shape[1])),
                    (hidden, mask, pos, caches[1], state, caches[0]),
                    self._step_batch,
                )
            finally:
                self._stepping -= 1
            if isinstance(result, Exception):  # this stream failed, the batch did not
                raise result
            ids, mask, pos, next_hidden, (top_s, next_bottom_s) = result  # next tokens (B, 1), their bottom output
            tokens = ids[:, 0]
            timings = StepTimings(bottom_s, trunk_s, top_s, sent, received)
            yield StreamChunk(tokens, ~state.unfinished, decoder.feed(tokens, state) if decoder else None, timings)
            if next_hidden is None:
                return
            hidden, bottom_s = next_hidden, next_bottom_s

    async def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate as ``model.generate`` of the unsplit model does, token for token.

        Settings resolve as in ``model.generate``: keywords override
        ``generation_config``, which overrides the model's own (the top stage's
        ``generation_config``, kept by :func:`split_model` and the bundles), which
        overrides transformers' defaults. Every ``GenerationConfig`` field of greedy search
        and sampling works, through transformers' own logits processors and stopping
        criteria: ``max_new_tokens``/``max_length``, ``min_new_tokens``/``min_length``,
        ``eos_token_id`` (an int or a list; ``None`` explicitly: no eos),
        ``pad_token_id`` (default: the first eos, with transformers' warning),
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``,
        ``suppress_tokens``, ``stop_strings``, ``num_return_sequences``,
        ``return_dict_in_generate`` with ``output_scores``/``output_logits``, ...
        Beam search too: ``num_beams`` > 1 with ``length_penalty``, ``early_stopping``
        and ``num_return_sequences``, ``do_sample=True`` for beam sampling (every stage's
        KV cache, the trunk's on the server included, is reordered after each step).

        Args:
            input_ids: ``(B, T)`` prompts, left-padded.
            attention_mask: ``(B, T)``, 1 for real tokens (default: inferred from
                ``pad_token_id`` as ``generate`` does, else all ones).
            generation_config: A ``transformers.GenerationConfig`` for this call.
            timeout_s: Deadline of the whole call; past it the generation is cancelled, its
                trunk session closed, and :class:`TrunkTimeout` raised. ``None``: no deadline
                (each trunk call still has ``ClientConfig.step_timeout_s``).
            **kwargs: ``GenerationConfig`` fields, and as in ``generate``:
                ``logits_processor`` (a ``LogitsProcessorList``), ``stopping_criteria``
                (a ``StoppingCriteriaList``), ``prefix_allowed_tokens_fn``, ``streamer``
                (anything with ``put(token_ids)`` and ``end()``: ``TextStreamer``,
                ``TextIteratorStreamer``, ...; ended even if the call fails),
                ``tokenizer`` (for ``stop_strings``; default: the pipeline's); and
                ``seed``: the call's own sampler seed, so that concurrent calls are
                reproducible (``seed=s`` equals ``torch.manual_seed(s)`` before
                ``model.generate``). Without a seed, sampling draws from torch's global
                generator, as ``generate`` does: ``torch.manual_seed(s)`` before the call
                gives ``generate``'s tokens after the same seed.

        Returns:
            ``(B * num_return_sequences, T + new)`` token ids on ``input_ids``'s device,
            or with ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput``
            (``sequences``; ``scores`` and ``logits`` when asked for, on the CPU); for
            beam search a ``GenerateBeamDecoderOnlyOutput``, which adds ``beam_indices``
            and, with ``output_scores``, ``sequences_scores``.

        Raises:
            ConfigError: an option a split model cannot run yet (assisted, contrastive or
                constrained decoding, ``output_attentions``, a streamer with beam search,
                ...), or an unknown keyword; the message names it and the fix. Also the
                trunk's layers or model do not fit the bottom and top.
            ValueError: bad prompts (shape, right padding) or settings transformers
                refuses (its own message).
            TrunkTimeout: ``timeout_s`` passed (or one trunk call its ``step_timeout_s``).
            TrunkError: the trunk failed (see the error tree).
        """
        call = GenerationCall(kwargs, self.tokenizer)  # forks the global generator now, as generate draws from it
        run = self._collect(call, input_ids, attention_mask, generation_config)
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

    async def _collect(
        self,
        call: GenerationCall,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generation_config: GenerationConfig | None,
    ) -> Any:
        try:
            steps = self._steps(call, input_ids, attention_mask, generation_config)
            async with contextlib.aclosing(steps):
                async for _ in steps:
                    pass
        finally:
            call.finish()
        return call.output(input_ids.device)

    async def generate_text(
        self, prompt: str | Sequence[dict[str, str]], max_new_tokens: int = 128, **kwargs: Any
    ) -> str:
        """Generate an answer to a prompt string or a list of chat messages.

        Chat messages (``[{"role": "user", "content": ...}, ...]``) go through the
        tokenizer's chat template with the generation prompt added. ``kwargs`` are those
        of :meth:`generate`. Returns the new text of the first sequence.

        Raises:
            ValueError: the pipeline has no tokenizer.
        """
        input_ids, attention_mask = self.encode(prompt)
        out = await self.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return str(self.tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True))

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
