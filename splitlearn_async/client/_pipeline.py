"""``SplitPipeline``: bottom -> trunk -> top generation for async applications.

Bottom and top run on the client's :class:`~splitlearn_async.worker.StageWorker` thread,
never on the event loop; the trunk is a ``LocalTrunk`` or a ``RemoteTrunk`` session. Each
stage keeps its own KV cache, so no step recomputes the prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Sequence

import torch

from ..errors import ClientClosed, ConfigError, TrunkTimeout
from ..models.decoding import DecodeState, SamplingConfig
from ..models.stages import run_stage, run_stage_batched
from ..worker import StageWorker

__all__ = ["SplitPipeline", "StreamChunk"]

logger = logging.getLogger(__name__)

#: How long the pipeline's own worker waits for the steps of running streams to batch.
_GATHER_WAIT_S = 0.01


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
        trunk: A ``RemoteTrunk`` or ``LocalTrunk`` (anything with ``open_session()``).
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
        bottom: Any,
        trunk: Any,
        top: Any,
        tokenizer: Any = None,
        worker: StageWorker | None = None,
        adapter_id: str | None = None,
    ):
        self.bottom = bottom
        self.trunk = trunk
        self.top = top
        self.tokenizer = tokenizer
        self.adapter_id = adapter_id
        self._worker = worker
        self._owns_worker = worker is None
        # one batch function per stage, so concurrent streams' steps share a worker call
        self._bottom_batch = functools.partial(_bottom_steps, bottom)
        self._top_batch = functools.partial(_top_steps, top)
        self._closed = False
        self._trunk_checked = False
        self._streams = 0  # streams inside their decode loop
        self._expecting = False

    async def _ensure_worker(self) -> StageWorker:
        if self._closed:
            raise ClientClosed("Cannot generate, as the pipeline has been closed.")
        if self._worker is None:
            self._worker = StageWorker(name="splitlearn-client", max_gather_wait_s=_GATHER_WAIT_S)
        if not self._expecting:
            # running streams send their next bottom/top step within milliseconds of each
            # other: the worker may wait (max_gather_wait_s) for them to batch together
            self._worker.expect(lambda: self._streams)
            self._expecting = True
        if not self._worker.is_running:
            await self._worker.start()
        return self._worker

    async def _check_trunk(self) -> None:
        """Once per pipeline: the trunk must continue the bottom and end where the top starts."""
        if self._trunk_checked or not hasattr(self.trunk, "info"):
            return
        info = await self.trunk.info()
        lo, hi = (int(v) for v in info.get("layer_range", (-1, -1)))
        bottom_end, top_start = self.bottom.layer_range[1], self.top.layer_range[0]
        problems = []
        if (lo, hi) != (bottom_end, top_start):
            problems.append(
                f"the trunk runs layers [{lo}, {hi}) but the bottom ends at layer {bottom_end} and the top "
                f"starts at layer {top_start}"
            )
        if int(info.get("hidden_size", self.bottom.hidden_size)) != self.bottom.hidden_size:
            problems.append(f"the trunk's hidden size is {info.get('hidden_size')}, the bottom's {self.bottom.hidden_size}")
        model_type = info.get("model_type")
        if model_type and model_type != self.bottom.config.model_type:
            problems.append(f"the trunk is a {model_type!r} model, the bottom a {self.bottom.config.model_type!r} one")
        if problems:
            raise ConfigError(
                "The trunk does not fit this pipeline: " + "; ".join(problems)
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
    ) -> AsyncIterator[StreamChunk]:
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
        decoder = _TextDecoder(self.tokenizer, state.batch_size) if self.tokenizer is not None else None
        await self._check_trunk()
        session = await (self.trunk.open_session(adapter_id=self.adapter_id) if self.adapter_id else self.trunk.open_session())
        self._streams += 1
        try:
            steps = self._decode(worker, session, state, ids, mask, pos, caches, decoder)
            async with session, contextlib.aclosing(steps):
                async for chunk in steps:
                    yield chunk
        finally:
            self._streams -= 1

    async def _decode(
        self, worker: StageWorker, session: Any, state: DecodeState, ids: torch.Tensor, mask: torch.Tensor,
        pos: torch.Tensor, caches: tuple[Any, Any], decoder: _TextDecoder | None,
    ) -> AsyncIterator[StreamChunk]:
        """The decode loop of :meth:`stream`: bottom -> trunk -> top, one chunk per step."""
        while not state.done:
            new_mask = mask[:, -ids.shape[1]:]
            # bottom and top steps of concurrent streams with as many new tokens batch together
            hidden = await worker.run_batched(
                ("bottom", id(self.bottom), ids.shape[1]), (ids, mask, pos, caches[0]), self._bottom_batch
            )  # (B, T, H)
            hidden = await session.forward(hidden, new_mask, pos)  # (B, T, H)
            chosen = await worker.run_batched(
                ("top", id(self.top), hidden.shape[1]), (hidden, mask, pos, caches[1], state), self._top_batch
            )
            if isinstance(chosen, Exception):  # this stream failed, the batch did not
                raise chosen
            ids, mask, pos = chosen
            tokens = ids[:, 0]
            yield StreamChunk(tokens, ~state.unfinished, decoder.feed(tokens, state) if decoder else None)

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
            TrunkTimeout: ``timeout_s`` passed.
            TrunkError: the trunk failed (see the error tree).
        """
        run = self._generate(
            input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
            eos_token_id, pad_token_id, seed,
        )
        if timeout_s is None:
            return await run
        try:
            return await asyncio.wait_for(run, timeout_s)
        except asyncio.TimeoutError:
            raise TrunkTimeout(
                f"generate() ran past its deadline of timeout_s={timeout_s} s and was cancelled; "
                "raise timeout_s or lower max_new_tokens."
            ) from None

    async def _generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, do_sample: bool,
        temperature: float, top_k: int | None, top_p: float | None, eos_token_id: Any, pad_token_id: int | None,
        seed: int | None,
    ) -> torch.Tensor:
        steps: list[torch.Tensor] = []
        stream = self.stream(
            input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
            eos_token_id, pad_token_id, seed,
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
        return str(self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))

    def encode(self, prompt: str | Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``(1, T)`` of a prompt string or chat messages."""
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer; pass tokenizer=... to SplitPipeline to use text.")
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

    async def __aenter__(self) -> "SplitPipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _bottom_steps(bottom: Any, calls: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    """(worker) The bottom steps ``(ids (B_i, T), mask, positions, cache)`` of several streams in one call.

    Returns each stream's hidden states ``(B_i, T, H)``. Raises only if the call failed as a
    whole, and then no cache has advanced (the worker retries each stream alone).
    """
    return run_stage_batched(bottom, calls)


def _top_steps(
    top: Any, calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, DecodeState]]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | Exception]:
    """(worker) The top steps of several streams in one call, then each stream's next tokens.

    Each call is ``(hidden (B_i, T, H), mask, positions, cache, state)``. Returns per stream
    what :meth:`DecodeState.advance` returns, or the exception it raised: once the top's
    caches have advanced, nothing may make the worker run the batch again.
    """
    logits = run_stage_batched(top, [call[:4] for call in calls])  # each (B_i, T, V)
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | Exception] = []
    for (_, _, _, _, state), rows in zip(calls, logits):
        try:
            results.append(state.advance(rows[:, -1]))
        except Exception as exc:
            results.append(exc)
    return results


class _TextDecoder:
    """Turns each row's growing token list into new text pieces (multi-byte safe)."""

    def __init__(self, tokenizer: Any, batch: int) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.shown = [""] * batch

    def feed(self, tokens: torch.Tensor, state: DecodeState) -> list[str]:
        pieces = []
        for row, token in enumerate(tokens.tolist()):
            if token in state.eos or (self.tokens[row] and self.tokens[row][-1] in state.eos):
                pieces.append("")
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
                pieces.append("")
                continue
            pieces.append(text[len(self.shown[row]):])
            self.shown[row] = text
        return pieces
