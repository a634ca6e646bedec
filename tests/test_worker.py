"""StageWorker: one thread, batching by key, failures, cancellation and shutdown.

Scheduling is tested with plain Python callables; only the torch_threads test touches torch.
A gate parks the worker thread inside an item, so that what is queued behind it (and thus
how it batches) is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from splitlearn_async.errors import ConfigError
from splitlearn_async.worker import StageWorker, WorkerDied, WorkerStats, WorkerStopped


class Gate:
    """Holds the worker thread inside ``hold`` until ``open()``; ``entered`` resolves when it is in."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.entered: asyncio.Future[None] = self._loop.create_future()
        self._opened = threading.Event()

    def hold(self) -> str:
        self._loop.call_soon_threadsafe(lambda: self.entered.done() or self.entered.set_result(None))
        if not self._opened.wait(timeout=60):  # a safety net against a hung test, not a timing check
            raise TimeoutError("the test never opened the gate")
        return "held"

    def open(self) -> None:
        self._opened.set()


async def park(worker: StageWorker) -> tuple[Gate, asyncio.Task[str]]:
    """Park the worker thread in a gate; returns the gate and the task of the parked call."""
    gate = Gate()
    task = asyncio.create_task(worker.run(gate.hold))
    await gate.entered
    return gate, task


async def until(predicate: Callable[[], bool], spins: int = 10_000) -> None:
    """Yield to the loop until ``predicate()`` holds (counted in loop turns, not seconds)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def doubles(items: list[int]) -> list[int]:
    return [2 * x for x in items]


# --- one thread -------------------------------------------------------------------------


async def test_every_item_runs_on_the_one_worker_thread() -> None:
    seen: list[int] = []

    def record(i: int) -> int:
        seen.append(threading.get_ident())
        return i

    def record_batch(items: list[int]) -> list[int]:
        seen.append(threading.get_ident())
        return items

    async with StageWorker("one-thread") as worker:
        assert worker.thread is not None and worker.is_running
        results = await asyncio.gather(
            *(worker.run(record, i) for i in range(30)),
            *(worker.run_batched("k", i, record_batch) for i in range(30)),
        )
        assert results == [*range(30), *range(30)]
        assert set(seen) == {worker.thread.ident}
        assert worker.thread.ident != threading.get_ident()


async def test_thread_count_does_not_grow_with_concurrent_callers() -> None:
    async with StageWorker("thread-count") as worker:
        baseline = threading.active_count()
        counts: list[int] = []

        def count() -> None:
            counts.append(threading.active_count())

        await asyncio.gather(*(worker.run(count) for _ in range(128)))
        await asyncio.gather(*(worker.run_batched("k", 1, lambda xs: [count() for _ in xs]) for _ in range(128)))
        assert len(counts) == 256
        assert max(counts) == baseline
        assert threading.active_count() == baseline


async def test_the_worker_owns_torch_threads_and_the_starting_thread_gets_one() -> None:
    """No second OpenMP team: the loop's thread runs torch single-threaded while a worker runs."""
    import os

    import torch

    before = torch.get_num_threads()
    async with StageWorker("torch-owner") as worker:
        assert await worker.run(torch.get_num_threads) == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


async def test_torch_threads_is_applied_on_the_worker_thread() -> None:
    import torch

    before = torch.get_num_threads()
    async with StageWorker("torch-threads", torch_threads=1) as worker:
        assert await worker.run(torch.get_num_threads) == 1
        # torch's intra-op pool is shared by the process: give later tests their default back
        await worker.run(torch.set_num_threads, before)
    assert torch.get_num_threads() == before


def test_importing_the_worker_does_not_import_torch() -> None:
    code = "import sys, splitlearn_async.worker; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- batching ---------------------------------------------------------------------------


async def test_batches_are_at_most_max_batch_size_and_results_go_to_their_callers() -> None:
    sizes: list[int] = []

    def batch_fn(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [x * x for x in items]

    async with StageWorker("batching", max_batch_size=16) as worker:
        gate, held = await park(worker)
        tasks = [asyncio.create_task(worker.run_batched("step", i, batch_fn)) for i in range(40)]
        await until(lambda: worker.queue_depth == 40)
        gate.open()
        assert await asyncio.gather(*tasks) == [i * i for i in range(40)]
        assert await held == "held"
        stats = worker.stats
    assert all(size <= 16 for size in sizes)
    assert sorted(sizes) == [8, 16, 16]
    assert stats == WorkerStats(items_run=41, batches_run=3, largest_batch=16, batch_size_counts={16: 2, 8: 1})


async def test_batching_off_runs_every_item_alone() -> None:
    async with StageWorker("no-batching", batching=False) as worker:
        gate, held = await park(worker)
        tasks = [asyncio.create_task(worker.run_batched("step", i, doubles)) for i in range(40)]
        await until(lambda: worker.queue_depth == 40)
        gate.open()
        assert await asyncio.gather(*tasks) == [2 * i for i in range(40)]
        await held
        assert worker.stats.batch_size_counts == {1: 40}


async def test_items_batch_only_with_their_own_key_and_plain_calls_run_alone() -> None:
    calls: list[tuple[str, list[int]]] = []

    def tagged(tag: str) -> Callable[[list[int]], list[str]]:
        def batch_fn(items: list[int]) -> list[str]:
            calls.append((tag, items))
            return [f"{tag}{x}" for x in items]

        return batch_fn

    fn_a, fn_b = tagged("a"), tagged("b")
    async with StageWorker("keys") as worker:
        gate, held = await park(worker)
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(worker.run_batched(("session", i % 2), i, fn_a if i % 2 else fn_b)))
            tasks.append(asyncio.create_task(worker.run(str, i)))
        await until(lambda: worker.queue_depth == 12)
        gate.open()
        results = await asyncio.gather(*tasks)
        await held
    assert results == ["b0", "0", "a1", "1", "b2", "2", "a3", "3", "b4", "4", "a5", "5"]
    assert sorted(calls) == [("a", [1, 3, 5]), ("b", [0, 2, 4])]


async def test_the_key_alone_decides_the_batch() -> None:
    # a lambda made anew for every call still batches: the first item's batch_fn runs the chunk
    async with StageWorker("fresh-lambdas") as worker:
        gate, held = await park(worker)
        tasks = [asyncio.create_task(worker.run_batched("k", i, lambda xs: [x + 1 for x in xs])) for i in range(5)]
        await until(lambda: worker.queue_depth == 5)
        gate.open()
        assert await asyncio.gather(*tasks) == [1, 2, 3, 4, 5]
        await held
        assert worker.stats.batch_size_counts == {5: 1}


async def test_batch_delay_waits_for_more_items() -> None:
    # with a long delay the first item waits until a second one fills the batch of 2
    async with StageWorker("delay", max_batch_size=2, max_batch_delay_s=600.0) as worker:
        first = asyncio.create_task(worker.run_batched("k", 1, doubles))
        await until(lambda: worker.queue_depth == 0)  # the worker has taken it and is waiting
        for _ in range(10):
            await asyncio.sleep(0)
        second = asyncio.create_task(worker.run_batched("k", 2, doubles))
        assert await asyncio.gather(first, second) == [2, 4]
        assert worker.stats.batch_size_counts == {2: 1}


# --- failures ---------------------------------------------------------------------------


class Poisoned(Exception):
    pass


async def test_one_poisoned_item_fails_alone() -> None:
    def batch_fn(items: list[int]) -> list[int]:
        if 7 in items:
            raise Poisoned(f"item 7 is poisoned (batch of {len(items)})")
        return [x + 100 for x in items]

    async with StageWorker("poison") as worker:
        gate, held = await park(worker)
        tasks = [asyncio.create_task(worker.run_batched("k", i, batch_fn)) for i in range(10)]
        await until(lambda: worker.queue_depth == 10)
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await held
        stats = worker.stats
    assert isinstance(results[7], Poisoned) and "batch of 1" in str(results[7])
    assert [r for i, r in enumerate(results) if i != 7] == [i + 100 for i in range(10) if i != 7]
    assert stats.batch_size_counts == {10: 1, 1: 10}
    assert stats.items_run == 11


async def test_exceptions_propagate_with_their_type() -> None:
    def fails() -> None:
        raise KeyError("missing")

    async with StageWorker("raises") as worker:
        with pytest.raises(KeyError, match="missing"):
            await worker.run(fails)
        with pytest.raises(Poisoned):
            await worker.run_batched("k", 1, lambda items: (_ for _ in ()).throw(Poisoned()))
        with pytest.raises(ValueError, match="returned 0 results for 1 items"):
            await worker.run_batched("k", 1, lambda items: [])
        with pytest.raises(RuntimeError, match="StopIteration"):
            await worker.run(next, iter([]))
        assert await worker.run(lambda: "still working") == "still working"


async def test_a_crashed_thread_fails_every_call_with_worker_died(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_scheduler(self: StageWorker, loop: object, items: list[object]) -> None:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(StageWorker, "_run_items", broken_scheduler)
    worker = StageWorker("crashes")
    await worker.start()
    with caplog.at_level(logging.ERROR, logger="splitlearn_async.worker"):
        results = await asyncio.gather(*(worker.run(int, i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, WorkerDied) for r in results)
    assert "scheduler bug" in str(results[0]) and isinstance(results[0].__cause__, RuntimeError)
    assert any(r.exc_info for r in caplog.records)
    assert not worker.is_running and worker.queue_depth == 0
    with pytest.raises(WorkerDied, match="crashes"):
        await worker.run(int, 1)
    await worker.stop()
    assert worker.thread is not None and not worker.thread.is_alive()


# --- cancellation -----------------------------------------------------------------------


async def test_a_cancelled_caller_s_item_is_skipped() -> None:
    ran: list[str] = []

    def batch_fn(items: list[str]) -> list[str]:
        ran.extend(items)
        return items

    async with StageWorker("cancel") as worker:
        gate, held = await park(worker)
        plain = asyncio.create_task(worker.run(ran.append, "plain"))
        batched = asyncio.create_task(worker.run_batched("k", "batched", batch_fn))
        kept = asyncio.create_task(worker.run_batched("k", "kept", batch_fn))
        await until(lambda: worker.queue_depth == 3)
        plain.cancel()
        batched.cancel()
        for task in (plain, batched):
            with pytest.raises(asyncio.CancelledError):
                await task
        gate.open()
        assert await kept == "kept"
        await held
        assert await worker.run(lambda: "after") == "after"
    assert ran == ["kept"]


# --- lifecycle --------------------------------------------------------------------------


async def test_stop_leaves_no_thread_behind_and_refuses_new_work() -> None:
    worker = StageWorker("lifecycle-worker")
    await worker.start()
    await worker.start()  # idempotent
    assert await worker.run(lambda: 1) == 1
    await worker.stop()
    await worker.stop()  # harmless
    assert worker.thread is not None and not worker.thread.is_alive()
    assert "lifecycle-worker" not in [t.name for t in threading.enumerate()]
    assert not worker.is_running
    with pytest.raises(WorkerStopped, match="has been stopped"):
        await worker.run(lambda: 1)
    with pytest.raises(WorkerStopped):
        await worker.run_batched("k", 1, doubles)
    with pytest.raises(WorkerStopped, match="cannot be restarted"):
        await worker.start()


async def test_stop_lets_queued_work_finish_within_grace() -> None:
    worker = StageWorker("graceful")
    await worker.start()
    gate, held = await park(worker)
    tasks = [asyncio.create_task(worker.run(lambda i=i: i * 10)) for i in range(5)]
    batched = [asyncio.create_task(worker.run_batched("k", i, doubles)) for i in range(5)]
    await until(lambda: worker.queue_depth == 10)
    stopping = asyncio.create_task(worker.stop(grace_s=None))
    await asyncio.sleep(0)
    assert not worker.is_running
    with pytest.raises(WorkerStopped):
        await worker.run(lambda: 0)
    gate.open()
    await stopping
    assert await held == "held"
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
    assert await asyncio.gather(*batched) == [0, 2, 4, 6, 8]
    assert worker.thread is not None and not worker.thread.is_alive()


async def test_stop_fails_what_is_left_after_the_grace_period() -> None:
    ran: list[int] = []
    worker = StageWorker("impatient")
    await worker.start()
    gate, held = await park(worker)
    tasks = [asyncio.create_task(worker.run(ran.append, i)) for i in range(3)]
    await until(lambda: worker.queue_depth == 3)
    stopping = asyncio.create_task(worker.stop(grace_s=0.0))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, WorkerStopped) and "grace period" in str(r) for r in results)
    gate.open()  # the running item cannot be interrupted; stop() waits for it
    await stopping
    with pytest.raises(WorkerStopped):
        await held
    assert ran == []
    assert not worker.thread.is_alive()  # type: ignore[union-attr]


async def test_misuse_fails_with_a_sentence() -> None:
    worker = StageWorker("unstarted")
    with pytest.raises(RuntimeError, match="not started"):
        await worker.run(int)
    await worker.stop()  # never started: nothing to do
    with pytest.raises(TypeError, match="hashable"):
        async with StageWorker("hash") as started:
            await started.run_batched(["not", "hashable"], 1, doubles)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"torch_threads": 0}, {"max_batch_delay_s": -1.0}, {"name": ""}],
)
def test_bad_settings_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        StageWorker(**kwargs)


async def test_gather_waits_for_the_items_its_sources_expect() -> None:
    calls: list[list[int]] = []

    def batch_fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    expected = 3
    async with StageWorker("gather", max_gather_wait_s=0.5) as worker:
        worker.expect(lambda: expected)

        async def later(i: int, delay_s: float) -> int:
            await asyncio.sleep(delay_s)
            return await worker.run_batched("k", i, batch_fn)

        assert await asyncio.gather(later(0, 0), later(1, 0.02), later(2, 0.04)) == [0, 1, 2]
        assert calls == [[0, 1, 2]]  # one batch, though the items came 20 ms apart
        expected = 1  # nothing more is expected: an item runs at once, without waiting
        calls.clear()
        assert await asyncio.gather(later(3, 0), later(4, 0.1)) == [3, 4]
        assert calls == [[3], [4]]


def test_gather_wait_must_be_non_negative() -> None:
    with pytest.raises(ConfigError, match="max_gather_wait_s"):
        StageWorker(max_gather_wait_s=-1.0)


async def test_background_work_yields_one_unit_per_batch_to_the_rest():
    """Background items (training segments) queued behind a busy worker: the other items waiting
    run first, then one background unit (with the batched items of its key), then the next."""
    ran: list[str] = []

    def record(items: list[str]) -> list[str]:
        ran.append("+".join(items))
        return items

    async with StageWorker("background") as worker:
        gate, parked = await park(worker)
        background = [
            asyncio.create_task(worker.run_batched(key, name, record, background=True))
            for key, name in (("b1", "b1a"), ("b2", "b2"), ("b1", "b1b"), ("b3", "b3"))
        ]
        front = [asyncio.create_task(worker.run_batched("f", name, record)) for name in ("f1", "f2")]
        plain = asyncio.create_task(worker.run(lambda: ran.append("plain") or "plain"))
        await until(lambda: worker.queue_depth == 7)
        gate.open()
        await asyncio.gather(parked, *background, *front, plain)
        assert ran == ["f1+f2", "plain", "b1a+b1b", "b2", "b3"]
        # one more batch arriving while background work is held back still goes first
        gate, parked = await park(worker)
        held = [asyncio.create_task(worker.run_batched(k, k, record, background=True)) for k in ("x", "y", "z")]
        await until(lambda: worker.queue_depth == 3)
        gate.open()
        await held[0]  # x ran; y and z are held back
        ran.clear()
        await asyncio.gather(worker.run_batched("f", "f3", record), *held)
        assert ran[0] == "f3" or ran[:2] == ["y", "f3"]  # f3 waits for one background unit at most
        assert sorted(ran) == ["f3", "y", "z"]


async def test_background_work_held_back_still_runs_before_stop():
    ran: list[str] = []
    worker = StageWorker("background-stop")
    await worker.start()
    gate, parked = await park(worker)
    tasks = [asyncio.create_task(worker.run_batched(k, k, lambda xs: [ran.append(x) or x for x in xs], background=True))
             for k in ("a", "b", "c")]
    await until(lambda: worker.queue_depth == 3)
    stopping = asyncio.create_task(worker.stop(grace_s=None))
    await asyncio.sleep(0)
    gate.open()
    await stopping
    assert [await t for t in tasks] == ["a", "b", "c"] and ran == ["a", "b", "c"]
    await parked


def test_pin_malloc_thresholds_sets_glibcs_and_leaves_a_users_alone(monkeypatch):
    from splitlearn_async.worker import pin_malloc_thresholds

    expected = sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert pin_malloc_thresholds() is bool(expected)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_malloc_thresholds() is False  # the user's setting wins
