"""Generation settings resolved as ``model.generate`` resolves them, for a split model.

:func:`resolve_generation` takes what ``generate`` takes (a ``GenerationConfig``, keyword
overrides, the user's logits processors and stopping criteria) and the model's own
defaults (the ``generation_config`` that :func:`~splitlearn_async.models.splitter.split_model`
and the loaders keep on every stage), and returns one :class:`ResolvedGeneration`: the
final ``GenerationConfig``, transformers' own ``LogitsProcessorList`` and
``StoppingCriteriaList`` built from it, and the prompt as ``generate`` prepares it (an
attention mask inferred from padding when none is given, every row repeated
``num_return_sequences`` times).

transformers does this inside ``GenerationMixin`` methods that read only the model's
config and generation config, never its weights. :class:`_ConfigHost` is a
``GenerationMixin`` that holds just those two, so the very same methods run here: the
priorities (keyword > ``generation_config`` > the model's > global defaults), the
special tokens (eos an int or a list; pad defaulting to the first eos, with
transformers' warning), the lengths, and every processor and criterion in transformers'
order. The same host, kept on the result, runs transformers' beam bookkeeping
(:mod:`.beams`). They are private helpers of transformers: this module and
:mod:`.beams` are the only places that call them, and the equivalence tests
(``tests/client/test_generation_*.py``) pin what they do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerationMixin

from ..errors import ConfigError

__all__ = ["ResolvedGeneration", "default_generation_config", "resolve_generation"]

#: ``generate`` arguments that select a decoding method or an input the split cannot run,
#: each with the sentence that says why and what to do instead.
_UNSUPPORTED_ARGUMENTS = {
    "assistant_model": "assisted generation needs a draft model next to the whole model; drop assistant_model",
    "assistant_tokenizer": "assisted generation is not supported; drop assistant_tokenizer",
    "custom_generate": "custom decoding loops run on a whole model; drop custom_generate",
    "negative_prompt_ids": "classifier-free guidance needs a second pass of the whole model; drop negative_prompt_ids",
    "negative_prompt_attention_mask": "classifier-free guidance is not supported; drop negative_prompt_attention_mask",
    "synced_gpus": "a split model is not sharded with DeepSpeed or FSDP; drop synced_gpus",
    "inputs_embeds": "the bottom stage embeds the tokens itself; pass input_ids instead of inputs_embeds",
    "position_ids": "the pipeline computes positions from the attention mask; drop position_ids",
    "cache": "every stage keeps its own KV cache; drop cache",
    "past_key_values": "every stage keeps its own KV cache; drop past_key_values",
}


def default_generation_config(model_config: Any) -> GenerationConfig:
    """The generation config a model of ``model_config`` gets when none was saved with it.

    As ``PreTrainedModel.__init__`` does: ``GenerationConfig.from_model_config(config)``.
    """
    return GenerationConfig.from_model_config(model_config)


class _ConfigHost(GenerationMixin):
    """A ``GenerationMixin`` with a model's config and generation config, and no weights.

    ``generate``'s preparation steps (settings, special tokens, lengths, processors,
    stopping criteria) read only ``self.config`` and ``self.generation_config``; running
    them on this host gives exactly what ``model.generate`` would build.
    """

    def __init__(self, config: Any, generation_config: GenerationConfig) -> None:
        self.config = config
        self.generation_config = generation_config


@dataclass(frozen=True)
class ResolvedGeneration:
    """One generation call's settings and prompt, resolved once as ``model.generate`` does.

    Attributes:
        config: The final ``GenerationConfig`` (call > given config > model's > defaults),
            with transformers' special-token tensors (``_eos_token_tensor``, ...) and the
            lengths (``max_length``, ``min_length``) set for this prompt.
        logits_processor: transformers' processors for these settings, in transformers'
            order, merged with the user's (a user's processor replaces one of its type).
        stopping_criteria: transformers' criteria (max length, stop strings, eos, ...),
            merged with the user's.
        input_ids: ``(B * R, T)`` prompts on the CPU, each row repeated ``R`` times:
            ``R = max(num_beams, num_return_sequences)``, as ``generate`` expands them.
        attention_mask: ``(B * R, T)``, 1 for real tokens (inferred from padding when none
            was given, as ``generate`` does).
        seed: The call's own seed, or None to draw from torch's global generator.
        host: The ``GenerationMixin`` host that resolved these settings; beam search runs
            transformers' bookkeeping on it.
    """

    config: GenerationConfig
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    seed: int | None = None
    host: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_beams(self) -> int:
        """Beams per prompt: 1 for greedy search and sampling, more for beam search."""
        return int(self.config.num_beams or 1)

    @property
    def do_sample(self) -> bool:
        """Sample the next token from the processed distribution; otherwise take the argmax."""
        return bool(self.config.do_sample)

    @property
    def eos(self) -> list[int]:
        """The token ids that finish a row (empty: none)."""
        tensor = getattr(self.config, "_eos_token_tensor", None)
        return [] if tensor is None else [int(t) for t in tensor.tolist()]

    @property
    def pad_token_id(self) -> int | None:
        """The token written into finished rows (the first eos when the config has none)."""
        tensor = getattr(self.config, "_pad_token_tensor", None)
        return None if tensor is None else int(tensor)

    @property
    def pads_finished_rows(self) -> bool:
        """True when some stopping criterion knows eos, as ``generate`` decides whether to pad."""
        return any(hasattr(criterion, "eos_token_id") for criterion in self.stopping_criteria)

    @property
    def keeps_scores(self) -> bool:
        """``return_dict_in_generate`` with ``output_scores``: keep the processed scores of each step."""
        return bool(self.config.return_dict_in_generate and self.config.output_scores)

    @property
    def keeps_logits(self) -> bool:
        """``return_dict_in_generate`` with ``output_logits``: keep the raw logits of each step."""
        return bool(self.config.return_dict_in_generate and self.config.output_logits)


def resolve_generation(
    model_config: Any,
    model_generation_config: GenerationConfig | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    **kwargs: Any,
) -> ResolvedGeneration:
    """Resolve one ``generate`` call's settings and prompt, step by step as ``model.generate``.

    Args:
        model_config: The model's config (a stage's ``config``).
        model_generation_config: The model's generation config (a stage's
            ``generation_config``); None uses :func:`default_generation_config`.
        input_ids: ``(B, T)`` prompts, left-padded.
        attention_mask: ``(B, T)``, 1 for real tokens; None infers it from ``pad_token_id``
            as ``generate`` does (all ones when the prompts hold no pad token).
        generation_config: The call's base config, as ``generate(generation_config=...)``.
        logits_processor: The user's processors, merged into transformers' list.
        stopping_criteria: The user's criteria, merged into transformers' list.
        prefix_allowed_tokens_fn: As ``generate``'s (a ``PrefixConstrainedLogitsProcessor``).
        tokenizer: Needed for ``stop_strings``.
        seed: Kept on the result for the sampler.
        **kwargs: ``GenerationConfig`` fields that override the config, as ``generate``'s.

    Returns:
        A :class:`ResolvedGeneration`.

    Raises:
        ConfigError: an option the split model cannot run (assisted, contrastive or
            constrained decoding, attentions or hidden states in the output, ...), or a
            keyword that is no ``GenerationConfig`` field; the message names it and the fix.
        ValueError: the prompt's shape or padding is wrong, or transformers refuses the
            settings (its own message: ``max_new_tokens`` <= 0, a non-positive
            temperature, ``stop_strings`` without a tokenizer, ...).
    """
    _refuse_arguments(kwargs)
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
    base = model_generation_config if model_generation_config is not None else default_generation_config(model_config)
    host: Any = _ConfigHost(model_config, base)  # GenerationMixin's methods are typed for a whole model

    # 1. settings, with generate's priorities; anything left over is no field of GenerationConfig
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and base.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and base.min_length is None
    )
    config, leftover = host._prepare_generation_config(generation_config, **kwargs)
    _refuse_leftovers(leftover)
    _check_supported(config)

    # 2. special tokens and the attention mask, as generate prepares them
    batch_size, prompt_length = int(input_ids.shape[0]), int(input_ids.shape[1])
    host._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device, batch_size=batch_size)
    if attention_mask is None:
        attention_mask = host._prepare_attention_mask_for_generation(input_ids, config, {}).long()
        _check_left_padded(attention_mask)

    # 3. one row per beam or returned sequence, as generate expands the inputs
    expanded_ids, expanded_mask = input_ids, attention_mask
    expand = max(config.num_beams or 1, config.num_return_sequences or 1)
    if expand > 1:
        expanded_ids = input_ids.repeat_interleave(expand, dim=0)
        expanded_mask = attention_mask.repeat_interleave(expand, dim=0)

    # 4. lengths, then processors and criteria (generate drops an all-ones mask before building them)
    config = host._prepare_generated_length(
        generation_config=config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=prompt_length,
        inputs_tensor=input_ids,
    )
    host._validate_generated_length(config, prompt_length, has_default_max_length)
    processors = host._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_length,
        encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
        device=input_ids.device,
        model_kwargs={"attention_mask": None if bool((expanded_mask == 1).all()) else expanded_mask},
    )
    criteria = host._get_stopping_criteria(
        generation_config=config,
        stopping_criteria=stopping_criteria if stopping_criteria is not None else StoppingCriteriaList(),
        tokenizer=tokenizer,
    )
    return ResolvedGeneration(config, processors, criteria, expanded_ids, expanded_mask, seed, host)


def _check_prompt(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt on the CPU as ``(B, T)`` integer ids, and its mask if given, checked."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor with length >= 1, got {shape}.")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    input_ids = input_ids.to("cpu").long()
    if attention_mask is None:
        return input_ids, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask has shape {got} but input_ids has {tuple(input_ids.shape)}.")
    attention_mask = attention_mask.to("cpu").long()
    _check_left_padded(attention_mask)
    return input_ids, attention_mask


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "the last column of attention_mask has padding: pad prompts on the left "
            "(tokenizer.padding_side = 'left') for generation."
        )


def _refuse_arguments(kwargs: dict[str, Any]) -> None:
    """Refuse ``generate`` arguments that the split model cannot honour, with the reason."""
    given = [name for name in _UNSUPPORTED_ARGUMENTS if kwargs.get(name) is not None]
    if given:
        reasons = "; ".join(f"{name}: {_UNSUPPORTED_ARGUMENTS[name]}" for name in given)
        raise ConfigError(f"SplitPipeline.generate does not support {', '.join(given)} ({reasons}).")


def _refuse_leftovers(leftover: dict[str, Any]) -> None:
    """Refuse keywords that are no ``GenerationConfig`` field (typos, model inputs)."""
    unknown = sorted(name for name, value in leftover.items() if value is not None)
    unknown = [name for name in unknown if name not in ("output_attentions", "output_hidden_states")]
    if unknown:
        raise ConfigError(
            f"generate() got {unknown}, which are neither GenerationConfig fields nor options of "
            "SplitPipeline.generate; check the spelling (see transformers' GenerationConfig for the fields)."
        )


def _check_supported(config: GenerationConfig) -> None:
    """Refuse settings that select a decoding method or an output the split model lacks."""
    refusals = {
        "output_attentions": "the trunk's attentions stay where the trunk runs; leave output_attentions=False",
        "output_hidden_states": "the trunk's hidden states stay where it runs; leave output_hidden_states=False",
        "token_healing": "token healing is not supported; set token_healing=False",
        "dola_layers": "DoLa needs the hidden states of every layer on the client; set dola_layers=None",
        "constraints": "constraints need constrained beam search, which is not supported; drop them",
        "force_words_ids": "force_words_ids needs constrained beam search, which is not supported; drop it",
        "prompt_lookup_num_tokens": "prompt lookup is assisted generation, which is not supported; set it to None",
        "assistant_early_exit": "assisted generation is not supported; set assistant_early_exit=None",
        "use_mtp": "multi-token prediction is assisted generation, which is not supported; set use_mtp=False",
    }
    for field, reason in refusals.items():
        if getattr(config, field, None) not in (None, False):
            raise ConfigError(
                f"{field}={getattr(config, field)!r} is not supported by SplitPipeline.generate: {reason}."
            )
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise ConfigError(
            f"guidance_scale={config.guidance_scale} is not supported by SplitPipeline.generate: classifier-free "
            "guidance needs a second pass of the whole model; set guidance_scale=None."
        )
    mode = config.get_generation_mode()
    if mode not in ("greedy_search", "sample", "beam_search", "beam_sample"):
        raise ConfigError(
            f"these settings select {mode.value} generation, which SplitPipeline.generate does not support: it does greedy "
            "search, sampling and beam search (with every logits processor and stopping criterion). Unset "
            "penalty_alpha to leave contrastive search, and num_beam_groups for group beam search."
        )
    if mode in ("beam_search", "beam_sample") and config.low_memory:
        raise ConfigError(
            "low_memory=True is not supported with beam search, by SplitPipeline.generate as by model.generate "
            "since transformers' beam search refactor; set low_memory=None."
        )
