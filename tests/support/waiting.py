"""Waiting for a condition in async tests, bounded so that a broken test fails instead of hanging."""

from __future__ import annotations

from collections.abc import Callable

import anyio


async def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Poll ``predicate()`` every 10 ms until it is true.

    The timeout bounds the test's duration (a hang guard); it is not a speed assertion.

    Raises:
        TimeoutError: ``predicate()`` stayed false for ``timeout_s`` seconds.
    """
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.01)
