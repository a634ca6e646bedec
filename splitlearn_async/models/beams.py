"""Beam search's books, kept by transformers' own vectorised bookkeeping.

:class:`BeamDecodeState` is :class:`~.decoding.DecodeState`'s counterpart for
``num_beams > 1``: it holds one call's
:class:`~splitlearn_async.models.generation.ResolvedGeneration` and does, step by step,
what ``GenerationMixin._beam_search`` does with the last position's logits. The
bookkeeping is transformers' own, run on the config-only host that resolved the call
(``_get_top_k_continuations``, ``_get_running_beams_for_next_iteration``,
``_update_finished_beams``, ``_check_early_stop_heuristic``,
``_beam_search_has_unfinished_sequences``), so ``length_penalty``, ``early_stopping``
and ``num_return_sequences`` mean what they mean in ``generate``.

After each step, :attr:`BeamDecodeState.beam_idx` ``(B * K,)`` says which row each new
row continues: every stage's KV cache is reordered by it
(:meth:`~splitlearn_async.models.cache.KVCache.reorder`) before the new tokens run.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers.generation.utils import GenerationMixin

from .generation import ResolvedGeneration
from .positions import prompt_positions

__all__ = ["BeamDecodeState", "BeamResult"]

#: What ``_beam_search`` returns: ``(sequences (B * R, T + n), sequences_scores (B * R,),
#: beam_indices (B * R, n))`` for the best ``R = num_return_sequences`` hypotheses of each prompt.
BeamResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BeamDecodeState:
    """State of one beam search over ``B`` prompts with ``K`` beams each, advanced step by step.

    The rows are the prompts' beams, ``B * K`` of them (the prompt repeated ``K`` times,
    as ``generate`` expands it), and every stage computes all of them at each step.

    Args:
        generation: The call's settings and prompt (``num_beams > 1``).
        generator: Where beam sampling (``do_sample=True``) draws from (a
            :class:`~.decoding.RandomDraws`' generator); None makes a fresh one.
    """

    def __init__(self, generation: ResolvedGeneration, generator: torch.Generator | None = None) -> None:
        config = generation.config
        self.generation = generation
        self.num_beams = beams = generation.num_beams
        rows, self.prompt_length = (int(n) for n in generation.input_ids.shape)
        self.prompts = prompts = rows // beams
        self.max_length = int(config.max_length)
        self.attention_mask = generation.attention_mask  # (B * K, past), grows by one column per step
        self.generated = 0
        #: The processed log-probabilities and the raw logits of every step, ``(B * K, V)`` each, when asked for.
        self.scores: list[torch.Tensor] | None = [] if generation.keeps_scores else None
        self.logits: list[torch.Tensor] | None = [] if generation.keeps_logits else None
        #: The parent row of each row after the last step ``(B * K,)``: reorder the caches by it.
        self.beam_idx: torch.Tensor | None = None
        self.eos = generation.eos
        # the host that resolved the call (the helpers read nothing of it); transformers types them for a whole model
        self._host: Any = generation.host if generation.host is not None else GenerationMixin()
        if generator is None:  # a generator of its own, seeded by the call or by one draw of the global one
            seed = generation.seed if generation.seed is not None else int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator()
            generator.manual_seed(seed)
        self._generator = generator
        self._last_prompt_position = prompt_positions(self.attention_mask)[:, -1:]  # (B * K, 1)
        self._cur_len = self.prompt_length
        self._done = False

        # transformers' initial books (``_beam_search``, step 3), with its fill value, precedence included
        pad_token_id, eos_token_id = config._pad_token_tensor, config._eos_token_tensor
        fill = int(pad_token_id or eos_token_id[0] if eos_token_id is not None else -1)
        n_eos = eos_token_id.shape[0] if eos_token_id is not None else 0
        self._beams_to_keep = max(2, 1 + n_eos) * beams
        self._top_num_beam_mask = torch.arange(self._beams_to_keep) < beams
        self._running_sequences = torch.full((prompts, beams, self.max_length), fill_value=fill, dtype=torch.int64)
        self._running_sequences[:, :, : self.prompt_length] = generation.input_ids.view(prompts, beams, -1)
        self._sequences = self._running_sequences.clone()
        self._running_beam_scores = torch.zeros((prompts, beams), dtype=torch.float)
        self._running_beam_scores[:, 1:] = -1e9
        self._beam_scores = torch.full((prompts, beams), fill_value=-1e9, dtype=torch.float)
        self._is_sent_finished = torch.zeros((prompts, beams), dtype=torch.bool)
        self._improvable = torch.ones((prompts, 1), dtype=torch.bool)
        self._hits = torch.zeros((prompts, beams), dtype=torch.bool)
        new_columns = self.max_length - self.prompt_length
        self._running_beam_indices = torch.full((prompts, beams, new_columns), fill_value=-1, dtype=torch.int32)
        self._beam_indices = self._running_beam_indices.clone()

    @property
    def batch_size(self) -> int:
        """Rows being computed: prompts times beams."""
        return self.prompts * self.num_beams

    @property
    def done(self) -> bool:
        """True once beam search stops (as ``_beam_search``'s loop: no beam can improve, or none can go on)."""
        return self._done

    @property
    def unfinished(self) -> torch.Tensor:
        """``(B * K,)`` bool: every row until the search stops, then none (beams have no row of their own)."""
        return torch.full((self.batch_size,), not self._done, dtype=torch.bool)

    @property
    def sequences(self) -> torch.Tensor:
        """The prompts ``(B * K, T)`` before the first step; the running beams' tokens afterwards."""
        return self._running_sequences[:, :, : self._cur_len].reshape(self.batch_size, -1)

    def prompt_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of the prefill, each ``(B * K, T)``."""
        return self.generation.input_ids, self.attention_mask, prompt_positions(self.attention_mask)

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of ``_beam_search`` from the last position's logits ``(B * K, V)``.

        As ``generate``: log-softmax, the logits processors, the running beams' scores
        added, the top ``2K`` (or more, with several eos) continuations taken (or sampled),
        the finished ones kept if they beat the finished hypotheses, the best ``K``
        unfinished ones carried on. Sets :attr:`beam_idx`.

        Returns ``(next_ids (B * K, 1), attention_mask (B * K, past + 1), position_ids (B * K, 1))``.
        """
        host, beams, prompts, cur_len = self._host, self.num_beams, self.prompts, self._cur_len
        raw = logits.detach().to(device="cpu", dtype=torch.float32, copy=True)
        log_probs = torch.nn.functional.log_softmax(raw, dim=-1)
        log_probs = self.generation.logits_processor(cast(torch.LongTensor, self.sequences), log_probs)
        if self.logits is not None:
            self.logits.append(raw)
        if self.scores is not None:
            self.scores.append(log_probs.clone())
        accumulated = (log_probs.view(prompts, beams, -1) + self._running_beam_scores[:, :, None]).view(prompts, -1)
        topk_log_probs, topk_sequences, topk_beam_indices = self._continuations(accumulated)
        recorded = tuple(self.scores) if self.scores is not None else None
        hits = self.generation.stopping_criteria(topk_sequences[:, :, : cur_len + 1].reshape(-1, cur_len + 1), recorded)
        self._hits = hits.view(prompts, self._beams_to_keep)
        running = host._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs,
            topk_running_sequences=topk_sequences,
            topk_running_beam_indices=topk_beam_indices,
            next_token_hits_stopping_criteria=self._hits,
            num_beams=beams,
        )
        self._running_sequences, self._running_beam_scores, self._running_beam_indices = running
        finished = host._update_finished_beams(
            sequences=self._sequences,
            topk_running_sequences=topk_sequences,
            beam_scores=self._beam_scores,
            topk_log_probs=topk_log_probs,
            beam_indices=self._beam_indices,
            topk_running_beam_indices=topk_beam_indices,
            is_early_stop_heuristic_unsatisfied=self._improvable,
            is_sent_finished=self._is_sent_finished,
            next_token_hits_stopping_criteria=self._hits,
            top_num_beam_mask=self._top_num_beam_mask,
            num_beams=beams,
            cur_len=cur_len,
            decoder_prompt_len=self.prompt_length,
            length_penalty=self.generation.config.length_penalty,
            early_stopping=self.generation.config.early_stopping,
        )
        self._sequences, self._beam_scores, self._beam_indices, self._is_sent_finished = finished
        self.beam_idx = self._running_beam_indices[..., cur_len - self.prompt_length].reshape(-1).long()
        self._cur_len = cur_len = cur_len + 1
        self._stop_check()
        self.generated += 1
        tokens = self._running_sequences[:, :, cur_len - 1].reshape(-1, 1)  # (B * K, 1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones(self.batch_size, 1, dtype=torch.long)], dim=1)
        return tokens, self.attention_mask, self._last_prompt_position + self.generated

    def _stop_check(self) -> None:
        """Whether the search goes on: transformers' early-stop heuristic and its stopping condition."""
        config = self.generation.config
        self._improvable = self._host._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self._improvable,
            running_beam_scores=self._running_beam_scores,
            beam_scores=self._beam_scores,
            is_sent_finished=self._is_sent_finished,
            cur_len=self._cur_len,
            max_length=self.max_length,
            decoder_prompt_len=self.prompt_length,
            early_stopping=config.early_stopping,
            length_penalty=config.length_penalty,
        )
        going_on = self._host._beam_search_has_unfinished_sequences(
            self._improvable, self._is_sent_finished, self._hits, config.early_stopping
        )
        self._done = not bool(going_on)

    def _continuations(self, accumulated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top ``beams_to_keep`` continuations of ``accumulated`` ``(B, K * V)``: transformers'
        ``_get_top_k_continuations``, its sampling branch drawing from the call's generator."""
        host, beams, cur_len = self._host, self.num_beams, self._cur_len
        if not self.generation.do_sample:
            return cast(
                "tuple[torch.Tensor, torch.Tensor, torch.Tensor]",
                host._get_top_k_continuations(
                    accumulated_log_probs=accumulated,
                    running_sequences=self._running_sequences,
                    running_beam_indices=self._running_beam_indices,
                    cur_len=cur_len,
                    decoder_prompt_len=self.prompt_length,
                    do_sample=False,
                    beams_to_keep=self._beams_to_keep,
                    num_beams=beams,
                    batch_size=self.prompts,
                ),
            )
        # transformers' lines, with torch.multinomial drawing from the call's generator instead of the global one
        probs = torch.nn.functional.softmax(accumulated, dim=-1)
        topk_indices = torch.multinomial(probs, num_samples=self._beams_to_keep, generator=self._generator)
        topk_log_probs = torch.gather(input=accumulated, dim=1, index=topk_indices)
        topk_log_probs, order = topk_log_probs.sort(dim=-1, descending=True)
        topk_indices = topk_indices.gather(dim=-1, index=order)
        vocab_size = accumulated.shape[-1] // beams
        topk_current_beam_indices = topk_indices // vocab_size
        topk_beam_indices = host._gather_beams(self._running_beam_indices, topk_current_beam_indices)
        topk_sequences = host._gather_beams(self._running_sequences, topk_current_beam_indices)
        topk_sequences[:, :, cur_len] = topk_indices % vocab_size
        batch_offset = torch.arange(self.prompts).view(-1, 1) * beams
        topk_beam_indices[:, :, cur_len - self.prompt_length] = topk_current_beam_indices + batch_offset
        return topk_log_probs, topk_sequences, topk_beam_indices

    def result(self) -> BeamResult:
        """The best ``num_return_sequences`` finished hypotheses of each prompt, as ``_beam_search`` returns them.

        ``(sequences (B * R, T + n), sequences_scores (B * R,), beam_indices (B * R, n))``,
        cut to the longest hypothesis ``n``; shorter ones are filled as transformers fills them.
        """
        returned = int(self.generation.config.num_return_sequences or 1)
        sequences = self._sequences[:, :returned].reshape(self.prompts * returned, -1)
        scores = self._beam_scores[:, :returned].reshape(-1)
        indices = self._beam_indices[:, :returned].reshape(self.prompts * returned, -1)
        generated = int(((indices + 1).bool()).sum(dim=1).max())
        return sequences[:, : self.prompt_length + generated], scores, indices[:, :generated]
