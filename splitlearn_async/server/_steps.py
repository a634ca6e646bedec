"""Session steps of many sessions as one trunk call, on the server's worker thread.

:class:`StepWork` is one session's message (or one chunk of a long prompt) waiting on the
worker; :func:`compute_batch` runs the waiting works of one batch key as one trunk call:
linear layers and MLPs over all rows at once, attention per session on its own KV cache.

A beam-search step (``beam_idx``) reorders its session's cache inside the same worker
item, just before the batched call: the reorder copies keys and values, which is torch
work and belongs on the worker, and it costs no extra trip through the queue, so the step
batches with the others as usual. Each work reorders once: if the batched call fails and
the worker runs the works again one by one, their caches are not reordered twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from splitlearn_async import protocol as proto
from splitlearn_async.errors import TrunkRejected
from splitlearn_async.models.cache import KVCache
from splitlearn_async.models.stages import run_stage_batched

from ._metrics import NullMetrics
from ._sessions import Session

__all__ = ["StepWork", "chunk_bounds", "compute_batch"]


@dataclass
class StepWork:
    """One session's message (or chunk of it) waiting for a batched trunk call.

    Attributes:
        hidden: ``(B, T, H)`` hidden states of the new tokens, wire dtype.
        mask: ``(B, T)`` validity of the new tokens.
        positions: ``(B, T)`` their position ids.
        session: The session.
        cache: The session's KV cache, taken when the work was queued; it advances by ``T`` columns.
        reply_dtype: dtype of the hidden states in the reply.
        earlier: Outputs ``(B, t, H)`` of the message's earlier chunks, joined into the reply.
        last: True for a message's last chunk: the result is the encoded reply.
        beam_idx: ``(B,)`` parent rows: reorder the cache before the step (None: done, or none asked).
        failure: Why the reorder failed, if it did: the work's result, without a trunk call.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    session: Session
    cache: KVCache
    reply_dtype: torch.dtype
    earlier: list[torch.Tensor] = field(default_factory=list)
    last: bool = True
    beam_idx: torch.Tensor | None = None
    failure: Exception | None = None

    def reorder_once(self) -> bool:
        """(worker) Reorder the cache by ``beam_idx`` unless done already; False if that failed."""
        beam_idx, self.beam_idx = self.beam_idx, None
        if beam_idx is not None:
            try:
                self.cache.reorder(beam_idx)
            except Exception as exc:
                self.failure = exc
        return self.failure is None


def chunk_bounds(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` cutting ``length`` tokens into chunks of at most ``chunk`` (None: one)."""
    if chunk is None or length <= chunk:
        return [(0, length)]
    return [(a, min(length, a + chunk)) for a in range(0, length, chunk)]


def compute_batch(trunk: Any, works: list[StepWork], metrics: NullMetrics) -> list[bytes | torch.Tensor | Exception]:
    """(worker) One trunk call for the steps of several sessions; one result per step.

    A step whose output is not finite, or whose reply cannot be encoded, gets its
    exception as its result; the others their reply: a bytes body for a message's last
    chunk, the ``(B, T, H)`` output otherwise. A beam-search step's cache is reordered
    first (once; a step whose reorder fails gets that error and no trunk call). Raises
    only if the trunk call itself failed, and then no cache has advanced.
    """
    live = [w for w in works if w.reorder_once()]
    calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, KVCache]] = [
        (w.hidden, w.mask, w.positions, w.cache) for w in live
    ]
    outs: list[torch.Tensor] = []
    if calls:
        outs = run_stage_batched(trunk, calls)  # each (B_i, T, H), model dtype, CPU
        metrics.observe_batch(sum(int(w.hidden.shape[0]) for w in live))
    # from here on nothing may raise: the caches have advanced, a retry would advance them twice
    live_outs = iter(outs)  # in the order of ``live``: the works whose reorder did not fail
    results: list[bytes | torch.Tensor | Exception] = []
    for work in works:
        if work.failure is not None:
            results.append(work.failure)
            continue
        try:
            results.append(_finish_step(work, next(live_outs)))
        except Exception as exc:
            results.append(exc)
    return results


def _finish_step(work: StepWork, out: torch.Tensor) -> bytes | torch.Tensor:
    """(worker) One session's part of a batched call: the reply body, or the chunk's output.

    Raises:
        TrunkRejected: the output holds NaN or infinite values.
        WireError: the reply cannot be encoded.
    """
    # the cache captured at submission: the stream may close the session meanwhile
    work.session.cache_bytes = work.cache.nbytes()
    if not bool(torch.isfinite(out).all()):
        raise TrunkRejected(
            "the trunk's output holds NaN or infinite values for this input; check the hidden states sent."
        )
    if not work.last:
        return out
    full = torch.cat([*work.earlier, out], dim=1) if work.earlier else out  # (B, T, H)
    return proto.build_result(
        full, session_id=work.session.session_id, length=work.cache.length, wire_dtype=work.reply_dtype
    )
