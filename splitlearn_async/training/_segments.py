"""Training forwards and backwards on the worker: cut into layer segments, batched over sessions.

**Segments.** A trunk's training forward over ``B x T`` tokens and all its layers can take
longer than many decode steps; run as one work item, it would make every decode step that
arrives meanwhile wait for all of it. So the trunk's layers are cut into segments of whole
layers (:func:`segment_bounds`), and each segment of a forward or a backward is a work
item of its own: inference items queued meanwhile run between two segments, as they run
between the chunks of a long prompt.

The math is that of one call. Segment ``k`` runs its layers on a leaf ``x_k``: the
previous segment's output, detached and requiring grad, so each segment has a graph of
its own (kept in :attr:`StepGraph.segments`). The backward runs
``torch.autograd.grad(out_k, [x_k, *params], g_k)`` from the last segment down, and
``g_{k-1}`` is the gradient of ``x_k``: the gradient of the same tensor that autograd
would have passed across that boundary in one graph, made by the same operations. The
parameter gradients are checked and accumulated only once every segment has run, so a
backward that gives NaN or infinity changes nothing, as before.

**Batches of sessions.** Training forwards of different sessions that wait together (equal
``T``) run as one :class:`ForwardRun` over their rows joined: each row runs with its own
session's LoRA adapter (:class:`~._lora.RowAdapters`), and the segments' graphs are shared.
Each session gets a :class:`~._pending.StepGraph` that names its rows. When every
session of the batch sends its backward (the host waits up to ``batch_wait_s`` for them),
the backwards run as one ``autograd.grad`` over the shared graph, segment by segment
(:func:`backward_segment`), each session's gradient in its own rows and its own adapter's
parameters. Backwards that come without all their batch-mates recompute their own rows'
segment from the kept segment input and back-propagate that instead (the shared graph
also holds the others' adapters, which may have stepped since): the same gradients within
float rounding, for one more forward of their own rows. With the base trunk frozen, rows
never mix: each session's gradients depend on its own rows only. Full-trunk sessions
train weights every row uses, and always run alone.

Everything here runs on the worker thread; :mod:`._work` sends the items there.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, StateError
from ._engine import NonFiniteGradient, TrunkTrainer
from ._lora import RowAdapters, use_adapter
from ._pending import StepGraph

__all__ = ["BackwardRun", "ForwardRun", "Layers", "Member", "backward_segment", "segment_bounds"]

#: The decoder layers ``(a, b)`` one segment runs (full-model indices); None: the whole trunk in one call.
Layers = tuple[int, int] | None


def segment_bounds(layer_range: tuple[int, int], tokens: int, layer_tokens: int | None) -> list[Layers]:
    """The segments of a training call over ``tokens`` (``B x T``) tokens through ``layer_range``.

    Each segment runs at most ``layer_tokens // tokens`` layers (at least one), and the
    segments are as even as that allows: 24 layers with room for 10 give 8 + 8 + 8.
    ``[None]`` (one call over every layer) when everything fits, or ``layer_tokens`` is None.
    """
    start, end = layer_range
    layers = end - start
    if layer_tokens is None or tokens < 1 or layers <= max(1, layer_tokens // tokens):
        return [None]
    count = math.ceil(layers / max(1, layer_tokens // tokens))
    cuts = [start + (layers * i) // count for i in range(count + 1)]
    return list(itertools.pairwise(cuts))


#: One work item of a forward: its layers, and its rows (None: every row of the batch).
Piece = tuple[Layers, slice | None]


def segment_plan(layer_range: tuple[int, int], rows: int, length: int, layer_tokens: int | None) -> list[Piece]:
    """The work items of a training call over ``rows x length`` tokens: layer segments, maybe cut by rows.

    The layers are cut by :func:`segment_bounds`. When even one layer over every row
    holds more than ``layer_tokens`` tokens, each layer is cut further into chunks of
    ``max(1, layer_tokens // length)`` rows (as even as that allows), one item each:
    rows never mix in a decoder layer, so a chunk runs on its own rows alone.
    """
    bounds = segment_bounds(layer_range, rows * length, layer_tokens)
    if layer_tokens is None or rows < 2 or rows * length <= layer_tokens:
        return [(layers, None) for layers in bounds]
    count = math.ceil(rows / max(1, layer_tokens // length))
    cuts = [(rows * i) // count for i in range(count + 1)]
    return [(layers, slice(a, b)) for layers in bounds for a, b in itertools.pairwise(cuts)]


@dataclass(eq=False)
class Member:
    """One session's forward in a :class:`ForwardRun`: its inputs, its trainer, its rows.

    Attributes:
        trainer: The session's trainer.
        hidden: ``(B, T, H)`` bottom output (any float dtype; cast to the trunk's).
        attention_mask: ``(B, T)`` validity of the tokens, or None.
        position_ids: ``(B, T)`` positions, or None.
        build: Called on the worker with ``(output (B, T, H) on the CPU, step_id)``.
        step_id: The step's id (0 for an evaluation).
        owner: The training session's id (the loop's books; the worker does not read it).
        rows: This forward's rows of the run's batch (set by the run).
    """

    trainer: TrunkTrainer
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    build: Callable[[torch.Tensor, int], Any]
    step_id: int = 0
    owner: str = ""
    rows: slice = field(default_factory=lambda: slice(None))


def _join(parts: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """The ``(B, T)`` masks or positions of several forwards joined by rows (None if none has one)."""
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):  # the batch key keeps these apart
        raise StateError("training forwards batched together must all have, or all lack, masks and positions")
    return torch.cat([p.to(device) for p in parts if p is not None])


class ForwardRun:
    """(worker) A training forward (or an evaluation) of one or more sessions, segment by segment.

    Args:
        trunk: The :class:`TrunkStage`.
        members: The sessions' forwards, in row order (one: exactly the unbatched forward).
        layer_tokens: ``TrainingLimits.segment_layer_tokens`` (over the joined batch).
        keep_graph: Keep each segment's graph for a backward; False runs without autograd.
    """

    def __init__(self, trunk: Any, members: Sequence[Member], layer_tokens: int | None, keep_graph: bool) -> None:
        device = trunk.device
        self.trunk = trunk
        self.members = list(members)
        self.keep_graph = keep_graph
        at = 0
        for m in self.members:
            m.rows = slice(at, at + m.hidden.shape[0])
            at += m.hidden.shape[0]
        hiddens = [m.hidden.detach().to(device=device, dtype=trunk.dtype) for m in self.members]
        x = hiddens[0].clone() if len(hiddens) == 1 else torch.cat(hiddens)  # (sum B, T, H)
        self.inputs: torch.Tensor | None = x.requires_grad_(True) if keep_graph else x
        self.mask = _join([m.attention_mask for m in self.members], device)
        self.positions = _join([m.position_ids for m in self.members], device)
        adapters = [m.trainer.adapter for m in self.members]
        self.adapter = (
            adapters[0]
            if len(self.members) == 1
            else RowAdapters([(m.rows.start, m.rows.stop, a) for m, a in zip(self.members, adapters, strict=True)])
        )
        rows, length = x.shape[:2]
        if len(self.members) == 1:  # a batch of sessions holds one segment's tokens at most: never cut by rows
            self.plan = segment_plan(trunk.layer_range, rows, length, layer_tokens)
        else:
            self.plan = [(layers, None) for layers in segment_bounds(trunk.layer_range, rows * length, layer_tokens)]
        self.outputs: torch.Tensor | None = None
        self.segments: list[tuple[torch.Tensor, torch.Tensor, slice | None]] = []
        self._boundary: torch.Tensor | None = None  # cut by rows: the input of the layers in progress
        self._chunks: list[torch.Tensor] = []  # cut by rows: the outputs of their chunks done so far
        self.next_segment = 0
        self.nbytes = 0
        self._finished = 0  # members whose output and graph were handed out
        self._saved: dict[int, int] = {}  # storage id -> bytes, over every segment (a boundary is counted once)

    @property
    def done(self) -> bool:
        """Whether every segment has run."""
        return self.next_segment >= len(self.plan)

    def advance(self, index: int) -> None:
        """(worker) Run segment ``index`` unless it ran already (each member's item asks for it).

        Raises:
            ConfigError: the run was released.
        """
        if index < self.next_segment:
            return
        if index != self.next_segment or self.done:
            raise StateError(f"segment {index} asked of a forward at segment {self.next_segment}")
        if self.inputs is None:
            raise ConfigError("this training forward was released (its session closed or the call was cancelled).")
        layers, rows = self.plan[index]
        if rows is not None:
            self._advance_rows(layers, rows)
            self.next_segment += 1
            return
        if self.outputs is None:
            x = self.inputs
        else:
            x = self.outputs.detach().requires_grad_(True) if self.keep_graph else self.outputs  # (B, T, H) leaf
        with torch.set_grad_enabled(self.keep_graph), use_adapter(self.adapter), self._saving():  # type: ignore[arg-type]
            out = self._call(x, self.mask, self.positions, layers)
        if self.keep_graph:
            self.segments.append((x, out, None))
        self.outputs = out
        self.next_segment += 1

    def _advance_rows(self, layers: Layers, rows: slice) -> None:
        """(worker) One chunk of rows through one segment's layers; the last chunk joins the segment's output."""
        if rows.start == 0:  # the first chunk of these layers: their input is the previous layers' output
            source = self.inputs if self.outputs is None else self.outputs
            if source is None:
                raise StateError("a forward cut by rows lost its input")
            self._boundary = source.detach()
            self._chunks = []
        if self._boundary is None:
            raise StateError("a chunk of rows was asked before the first of its layers")
        x = self._boundary[rows].detach().requires_grad_(self.keep_graph)  # (b, T, H) leaf
        mask = None if self.mask is None else self.mask[rows]
        positions = None if self.positions is None else self.positions[rows]
        with torch.set_grad_enabled(self.keep_graph), use_adapter(self.adapter), self._saving():  # type: ignore[arg-type]
            out = self._call(x, mask, positions, layers)
        if self.keep_graph:
            self.segments.append((x, out, rows))
        self._chunks.append(out)
        if rows.stop == self._boundary.shape[0]:  # every chunk of these layers ran
            self.outputs = torch.cat(self._chunks)  # (B, T, H)
            self._boundary, self._chunks = None, []

    def _call(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, layers: Layers) -> Any:
        """(worker) The trunk over ``x (B, T, H)``: every layer, or those of one segment."""
        if layers is None:
            return self.trunk(x, mask, positions)
        return self.trunk(x, mask, positions, layers=layers)

    def _saving(self) -> Any:
        """Count the bytes autograd saves for the backward (nothing without a graph)."""
        if not self.keep_graph:
            return contextlib.nullcontext()
        saved = self._saved

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "meta":
                saved.setdefault(id(t.untyped_storage()), t.untyped_storage().nbytes())
            return t

        def unpack(t: torch.Tensor) -> torch.Tensor:
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def finish(self, member: Member) -> tuple[torch.Tensor, StepGraph | None]:
        """(worker) ``member``'s output ``(B, T, H)`` on the CPU in its input's dtype, and its graph.

        The graph (None for an evaluation) names the member's rows of the shared segments.

        Raises:
            ConfigError: the member's output holds NaN or infinite values.
        """
        if self.outputs is None or not self.done:
            raise ConfigError("this training forward was released (its session closed or the call was cancelled).")
        self._finished += 1
        try:
            return self._hand_out(member, self.outputs)
        finally:
            if self._finished == len(self.members):  # from now on the members' graphs alone hold the tensors
                self.release()

    def _hand_out(self, member: Member, outputs: torch.Tensor) -> tuple[torch.Tensor, StepGraph | None]:
        alone = len(self.members) == 1
        out = outputs if alone else outputs[member.rows]  # (B, T, H)
        if not bool(torch.isfinite(out.detach()).all()):
            raise ConfigError(
                "the trunk's output holds NaN or infinite values for this input; check the hidden states sent"
            )
        reply = out.detach().to(device="cpu", dtype=member.hidden.dtype)
        if not self.keep_graph:
            return reply, None
        self.nbytes = sum(self._saved.values())
        share = self.nbytes * member.hidden.shape[0] // outputs.shape[0]
        graph = StepGraph(self.inputs, out, share, segments=self.segments, rows=None if alone else member.rows)
        graph.run = self
        return reply, graph

    def release(self) -> None:
        """Drop what the segments kept (any thread: it only drops references)."""
        self.inputs = None
        self.outputs = None
        self.segments = []
        self._boundary, self._chunks = None, []
        self._saved = {}


class BackwardRun:
    """(worker) One session's backward in progress through its kept graph, from the last segment down.

    Args:
        trainer: The session's trainer.
        graph: The step's graph (kept until :meth:`finish`).
        grad_output: ``(B, T, H)`` gradient of the loss w.r.t. the trunk output.
    """

    def __init__(self, trainer: TrunkTrainer, graph: StepGraph, grad_output: torch.Tensor) -> None:
        self.trainer = trainer
        self.graph = graph
        self.reply_dtype = grad_output.dtype
        self.next_segment = len(graph.segments) - 1
        self.grad: torch.Tensor | None = grad_output  # the gradient at the boundary above the next segment
        self._below: torch.Tensor | None = None  # cut by rows: the gradient below the layers in progress
        self._param_grads: list[Sequence[torch.Tensor | None]] = []  # per segment done, last segment first

    @property
    def done(self) -> bool:
        """Whether every segment has run."""
        return self.next_segment < 0

    def check(self) -> None:
        """(worker) Raise ConfigError if the graph was used or released."""
        if self.graph.outputs is None or self.grad is None or self.next_segment < 0:
            raise ConfigError("this step's graph was already used or released")

    def take(self, grad_in: torch.Tensor, param_grads: Sequence[torch.Tensor | None]) -> None:
        """(worker) One segment's results: check them, then step down a segment.

        Raises:
            ConfigError: no gradient reached the segment's input (the graph was broken).
            NonFiniteGradient: the gradients came out NaN or infinite; nothing changed.
        """
        if not all(t is None or bool(torch.isfinite(t).all()) for t in (grad_in, *param_grads)):
            raise NonFiniteGradient(
                f"the backward of training step {self.graph.step_id} gives NaN or infinite gradients (the "
                "grad_output sent is finite but too large, or already wrong); nothing was accumulated and the "
                "step is kept: send its Backward again with a finite, smaller gradient (e.g. scale the loss down)."
            )
        rows = self.graph.segments[self.next_segment][2]
        self._param_grads.append(param_grads)
        if rows is None:
            self.grad = grad_in
        else:  # a chunk of rows: its part of the gradient below; the first chunk completes it
            if self._below is None:
                if self.grad is None:
                    raise StateError("a backward cut by rows lost its gradient")
                self._below = torch.empty(self.grad.shape, dtype=grad_in.dtype, device=grad_in.device)
            self._below[rows] = grad_in
            if rows.start == 0:
                self.grad, self._below = self._below, None
        self.next_segment -= 1

    def output_gradient(self) -> torch.Tensor:
        """(worker) The gradient to send back through the next segment (its rows' part, for a chunk)."""
        if self.grad is None:
            raise ConfigError("this step's graph was already used or released")
        rows = self.graph.segments[self.next_segment][2]
        return self.grad if rows is None else self.grad[rows]

    def finish(self, apply: bool) -> torch.Tensor:
        """(worker) Accumulate every segment's parameter gradients, release the graph, maybe step.

        Returns:
            ``(B, T, H)`` gradient w.r.t. the trunk input, on the CPU in ``grad_output``'s dtype.
        """
        if not self.done or self.grad is None:
            raise ConfigError("a backward cannot finish before it has run through every segment")
        trainer = self.trainer
        with torch.no_grad():
            for i, p in enumerate(trainer.params):
                for per_segment in self._param_grads:  # as autograd accumulates: the first gradient, then the sum
                    grad = per_segment[i]
                    if grad is not None:
                        p.grad = grad if p.grad is None else p.grad + grad
        self.graph.release()
        self._param_grads = []
        trainer.micro_steps += 1
        trainer.last_grad_norm_sq = trainer.grad_norm_sq()  # before a step zeroes them: for clipping across the cut
        if apply:
            trainer.optimizer_step()
        result: torch.Tensor = self.grad.to(device="cpu", dtype=self.reply_dtype)
        return result  # (B, T, H)


def backward_segment(runs: Sequence[BackwardRun]) -> list[BaseException | None]:
    """(worker) Back-propagate backwards of one forward through their next segment, together.

    ``runs`` share one :class:`ForwardRun` and stand at the same segment. Each run's
    outcome is None (it stepped down a segment) or the error it alone gets (its
    gradients are not finite; nothing of it changed).

    Raises:
        ConfigError: a graph was used or released, or does not reach its segment's input.
    """
    for run in runs:
        run.check()
    graph, index = runs[0].graph, runs[0].next_segment
    if any(r.next_segment != index or r.graph.run is not graph.run for r in runs):
        raise StateError("backwards batched together must stand at the same segment of one forward")
    x, out, _ = graph.segments[index]
    total = out.shape[0]
    present = sum(r.graph.batch_rows for r in runs)
    params = [p for r in runs for p in r.trainer.params]
    grads: Sequence[torch.Tensor | None]
    grad_ins: list[torch.Tensor | None]
    if len(runs) == 1 and graph.rows is None:  # a forward of one session: exactly its own graph
        grads = torch.autograd.grad(
            out,
            [x, *params],
            runs[0].output_gradient().to(device=out.device, dtype=out.dtype),
            retain_graph=True,
            allow_unused=True,
        )
        grad_ins = [grads[0]]
    elif present == total:  # every session of the forward: one backward through the shared graph
        g = torch.empty_like(out)  # (sum B, T, H)
        for r in runs:
            g[r.graph.rows] = r.grad.to(device=out.device, dtype=out.dtype)  # type: ignore[union-attr]
        grads = torch.autograd.grad(out, [x, *params], g, retain_graph=True, allow_unused=True)
        grad_ins = [grads[0][r.graph.rows] for r in runs]
    else:  # some are not here (or were done, and stepped their adapters): recompute these rows alone
        grads, grad_ins = _recomputed(runs, x, index, params)
    outcomes: list[BaseException | None] = []
    at = 1
    for r, grad_in in zip(runs, grad_ins, strict=True):
        if grad_in is None:  # the input is a leaf of the graph, so this means the graph was broken
            raise ConfigError("backward produced no gradient for the trunk input; the kept graph does not reach it")
        count = len(r.trainer.params)
        try:
            r.take(grad_in, grads[at : at + count])
            outcomes.append(None)
        except NonFiniteGradient as exc:
            outcomes.append(exc)
        at += count
    return outcomes


def _recomputed(
    runs: Sequence[BackwardRun], x: torch.Tensor, index: int, params: list[torch.Tensor]
) -> tuple[Sequence[torch.Tensor | None], list[torch.Tensor | None]]:
    """(worker) ``autograd.grad`` of ``runs``' rows of segment ``index``, run again over those rows only."""
    forward: ForwardRun = runs[0].graph.run
    rows = [r.graph.rows for r in runs]
    mine = torch.cat([x[s] for s in rows]).detach().requires_grad_(True)  # (sum B of runs, T, H)
    mask = None if forward.mask is None else torch.cat([forward.mask[s] for s in rows])
    positions = None if forward.positions is None else torch.cat([forward.positions[s] for s in rows])
    adapters, at = [], 0
    for r in runs:
        size = r.graph.batch_rows
        adapters.append((at, at + size, r.trainer.adapter))
        at += size
    with torch.enable_grad(), use_adapter(RowAdapters(adapters)):  # type: ignore[arg-type]
        out = forward._call(mine, mask, positions, forward.plan[index][0])
    g = torch.cat([r.grad.to(device=out.device, dtype=out.dtype) for r in runs])  # type: ignore[union-attr]
    grads = torch.autograd.grad(out, [mine, *params], g, allow_unused=True)
    sizes = [r.graph.batch_rows for r in runs]
    grad_ins: list[torch.Tensor | None] = (
        list(torch.split(grads[0], sizes)) if grads[0] is not None else [None] * len(runs)
    )
    return grads, grad_ins
