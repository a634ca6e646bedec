"""A training forward or backward cut into layer segments, each one item on the torch worker.

A trunk's training forward over ``B x T`` tokens and all its layers can take longer than
many decode steps; run as one work item, it would make every decode step that arrives
meanwhile wait for all of it. So the trunk's layers are cut into segments of whole
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

Everything here runs on the worker thread; :mod:`._work` sends the segments there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ._engine import NonFiniteGradient, TrunkTrainer
from ._lora import use_adapter
from ._pending import StepGraph

__all__ = ["BackwardRun", "ForwardRun", "Layers", "evaluate_segment", "segment_bounds"]

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


class ForwardRun:
    """(worker) One training forward in progress: its leaf input, the segments done, their graphs.

    Args:
        trainer: The session's trainer.
        hidden: ``(B, T, H)`` bottom output (any float dtype; cast to the trunk's).
        attention_mask: ``(B, T)`` validity of the tokens, or None.
        position_ids: ``(B, T)`` positions, or None.
    """

    def __init__(
        self,
        trainer: TrunkTrainer,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> None:
        trunk = trainer.trunk
        device = trunk.device
        self.trainer = trainer
        self.reply_dtype = hidden.dtype
        self.mask = None if attention_mask is None else attention_mask.to(device)
        self.positions = None if position_ids is None else position_ids.to(device)
        x = hidden.detach().to(device=device, dtype=trunk.dtype).clone().requires_grad_(True)  # (B, T, H) leaf
        self.graph = StepGraph(x, None, 0)
        self._saved: dict[int, int] = {}  # storage id -> bytes, over every segment (a boundary is counted once)

    def segment(self, layers: Layers) -> None:
        """(worker) Run one segment with autograd on the previous segment's output, detached."""
        graph = self.graph
        if graph.inputs is None:
            raise ConfigError("this training forward was released (its session closed or the call was cancelled).")
        x = graph.inputs if graph.outputs is None else graph.outputs.detach().requires_grad_(True)  # (B, T, H) leaf
        saved = self._saved

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "meta":
                saved.setdefault(id(t.untyped_storage()), t.untyped_storage().nbytes())
            return t

        trunk = self.trainer.trunk
        with (
            torch.enable_grad(),
            use_adapter(self.trainer.adapter),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            if layers is None:
                out = trunk(x, self.mask, self.positions)  # (B, T, H), attached to the graph
            else:
                out = trunk(x, self.mask, self.positions, layers=layers)
        graph.segments.append((x, out))
        graph.outputs = out
        graph.nbytes = sum(saved.values())

    def finish(self) -> tuple[torch.Tensor, StepGraph]:
        """(worker) The output ``(B, T, H)`` on the CPU in the input's dtype, and the kept graph.

        Raises:
            ConfigError: the output holds NaN or infinite values.
        """
        out = self.graph.outputs
        if out is None:
            raise ConfigError("this training forward was released (its session closed or the call was cancelled).")
        if not bool(torch.isfinite(out.detach()).all()):
            raise ConfigError(
                "the trunk's output holds NaN or infinite values for this input; check the hidden states sent"
            )
        return out.detach().to(device="cpu", dtype=self.reply_dtype), self.graph

    def release(self) -> None:
        """Drop what the segments kept (any thread: it only drops references)."""
        self.graph.release()
        self._saved = {}


class BackwardRun:
    """(worker) One backward in progress through a kept graph, from its last segment down.

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
        self._param_grads: list[Sequence[torch.Tensor | None]] = []  # per segment done, last segment first

    @property
    def done(self) -> bool:
        """Whether every segment has run."""
        return self.next_segment < 0

    def segment(self) -> None:
        """(worker) Back-propagate through the next segment down; nothing is accumulated yet.

        Raises:
            ConfigError: the graph was released, or does not reach the segment's input.
            NonFiniteGradient: the gradients came out NaN or infinite; nothing changed.
        """
        graph, index = self.graph, self.next_segment
        if graph.outputs is None or self.grad is None or index < 0:
            raise ConfigError("this step's graph was already used or released")
        x, out = graph.segments[index]
        g = self.grad.to(device=out.device, dtype=out.dtype)
        params = self.trainer.params
        grads = torch.autograd.grad(out, [x, *params], g, retain_graph=True, allow_unused=True)
        grad_in, param_grads = grads[0], grads[1:]
        if grad_in is None:  # the input is a leaf of the graph, so this means the graph was broken
            raise ConfigError("backward produced no gradient for the trunk input; the kept graph does not reach it")
        if not all(t is None or bool(torch.isfinite(t).all()) for t in grads):
            raise NonFiniteGradient(
                f"the backward of training step {graph.step_id} gives NaN or infinite gradients (the grad_output "
                "sent is finite but too large, or already wrong); nothing was accumulated and the step is kept: "
                "send its Backward again with a finite, smaller gradient (e.g. scale the loss down)."
            )
        self._param_grads.append(param_grads)
        self.grad = grad_in
        self.next_segment = index - 1

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


def evaluate_segment(
    trainer: TrunkTrainer,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    layers: Layers,
    last: bool,
    reply_dtype: torch.dtype,
) -> torch.Tensor:
    """(worker) One segment of a forward without a graph, as the session trains the trunk (adapter active).

    Returns:
        ``(B, T, H)``: on the trunk's device for the next segment, or after the ``last`` one on
        the CPU in ``reply_dtype``.

    Raises:
        ConfigError: the last segment's output holds NaN or infinite values.
    """
    trunk = trainer.trunk
    device = trunk.device
    mask = None if attention_mask is None else attention_mask.to(device)
    positions = None if position_ids is None else position_ids.to(device)
    x = hidden.to(device=device, dtype=trunk.dtype)
    with torch.no_grad(), use_adapter(trainer.adapter):
        out = trunk(x, mask, positions) if layers is None else trunk(x, mask, positions, layers=layers)  # (B, T, H)
    if last and not bool(torch.isfinite(out).all()):
        raise ConfigError(
            "the trunk's output holds NaN or infinite values for this input; check the hidden states sent"
        )
    result: torch.Tensor = out.to(device="cpu", dtype=reply_dtype) if last else out
    return result
