"""One ``generate()`` / ``stream()`` call of :class:`SplitPipeline`: options, settings, streamer, output.

A :class:`GenerationCall` takes the call's keywords apart: the options of the call itself
(``seed``, ``streamer``, ``tokenizer``, ``logits_processor``, ``stopping_criteria``,
``prefix_allowed_tokens_fn``) and the ``GenerationConfig`` fields, which
:func:`~splitlearn_async.models.generation.resolve_generation` resolves on the worker
exactly as ``model.generate`` does. It owns the call's random draws
(:class:`~splitlearn_async.models.decoding.RandomDraws`, made when the call is made),
feeds the streamer as ``generate`` feeds it (the prompt, then each step's tokens, then
``end()``), and builds the return value (token ids, or ``GenerateDecoderOnlyOutput`` --
``GenerateBeamDecoderOnlyOutput`` for beam search -- with ``return_dict_in_generate=True``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from ..errors import ConfigError, StateError
from ..models.beams import BeamDecodeState
from ..models.decoding import Decoding, RandomDraws, new_decode_state
from ..models.generation import ResolvedGeneration, resolve_generation
from ..models.stages import TopStage

__all__ = ["CALL_OPTIONS", "GenerationCall"]

#: Keywords of ``generate`` that belong to the call, not to ``GenerationConfig``.
CALL_OPTIONS = ("seed", "streamer", "tokenizer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn")


class GenerationCall:
    """The options, random draws, decode state and streamer of one generation call.

    Args:
        kwargs: The call's keywords (consumed: the call options are taken out, the rest
            are ``GenerationConfig`` fields).
        tokenizer: The pipeline's tokenizer, used for ``stop_strings`` unless the call
            gives its own.
        streaming: The call hands out each step's tokens (``SplitPipeline.stream``).

    Raises:
        ConfigError: ``seed`` is not an integer, or ``streamer`` lacks ``put``/``end``.
    """

    def __init__(self, kwargs: dict[str, Any], tokenizer: Any = None, *, streaming: bool = False) -> None:
        options = {name: kwargs.pop(name) for name in CALL_OPTIONS if name in kwargs}
        seed = options.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}.")
        streamer = options.pop("streamer", None)
        if streamer is not None and not (
            callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))
        ):
            raise ConfigError(
                f"streamer must have put(token_ids) and end() methods, as transformers' BaseStreamer does "
                f"(TextStreamer, TextIteratorStreamer); got a {type(streamer).__name__}."
            )
        options.setdefault("tokenizer", tokenizer)
        self.seed: int | None = seed
        self.streamer = streamer
        self.options = options
        self.settings = kwargs
        self.streaming = streaming
        self.state: Decoding | None = None
        self.draws = RandomDraws(seed)  # last: nothing above may fail once the global generator is forked

    def resolve(
        self,
        top: TopStage,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generation_config: Any,
    ) -> ResolvedGeneration:
        """(worker) The call's settings and prompt, resolved against the top stage's defaults."""
        return resolve_generation(
            top.config,
            top.generation_config,
            input_ids,
            attention_mask,
            generation_config,
            seed=self.seed,
            **self.options,
            **self.settings,
        )

    def begin(self, generation: ResolvedGeneration) -> Decoding:
        """Make the decode state and hand the prompt to the streamer (as ``generate``: all rows).

        Raises:
            ConfigError: beam search with a streamer, or in ``stream()``: its sequences are
                known only at the end (``generate`` refuses a streamer with beams too).
        """
        if generation.num_beams > 1 and (self.streamer is not None or self.streaming):
            what = "a streamer" if self.streamer is not None else "SplitPipeline.stream()"
            raise ConfigError(
                f"{what} cannot be used with beam search (num_beams={generation.num_beams}), as in "
                "model.generate: the beams' sequences are known only at the end. Use generate() without a streamer, "
                "or num_beams=1."
            )
        self.state = new_decode_state(generation, self.draws.generator)
        if self.streamer is not None:
            self.streamer.put(self.state.sequences.cpu())
        return self.state

    def put(self, tokens: torch.Tensor) -> None:
        """Hand one step's tokens ``(B,)`` to the streamer."""
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())

    def finish(self) -> None:
        """End the call: leave torch's global generator as ``generate`` would, end the streamer.

        The streamer is ended even when the call failed or was cancelled, so that a
        consumer iterating a ``TextIteratorStreamer`` never waits forever.
        """
        self.draws.release()
        if self.streamer is not None:
            streamer, self.streamer = self.streamer, None
            streamer.end()

    def output(self, device: torch.device) -> Any:
        """What ``generate`` returns: ``(B * num_return_sequences, T + new)`` token ids on
        ``device``, or with ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput``
        with ``sequences`` and, when asked for, ``scores`` and ``logits`` (one ``(B, V)``
        float32 tensor per step, on the CPU). Beam search returns its best hypotheses, and
        a ``GenerateBeamDecoderOnlyOutput`` adds ``beam_indices`` and, with
        ``output_scores``, ``sequences_scores``, as ``generate`` does."""
        state = self.state
        if state is None:  # pragma: no cover (output() follows a finished run)
            raise StateError("output() was called before the generation ran.")
        beams = state.result() if isinstance(state, BeamDecodeState) else None
        sequences = (beams[0] if beams is not None else state.sequences).to(device)
        config = state.generation.config
        if not config.return_dict_in_generate:
            return sequences
        fields: dict[str, Any] = {  # transformers annotates them as LongTensor and one-element tuples
            "sequences": sequences,
            "scores": tuple(state.scores) if state.scores is not None else None,
            "logits": tuple(state.logits) if state.logits is not None else None,
        }
        if beams is None:
            return GenerateDecoderOnlyOutput(**fields)
        fields["sequences_scores"] = beams[1] if config.output_scores else None
        fields["beam_indices"] = beams[2]
        return GenerateBeamDecoderOnlyOutput(**fields)
