"""Several models on one server: named trunks, loaded on first use, evicted LRU under a byte budget.

A server serves one or more models, each by name (``splitlearn serve --model NAME=BUNDLE``).
A call names its model in the gRPC metadata ``splitlearn-model`` (``protocol.routing``);
a call that names none goes to the first model. :class:`ModelSet` holds them:

- a model given as a loader is loaded on its first call, on one loader thread beside the
  worker (reading weights is I/O; the worker keeps running the other models' steps
  meanwhile);
- before a load, idle models are evicted least-recently-used while the loaded bytes plus
  the new model's would pass ``max_model_bytes``. A model is idle when no call or stream
  is in flight on it and it holds no inference session, no training session and no
  adapter: nothing a client made is ever dropped. If the budget cannot be met, the call
  gets RESOURCE_EXHAUSTED naming the busy models;
- each loaded model has its own services (inference, training, adapters, a
  :class:`ServerContext`), and shares the server's one worker thread, its session store
  and its limits. Steps of different models never share a batch (the batch key names
  the model).

Loads are serialised by one lock: two calls for a model that is loading wait for the same
load; a failed load is answered FAILED_PRECONDITION with its reason, and the next call
tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from splitlearn_async.errors import ConfigError, ModelNotFound, PreconditionFailed, TrunkBusy
from splitlearn_async.protocol.routing import DEFAULT_MODEL, MODEL_METADATA, check_model_name, requested_model

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_METADATA",
    "ModelServices",
    "ModelSet",
    "ModelSlot",
    "ModelSource",
    "check_model_name",
    "model_bytes",
    "requested_model",
]

logger = logging.getLogger(__name__)


def model_bytes(trunk: Any) -> int:
    """Bytes of a trunk's parameters and buffers (its KV caches are counted per session)."""
    tensors = [*trunk.parameters(), *trunk.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class ModelSource:
    """How a server gets one model's trunk.

    Attributes:
        load: Returns the trunk; called on the model's first use (on a thread).
        nbytes: The trunk's size in bytes before it is loaded, for the budget (None:
            unknown; the budget is then checked once it is loaded).
        reloadable: False for a trunk given already loaded: it is never evicted, since
            it could not be loaded again.
        description: What it is, for logs and ``Info`` (e.g. the bundle's path).
    """

    load: Callable[[], Any]
    nbytes: int | None = None
    reloadable: bool = True
    description: str = ""

    @classmethod
    def loaded(cls, trunk: Any) -> ModelSource:
        """A trunk already in memory (never evicted)."""
        return cls(lambda: trunk, model_bytes(trunk), reloadable=False, description="given in memory")

    @classmethod
    def from_path(
        cls,
        source: str | os.PathLike[str],
        split_points: tuple[int, int] | None = None,
        dtype: str | None = None,
        device: str | None = None,
    ) -> ModelSource:
        """A trunk read from a bundle (or a model with ``split_points``) on first use.

        The size before loading is the bundle's trunk weights file when the dtype is kept.
        """

        def load() -> Any:
            from splitlearn_async.models.loading import load_stages

            return load_stages(source, split_points, parts=("trunk",), dtype=dtype, device=device).trunk

        return cls(load, None if dtype else _weights_bytes(Path(source)), description=str(source))


def _weights_bytes(path: Path) -> int | None:
    for candidate in (path / "trunk" / "model.safetensors", path / "model.safetensors"):
        if candidate.is_file():
            return candidate.stat().st_size
    return None


class ModelServices(Protocol):
    """One loaded model's services, as the server builds them (see ``_service.py``)."""

    @property
    def trunk(self) -> Any:
        """The model's trunk stage."""

    def holds_state(self) -> str | None:
        """Why the model may not be evicted now (sessions, training, adapters), or None."""

    async def stop(self) -> None:
        """Free the model's sessions, graphs and adapters."""


@dataclass(eq=False)
class ModelSlot:
    """One named model of a :class:`ModelSet`, loaded or not.

    Attributes:
        name: Its name.
        source: How to load it.
        services: Its services while loaded, else None.
        nbytes: Its bytes while loaded (else the source's estimate, or 0).
        calls: Calls and streams in flight on it.
        last_used_s: Clock time its last call ended (or began).
        loads: How many times it was loaded.
        failure: Why its last load failed, if it did.
    """

    name: str
    source: ModelSource
    services: Any = None
    nbytes: int = 0
    calls: int = 0
    last_used_s: float = 0.0
    loads: int = 0
    failure: str | None = None

    @property
    def loaded(self) -> bool:
        """True while the model is in memory."""
        return self.services is not None

    def busy_reason(self) -> str | None:
        """Why the model may not be evicted now, or None when it is idle."""
        if not self.source.reloadable:
            return "it was given in memory"
        if self.calls:
            return f"{self.calls} call(s) in flight"
        held: str | None = self.services.holds_state() if self.services is not None else None
        return held


class ModelSet:
    """The server's named models: lookup, first-use loading, LRU eviction under a byte budget.

    Args:
        sources: The models by name, in order; the first is the default.
        build: Makes a loaded trunk's services (called on the event loop).
        max_bytes: Budget for the loaded models' bytes (None: no budget).
        on_health: Told ``(name, serving)`` when a model's load fails or succeeds.
        clock: Monotonic clock in seconds.

    Raises:
        ConfigError: no model, a bad name, or a budget that is not a positive integer.
    """

    def __init__(
        self,
        sources: Mapping[str, ModelSource],
        build: Callable[[str, Any], ModelServices],
        max_bytes: int | None = None,
        on_health: Callable[[str, bool], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sources:
            raise ConfigError("a server needs at least one model; give a trunk or --model NAME=BUNDLE.")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ConfigError(f"max_model_bytes must be a positive number of bytes or None, got {max_bytes!r}.")
        self.slots = {check_model_name(name): ModelSlot(name, src) for name, src in sources.items()}
        self.default = next(iter(self.slots))
        self.max_bytes = max_bytes
        self._build = build
        self._on_health = on_health
        self._clock = clock
        self._lock = asyncio.Lock()
        # one loader thread: an evicted model's memory, freed into that thread's malloc
        # arena, is reused by the next load instead of piling up in a new thread's arena
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="splitlearn-model-loader")
        self.evictions = 0

    @property
    def names(self) -> list[str]:
        """The model names, the default first."""
        return list(self.slots)

    @property
    def loaded_bytes(self) -> int:
        """Bytes of the models in memory."""
        return sum(s.nbytes for s in self.slots.values() if s.loaded)

    def slot(self, name: str | None) -> ModelSlot:
        """The slot of ``name`` (None: the default model).

        Raises:
            ModelNotFound: no model of that name (the sentence lists the names).
        """
        if name is None:
            return self.slots[self.default]
        found = self.slots.get(name)
        if found is None:
            raise ModelNotFound(
                f"this server has no model {name!r}; it serves {self.names}. Name one of them in the "
                f"'{MODEL_METADATA}' metadata (RemoteTrunk(..., model=...)), or none for {self.default!r}."
            )
        return found

    def add_loaded(self, name: str, services: ModelServices) -> None:
        """Record ``name`` (given in memory) as loaded with ``services``, without a load."""
        slot = self.slots[name]
        slot.services = services
        slot.nbytes = model_bytes(services.trunk)
        slot.loads += 1
        slot.last_used_s = self._clock()

    @contextlib.asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[Any]:
        """The services of model ``name`` (loaded first if need be), held busy for the block.

        Raises:
            ModelNotFound: no model of that name.
            TrunkBusy: loading it would pass the budget and no other model is idle.
            PreconditionFailed: it could not be loaded (the reason is in the sentence).
        """
        slot = self.slot(name)
        slot.calls += 1  # before any await: an eviction running meanwhile leaves it alone
        slot.last_used_s = self._clock()
        try:
            services = slot.services if slot.loaded else await self._load(slot)
            yield services
        finally:
            slot.calls -= 1
            slot.last_used_s = self._clock()

    async def _load(self, slot: ModelSlot) -> Any:
        async with self._lock:
            if slot.loaded:  # another call loaded it while this one waited
                return slot.services
            estimate = slot.source.nbytes or 0
            await self._make_room(estimate, slot)
            logger.info("loading model %s (%s)", slot.name, slot.source.description or "loader")
            try:
                trunk = await asyncio.get_running_loop().run_in_executor(self._loader, slot.source.load)
            except Exception as exc:
                slot.failure = f"{type(exc).__name__}: {exc}"
                logger.error("model %s could not be loaded", slot.name, exc_info=exc)
                await self._health(slot.name, False)
                raise PreconditionFailed(
                    f"model {slot.name!r} could not be loaded on this server ({slot.failure}); "
                    "the server's operator must fix its files; other models are not affected."
                ) from exc
            slot.nbytes = model_bytes(trunk)
            slot.services = self._build(slot.name, trunk)
            slot.loads += 1
            slot.failure = None
            if slot.nbytes > estimate:  # the estimate was short (or unknown): check again
                await self._make_room(0, slot)
            await self._health(slot.name, True)
            logger.info("model %s loaded: %d bytes; %d bytes loaded in all", slot.name, slot.nbytes, self.loaded_bytes)
            return slot.services

    async def _make_room(self, incoming: int, slot: ModelSlot) -> None:
        """Evict idle models, least recently used first, until ``incoming`` more bytes fit."""
        budget = self.max_bytes
        if budget is None:
            return
        if incoming > budget:
            raise TrunkBusy(
                f"model {slot.name!r} needs {incoming} bytes, more than this server's whole model budget "
                f"max_model_bytes={budget}; the operator must raise --max-model-bytes to serve it."
            )
        while self.loaded_bytes + incoming > budget:
            idle = [s for s in self.slots.values() if s.loaded and s is not slot and s.busy_reason() is None]
            if not idle:
                busy = {s.name: s.busy_reason() for s in self.slots.values() if s.loaded and s is not slot}
                if slot.loaded:  # loaded already, over the budget by its own size: kept, said
                    logger.warning(
                        "models hold %d bytes, over max_model_bytes=%d; none is idle: %s",
                        self.loaded_bytes,
                        budget,
                        busy,
                    )
                    return
                raise TrunkBusy(
                    f"loading model {slot.name!r} ({incoming} bytes) would pass this server's "
                    f"max_model_bytes={budget} ({self.loaded_bytes} bytes loaded) and no loaded model is idle "
                    f"({'; '.join(f'{n}: {r}' for n, r in busy.items())}); retry when one is, or raise "
                    "--max-model-bytes."
                )
            victim = min(idle, key=lambda s: s.last_used_s)
            await self._evict(victim)

    async def _evict(self, slot: ModelSlot) -> None:
        services, slot.services = slot.services, None
        freed, slot.nbytes = slot.nbytes, 0
        self.evictions += 1
        await services.stop()
        del services
        # a model's services refer to each other (cycles): collect them now, so that its
        # weights are freed before the next load, not at some later collection
        gc.collect()
        logger.info("model %s evicted (least recently used, idle): %d bytes freed", slot.name, freed)

    async def _health(self, name: str, serving: bool) -> None:
        if self._on_health is not None:
            await self._on_health(name, serving)

    async def stop(self) -> None:
        """Stop every loaded model's services (the server is stopping) and the loader thread."""
        for slot in self.slots.values():
            if slot.services is not None:
                await slot.services.stop()
        self._loader.shutdown(wait=False, cancel_futures=True)

    def info(self) -> list[dict[str, Any]]:
        """One entry per model for ``Info``: name, loaded, bytes, loads, failure."""
        return [
            {
                "name": s.name,
                "loaded": s.loaded,
                "bytes": s.nbytes if s.loaded else 0,
                "loads": s.loads,
                "failure": s.failure,
            }
            for s in self.slots.values()
        ]
