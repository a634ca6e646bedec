"""The generic splitter: bottom, trunk and top stages built from a :class:`Family` record.

A stage holds the family's own decoder layers (copies of the module objects that share
their parameters with the source model), so attention, rotary embeddings and norms are
transformers' code, not ours. What crosses a stage boundary is a hidden-state tensor of
shape ``(B, T, hidden_size)``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import SplitPointError
from .attention import ATTENTION_NAME, SUPPORTED_BASES, CacheContext, PlainContext, ensure_registered
from .cache import CacheGroup, KVCache, KVPool
from .families import Family, family_for

__all__ = [
    "Stage", "BottomStage", "TrunkStage", "TopStage", "SplitStages", "split_model", "run_stage",
    "run_stage_batched", "PARTS",
]

logger = logging.getLogger(__name__)

PARTS = ("bottom", "trunk", "top")


def get_path(root: nn.Module, path: str) -> Any:
    """Follow a dotted attribute path from ``root``."""
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def check_split_points(split_points: Any, num_layers: int) -> tuple[int, int]:
    """Validate ``(a, b)`` against a model of ``num_layers`` decoder layers.

    Raises:
        SplitPointError: not two integers with ``0 <= a < b <= num_layers``.
    """
    example = f"({max(1, num_layers // 10)}, {num_layers - max(1, num_layers // 10)})"
    try:
        a, b = split_points
    except (TypeError, ValueError):
        raise SplitPointError(
            f"split_points must be a pair (a, b), got {split_points!r}; for this model with "
            f"{num_layers} layers use e.g. {example}."
        ) from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (a, b)):
        raise SplitPointError(f"split_points must be two integers, got {split_points!r}; e.g. {example}.")
    if not 0 <= a < b <= num_layers:
        raise SplitPointError(
            f"split_points={split_points!r} is invalid for a model with num_hidden_layers={num_layers}: "
            f"they must satisfy 0 <= a < b <= {num_layers} (bottom = layers [0, a), trunk = [a, b), "
            f"top = [b, {num_layers})); e.g. {example}."
        )
    return a, b


class Stage(nn.Module):
    """Common machinery of the three stages: layers, positions, caches, masks.

    Attributes:
        part: ``"bottom"``, ``"trunk"`` or ``"top"``.
        family: The :class:`Family` record.
        config: The stage's copy of the model config (its attention implementation is ours).
        layer_range: ``(start, end)``: this stage runs decoder layers ``start..end-1``.
        attn_kernel: The transformers kernel doing the attention math (``"sdpa"`` or ``"eager"``).
    """

    part: str = ""

    def __init__(
        self,
        family: Family,
        config: Any,
        layer_range: tuple[int, int],
        layers: dict[int, nn.Module],
        rotary: nn.Module | None,
        attn_kernel: str,
        modules: dict[str, nn.Module],
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.layer_range = layer_range
        self.attn_kernel = attn_kernel
        self.layers = nn.ModuleDict({str(i): layers[i] for i in range(*layer_range)})
        self.rotary = rotary
        for name, module in modules.items():
            self.add_module(name, module)

    # ---- naming: stage parameter names <-> checkpoint tensor names -------------------
    def checkpoint_name(self, name: str) -> str:
        """Map a name from ``named_parameters()`` to the model checkpoint's tensor name."""
        head, _, rest = name.partition(".")
        if head == "layers":
            return f"{self.family.layers}.{rest}"
        return f"{self.family.module_paths()[head]}.{rest}"

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """All parameters under their checkpoint names (shared tensors listed once per name)."""
        return {
            self.checkpoint_name(n): p
            for n, p in self.named_parameters(remove_duplicate=False)
        }

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def kv_pool(self) -> KVPool:
        """The token pool that holds the keys and values of every cache of this stage."""
        pool = self.__dict__.get("_kv_pool")
        if pool is None or pool.device != self.device:
            pool = self.__dict__["_kv_pool"] = KVPool(self.device)
        return pool

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences in this stage's :attr:`kv_pool`.

        Caches of one stage can run together as a :class:`CacheGroup`. A cache holds pool
        slots until :meth:`KVCache.release` is called or the cache is dropped.
        """
        return KVCache(batch_size, self.kv_pool)

    # ---- the shared forward path -----------------------------------------------------
    def _prepare(
        self,
        batch: int,
        length: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | CacheGroup | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Validity of the new tokens ``(B, T)`` (None: all real) and their position ids."""
        new_valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
                raise ValueError(
                    f"attention_mask must be (batch, past + new tokens) with batch={batch} and at least "
                    f"{length} columns, got shape {tuple(attention_mask.shape)}."
                )
            new_valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        if cache is not None and new_valid is None:
            new_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        if position_ids is None and isinstance(cache, CacheGroup):
            position_ids = cache.positions(length, device)  # each cache's own columns
        elif position_ids is None:
            # transformers' model forward: positions are cache columns, past + arange(T)
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + length, device=device).expand(batch, length)
        if position_ids.shape != (batch, length):
            position_ids = position_ids.expand(batch, length)
        return new_valid, position_ids.to(device)

    def _run_layers(
        self,
        hidden: torch.Tensor,  # (B, T, H)
        new_valid: torch.Tensor | None,
        position_ids: torch.Tensor,  # (B, T)
        cache: KVCache | CacheGroup | None,
    ) -> torch.Tensor:
        if self.num_layers == 0:
            return hidden
        if cache is None:
            return self._run_layer_stack(hidden, position_ids, PlainContext(self.attn_kernel, hidden.shape[1], new_valid))
        group = CacheGroup([cache]) if isinstance(cache, KVCache) else cache
        group.pool.reclaim()  # slots released since the last call: no call of this stage is in flight now
        new_slots = group.begin(new_valid)  # (B, T)
        try:  # one or several sessions: every layer makes one attention call over the pool
            ctx = CacheContext(self.attn_kernel, group, hidden.shape[1], new_slots)
            hidden = self._run_layer_stack(hidden, position_ids, ctx)
        except BaseException:
            group.abort()
            raise
        group.commit()
        return hidden

    def _run_layer_stack(self, hidden: torch.Tensor, position_ids: torch.Tensor, ctx: Any) -> torch.Tensor:
        pos_emb = self._position_embeddings(hidden, position_ids)
        layer_types = getattr(self.config, "layer_types", None)
        for idx, layer in self.iter_layers():
            kwargs: dict[str, Any] = {}
            if pos_emb is not None:
                kwargs["position_embeddings"] = (
                    pos_emb[layer_types[idx]] if isinstance(pos_emb, dict) else pos_emb
                )
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                splitlearn_attention=ctx,
                **kwargs,
            )
        return hidden

    def iter_layers(self) -> Iterator[tuple[int, nn.Module]]:
        for i in range(*self.layer_range):
            yield i, self.layers[str(i)]

    def _position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        if self.rotary is None:
            return None
        if self.family.rotary_by_layer_type:
            types = sorted({self.config.layer_types[i] for i in range(*self.layer_range)})
            return {t: self.rotary(hidden, position_ids, t) for t in types}
        return self.rotary(hidden, position_ids)

    def extra_repr(self) -> str:
        return f"family={self.family.name}, layers=[{self.layer_range[0]}, {self.layer_range[1]})"


class BottomStage(Stage):
    """Token embeddings (+ learned positions) and decoder layers ``[0, a)``.

    ``forward(input_ids (B, T), attention_mask=None, position_ids=None, cache=None)``
    returns hidden states ``(B, T, hidden_size)``.
    """

    part = "bottom"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | CacheGroup | None = None,
    ) -> torch.Tensor:
        batch, length = input_ids.shape
        new_valid, position_ids = self._prepare(batch, length, attention_mask, position_ids, cache, input_ids.device)
        hidden = self.embed(input_ids)  # (B, T, H)
        if "pos_embed" in self._modules:
            hidden = hidden + self.pos_embed(position_ids)
        if "embed_dropout" in self._modules:
            hidden = self.embed_dropout(hidden)
        return self._run_layers(hidden, new_valid, position_ids, cache)


class TrunkStage(Stage):
    """Decoder layers ``[a, b)``: hidden states in, hidden states out, ``(B, T, hidden_size)``."""

    part = "trunk"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | CacheGroup | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        new_valid, position_ids = self._prepare(
            batch, length, attention_mask, position_ids, cache, hidden_states.device
        )
        return self._run_layers(hidden_states, new_valid, position_ids, cache)


class TopStage(Stage):
    """Decoder layers ``[b, n)``, final norm and LM head: hidden states in, logits ``(B, T, V)`` out.

    ``logits_to_keep=k > 0`` returns the logits of the last ``k`` positions only, ``(B, k, V)``,
    as Hugging Face's ``logits_to_keep`` (generation keeps 1).
    """

    part = "top"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | CacheGroup | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        new_valid, position_ids = self._prepare(
            batch, length, attention_mask, position_ids, cache, hidden_states.device
        )
        hidden = self._run_layers(hidden_states, new_valid, position_ids, cache)
        if logits_to_keep:  # generation needs the last positions only: the LM head is the costly part
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(hidden))  # (B, T or logits_to_keep, V)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


_STAGE_CLASSES: dict[str, type[Stage]] = {"bottom": BottomStage, "trunk": TrunkStage, "top": TopStage}


@dataclass
class SplitStages:
    """The stages of a split model; unpacks as ``bottom, trunk, top``.

    A part that was not asked for is ``None``.
    """

    bottom: BottomStage | None
    trunk: TrunkStage | None
    top: TopStage | None

    def __iter__(self) -> Iterator[Stage | None]:
        return iter((self.bottom, self.trunk, self.top))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Stage | None:
        return (self.bottom, self.trunk, self.top)[index]

    def present(self) -> dict[str, Stage]:
        """The stages that exist, by part name."""
        return {p: s for p, s in zip(PARTS, self) if s is not None}

    @property
    def split_points(self) -> tuple[int, int]:
        stage = next(iter(self.present().values()))
        a = stage.layer_range[0] if stage.part == "trunk" else None
        for s in self.present().values():
            if s.part == "trunk":
                return s.layer_range
            if s.part == "bottom":
                a = s.layer_range[1]
            if s.part == "top":
                b = s.layer_range[0]
        if self.bottom is not None and self.top is not None:
            return (a, b)  # type: ignore[return-value]
        raise ValueError("split points are only known when the trunk or both client stages are present.")


def split_model(
    model: nn.Module, split_points: tuple[int, int], parts: tuple[str, ...] = PARTS
) -> SplitStages:
    """Split a loaded Hugging Face causal LM into bottom, trunk and top stages.

    Args:
        model: A ``*ForCausalLM`` of a supported family (see ``supported_model_types()``).
        split_points: ``(a, b)`` with ``0 <= a < b <= num_hidden_layers``: bottom runs
            layers ``[0, a)``, trunk ``[a, b)``, top ``[b, n)`` plus the final norm and head.
        parts: Which stages to build.

    Returns:
        :class:`SplitStages`, which unpacks as ``bottom, trunk, top``. The stages share
        their parameters with ``model`` (training a stage trains the model) and leave
        ``model`` itself unchanged and usable.

    Raises:
        UnsupportedModelError: the model's family is not supported.
        SplitPointError: the split points are invalid.
    """
    config = model.config
    family = family_for(getattr(config, "model_type", "?"))
    n = int(config.num_hidden_layers)
    a, b = check_split_points(split_points, n)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts must be drawn from {PARTS}, got {sorted(unknown)}.")

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

    def take(path: str | None) -> nn.Module | None:
        return copy.deepcopy(get_path(model, path), memo) if path else None

    all_layers = get_path(model, family.layers)
    ranges = {"bottom": (0, a), "trunk": (a, b), "top": (b, n)}
    stages: dict[str, Stage | None] = {p: None for p in PARTS}
    for part in parts:
        lo, hi = ranges[part]
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
        rotary = take(family.rotary) if hi > lo else None
        stage = _STAGE_CLASSES[part](family, stage_config, (lo, hi), layers, rotary, base, modules)
        stage.train(model.training)
        stages[part] = stage
    return SplitStages(**stages)  # type: ignore[arg-type]


def run_stage(
    stage: Stage,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: KVCache | CacheGroup | None,
    **stage_kwargs: Any,
) -> torch.Tensor:
    """Run ``stage`` without autograd on its own device and dtype; the output comes back on the CPU.

    ``inputs`` are token ids (bottom) or hidden states (trunk, top), usually on the CPU as
    they arrive from another thread or process; float inputs are cast to the stage's dtype.
    ``stage_kwargs`` go to the stage's forward (``logits_to_keep`` for the top).
    """
    device = stage.device
    x = inputs.to(device, stage.dtype) if inputs.is_floating_point() else inputs.to(device)
    with torch.no_grad():
        out = stage(
            x,
            None if attention_mask is None else attention_mask.to(device),
            None if position_ids is None else position_ids.to(device),
            cache=cache,
            **stage_kwargs,
        )
    return out.to("cpu")


def run_stage_batched(
    stage: Stage,
    calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, KVCache]],
    **stage_kwargs: Any,
) -> list[torch.Tensor]:
    """Run several cached calls of ``stage`` as one batch; each gets its own rows back.

    Every call is ``(inputs (B_i, T_i), mask, positions, cache)`` as for :func:`run_stage`,
    with its own :class:`KVCache` of ``B_i`` rows; the caches may hold different numbers
    of columns. Every layer runs once over all ``sum(B_i)`` rows, attention included (one
    call over the stage's KV pool, :class:`CacheGroup`). Calls with fewer new tokens than
    the longest are left-padded to ``max(T_i)`` for the call; the padding is computed but
    never stored, and each cache advances by its own ``T_i``. (Prefills of different
    lengths batch this way; keep decode steps apart from prefills, since a one-token step
    padded to a long prompt would pay for the prompt's length.)

    Args:
        stage: The stage to run.
        calls: At least one call; the masks may be ``(B_i, T_i)`` or ``(B_i, past + T_i)``
            (only the last ``T_i`` columns are read), or None for all valid. Positions are
            required when the calls differ in ``T_i``.

    Returns:
        One output per call, ``(B_i, T_i, ...)`` on the CPU, in order.

    Raises:
        ValueError: a cache appears twice, or positions are missing for ragged calls.

    ``stage_kwargs`` go to the stage's forward; with ``logits_to_keep=k`` (the top), each
    call gets ``(B_i, k, V)`` back.
    """
    if len(calls) == 1:
        inputs, mask, positions, cache = calls[0]
        return [run_stage(stage, inputs, mask, positions, cache, **stage_kwargs)]
    lengths = [int(c[0].shape[1]) for c in calls]
    width = max(lengths)
    ragged = min(lengths) != width
    if ragged and any(c[2] is None for c in calls):
        raise ValueError("calls with different numbers of new tokens need their position ids.")
    group = CacheGroup([c[3] for c in calls], new_tokens=lengths if ragged else None)

    def left_pad(t: torch.Tensor, length: int, fill: float = 0) -> torch.Tensor:
        if length == width:
            return t
        pad = t.new_full((t.shape[0], width - length, *t.shape[2:]), fill)
        return torch.cat([pad, t], dim=1)

    inputs = torch.cat([left_pad(c[0], n) for c, n in zip(calls, lengths)])  # (B, W) ids or (B, W, H) hidden
    masks = torch.cat([
        left_pad(torch.ones(c[0].shape[0], n, dtype=torch.bool) if c[1] is None else c[1][:, -n:].to(torch.bool), n)
        for c, n in zip(calls, lengths)
    ])  # (B, W) validity of the new tokens; False at left padding
    positions = torch.cat([
        left_pad(c[2].long().expand(c[0].shape[0], n), n) if c[2] is not None
        else torch.arange(c[3].length, c[3].length + n).expand(c[0].shape[0], n)
        for c, n in zip(calls, lengths)
    ])  # (B, W)
    out = run_stage(stage, inputs, masks, positions, group, **stage_kwargs)  # (B, W or k, ...)
    if stage_kwargs.get("logits_to_keep"):
        return [out[rows] for rows in group.slices()]
    return [out[rows, width - n :] for rows, n in zip(group.slices(), lengths)]
