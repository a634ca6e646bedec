"""Execution: running units of work on the worker thread and handing outcomes back to the loop.

The thread blocks in :func:`wait_for_items` until the loop has gathered items, runs them
unit by unit with a :class:`BatchRunner` (a plain call, or one ``batch_fn`` call for a
chunk of batched items, retried item by item if it fails for several), and posts each
unit's outcomes to the loop, where :func:`deliver` resolves the callers' futures.

Nothing here imports torch at import time; :func:`set_torch_threads` imports it on the
worker thread.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitlearn_async.errors import ConfigError

from ._gathering import Gathered, Unit
from ._queue import BatchedItem, Outcome, PlainItem

__all__ = [
    "INTERPRETER_EXITING",
    "BatchRunner",
    "WorkerStats",
    "deliver",
    "post",
    "set_torch_threads",
    "track_thread",
    "wait_for_items",
]

logger = logging.getLogger(__name__)

# How often an idle worker thread checks that its event loop still exists, so a loop
# closed without stop() does not strand the thread forever.
_IDLE_POLL_S = 1.0


@dataclass
class WorkerStats:
    """Counters of what a worker has run (a snapshot; it does not change after it is taken).

    Attributes:
        items_run: Items finished (with a result or an exception), plain and batched.
        batches_run: Calls of a ``batch_fn`` (retries of single items after a failed batch included).
        largest_batch: The most items passed to one ``batch_fn`` call.
        batch_size_counts: ``batch_fn`` calls by number of items: ``{size: calls}``.
    """

    items_run: int = 0
    batches_run: int = 0
    largest_batch: int = 0
    batch_size_counts: dict[int, int] = field(default_factory=dict)


def _cores() -> int:
    """Cores the calling thread may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_torch_threads(torch_threads: int | None) -> None:
    """(thread) Give the calling thread's torch ``torch_threads`` intra-op threads (None: every core).

    Nothing happens when ``torch_threads`` is None and torch has not been imported.
    """
    if torch_threads is not None or "torch" in sys.modules:
        import torch  # lazily: importing the worker must not import torch

        torch.set_num_threads(torch_threads or _cores())


def wait_for_items(
    name: str,
    loop: asyncio.AbstractEventLoop,
    next_batch: Callable[[], Coroutine[Any, Any, Gathered]],
    ending: Callable[[], bool],
) -> Gathered | None:
    """(thread) Block until the loop hands over a batch of items; None once the thread should end.

    The thread ends quietly when its loop is gone or going: ``ending()`` says so (the loop
    is shutting down, or the interpreter is exiting), the loop is closed, or the loop
    cancelled the wait (``asyncio.run`` cancels every task when its main coroutine
    returns). A program that never called ``stop()`` thus exits without a word.
    """
    if ending() or loop.is_closed():
        logger.debug("StageWorker %r: the event loop is ending without stop(); thread ends", name)
        return None
    waiting = next_batch()
    try:
        pending = asyncio.run_coroutine_threadsafe(waiting, loop)
    except RuntimeError:  # the loop closed meanwhile
        waiting.close()
        logger.debug("StageWorker %r: event loop closed without stop(); thread ends", name)
        return None
    while True:
        try:
            return pending.result(timeout=_IDLE_POLL_S)
        except concurrent.futures.TimeoutError:
            if loop.is_closed():  # nothing to cancel: the loop cannot run the task again
                logger.debug("StageWorker %r: event loop closed without stop(); thread ends", name)
                return None
            if INTERPRETER_EXITING.is_set():
                pending.cancel()
                logger.debug("StageWorker %r: the interpreter is exiting; thread ends", name)
                return None
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            # the loop is shutting down and cancelled its tasks (asyncio.run does)
            logger.debug("StageWorker %r: event loop shut down without stop(); thread ends", name)
            return None


def post(name: str, loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> None:
    """(thread) Schedule ``callback(*args)`` on ``loop``; if the loop is gone, nobody waits for it."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        logger.debug("StageWorker %r: event loop closed; an outcome was dropped", name)


#: Set when the interpreter exits: worker threads whose loop still runs elsewhere end too.
INTERPRETER_EXITING = threading.Event()

#: Worker threads alive, joined at interpreter exit (see :func:`track_thread`).
_LIVE_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_EXIT_JOIN_S = 5.0
_join_registered = False


def track_thread(thread: threading.Thread) -> None:
    """Have ``thread`` (a worker thread) joined when the interpreter exits.

    A worker thread still inside torch while the interpreter tears down its C++ runtime
    aborts the process (``terminate called without an active exception``). At exit, after
    the program's own threads are joined, every worker thread is told to end and joined
    (for at most a few seconds), so that a program that never stopped its workers exits
    cleanly and silently.
    """
    global _join_registered
    if not _join_registered:
        atexit.register(_join_at_exit)
        _join_registered = True
    _LIVE_THREADS.add(thread)


def _join_at_exit() -> None:
    INTERPRETER_EXITING.set()
    for thread in list(_LIVE_THREADS):
        if thread is not threading.current_thread():
            thread.join(timeout=_EXIT_JOIN_S)


def deliver(outcomes: list[Outcome]) -> None:
    """(loop) Resolve the callers' futures, skipping those already done (e.g. cancelled)."""
    for item, result, exc in outcomes:
        future = item.future
        if future is None or future.done():
            continue
        if exc is None:
            future.set_result(result)
        elif isinstance(exc, StopIteration):  # futures refuse StopIteration
            error = RuntimeError(f"the call raised StopIteration: {exc}")
            error.__cause__ = exc
            future.set_exception(error)
        else:
            future.set_exception(exc)


class BatchRunner:
    """Runs units of work items on the worker thread and counts what it ran.

    Args:
        name: The worker's name, for log lines.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._stats = WorkerStats()
        self._stats_lock = threading.Lock()

    def stats(self) -> WorkerStats:
        """A snapshot of the counters (any thread)."""
        with self._stats_lock:
            s = self._stats
            return WorkerStats(s.items_run, s.batches_run, s.largest_batch, dict(s.batch_size_counts))

    def run_units(self, loop: asyncio.AbstractEventLoop, units: list[Unit]) -> None:
        """(thread) Run units one by one, handing back each unit's outcomes to ``loop`` at once."""
        for unit in units:
            outcomes = self.run_call(unit) if isinstance(unit, PlainItem) else self.run_chunk(unit)
            if outcomes:
                post(self._name, loop, deliver, outcomes)

    def run_call(self, item: PlainItem) -> list[Outcome]:
        """(thread) Run one plain call, unless its caller has gone."""
        if item.abandoned:
            return []
        try:
            outcome: Outcome = (item, item.call(), None)
        except Exception as exc:
            outcome = (item, None, exc)
        self._count(items=1)
        return [outcome]

    def run_chunk(self, chunk: list[BatchedItem]) -> list[Outcome]:
        """(thread) One ``batch_fn`` call for a chunk; if it fails for several, each again alone."""
        live = [item for item in chunk if not item.abandoned]
        if not live:
            return []
        batch_fn = live[0].batch_fn  # the key stands for the batch function: the first item's runs the chunk
        self._count(batch=len(live))
        logger.debug("StageWorker %r: batch of %d for key %r", self._name, len(live), live[0].key)
        try:
            results: Sequence[Any] = list(batch_fn([item.payload for item in live]))
            if len(results) != len(live):
                raise ConfigError(
                    f"batch_fn returned {len(results)} results for {len(live)} items; "
                    "it must return one result per item, in order."
                )
        except Exception as exc:
            if len(live) == 1:
                self._count(items=1)
                return [(live[0], None, exc)]
            logger.warning(
                "StageWorker %r: batch_fn failed for a batch of %d (%s: %s); running each item alone",
                self._name,
                len(live),
                type(exc).__name__,
                exc,
            )
            return [outcome for item in live for outcome in self.run_chunk([item])]
        self._count(items=len(live))
        return [(item, result, None) for item, result in zip(live, results, strict=True)]

    def _count(self, *, items: int = 0, batch: int = 0) -> None:
        """(thread) Update the counters."""
        with self._stats_lock:
            s = self._stats
            s.items_run += items
            if batch:
                s.batches_run += 1
                s.largest_batch = max(s.largest_batch, batch)
                s.batch_size_counts[batch] = s.batch_size_counts.get(batch, 0) + 1
