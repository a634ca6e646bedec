"""Named LoRA adapters of one trunk, and building an adapter from settings or from saved bytes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterNotFound, AlreadyExists, TrunkBusy, TrunkRejected
from ._config import LoraConfig, check_adapter_id
from ._lora import LoraAdapter, adapter_elements
from ._safetensors import from_safetensors
from ._types import TrainingLimits

__all__ = ["AdapterRegistry", "check_lora_cost", "create_adapter"]


@dataclass
class AdapterRegistry:
    """Named LoRA adapters of one trunk.

    Attributes:
        max_adapters: Most adapters kept at once.
        adapters: ``{adapter_id: LoraAdapter}``.
    """

    max_adapters: int = 64
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def new_id(self) -> str:
        """An unused name ``adapter-<n>``."""
        while True:
            candidate = f"adapter-{next(self._ids)}"
            if candidate not in self.adapters:
                return candidate

    def check_room(self, adapter_id: str) -> None:
        """Check that an adapter named ``adapter_id`` can be added (a server asks before any byte arrives).

        Raises:
            ConfigError: the name is malformed.
            AlreadyExists: the name is taken.
            TrunkBusy: ``max_adapters`` adapters are loaded.
        """
        check_adapter_id(adapter_id)
        if adapter_id in self.adapters:
            raise AlreadyExists(
                f"an adapter named {adapter_id!r} is loaded already; delete it first or pick another name."
            )
        if len(self.adapters) >= self.max_adapters:
            raise TrunkBusy(
                f"{len(self.adapters)} adapters are loaded (max_adapters={self.max_adapters}); delete one first."
            )

    def get(self, adapter_id: str) -> LoraAdapter:
        """The adapter named ``adapter_id``.

        Raises:
            AdapterNotFound: no such adapter.
        """
        adapter = self.adapters.get(adapter_id)
        if adapter is None:
            known = sorted(self.adapters)[:8]
            raise AdapterNotFound(f"no adapter named {adapter_id!r} is loaded on this trunk (loaded: {known}).")
        return adapter


def create_adapter(trunk: Any, config: LoraConfig, adapter_id: str, weights: bytes | None = None) -> LoraAdapter:
    """(worker) A new adapter on ``trunk``: from saved ``weights`` (their metadata gives rank,
    alpha and targets) if given, else initialised with ``config``'s settings.

    Raises:
        CheckpointError: ``weights`` is not an adapter file that fits ``trunk``.
        ValueError: no layer of the trunk matches the target modules.
    """
    if weights:
        tensors, meta = from_safetensors(weights)
        return LoraAdapter.from_tensors(trunk, tensors, meta, adapter_id)
    return LoraAdapter(trunk, config.rank, config.alpha, config.target_modules, config.dropout, config.seed, adapter_id)


def check_lora_cost(trunk: Any, limits: TrainingLimits, config: LoraConfig) -> None:
    """Check an adapter's settings against the caps, before anything is allocated.

    The one rule for adapters trained (``TrainOpen``) and loaded (``LoadAdapter``).

    Raises:
        TrunkRejected: the rank, the number of target modules or the adapter's elements
            are over the caps, or no layer of the trunk matches the target modules.
    """
    lim = limits
    if config.rank > lim.max_lora_rank:
        raise TrunkRejected(
            f"an adapter of rank {config.rank} is over this trunk's max_lora_rank={lim.max_lora_rank}; "
            "use a smaller rank, or raise ServerConfig.max_lora_rank."
        )
    targets = config.target_modules
    if targets is not None and len(targets) > lim.max_lora_targets:
        raise TrunkRejected(
            f"the adapter names {len(targets)} target modules, over this trunk's max_lora_targets="
            f"{lim.max_lora_targets}; name fewer, or raise ServerConfig.max_lora_targets."
        )
    try:
        elements = adapter_elements(trunk, config)
    except ValueError as exc:
        raise TrunkRejected(str(exc)) from exc
    if elements > lim.max_adapter_elements:
        raise TrunkRejected(
            f"an adapter of rank {config.rank} on these layers would hold {elements} elements, over this "
            f"trunk's max_adapter_elements={lim.max_adapter_elements}; use a smaller rank or fewer target "
            "modules, or raise ServerConfig.max_adapter_elements."
        )
