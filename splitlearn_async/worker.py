"""StageWorker: the one thread that runs all torch work of a process.

The event loop never runs torch: a coroutine puts a work item (with an ``asyncio.Future``)
on an ``asyncio.Queue`` and awaits the future. One worker thread takes items in a short
loop, in the manner of vLLM's engine core::

    while True:
        items = <block on the queue until something is waiting, then drain it>
        run plain items one by one; group batched items by key into chunks, one call each
        hand every result back with loop.call_soon_threadsafe

A sentinel item ends the loop. Two kinds of failure are kept apart: one item failing (its
caller gets the exception, the rest carry on) and the thread dying (every pending and
later call fails fast with :class:`WorkerDied`).

This module does not import torch; the thread imports it only to set its thread count.

Threads and OpenMP: torch's CPU kernels run on OpenMP teams, one per thread that starts a
parallel region, and libgomp stops its threads from spinning between regions as soon as
it manages more threads than there are cores. A second team in the process (the event
loop's, say, after it converted one large tensor) makes every step of the worker's team
pay futex wake-ups instead: on 2 cores a SmolLM2 trunk step went from 22 ms to 38 ms. So
the worker sets its own thread count explicitly (all cores it may run on, by default),
and while it runs, the thread that started it (the event loop's) runs torch with one
thread, which never starts a team. Load models before starting the worker with
``torch.set_num_threads(1)`` on the main thread, or on the worker itself, for the same
reason (``splitlearn serve`` does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from splitlearn_async.errors import ConfigError

from .errors import WorkerDied, WorkerStopped

__all__ = ["StageWorker", "WorkerStats", "WorkerStopped", "WorkerDied"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# How often an idle worker thread checks that its event loop still exists, so a loop
# closed without stop() does not strand the thread forever.
_IDLE_POLL_S = 1.0
_STOP = object()  # the sentinel: the thread ends after the items queued before it


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


class _Item:
    """One submission: a plain call (``batch_fn is None``) or a batched item."""

    __slots__ = ("future", "call", "key", "payload", "batch_fn", "abandoned")

    def __init__(
        self,
        *,
        call: Callable[[], Any] | None = None,
        key: Hashable = None,
        payload: Any = None,
        batch_fn: Callable[[list[Any]], Sequence[Any]] | None = None,
    ) -> None:
        self.future: asyncio.Future[Any] | None = None
        self.call = call
        self.key = key
        self.payload = payload
        self.batch_fn = batch_fn
        # Set on the loop once nobody waits for the result (cancelled, failed at stop);
        # read by the worker thread, which then skips the item. A bool store is atomic.
        self.abandoned = False


# (item, result, exception): what the thread hands back for one item
_Outcome = tuple[_Item, Any, BaseException | None]


def _plan(items: Sequence[_Item], max_batch_size: int, batching: bool) -> list[list[_Item]]:
    """Split drained items into units, each run with one call, in order of first arrival.

    A plain call is a unit of its own. Batched items with equal keys are grouped at the
    place of the group's first item (so a batched item may overtake a plain call queued
    before it), then cut into chunks of at most ``max_batch_size`` (1 when batching is off).
    """
    units: list[list[_Item]] = []
    groups: dict[Hashable, list[_Item]] = {}
    for item in items:
        if item.batch_fn is None:
            units.append([item])
            continue
        group = groups.get(item.key)
        if group is None:
            group = groups[item.key] = []
            units.append(group)
        group.append(item)
    size = max_batch_size if batching else 1
    chunked: list[list[_Item]] = []
    for unit in units:
        chunked.extend(unit[i : i + size] for i in range(0, len(unit), size))
    return chunked


class StageWorker:
    """The one thread that runs a process's torch work, fed by an asyncio queue.

    Use it as ``async with StageWorker("trunk") as worker: await worker.run(fn, x)``, or
    call :meth:`start` and :meth:`stop` yourself. All methods are called from the event
    loop that started the worker.

    Args:
        name: Thread name, also used in log lines and error messages.
        torch_threads: ``torch.set_num_threads(torch_threads)`` is called once on the
            worker thread before its first item (torch's intra-op threads); None means
            every core the thread may run on (``os.sched_getaffinity``). Meanwhile the
            starting thread runs torch with one thread (see the module's docstring); stop()
            gives it back its count.
        max_batch_size: Most items passed to one ``batch_fn`` call.
        max_batch_delay_s: After taking a batched item, wait up to this long for more
            items to fill a batch; 0 runs what is waiting at once.
        batching: False runs every batched item alone (``batch_fn([item])``), for
            comparisons and debugging.
        max_gather_wait_s: When the sources added with :meth:`expect` say that more
            batched items are on their way than are waiting (sessions in the middle of a
            decode loop whose next step has not arrived yet), wait up to this long for
            them. Without it, steps that arrive a few milliseconds apart split into
            batches that alternate forever. A lone session never waits (nothing more is
            expected).

    Raises:
        ConfigError: an argument is out of range.
    """

    def __init__(
        self,
        name: str = "splitlearn-worker",
        *,
        torch_threads: int | None = None,
        max_batch_size: int = 32,
        max_batch_delay_s: float = 0.0,
        batching: bool = True,
        max_gather_wait_s: float = 0.0,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}.")
        if torch_threads is not None and (isinstance(torch_threads, bool) or torch_threads < 1):
            raise ConfigError(f"torch_threads must be None or >= 1, got {torch_threads!r}.")
        if isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size!r}.")
        if not max_batch_delay_s >= 0:
            raise ConfigError(f"max_batch_delay_s must be >= 0 seconds, got {max_batch_delay_s!r}.")
        if isinstance(max_gather_wait_s, bool) or not max_gather_wait_s >= 0:
            raise ConfigError(f"max_gather_wait_s must be >= 0 seconds, got {max_gather_wait_s!r}.")
        self.name = name
        self.max_gather_wait_s = float(max_gather_wait_s)
        self._expected_sources: list[Callable[[], int]] = []
        self.torch_threads = torch_threads
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = float(max_batch_delay_s)
        self.batching = batching
        self._loop: asyncio.AbstractEventLoop | None = None
        # asyncio primitives bind to the loop that first uses them (Python >= 3.10)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._exited = asyncio.Event()  # set (on the loop) when the thread ends
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._closed = False  # stop() was called: no (re)start
        self._stop_requested = False
        self._crash: BaseException | None = None
        self._pending: set[_Item] = set()
        self._stats = WorkerStats()
        self._stats_lock = threading.Lock()
        self._caller_threads: int | None = None  # the starting thread's torch threads, restored at stop

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker thread on the running event loop; a second call does nothing.

        Raises:
            WorkerStopped: the worker was stopped; a stopped worker cannot be restarted.
            RuntimeError: the worker was started on another event loop.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            raise WorkerStopped(
                f"StageWorker {self.name!r} has been stopped and cannot be restarted; create a new one."
            )
        if self._thread is not None:
            if loop is not self._loop:
                raise RuntimeError(f"StageWorker {self.name!r} was started on another event loop.")
            return
        self._loop = loop
        torch = sys.modules.get("torch")
        if torch is not None and self._caller_threads is None:  # no OpenMP team on the loop's thread
            self._caller_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        self._thread = threading.Thread(target=self._thread_main, args=(loop,), name=self.name, daemon=True)
        self._accepting = True
        self._thread.start()
        logger.debug("StageWorker %r started", self.name)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop the worker: refuse new work, finish queued work, end and join the thread.

        New submissions fail with :class:`WorkerStopped` at once. Items already queued run
        if they finish within ``grace_s``; the rest fail with :class:`WorkerStopped`. An
        item already running when the grace period ends cannot be interrupted: stop()
        waits for it. Calling stop() again (or on a worker never started) is harmless.

        Args:
            grace_s: Seconds to let queued work finish; ``None`` waits for all of it.

        Raises:
            ConfigError: ``grace_s`` is negative.
        """
        if grace_s is not None and not grace_s >= 0:
            raise ConfigError(f"grace_s must be None or >= 0 seconds, got {grace_s!r}.")
        self._accepting = False
        self._closed = True
        if self._thread is None:
            return
        if not self._stop_requested:
            self._stop_requested = True
            self._queue.put_nowait(_STOP)  # after every item already queued
        try:
            await asyncio.wait_for(self._exited.wait(), grace_s)
        except asyncio.TimeoutError:
            dropped = self._fail_pending(
                lambda: WorkerStopped(
                    f"StageWorker {self.name!r} stopped before this call finished: "
                    f"the {grace_s} s shutdown grace period ran out."
                )
            )
            logger.warning(
                "StageWorker %r: grace period of %s s ran out; %d calls failed with WorkerStopped",
                self.name, grace_s, dropped,
            )
            await self._exited.wait()  # the thread skips the dropped items; only a running one delays it
        self._thread.join()  # it has posted its last callback, so it is returning now
        if self._caller_threads is not None:
            sys.modules["torch"].set_num_threads(self._caller_threads)
            self._caller_threads = None
        logger.debug("StageWorker %r stopped", self.name)

    async def __aenter__(self) -> StageWorker:
        """Start the worker (see :meth:`start`) and return it."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the worker with the default grace period (see :meth:`stop`)."""
        await self.stop()

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread, or None before :meth:`start`."""
        return self._thread

    @property
    def queue_depth(self) -> int:
        """Items waiting in the queue (not counting those the thread has taken)."""
        return self._queue.qsize()

    @property
    def is_running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`, while the thread is alive."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the counters (see :class:`WorkerStats`)."""
        with self._stats_lock:
            s = self._stats
            return WorkerStats(s.items_run, s.batches_run, s.largest_batch, dict(s.batch_size_counts))

    # --- submitting work (on the loop) ---------------------------------------------------

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the worker thread and return its result.

        Cancelling the caller before the thread reaches the item skips it; once running,
        the call finishes and its result is dropped.

        Returns:
            What ``fn`` returns.

        Raises:
            Exception: whatever ``fn`` raises, unchanged.
            WorkerStopped: the worker was stopped, or stopped before the call finished.
            WorkerDied: the worker thread crashed.
            RuntimeError: the worker was not started, or is used from another event loop.
        """
        item = _Item(call=functools.partial(fn, *args, **kwargs))
        result: T = await self._submit(item)
        return result

    async def run_batched(
        self, key: Hashable, item: ItemT, batch_fn: Callable[[list[ItemT]], Sequence[ResultT]]
    ) -> ResultT:
        """Run ``item`` through ``batch_fn`` together with other items waiting under ``key``.

        Items submitted with equal keys that are waiting when the worker looks are passed
        to one call ``batch_fn([item, ...])``, at most ``max_batch_size`` at a time. The
        key stands for the batch function: items with equal keys must be fine with the
        same ``batch_fn``, because the first item's one runs the whole chunk (so a lambda
        made anew for each call still batches). ``batch_fn`` returns one result per item,
        in order. If it raises for several items, each is run again alone so that only the
        bad one fails: ``batch_fn`` must therefore leave no partial effects when it raises.

        Returns:
            This item's result.

        Raises:
            Exception: what ``batch_fn`` raised for this item alone; ValueError if it did
                not return one result per item.
            TypeError: ``key`` is not hashable.
            WorkerStopped, WorkerDied, RuntimeError: as for :meth:`run`.
        """
        try:
            hash(key)
        except TypeError as exc:
            raise TypeError(f"run_batched() needs a hashable key: {exc}.") from exc
        result: ResultT = await self._submit(_Item(key=key, payload=item, batch_fn=batch_fn))
        return result

    async def _submit(self, item: _Item) -> Any:
        """Queue ``item`` and wait for its outcome."""
        if self._crash is not None:
            raise self._died_error()
        if not self._accepting:
            if self._closed:
                raise WorkerStopped(f"StageWorker {self.name!r} has been stopped; it takes no new work.")
            raise RuntimeError(
                f"StageWorker {self.name!r} is not started; call `await worker.start()` "
                "or use `async with worker:` first."
            )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError(f"StageWorker {self.name!r} belongs to another event loop.")
        future = loop.create_future()
        item.future = future
        self._pending.add(item)
        future.add_done_callback(functools.partial(self._on_done, item))
        self._queue.put_nowait(item)
        return await future

    def _on_done(self, item: _Item, future: asyncio.Future[Any]) -> None:
        """Done-callback (loop): nobody needs the item any more; the thread skips it if not started."""
        item.abandoned = True
        self._pending.discard(item)

    def expect(self, source: Callable[[], int]) -> None:
        """Add a source of how many batched items are expected soon (called on the loop).

        The worker sums the sources when it forms a batch; with ``max_gather_wait_s > 0``
        it waits (at most that long) until that many batched items are waiting. A server
        counts its sessions in a decode loop, a pipeline its running streams.
        """
        self._expected_sources.append(source)

    def _expected(self) -> int:
        """(loop) Batched items expected soon, by the sources of :meth:`expect`."""
        return sum(source() for source in self._expected_sources)

    async def _next_batch(self) -> list[Any]:
        """(loop) Wait for the first item, then take everything else already waiting.

        Then wait for more, up to ``max_batch_delay_s`` for a full batch, or up to
        ``max_gather_wait_s`` for the items :meth:`expect`'s sources announce.
        """
        loop = asyncio.get_running_loop()
        items = [await self._queue.get()]
        self._drain(items)
        target, wait_s = self.max_batch_size, self.max_batch_delay_s
        if self.max_gather_wait_s > wait_s and self._expected_sources and self._wants_more(items):
            expected = min(self.max_batch_size, self._expected())
            if expected > self._batched(items):
                target, wait_s = expected, self.max_gather_wait_s
        if wait_s > 0 and self._wants_more(items, target):
            deadline = loop.time() + wait_s
            while self._wants_more(items, target):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
                self._drain(items)
        return items

    def _drain(self, items: list[Any]) -> None:
        """(loop) Append every queued item to ``items``, stopping after the sentinel."""
        while items[-1] is not _STOP:
            try:
                items.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    @staticmethod
    def _batched(items: list[Any]) -> int:
        return sum(1 for it in items if it is not _STOP and it.batch_fn is not None)

    def _wants_more(self, items: list[Any], target: int | None = None) -> bool:
        """(loop) True while a batch could still grow to ``target`` (default: a full batch)."""
        if items[-1] is _STOP or not self.batching:
            return False
        batched = self._batched(items)
        return 0 < batched < min(self.max_batch_size, target or self.max_batch_size)

    def _fail_pending(self, make_error: Callable[[], BaseException]) -> int:
        """(loop) Fail every unfinished call with a fresh error from ``make_error``; return how many."""
        failed = 0
        for item in list(self._pending):
            item.abandoned = True  # before set_exception: its done-callback runs only later
            if item.future is not None and not item.future.done():
                item.future.set_exception(make_error())
                failed += 1
        return failed

    def _died_error(self) -> WorkerDied:
        """The error every call gets once the thread has crashed."""
        crash = self._crash
        error = WorkerDied(
            f"StageWorker {self.name!r} died ({type(crash).__name__}: {crash}); "
            "every call fails until a new worker is started."
        )
        error.__cause__ = crash
        return error

    def _on_crash(self, exc: BaseException) -> None:
        """(loop) The thread crashed: refuse new work and fail everything pending."""
        self._crash = exc
        self._accepting = False
        self._fail_pending(self._died_error)
        while not self._queue.empty():  # their callers have just been failed
            self._queue.get_nowait()

    def _deliver(self, outcomes: list[_Outcome]) -> None:
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

    # --- the worker thread ---------------------------------------------------------------

    def _thread_main(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker thread: take items, run them, hand back outcomes; end at the sentinel."""
        try:
            if self.torch_threads is not None or "torch" in sys.modules:
                import torch  # lazily: importing this module must not import torch

                torch.set_num_threads(self.torch_threads or _cores())
            while True:
                items = self._wait_for_items(loop)
                if items is None:
                    break
                stop = items[-1] is _STOP
                work = items[:-1] if stop else items
                if work:
                    self._run_items(loop, work)
                if stop:
                    break
        except BaseException as exc:
            logger.error("StageWorker %r crashed; failing every pending call", self.name, exc_info=True)
            self._post(loop, self._on_crash, exc)
        finally:
            self._post(loop, self._exited.set)

    def _wait_for_items(self, loop: asyncio.AbstractEventLoop) -> list[Any] | None:
        """(thread) Block until the loop hands over a batch of items; None if the loop is gone."""
        try:
            pending = asyncio.run_coroutine_threadsafe(self._next_batch(), loop)
        except RuntimeError:  # the loop is closed
            logger.warning("StageWorker %r: event loop closed without stop(); thread ends", self.name)
            return None
        while True:
            try:
                return pending.result(timeout=_IDLE_POLL_S)
            except concurrent.futures.TimeoutError:
                if loop.is_closed():
                    pending.cancel()
                    logger.warning("StageWorker %r: event loop closed without stop(); thread ends", self.name)
                    return None
            except (concurrent.futures.CancelledError, asyncio.CancelledError):
                # the loop is shutting down and cancelled its tasks (asyncio.run does)
                logger.warning("StageWorker %r: event loop shut down without stop(); thread ends", self.name)
                return None

    def _run_items(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        """(thread) Run drained items, unit by unit, handing back each unit's outcomes at once."""
        for unit in _plan(items, self.max_batch_size, self.batching):
            outcomes = self._run_call(unit[0]) if unit[0].batch_fn is None else self._run_chunk(unit)
            if outcomes:
                self._post(loop, self._deliver, outcomes)

    def _run_call(self, item: _Item) -> list[_Outcome]:
        """(thread) Run one plain call, unless its caller has gone."""
        if item.abandoned:
            return []
        call = cast(Callable[[], Any], item.call)  # set for every plain item
        try:
            outcome: _Outcome = (item, call(), None)
        except Exception as exc:
            outcome = (item, None, exc)
        self._count(items=1)
        return [outcome]

    def _run_chunk(self, chunk: list[_Item]) -> list[_Outcome]:
        """(thread) One ``batch_fn`` call for a chunk; if it fails for several, each again alone."""
        live = [item for item in chunk if not item.abandoned]
        if not live:
            return []
        batch_fn = cast(Callable[[list[Any]], Sequence[Any]], live[0].batch_fn)  # set for every batched item
        self._count(batch=len(live))
        logger.debug("StageWorker %r: batch of %d for key %r", self.name, len(live), live[0].key)
        try:
            results = list(batch_fn([item.payload for item in live]))
            if len(results) != len(live):
                raise ValueError(
                    f"batch_fn returned {len(results)} results for {len(live)} items; "
                    "it must return one result per item, in order."
                )
        except Exception as exc:
            if len(live) == 1:
                self._count(items=1)
                return [(live[0], None, exc)]
            logger.warning(
                "StageWorker %r: batch_fn failed for a batch of %d (%s: %s); running each item alone",
                self.name, len(live), type(exc).__name__, exc,
            )
            return [outcome for item in live for outcome in self._run_chunk([item])]
        self._count(items=len(live))
        return [(item, result, None) for item, result in zip(live, results)]

    def _count(self, *, items: int = 0, batch: int = 0) -> None:
        """(thread) Update the counters."""
        with self._stats_lock:
            s = self._stats
            s.items_run += items
            if batch:
                s.batches_run += 1
                s.largest_batch = max(s.largest_batch, batch)
                s.batch_size_counts[batch] = s.batch_size_counts.get(batch, 0) + 1

    def _post(self, loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
        """(thread) Schedule ``callback(*args)`` on ``loop``; log if the loop is gone."""
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            logger.warning("StageWorker %r: event loop closed; an outcome was dropped", self.name)
