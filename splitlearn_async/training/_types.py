"""The small types of the training host: how it runs work, its caps, one open session."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError, PreconditionFailed, TrunkBusy
from ._config import TRUNK_MODES, check_adapter_id
from ._engine import TrunkTrainer

__all__ = [
    "BatchedRunner",
    "Runner",
    "TrainingEntry",
    "TrainingLimits",
    "apply_blocked",
    "busy",
    "check_can_open",
    "check_open_settings",
    "one_by_one",
]

T = TypeVar("T")


class Runner(Protocol):
    """Runs ``fn(*args)`` on the trunk's torch worker thread: ``StageWorker.run``."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


class BatchedRunner(Protocol):
    """Runs ``item`` through ``batch_fn`` with the other items waiting under ``key``: ``StageWorker.run_batched``."""

    def __call__(
        self, key: Hashable, item: Any, batch_fn: Callable[[list[Any]], Sequence[Any]], /
    ) -> Awaitable[Any]: ...


def one_by_one(run: Runner) -> BatchedRunner:
    """A :class:`BatchedRunner` that runs every item alone through ``run``: ``batch_fn([item])[0]``."""

    async def batched(key: Hashable, item: Any, batch_fn: Callable[[list[Any]], Sequence[Any]]) -> Any:
        return await run(lambda: batch_fn([item])[0])

    return batched


@dataclass(frozen=True)
class TrainingLimits:
    """The caps of training on one trunk (the server takes them from its ``ServerConfig``).

    Attributes:
        allow_full_training: Whether ``mode="full"`` sessions may open (they change the
            weights every inference session is served with).
        max_training_sessions: Most training sessions open at once.
        max_pending_steps: Most forwards kept waiting for their backward, over all sessions.
        pending_step_ttl_s: Seconds a forward's graph is kept without a backward.
        max_adapters: Most LoRA adapters loaded at once.
        session_ttl_s: Seconds a training session may stay idle before :meth:`TrainingHost.sweep`
            closes it.
        max_lora_rank: Largest rank of an adapter, trained or loaded.
        max_lora_targets: Most names in an adapter's ``target_modules``.
        max_adapter_elements: Most elements of one adapter (``rank x (in + out)`` over its layers).
        segment_layer_tokens: Most layer-tokens (tokens of the batch x decoder layers) one work
            item of a training forward, evaluation or backward runs: the trunk's layers are cut
            into segments of ``max(1, segment_layer_tokens // (B x T))`` whole layers, each one
            item, so work queued meanwhile (decode steps) waits for one segment, not the whole
            step; the gradients are the same bit for bit. When one layer over all ``B`` rows
            is more, each layer runs in chunks of ``max(1, segment_layer_tokens // T)`` rows
            (within float rounding of one call). None: the whole trunk in one item.
        batch_tokens: Most tokens (``B x T``, summed) of the training forwards (or
            evaluations) of different sessions that run as one batch: forwards with equal
            ``T`` that wait together run their segments as one call, each row with its own
            session's adapter, and their backwards likewise when they wait together. A
            batch also holds no more than ``segment_layer_tokens`` tokens (unless one step
            alone has more), so that its segments take no longer than one session's. None:
            each forward runs alone. Full-trunk sessions always run alone.
        batch_wait_s: How long the backward of a batched forward waits for the other
            sessions of its batch to send theirs, so that they run as one backward; one
            that does not come in time costs nothing but this wait (the backward then runs
            on its own rows). 0 never waits.
    """

    allow_full_training: bool = True
    max_training_sessions: int = 16
    max_pending_steps: int = 8
    pending_step_ttl_s: float = 300.0
    max_adapters: int = 64
    session_ttl_s: float = math.inf
    max_lora_rank: int = 4096
    max_lora_targets: int = 64
    max_adapter_elements: int = 1 << 40
    segment_layer_tokens: int | None = 64
    batch_tokens: int | None = 1024
    batch_wait_s: float = 0.05

    def __post_init__(self) -> None:
        tokens = self.batch_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ConfigError(
                f"TrainingLimits.batch_tokens must be an int >= 1 or None, got {tokens!r}; "
                "e.g. 1024, or None to run each session's training forwards alone."
            )
        wait = self.batch_wait_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < math.inf:
            raise ConfigError(f"TrainingLimits.batch_wait_s must be a number of seconds >= 0, got {wait!r}.")
        value = self.segment_layer_tokens
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"TrainingLimits.segment_layer_tokens must be an int >= 1 or None, got {value!r}; "
                "e.g. 64, or None to run a training step's layers in one work item."
            )


@dataclass(eq=False)
class TrainingEntry:
    """One open training session.

    Attributes:
        training_id: Its id (random, so that other clients cannot guess it).
        trainer: The :class:`TrunkTrainer` (used on the worker only).
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        adapter_id: The trained adapter's name (LoRA only).
        last_used_s: Clock time of the last call.
        busy: Calls of this session in progress (the sweep leaves it alone while > 0).
    """

    training_id: str
    trainer: TrunkTrainer
    mode: str
    adapter_id: str | None
    last_used_s: float
    busy: int = 0

    @property
    def trainable_parameters(self) -> int:
        """Elements the trunk's optimizer updates for this session."""
        return self.trainer.num_trainable


@contextlib.contextmanager
def busy(entry: TrainingEntry, clock: Callable[[], float]) -> Iterator[None]:
    """Mark ``entry`` busy during a call (the sweep leaves it alone) and record its last use after."""
    entry.busy += 1
    try:
        yield
    finally:
        entry.busy -= 1
        entry.last_used_s = clock()


def apply_blocked(count: int, other: str) -> str:
    """The sentence for an optimizer step while ``count`` (``other``) steps wait for their backward."""
    return (
        f"the optimizer cannot step while {count} {other}step(s) of this training session wait for their "
        "backward (their graphs hold the current weights); run their backward with apply=False first."
    )


def check_open_settings(mode: str, adapter_id: str | None) -> None:
    """Whether ``mode`` and ``adapter_id`` make sense together.

    Raises:
        ConfigError: an unknown mode, a malformed adapter name, or a name with a mode other than LoRA.
    """
    if mode not in TRUNK_MODES:
        raise ConfigError(f"mode must be one of {', '.join(TRUNK_MODES)}, got {mode!r}.")
    check_adapter_id(adapter_id, "adapter_id", allow_none=True)
    if mode != "lora" and adapter_id is not None:
        raise ConfigError(f"adapter_id={adapter_id!r} is only meaningful for mode 'lora', not {mode!r}.")


def check_can_open(limits: TrainingLimits, sessions: list[TrainingEntry], mode: str, adapter_id: str | None) -> None:
    """Whether a session of ``mode`` (training ``adapter_id``) may open beside ``sessions``.

    Raises:
        PreconditionFailed: full training is not allowed, or would run beside other sessions
            (or they beside it), or another session trains the adapter.
        TrunkBusy: ``max_training_sessions`` are open.
    """
    if mode == "full" and not limits.allow_full_training:
        raise PreconditionFailed(
            "this server does not allow full-trunk training (it would change the weights every session "
            "is served with); train LoRA adapters instead, or start the server with allow_full_training=True."
        )
    if len(sessions) >= limits.max_training_sessions:
        raise TrunkBusy(
            f"{len(sessions)} training sessions are open (max_training_sessions="
            f"{limits.max_training_sessions}); close one or try again later."
        )
    if any(e.mode == "full" for e in sessions) or (mode == "full" and sessions):
        raise PreconditionFailed(
            "a full-trunk training session cannot run beside other training sessions (its optimizer "
            "changes the weights their kept graphs hold); close the other sessions first."
        )
    if adapter_id is not None and any(e.adapter_id == adapter_id for e in sessions):
        raise PreconditionFailed(
            f"adapter {adapter_id!r} is being trained by another training session; close it first."
        )
