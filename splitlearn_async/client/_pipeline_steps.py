"""The decode step of :class:`SplitPipeline`, as run on the client's worker thread.

Every stream of a pipeline reaches the worker at the same point of its step, so the
steps of all streams gather into one batch: :func:`bottom_steps` runs the prompts'
bottom, :func:`top_bottom_steps` one decode step (top, next tokens, bottom). Each stream
keeps its own KV caches; a failure of one stream fails that stream only. In beam search,
a stream's bottom and top caches are reordered by its new ``beam_idx`` between its
choice and the bottom. A pipeline's defense (``_defenses.py``), if any, is applied to each
stream's bottom output here, before it goes to the trunk.
:class:`TextDecoder` turns the tokens into text on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..models.cache import KVCache
from ..models.decoding import Decoding
from ..models.stages import BottomStage, TopStage, run_stage_batched
from ._defenses import Defense

__all__ = [
    "BottomCall",
    "StepCall",
    "StepResult",
    "StepTimings",
    "StreamChunk",
    "TextDecoder",
    "batch_length",
    "bottom_steps",
    "top_bottom_steps",
]


@dataclass(frozen=True)
class StepTimings:
    """Where one token's time went, and what crossed the wire for it.

    The token's hidden states went bottom -> trunk -> top: ``bottom_s`` is the bottom call
    that made them (the prompt's, for the first token; that call's time, queueing for the
    worker included), ``trunk_s`` the trunk call as the client waited for it (network,
    server queue and compute), ``top_s`` the top call that turned them into this token.
    Bottom and top calls are batched over the pipeline's streams: their time is the
    batched call's. Bytes are the trunk message and its reply (0 for an in-process trunk).
    """

    bottom_s: float
    trunk_s: float
    top_s: float
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class StreamChunk:
    """One decode step of :meth:`SplitPipeline.stream`.

    Attributes:
        tokens: ``(B,)`` the new token of every row (``pad_token_id`` once a row finished);
            ``B`` counts every returned sequence (prompts times ``num_return_sequences``).
        finished: ``(B,)`` bool, rows that have produced eos (this step included).
        text: Per row, the new text this step adds (with a tokenizer), else ``None``.
        timings: Where this step's time went (:class:`StepTimings`).
    """

    tokens: torch.Tensor
    finished: torch.Tensor
    text: list[str] | None = None
    timings: StepTimings | None = None


def batch_length(tokens: int) -> int | str:
    """The part of a batch key that keeps one-token decode steps apart from prompts.

    Prompts of different lengths batch together (left-padded by ``run_stage_batched``);
    a decode step must not, as it would pay for the longest prompt's length.
    """
    return tokens if tokens == 1 else "prompt"


#: A bottom step of one stream: ``(ids (B_i, T), mask (B_i, T_all), positions (B_i, T), bottom cache)``.
BottomCall = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, KVCache]
#: A decode step of one stream: ``(hidden (B_i, T, H), mask, positions, top cache, state, bottom cache)``.
StepCall = tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache, Decoding, KVCache]
#: Its outcome: ``(ids (B_i, 1), mask, positions, hidden (B_i, 1, H) or None when the stream
#: is done, (seconds in the top, seconds in the bottom))``: the times of the batched calls.
StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[float, float]]


def bottom_steps(
    bottom: BottomStage, defense: Defense | None, calls: list[BottomCall]
) -> list[torch.Tensor | Exception]:
    """(worker) The bottom steps of several streams in one call.

    Returns each stream's hidden states ``(B_i, T, H)``, through ``defense`` if there is one
    (or the exception the defense raised for that stream). Raises only if the bottom call
    failed as a whole, and then no cache has advanced (the worker retries each stream alone).
    """
    hidden: list[torch.Tensor | Exception] = [*run_stage_batched(bottom, calls)]
    return hidden if defense is None else [_defended(defense, h) for h in hidden]


def _defended(defense: Defense, hidden: torch.Tensor | Exception) -> torch.Tensor | Exception:
    """(worker) ``defense(hidden)``, or the exception it raised: the caches have advanced, so it must not escape."""
    if isinstance(hidden, Exception):
        return hidden
    try:
        return defense(hidden)
    except Exception as exc:
        return exc


def top_bottom_steps(
    top: TopStage, bottom: BottomStage, defense: Defense | None, calls: list[StepCall]
) -> list[StepResult | Exception]:
    """(worker) One decode step of several streams: top, next tokens, bottom (then ``defense``), in one worker item.

    Returns per stream its :data:`StepResult` or the exception that stream raised. Raises
    only if the top call itself failed (then no cache has advanced); once the top's caches
    have advanced, nothing may make the worker run the batch again, so later failures are
    per stream.
    """
    started = time.perf_counter()
    logits = run_stage_batched(top, [call[:4] for call in calls], logits_to_keep=1)  # each (B_i, 1, V)
    top_s = time.perf_counter() - started
    results: list[StepResult | Exception] = []
    waiting: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (stream, its next ids, mask, positions)
    bottom_calls: list[BottomCall] = []
    for k, ((_, _, _, top_cache, state, bottom_cache), rows) in enumerate(zip(calls, logits, strict=True)):
        try:
            ids, mask, pos = state.advance(rows[:, -1])
            if state.beam_idx is not None and not state.done:  # each row continues its parent beam
                top_cache.reorder(state.beam_idx)
                bottom_cache.reorder(state.beam_idx)
        except Exception as exc:
            results.append(exc)
            continue
        results.append((ids, mask, pos, None, (top_s, 0.0)))
        if not state.done:
            waiting.append((k, ids, mask, pos))
            bottom_calls.append((ids, mask, pos, bottom_cache))
    if bottom_calls:
        started = time.perf_counter()
        hidden = _bottom_steps_alone_on_failure(bottom, bottom_calls)
        bottom_s = time.perf_counter() - started
        for (k, ids, mask, pos), h in zip(waiting, hidden, strict=True):
            h = h if defense is None else _defended(defense, h)
            results[k] = h if isinstance(h, Exception) else (ids, mask, pos, h, (top_s, bottom_s))  # h: (B_i, 1, H)
    return results


def _bottom_steps_alone_on_failure(bottom: BottomStage, calls: list[BottomCall]) -> list[torch.Tensor | Exception]:
    """(worker) The bottom steps in one call; if that fails, each alone, to find the stream that fails."""
    try:
        return [*run_stage_batched(bottom, calls)]
    except Exception:  # no bottom cache advanced: run each alone
        hidden: list[torch.Tensor | Exception] = []
        for call in calls:
            try:
                hidden.append(run_stage_batched(bottom, [call])[0])
            except Exception as exc:
                hidden.append(exc)
        return hidden


class TextDecoder:
    """Turns each row's growing token list into new text pieces (multi-byte safe)."""

    def __init__(self, tokenizer: Any, batch: int) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.shown = [""] * batch

    def feed(self, tokens: torch.Tensor, state: Decoding) -> list[str]:
        """Each row's new text after its token in ``tokens (B,)``: ``""`` once the row has
        finished, or while a multi-byte character is incomplete."""
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
            pieces.append(text[len(self.shown[row]) :])
            self.shown[row] = text
        return pieces
