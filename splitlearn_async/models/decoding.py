"""The decoding loop's books and token choice, with ``model.generate``'s semantics.

:class:`DecodeState` holds one call's :class:`~splitlearn_async.models.generation.ResolvedGeneration`
and does, step by step, what transformers' sampling loop (``GenerationMixin._sample``)
does with the last position's logits: run the logits processors, keep the scores and
logits asked for, pick the next tokens (argmax, or ``torch.multinomial`` over the
softmax), pad finished rows, and ask the stopping criteria which rows are done. It also
tracks the attention mask and the position ids of the next step. It does no model work,
so the in-process loop (:func:`stream_local`) and the async
:class:`~splitlearn_async.client.SplitPipeline` share it.

:class:`RandomDraws` is where a call's samples come from: its own seeded generator, or a
fork of torch's global generator that leaves the global one as ``generate`` would.

Beam search (``num_beams > 1``) has its own state, :class:`~.beams.BeamDecodeState`;
:func:`new_decode_state` makes the one a call's settings ask for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..errors import ConfigError
from .beams import BeamDecodeState
from .generation import ResolvedGeneration, resolve_generation
from .positions import prompt_positions

__all__ = [
    "DecodeState",
    "Decoding",
    "RandomDraws",
    "SamplingConfig",
    "generate_local",
    "new_decode_state",
    "stream_local",
]


@dataclass(frozen=True)
class SamplingConfig:
    """The common sampling settings in one object, checked when made.

    A shorthand for the ``GenerationConfig`` fields of the same names:
    ``pipeline.generate(ids, mask, **sampling.as_kwargs())``.

    Attributes:
        do_sample: Sample from the distribution; otherwise take the argmax (greedy).
        temperature: Divide logits by this (> 0) before sampling.
        top_k: Keep only the ``top_k`` most likely tokens (None: transformers' default).
        top_p: Keep the smallest set of tokens whose probability reaches ``top_p`` (None: all).
        seed: Seed of the call's own generator; None draws from torch's global generator.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}.")

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keywords of ``generate`` (fields left at None are left out)."""
        fields = {"do_sample": self.do_sample, "temperature": self.temperature, "top_k": self.top_k}
        fields.update(top_p=self.top_p, seed=self.seed)
        return {name: value for name, value in fields.items() if value is not None}


class RandomDraws:
    """Where one generation call draws its samples from.

    With a ``seed``, a generator of the call's own: the same seed gives the same tokens,
    whatever runs concurrently, and ``seed=s`` equals ``torch.manual_seed(s)`` before
    ``model.generate``. Without one, torch's global CPU generator, as ``generate`` uses
    it: the call forks the global state when made and moves the global generator on at
    once (so that a call made meanwhile draws other numbers); :meth:`release` then leaves
    the global generator where the call's own draws ended, as if it had drawn from it
    directly, unless something else drew from it in between. So ``torch.manual_seed(s)``
    before a call gives the tokens ``model.generate`` gives after the same seed.

    Make it on the thread that owns the call (the event loop), before any await.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        self._claimed: torch.Tensor | None = None
        if seed is not None:
            self.generator.manual_seed(seed)
            return
        self.generator.set_state(torch.default_generator.get_state())
        torch.randint(0, 2**62, (1,))  # move the global generator on: a concurrent call draws other numbers
        self._claimed = torch.default_generator.get_state()

    def release(self) -> None:
        """Leave torch's global generator where this call's draws ended (seedless calls only; once)."""
        claimed, self._claimed = self._claimed, None
        if claimed is not None and torch.equal(torch.default_generator.get_state(), claimed):
            torch.default_generator.set_state(self.generator.get_state())


class DecodeState:
    """State of one batch being generated, advanced one step at a time.

    Args:
        generation: The call's settings and prompt (:func:`resolve_generation`).
        generator: Where samples come from (a :class:`RandomDraws`' generator); None
            makes a fresh one from ``generation.seed`` (or from a random seed).
    """

    #: Greedy search and sampling never reorder rows (beam search does: :class:`~.beams.BeamDecodeState`).
    beam_idx: torch.Tensor | None = None

    def __init__(self, generation: ResolvedGeneration, generator: torch.Generator | None = None) -> None:
        if generation.num_beams > 1:
            raise ConfigError(
                f"DecodeState runs greedy search and sampling, not num_beams={generation.num_beams}; "
                "make the state with new_decode_state(), which picks BeamDecodeState for beam search."
            )
        self.generation = generation
        self.sequences = generation.input_ids  # (B, T), grows by one column per step
        self.attention_mask = generation.attention_mask
        self.unfinished = torch.ones(self.sequences.shape[0], dtype=torch.bool)
        self.generated = 0
        #: The processed scores and the raw logits of every step, ``(B, V)`` each, when asked for.
        self.scores: list[torch.Tensor] | None = [] if generation.keeps_scores else None
        self.logits: list[torch.Tensor] | None = [] if generation.keeps_logits else None
        if generator is None:  # a generator of its own, seeded by the call or by one draw of the global one
            seed = generation.seed if generation.seed is not None else int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator()
            generator.manual_seed(seed)
        self._generator = generator
        self._pad = generation.pad_token_id
        self._pads_finished = generation.pads_finished_rows
        if self._pads_finished and self._pad is None:
            raise ValueError(
                "a stopping criterion knows eos, so finished rows are padded, but there is no pad_token_id "
                "and no eos_token_id to take it from; pass pad_token_id=..."
            )
        self.eos = generation.eos
        self._last_prompt_position = prompt_positions(self.attention_mask)[:, -1:]  # (B, 1), once

    @property
    def batch_size(self) -> int:
        """Rows being generated (prompts times ``num_return_sequences``)."""
        return int(self.sequences.shape[0])

    @property
    def done(self) -> bool:
        """True once every row is finished (the stopping criteria include the length limit)."""
        return not bool(self.unfinished.any())

    def prompt_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of the prefill, each ``(B, T)``."""
        return self.sequences, self.attention_mask, prompt_positions(self.attention_mask)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token ``(B,)`` of every row from the last position's logits ``(B, V)``.

        As ``generate``: the logits (float32, a copy) go through the logits processors;
        sampling draws with ``torch.multinomial`` from their softmax, greedy takes the argmax.
        """
        raw = logits.detach().to(device="cpu", dtype=torch.float32, copy=True)
        scores = self.generation.logits_processor(cast(torch.LongTensor, self.sequences), raw)
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(raw)
        if self.generation.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=self._generator).squeeze(1)
        return torch.argmax(scores, dim=-1)

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take the next tokens from ``logits`` (B, V) and return the next step's inputs.

        Returns ``(next_ids (B, 1), attention_mask (B, past + 1), position_ids (B, 1))``.
        Finished rows receive ``pad_token_id`` when eos stops rows (their attention mask
        stays 1, as in ``generate``).
        """
        tokens = self.choose(logits)
        if self._pads_finished:
            unfinished = self.unfinished.long()
            tokens = tokens * unfinished + int(self._pad or 0) * (1 - unfinished)
        self.sequences = torch.cat([self.sequences, tokens[:, None]], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones(self.batch_size, 1, dtype=torch.long)], dim=1)
        recorded = tuple(self.scores) if self.scores is not None else None
        self.unfinished &= ~self.generation.stopping_criteria(self.sequences, recorded)
        self.generated += 1
        return tokens[:, None], self.attention_mask, self._last_prompt_position + self.generated


#: The decode state of one call: greedy search and sampling, or beam search.
Decoding = DecodeState | BeamDecodeState


def new_decode_state(generation: ResolvedGeneration, generator: torch.Generator | None = None) -> Decoding:
    """The decode state ``generation`` asks for: a :class:`BeamDecodeState` for ``num_beams > 1``,
    else a :class:`DecodeState`; ``generator`` is where samples come from."""
    if generation.num_beams > 1:
        return BeamDecodeState(generation, generator)
    return DecodeState(generation, generator)


def stream_local(
    bottom: Any,
    trunk: Any,
    top: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    generation_config: Any = None,
    *,
    sampling: SamplingConfig | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Generate in-process through three stages with a KV cache in each, one step at a time.

    Takes ``generate``'s settings (``generation_config`` and keywords, resolved against
    the top stage's ``generation_config``; ``max_new_tokens`` may come positionally, and
    ``sampling`` is a :class:`SamplingConfig`) and yields the ``(B,)`` new tokens of each
    step (``pad_token_id`` for finished rows). This is the synchronous reference loop;
    async applications use ``SplitPipeline``.

    Raises:
        ConfigError: the settings ask for beam search, whose sequences are known only at
            the end (use :func:`generate_local`), or another option the split cannot run.
    """
    for _, ids in _local_steps(
        bottom, trunk, top, input_ids, attention_mask, max_new_tokens, generation_config, sampling, kwargs, True
    ):
        yield ids[:, 0]


def generate_local(
    bottom: Any,
    trunk: Any,
    top: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    generation_config: Any = None,
    *,
    sampling: SamplingConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Like :func:`stream_local`, but returns ``(B * R, T + new)`` token ids as ``model.generate`` does
    (``R = num_return_sequences``), beam search included."""
    last: Decoding | None = None
    for state, _ in _local_steps(
        bottom, trunk, top, input_ids, attention_mask, max_new_tokens, generation_config, sampling, kwargs, False
    ):
        last = state
    if last is None:  # pragma: no cover (generate always makes at least one token)
        raise ValueError("no token was generated.")
    sequences = last.result()[0] if isinstance(last, BeamDecodeState) else last.sequences
    return sequences.to(input_ids.device)


def _local_steps(
    bottom: Any,
    trunk: Any,
    top: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int | None,
    generation_config: Any,
    sampling: SamplingConfig | None,
    kwargs: dict[str, Any],
    streaming: bool,
) -> Iterator[tuple[Decoding, torch.Tensor]]:
    """The loop of :func:`stream_local`: yields the state and the new tokens ``(B, 1)`` of each step.

    With beam search, the caches are reordered by the state's ``beam_idx`` after each step.
    """
    kwargs = {**(sampling.as_kwargs() if sampling is not None else {}), **kwargs}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    draws = RandomDraws(kwargs.get("seed"))
    try:
        generation = resolve_generation(
            top.config, top.generation_config, input_ids, attention_mask, generation_config, **kwargs
        )
        state = new_decode_state(generation, draws.generator)
        if streaming and isinstance(state, BeamDecodeState):
            raise ConfigError(
                "stream_local yields each step's tokens, but beam search picks its sequences only at the end; "
                "use generate_local (transformers' streamers refuse beam search too)."
            )
        caches = [s.new_cache(state.batch_size) for s in (bottom, trunk, top)]
        ids, mask, pos = state.prompt_inputs()
        try:
            while not state.done:
                with torch.no_grad():
                    hidden = bottom(
                        ids.to(bottom.device), mask.to(bottom.device), pos.to(bottom.device), cache=caches[0]
                    )
                    hidden = trunk(
                        hidden.to(trunk.device), mask.to(trunk.device), pos.to(trunk.device), cache=caches[1]
                    )
                    logits = top(
                        hidden.to(top.device),
                        mask.to(top.device),
                        pos.to(top.device),
                        cache=caches[2],
                        logits_to_keep=1,
                    )  # (B, 1, V)
                ids, mask, pos = state.advance(logits[:, -1])  # (B, 1) tokens
                if state.beam_idx is not None and not state.done:
                    for cache in caches:
                        cache.reorder(state.beam_idx)  # each row continues its parent beam
                yield state, ids
        finally:
            for cache in caches:
                cache.release()
    finally:
        draws.release()
