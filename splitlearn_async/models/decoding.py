"""Token selection and bookkeeping of a generation loop, with ``generate``'s semantics.

:class:`DecodeState` tracks the running attention mask, position ids, finished rows and
the output, and picks each next token (greedy, or sampling with temperature, top-k and
top-p from a seeded generator). It does no model work, so the in-process loop
(:func:`stream_local`) and the async :class:`~splitlearn_async.client.SplitPipeline`
share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from splitlearn_async.errors import ConfigError

from .positions import prompt_positions

__all__ = ["DecodeState", "SamplingConfig", "generate_local", "stream_local"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        do_sample: Sample from the distribution; otherwise take the argmax (greedy).
        temperature: Divide logits by this (> 0) before sampling.
        top_k: Keep only the ``top_k`` most likely tokens (None: all).
        top_p: Keep the smallest set of tokens whose probability reaches ``top_p`` (None: all).
        seed: Seed of the sampling generator; the same seed gives the same tokens.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ConfigError(f"top_k must be a positive integer or None, got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] or None, got {self.top_p!r}.")


def _eos_set(eos_token_id: int | Iterable[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


class DecodeState:
    """State of one batch being generated.

    Args:
        input_ids: ``(B, T)`` prompt, left-padded.
        attention_mask: ``(B, T)``, 1 for real tokens (default: all ones).
        max_new_tokens: Stop after this many new tokens.
        eos_token_id: Token id(s) that finish a row.
        pad_token_id: Written into finished rows (default: the first eos id, as ``generate``).
        sampling: A :class:`SamplingConfig`.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None = None,
        pad_token_id: int | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ConfigError(
                f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}."
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}."
            )
        if bool((attention_mask[:, -1] == 0).any()):
            raise ConfigError(
                "the last column of attention_mask has padding: pad prompts on the left "
                "(tokenizer.padding_side = 'left') for generation."
            )
        self.eos = _eos_set(eos_token_id)
        if pad_token_id is None:
            pad_token_id = self.eos[0] if self.eos else 0
        self.pad_token_id = int(pad_token_id)
        self.sampling = sampling or SamplingConfig()
        self.max_new_tokens = max_new_tokens
        self.sequences = input_ids.to("cpu").long()
        self.attention_mask = attention_mask.to("cpu").long()
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
        self.generated = 0
        self._generator: torch.Generator | None = None
        if self.sampling.do_sample:
            self._generator = torch.Generator()
            self._generator.manual_seed(self.sampling.seed if self.sampling.seed is not None else torch.seed())
        self._eos_tensor = torch.tensor(self.eos, dtype=torch.long) if self.eos else None
        self._last_prompt_position = prompt_positions(self.attention_mask)[:, -1:]  # (B, 1), once

    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0])

    def prompt_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of the prefill, each ``(B, T)``."""
        return self.sequences, self.attention_mask, prompt_positions(self.attention_mask)

    @property
    def done(self) -> bool:
        return self.generated >= self.max_new_tokens or not bool(self.unfinished.any())

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token of every row from the last-position logits ``(B, V)``."""
        scores = logits.detach().to("cpu", torch.float32)
        if not self.sampling.do_sample:
            return scores.argmax(dim=-1)
        s = self.sampling
        scores = scores / s.temperature
        if s.top_k is not None:
            k = min(s.top_k, scores.shape[-1])
            kth = torch.topk(scores, k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p is not None and s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cum - sorted_scores.softmax(dim=-1) >= s.top_p  # keep the token that crosses top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(1)

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take the next tokens from ``logits`` (B, V) and return the next step's inputs.

        Returns ``(next_ids (B, 1), attention_mask (B, past + 1), position_ids (B, 1))``.
        Finished rows receive ``pad_token_id`` (their attention mask stays 1, as in ``generate``).
        """
        tokens = self.choose(logits)
        tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, self.pad_token_id))
        self.sequences = torch.cat([self.sequences, tokens[:, None]], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones(self.batch_size, 1, dtype=torch.long)], dim=1)
        if self._eos_tensor is not None:
            self.unfinished &= ~torch.isin(tokens, self._eos_tensor)
        self.generated += 1
        positions = self._next_positions()
        return tokens[:, None], self.attention_mask, positions

    def _next_positions(self) -> torch.Tensor:
        # generate continues every row with last position + 1
        return self._last_prompt_position + self.generated


def stream_local(
    bottom: Any,
    trunk: Any,
    top: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    sampling: SamplingConfig | None = None,
) -> Iterator[torch.Tensor]:
    """Generate in-process through three stages with a KV cache in each, one step at a time.

    Yields the ``(B,)`` new tokens of each step (``pad_token_id`` for finished rows).
    This is the synchronous reference loop; async applications use ``SplitPipeline``.
    """
    state = DecodeState(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, sampling)
    caches = [s.new_cache(state.batch_size) for s in (bottom, trunk, top)]
    ids, mask, pos = state.prompt_inputs()
    try:
        while not state.done:
            with torch.no_grad():
                hidden = bottom(ids.to(bottom.device), mask.to(bottom.device), pos.to(bottom.device), cache=caches[0])
                hidden = trunk(hidden.to(trunk.device), mask.to(trunk.device), pos.to(trunk.device), cache=caches[1])
                logits = top(
                    hidden.to(top.device), mask.to(top.device), pos.to(top.device), cache=caches[2], logits_to_keep=1
                )  # (B, 1, V)
            ids, mask, pos = state.advance(logits[:, -1])  # (B, 1) tokens
            yield ids[:, 0]
    finally:
        for cache in caches:
            cache.release()


def generate_local(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Like :func:`stream_local`, but returns ``(B, T + new)`` token ids as ``model.generate`` does."""
    input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[3]
    steps = [tokens[:, None] for tokens in stream_local(*args, **kwargs)]
    return torch.cat([input_ids.to("cpu").long(), *steps], dim=1)
