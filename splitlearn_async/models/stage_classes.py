"""The stage modules: :class:`Stage` and its three parts, and :class:`SplitStages` that holds them.

A stage holds the family's own decoder layers (copies of the module objects that share
their parameters with the source model), so attention, rotary embeddings and norms are
transformers' code, not ours. What crosses a stage boundary is a hidden-state tensor of
shape ``(B, T, hidden_size)``. :func:`~splitlearn_async.models.splitter.split_model`
builds the stages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from splitlearn_async.errors import ConfigError

from .attention import AttentionContext, CacheContext, PlainContext
from .cache import KVCache, KVPool
from .cache_group import CacheGroup
from .families import Family

__all__ = ["PARTS", "STAGE_CLASSES", "BottomStage", "SplitStages", "Stage", "TopStage", "TrunkStage"]

PARTS = ("bottom", "trunk", "top")

# What a rotary module returns: ``(cos, sin)``, each ``(B, T, head_dim)``; per layer type
# for families whose layer types have rotaries of their own (gemma3).
_Rotary: TypeAlias = tuple[torch.Tensor, torch.Tensor]
PositionEmbeddings: TypeAlias = _Rotary | dict[str, _Rotary] | None


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
    #: The model's ``GenerationConfig`` (``generate``'s defaults: eos, pad, sampling, ...),
    #: kept by :func:`split_model`, the loaders and the bundles; None on a stage made by hand.
    generation_config: Any = None

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
        return {self.checkpoint_name(n): p for n, p in self.named_parameters(remove_duplicate=False)}

    @property
    def hidden_size(self) -> int:
        """Width ``H`` of the hidden states that cross the stage's boundaries."""
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Decoder layers this stage runs."""
        return self.layer_range[1] - self.layer_range[0]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stage's (first) parameter."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the stage's (first) parameter."""
        return next(self.parameters()).device

    @property
    def kv_pool(self) -> KVPool:
        """The token pool that holds the keys and values of every cache of this stage."""
        pool: KVPool | None = self.__dict__.get("_kv_pool")
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
                raise ConfigError(
                    f"attention_mask must be (batch, past + new tokens) with batch={batch} and at least "
                    f"{length} columns, got shape {tuple(attention_mask.shape)}."
                )
            new_valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        if position_ids is None:
            if isinstance(cache, CacheGroup):
                position_ids = cache.positions(length, device)  # each cache's own columns
            else:
                # transformers' model forward: positions are cache columns, past + arange(T)
                start = cache.length if cache is not None else 0
                position_ids = torch.arange(start, start + length, device=device).expand(batch, length)
        if position_ids.shape != (batch, length):
            position_ids = position_ids.expand(batch, length)
        return new_valid, position_ids.to(device)

    def _run_layers(
        self,
        hidden: torch.Tensor,  # (B, T, H)
        new_valid: torch.Tensor | None,  # (B, T)
        position_ids: torch.Tensor,  # (B, T)
        cache: KVCache | CacheGroup | None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if self.num_layers == 0:
            return hidden
        if cache is None:
            return self._run_layer_stack(
                hidden, position_ids, PlainContext(self.attn_kernel, hidden.shape[1], new_valid), layers
            )
        if new_valid is None:  # a cache records the validity of every column it takes
            new_valid = torch.ones(hidden.shape[0], hidden.shape[1], dtype=torch.bool, device=hidden.device)
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

    def _run_layer_stack(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        ctx: AttentionContext,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        pos_emb = self._position_embeddings(hidden, position_ids, layers)
        for idx, layer in self.iter_layers(layers):
            kwargs: dict[str, Any] = {}
            if isinstance(pos_emb, dict):
                kwargs["position_embeddings"] = pos_emb[self.config.layer_types[idx]]
            elif pos_emb is not None:
                kwargs["position_embeddings"] = pos_emb
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                splitlearn_attention=ctx,
                **kwargs,
            )  # (B, T, H)
        return hidden

    def iter_layers(self, layers: tuple[int, int] | None = None) -> Iterator[tuple[int, nn.Module]]:
        """The decoder layers with their indices in the full model, in order (only ``[a, b)`` if given)."""
        for i in range(*(layers or self.layer_range)):
            yield i, self.layers[str(i)]

    def _position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layers: tuple[int, int] | None = None
    ) -> PositionEmbeddings:
        if self.rotary is None:
            return None
        if self.family.rotary_by_layer_type:
            types = sorted({self.config.layer_types[i] for i in range(*(layers or self.layer_range))})
            return {t: self.rotary(hidden, position_ids, t) for t in types}
        rotary: _Rotary = self.rotary(hidden, position_ids)
        return rotary

    def extra_repr(self) -> str:
        """The family and the layer range, for ``repr(stage)``."""
        return f"family={self.family.name}, layers=[{self.layer_range[0]}, {self.layer_range[1]})"


class BottomStage(Stage):
    """Token embeddings (+ learned positions) and decoder layers ``[0, a)``.

    ``forward(input_ids (B, T), attention_mask=None, position_ids=None, cache=None)``
    returns hidden states ``(B, T, hidden_size)``.
    """

    part = "bottom"
    # registered by the splitter; ``pos_embed`` and ``embed_dropout`` only where the family has them
    embed: nn.Module
    pos_embed: nn.Module
    embed_dropout: nn.Module

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | CacheGroup | None = None,
    ) -> torch.Tensor:
        """Embed ``input_ids`` ``(B, T)`` and run the bottom layers; returns ``(B, T, hidden_size)``."""
        batch, length = input_ids.shape
        new_valid, position_ids = self._prepare(batch, length, attention_mask, position_ids, cache, input_ids.device)
        hidden: torch.Tensor = self.embed(input_ids)  # (B, T, H)
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
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the trunk layers over ``hidden_states`` ``(B, T, hidden_size)``; returns the same shape.

        ``layers=(a, b)`` runs only the decoder layers ``a..b-1`` (full-model indices, within
        :attr:`layer_range`) over the output of layer ``a - 1``, without a cache: a training
        step cut into segments (see ``splitlearn_async.training``) runs the layers this way,
        each segment one call, with the same operations as one call over all of them.

        Raises:
            ConfigError: ``layers`` is not a range within the trunk's, or comes with a cache.
        """
        if layers is not None:
            self._check_segment(layers, cache)
        batch, length, _ = hidden_states.shape
        new_valid, position_ids = self._prepare(
            batch, length, attention_mask, position_ids, cache, hidden_states.device
        )
        return self._run_layers(hidden_states, new_valid, position_ids, cache, layers)

    def _check_segment(self, layers: tuple[int, int], cache: KVCache | CacheGroup | None) -> None:
        start, end = self.layer_range
        a, b = layers
        if not start <= a < b <= end:
            raise ConfigError(
                f"layers={tuple(layers)} is not a non-empty range of this trunk's layers [{start}, {end}); "
                "pass (a, b) with start <= a < b <= end."
            )
        if cache is not None:
            raise ConfigError(
                "a trunk call over some of its layers (layers=...) cannot take a KV cache: the cache "
                "takes its new columns once per call; run cached calls over every layer."
            )


class TopStage(Stage):
    """Decoder layers ``[b, n)``, final norm and LM head: hidden states in, logits ``(B, T, V)`` out.

    ``logits_to_keep=k > 0`` returns the logits of the last ``k`` positions only, ``(B, k, V)``,
    as Hugging Face's ``logits_to_keep`` (generation keeps 1).
    """

    part = "top"
    # registered by the splitter
    norm: nn.Module
    lm_head: nn.Module

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | CacheGroup | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Run the top layers, the norm and the head over ``(B, T, hidden_size)``; returns logits."""
        batch, length, _ = hidden_states.shape
        new_valid, position_ids = self._prepare(
            batch, length, attention_mask, position_ids, cache, hidden_states.device
        )
        hidden = self._run_layers(hidden_states, new_valid, position_ids, cache)
        if logits_to_keep:  # generation needs the last positions only: the LM head is the costly part
            hidden = hidden[:, -logits_to_keep:]
        logits: torch.Tensor = self.lm_head(self.norm(hidden))  # (B, T or logits_to_keep, V)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


STAGE_CLASSES: dict[str, type[Stage]] = {"bottom": BottomStage, "trunk": TrunkStage, "top": TopStage}


@dataclass
class SplitStages:
    """The stages of a split model; unpacks as ``bottom, trunk, top``.

    A part that was not asked for is ``None``. A trunk cut into segments (more than two
    split points) has ``trunk=None`` and its segments in ``trunks``; then the stages
    unpack as ``bottom, trunk_0, trunk_1, ..., top``.
    """

    bottom: BottomStage | None
    trunk: TrunkStage | None
    top: TopStage | None
    trunks: tuple[TrunkStage, ...] = ()

    def _all(self) -> tuple[Stage | None, ...]:
        middle: tuple[Stage | None, ...] = self.trunks if self.trunks else (self.trunk,)
        return (self.bottom, *middle, self.top)

    def __iter__(self) -> Iterator[Stage | None]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, index: int) -> Stage | None:
        return self._all()[index]

    @property
    def segments(self) -> tuple[TrunkStage, ...]:
        """The trunk's segments in order: one (``trunk``) or several (``trunks``); none if absent."""
        if self.trunks:
            return self.trunks
        return (self.trunk,) if self.trunk is not None else ()

    @property
    def generation_config(self) -> Any:
        """The model's ``GenerationConfig``, which every stage keeps (None if none has one)."""
        return next((s.generation_config for s in self if s is not None and s.generation_config is not None), None)

    def present(self) -> dict[str, Stage]:
        """The stages that exist, by part name (``trunk.0``, ``trunk.1``, ... for a trunk in segments)."""
        out: dict[str, Stage] = {} if self.bottom is None else {"bottom": self.bottom}
        if self.trunks:
            out.update({f"trunk.{i}": s for i, s in enumerate(self.trunks)})
        elif self.trunk is not None:
            out["trunk"] = self.trunk
        if self.top is not None:
            out["top"] = self.top
        return out

    @property
    def split_points(self) -> tuple[int, ...]:
        """``(a, b)`` (``(a, b, c, ...)`` for a trunk in segments), from the trunk or the client stages.

        Raises:
            ConfigError: neither the trunk nor both client stages are present.
        """
        if self.trunks:
            return (self.trunks[0].layer_range[0], *(s.layer_range[1] for s in self.trunks))
        if self.trunk is not None:
            return self.trunk.layer_range
        if self.bottom is not None and self.top is not None:
            return (self.bottom.layer_range[1], self.top.layer_range[0])
        raise ConfigError("split points are only known when the trunk or both client stages are present.")
