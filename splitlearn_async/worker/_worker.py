"""StageWorker: the facade over the queue, the gathering and the execution of one worker thread."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from splitlearn_async.errors import ArgumentError, StateError

from ..errors import ConfigError, WorkerDied, WorkerStopped
from ._execution import BatchRunner, WorkerStats, post, set_torch_threads, track_thread, wait_for_items
from ._gathering import Gatherer, plan
from ._queue import BatchedItem, Item, PlainItem, WorkQueue

__all__ = ["StageWorker"]

logger = logging.getLogger(__name__)

#: How long a loop shutting down without stop() waits for its worker thread to end.
_LOOP_END_WAIT_S = 10.0

P = ParamSpec("P")
T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


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
            starting thread runs torch with one thread (see the package's docstring); stop()
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
        self.torch_threads = torch_threads
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = float(max_batch_delay_s)
        self.batching = batching
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue = WorkQueue()
        self._gatherer = Gatherer(self._queue, self)  # reads the settings above for every batch
        self._runner = BatchRunner(name)
        self._exited = asyncio.Event()  # set (on the loop) when the thread ends
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._closed = False  # stop() was called: no (re)start
        self._stop_requested = False
        self._loop_ending = False  # the loop is shutting down without stop(): the thread ends (read by it)
        self._watcher: asyncio.Task[None] | None = None
        self._crash: BaseException | None = None
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
                raise StateError(f"StageWorker {self.name!r} was started on another event loop.")
            return
        self._loop = loop
        torch = sys.modules.get("torch")
        if torch is not None and self._caller_threads is None:  # no OpenMP team on the loop's thread
            self._caller_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        self._thread = threading.Thread(target=self._thread_main, args=(loop,), name=self.name, daemon=True)
        self._accepting = True
        self._thread.start()
        track_thread(self._thread)
        self._watcher = loop.create_task(self._watch_loop(), name=f"{self.name}: ends with its event loop")
        logger.debug("StageWorker %r started", self.name)

    async def _watch_loop(self) -> None:
        """Wait for the thread to end; if the loop shuts down first, end the thread cleanly.

        ``asyncio.run`` cancels every task when its main coroutine returns. A program that
        never called :meth:`stop` gets here: the worker refuses new work and the loop keeps
        running until the thread has finished what it was doing and ended, so that nothing
        is left behind and nothing is printed at exit.
        """
        try:
            await self._exited.wait()
        except asyncio.CancelledError:
            logger.debug("StageWorker %r: event loop shutting down without stop(); ending the thread", self.name)
            self._loop_ending = True
            self._accepting = False
            self._closed = True
            if not self._stop_requested:
                self._stop_requested = True
                self._queue.put_stop()
            try:
                await asyncio.wait_for(self._exited.wait(), _LOOP_END_WAIT_S)
            except asyncio.TimeoutError:  # an item still running: the interpreter's exit joins the thread
                return
            if self._thread is not None:
                self._thread.join()

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
            self._queue.put_stop()  # after every item already queued
        try:
            await asyncio.wait_for(self._exited.wait(), grace_s)
        except asyncio.TimeoutError:
            dropped = self._queue.fail_pending(
                lambda: WorkerStopped(
                    f"StageWorker {self.name!r} stopped before this call finished: "
                    f"the {grace_s} s shutdown grace period ran out."
                )
            )
            logger.warning(
                "StageWorker %r: grace period of %s s ran out; %d calls failed with WorkerStopped",
                self.name,
                grace_s,
                dropped,
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
        """Items waiting in the queue, background items held back included (not those the thread has taken)."""
        return self._queue.qsize() + self._gatherer.held

    @property
    def is_running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`, while the thread is alive."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the counters (see :class:`WorkerStats`)."""
        return self._runner.stats()

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
        result: T = await self._submit(PlainItem(functools.partial(fn, *args, **kwargs)))
        return result

    async def run_batched(
        self,
        key: Hashable,
        item: ItemT,
        batch_fn: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        background: bool = False,
    ) -> ResultT:
        """Run ``item`` through ``batch_fn`` together with other items waiting under ``key``.

        Items submitted with equal keys that are waiting when the worker looks are passed
        to one call ``batch_fn([item, ...])``, at most ``max_batch_size`` at a time. The
        key stands for the batch function: items with equal keys must be fine with the
        same ``batch_fn``, because the first item's one runs the whole chunk (so a lambda
        made anew for each call still batches). ``batch_fn`` returns one result per item,
        in order. If it raises for several items, each is run again alone so that only the
        bad one fails: ``batch_fn`` must therefore leave no partial effects when it raises.

        ``background=True`` marks work that yields to the rest (training segments): while
        other items wait, each batch the worker forms takes at most one unit of background
        work (the oldest background item and the batched items of its key), so an item
        waits for at most one background unit, however many are queued.

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
            raise ArgumentError(f"run_batched() needs a hashable key: {exc}.") from exc
        batched = BatchedItem(key, item, batch_fn)
        batched.background = background
        result: ResultT = await self._submit(batched)
        return result

    async def _submit(self, item: Item) -> Any:
        """Queue ``item`` and wait for its outcome."""
        if self._crash is not None:
            raise self._died_error()
        if not self._accepting:
            if self._closed:
                raise WorkerStopped(f"StageWorker {self.name!r} has been stopped; it takes no new work.")
            raise StateError(
                f"StageWorker {self.name!r} is not started; call `await worker.start()` "
                "or use `async with worker:` first."
            )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise StateError(f"StageWorker {self.name!r} belongs to another event loop.")
        return await self._queue.submit(item, loop)

    def expect(self, source: Callable[[], int]) -> None:
        """Add a source of how many batched items are expected soon (called on the loop).

        The worker sums the sources when it forms a batch; with ``max_gather_wait_s > 0``
        it waits (at most that long) until that many batched items are waiting. A server
        counts its sessions in a decode loop, a pipeline its running streams.
        """
        self._gatherer.expect(source)

    # --- failure -------------------------------------------------------------------------

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
        self._queue.fail_pending(self._died_error)
        self._queue.discard_queued()  # their callers have just been failed
        self._gatherer.discard_held()

    # --- the worker thread ---------------------------------------------------------------

    def _thread_main(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker thread: take items, run them, hand back outcomes; end at the sentinel."""
        try:
            set_torch_threads(self.torch_threads)
            while True:
                gathered = wait_for_items(self.name, loop, self._gatherer.next_batch, lambda: self._loop_ending)
                if gathered is None:
                    break
                if gathered.items:
                    self._run_items(loop, gathered.items)
                if gathered.stop:
                    break
        except BaseException as exc:
            logger.exception("StageWorker %r crashed; failing every pending call", self.name)
            post(self.name, loop, self._on_crash, exc)
        finally:
            post(self.name, loop, self._exited.set)

    def _run_items(self, loop: asyncio.AbstractEventLoop, items: list[Item]) -> None:
        """(thread) Run gathered items, unit by unit, handing back each unit's outcomes at once."""
        self._runner.run_units(loop, plan(items, self.max_batch_size, self.batching))
