"""The generic splitter: :func:`split_model` builds bottom, trunk and top from a :class:`Family` record.

One splitter serves every family: the record says where the embeddings, decoder layers,
final norm, head and rotary live, and the splitter copies those module objects into the
stages (:mod:`splitlearn_async.models.stage_classes`), sharing their parameters.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from splitlearn_async.errors import ConfigError

from ..errors import SplitPointError
from .attention import ATTENTION_NAME, SUPPORTED_BASES, ensure_registered
from .families import family_for
from .stage_classes import PARTS, STAGE_CLASSES, BottomStage, SplitStages, Stage, TopStage, TrunkStage

__all__ = ["check_split_points", "get_path", "split_model"]

logger = logging.getLogger(__name__)

_StageT = TypeVar("_StageT", bound=Stage)


def get_path(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path from ``root``."""
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def check_split_points(split_points: Any, num_layers: int) -> tuple[int, ...]:
    """Validate ``(a, b)``, or ``(a, b, c, ...)`` for a trunk cut into segments, against ``num_layers``.

    Raises:
        SplitPointError: not two or more integers with ``0 <= a < b < ... <= num_layers``.
    """
    example = f"({max(1, num_layers // 10)}, {num_layers - max(1, num_layers // 10)})"
    try:
        points = tuple(split_points)
    except TypeError:
        points = ()
    if len(points) < 2:
        raise SplitPointError(
            f"split_points must be a pair (a, b), or more points to cut the trunk into segments, got "
            f"{split_points!r}; for this model with {num_layers} layers use e.g. {example}."
        )
    if any(isinstance(v, bool) or not isinstance(v, int) for v in points):
        raise SplitPointError(f"split_points must be integers, got {split_points!r}; e.g. {example}.")
    if not (points[0] >= 0 and points[-1] <= num_layers and all(x < y for x, y in itertools.pairwise(points))):
        raise SplitPointError(
            f"split_points={split_points!r} is invalid for a model with num_hidden_layers={num_layers}: "
            f"they must satisfy 0 <= a < b <= {num_layers} (bottom = layers [0, a), trunk = [a, b), "
            f"top = [b, {num_layers})), each point above the one before; e.g. {example}."
        )
    return points


def split_model(model: nn.Module, split_points: tuple[int, ...], parts: tuple[str, ...] = PARTS) -> SplitStages:
    """Split a loaded Hugging Face causal LM into bottom, trunk and top stages.

    Args:
        model: A ``*ForCausalLM`` of a supported family (see ``supported_model_types()``).
        split_points: ``(a, b)`` with ``0 <= a < b <= num_hidden_layers``: bottom runs
            layers ``[0, a)``, trunk ``[a, b)``, top ``[b, n)`` plus the final norm and head.
            More points cut the trunk into segments for a chain of servers: ``(a, b, c)``
            gives trunk segments ``[a, b)`` and ``[b, c)`` (``SplitStages.trunks``).
        parts: Which stages to build (``"trunk"`` builds every segment).

    Returns:
        :class:`SplitStages`, which unpacks as ``bottom, trunk, top`` (``bottom, trunk_0,
        trunk_1, ..., top`` for a trunk in segments). The stages share
        their parameters with ``model`` (training a stage trains the model) and leave
        ``model`` itself unchanged and usable. Every stage keeps a copy of
        ``model.generation_config`` (its ``generation_config``), so that generation with
        the stages resolves its settings as ``model.generate`` does.

    Raises:
        UnsupportedModelError: the model's family is not supported.
        SplitPointError: the split points are invalid.
    """
    config: Any = model.config  # a transformers PretrainedConfig; its fields depend on the family
    family = family_for(getattr(config, "model_type", "?"))
    n = int(config.num_hidden_layers)
    points = check_split_points(split_points, n)
    a, b = points[0], points[-1]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"parts must be drawn from {PARTS}, got {sorted(unknown)}.")

    base = getattr(config, "_attn_implementation", None) or "sdpa"
    if base not in SUPPORTED_BASES:
        logger.warning("attention implementation %r is not supported by stages; using 'sdpa'", base)
        base = "sdpa"
    ensure_registered()
    stage_config = copy.deepcopy(config)
    stage_config._attn_implementation = ATTENTION_NAME

    # Deep-copy module objects but keep the very same Parameter/buffer objects and point
    # every copied `config` attribute at the stage config: the model stays untouched.
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    memo[id(config)] = stage_config

    def take(path: str) -> nn.Module:
        module: nn.Module = copy.deepcopy(get_path(model, path), memo)
        return module

    generation_config = copy.deepcopy(getattr(model, "generation_config", None))  # generate's defaults
    all_layers = get_path(model, family.layers)
    ranges = {"bottom": [(0, a)], "trunk": list(itertools.pairwise(points)), "top": [(b, n)]}
    built: dict[str, Stage] = {}
    segments: list[TrunkStage] = []
    for part, (lo, hi) in [(p, r) for p in parts for r in ranges[p]]:
        layers = {i: copy.deepcopy(all_layers[i], memo) for i in range(lo, hi)}
        modules: dict[str, nn.Module] = {}
        if part == "bottom":
            modules["embed"] = take(family.embed)
            if family.pos_embed:
                modules["pos_embed"] = take(family.pos_embed)
            if family.embed_dropout:
                modules["embed_dropout"] = take(family.embed_dropout)
        if part == "top":
            modules["norm"] = take(family.norm)
            modules["lm_head"] = take(family.lm_head)
        rotary = take(family.rotary) if hi > lo and family.rotary else None
        stage = STAGE_CLASSES[part](family, stage_config, (lo, hi), layers, rotary, base, modules)
        stage.train(model.training)
        stage.generation_config = generation_config
        built[part] = stage
        if isinstance(stage, TrunkStage):
            segments.append(stage)
    return SplitStages(
        bottom=_built(built, "bottom", BottomStage),
        trunk=segments[0] if len(segments) == 1 else None,
        top=_built(built, "top", TopStage),
        trunks=tuple(segments) if len(segments) > 1 else (),
    )


def _built(built: Mapping[str, Stage], part: str, cls: type[_StageT]) -> _StageT | None:
    """The stage built for ``part`` (an instance of ``cls``, see ``STAGE_CLASSES``), or None."""
    stage = built.get(part)
    return stage if isinstance(stage, cls) else None
