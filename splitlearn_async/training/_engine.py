"""The trunk's side of split training, shared by LocalTrunk and the gRPC server.

- :class:`TrunkTrainer`: one training session's trainable parameters (the whole trunk,
  a LoRA adapter, or none) and their optimizer. Its ``forward`` keeps the autograd graph;
  its ``backward`` back-propagates the client's gradient of the trunk output through
  that very graph (no recomputation), accumulates the parameter gradients, optionally
  steps the optimizer, and returns the gradient of the trunk input. Its methods run on
  the torch worker thread only.
- :class:`PendingSteps`: the kept graphs by step id, bounded in number and in age.
- :class:`AdapterRegistry`: named LoRA adapters of one trunk.
- :func:`to_safetensors` / :func:`from_safetensors`: bytes with metadata, both ways.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError
from ._config import LoraConfig, OptimizerConfig
from ._lora import LoraAdapter, use_adapter

__all__ = [
    "TrunkTrainer",
    "StepGraph",
    "PendingSteps",
    "PendingFull",
    "StepNotFound",
    "AdapterRegistry",
    "to_safetensors",
    "from_safetensors",
    "serialize_state",
    "create_adapter",
]

logger = logging.getLogger(__name__)


class PendingFull(RuntimeError):
    """Too many training steps wait for their backward."""


class StepNotFound(KeyError):
    """A step id that is unknown, already used, or expired."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def to_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise CPU tensors to safetensors bytes with string ``metadata``."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata=dict(metadata or {}))


def from_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into ``(tensors, metadata)``.

    Raises:
        CheckpointError: the bytes are not a valid safetensors file.
    """
    from safetensors.torch import load

    try:
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8 : 8 + header_len]))
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"the data is not a valid safetensors file ({type(exc).__name__}: {exc}).") from exc
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


@dataclass(eq=False)
class StepGraph:
    """The kept autograd graph of one training forward.

    Attributes:
        inputs: ``(B, T, H)`` leaf tensor the trunk ran on (its ``.grad`` is the answer).
        outputs: ``(B, T, H)`` trunk output still attached to the graph.
        nbytes: Bytes of the tensors autograd saved for the backward (activations).
        owner: The training session the step belongs to.
        step_id: Its id.
        created_s: Clock time of the forward.
    """

    inputs: torch.Tensor | None
    outputs: torch.Tensor | None
    nbytes: int
    owner: str = ""
    step_id: int = 0
    created_s: float = 0.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.outputs.shape) if self.outputs is not None else ()

    def release(self) -> None:
        """Drop the graph (frees the saved activations)."""
        self.inputs = None
        self.outputs = None
        self.nbytes = 0


class TrunkTrainer:
    """One training session over a trunk: trainable parameters, optimizer, accumulation.

    Every method except the constructor runs on the torch worker thread.

    Args:
        trunk: The :class:`TrunkStage` (shared with inference sessions).
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        optimizer: Optimizer settings for the trainable parameters.
        adapter: The LoRA adapter to train (``mode="lora"`` only).

    Raises:
        ValueError: ``mode`` and ``adapter`` do not agree.
    """

    def __init__(self, trunk: Any, mode: str, optimizer: OptimizerConfig, adapter: LoraAdapter | None = None) -> None:
        if (mode == "lora") != (adapter is not None):
            raise ValueError("a LoRA training session needs an adapter, and only a LoRA session takes one.")
        self.trunk = trunk
        self.mode = mode
        self.adapter = adapter
        self.optimizer_config = optimizer
        if mode == "full":
            self.named_params = [(trunk.checkpoint_name(n), p) for n, p in trunk.named_parameters()]
            for _, p in self.named_params:
                p.requires_grad_(True)
        elif mode == "lora":
            self.named_params = list(adapter.named_parameters())  # type: ignore[union-attr]
        else:
            self.named_params = []
        self.params = [p for _, p in self.named_params]
        self.optimizer = optimizer.build(self.params) if self.params else None
        self.optimizer_steps = 0
        self.micro_steps = 0  # backwards since the last optimizer step

    @property
    def num_trainable(self) -> int:
        """Trainable elements."""
        return sum(p.numel() for p in self.params)

    def evaluate(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """(worker) Run the trunk as this session trains it (adapter active), without a graph.

        Returns:
            ``(B, T, H)`` output on the CPU in ``hidden``'s dtype.
        """
        device = self.trunk.device
        with torch.no_grad(), use_adapter(self.adapter):
            out = self.trunk(
                hidden.to(device=device, dtype=self.trunk.dtype),
                None if attention_mask is None else attention_mask.to(device),
                None if position_ids is None else position_ids.to(device),
            )  # (B, T, H)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("the trunk's output holds NaN or infinite values for this input; check the hidden states sent")
        return out.to(device="cpu", dtype=hidden.dtype)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, StepGraph]:
        """(worker) Run the trunk keeping its graph.

        Args:
            hidden: ``(B, T, H)`` bottom output (any float dtype; cast to the trunk's).
            attention_mask: ``(B, T)`` validity of the tokens, or None.
            position_ids: ``(B, T)`` positions, or None.

        Returns:
            ``(out, graph)``: ``out`` ``(B, T, H)`` detached on the CPU in ``hidden``'s
            dtype, and the :class:`StepGraph` to pass to :meth:`backward`.

        Raises:
            ValueError: the output holds NaN or infinity, or the shapes do not fit the trunk.
        """
        device, dtype = self.trunk.device, self.trunk.dtype
        x = hidden.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)  # (B, T, H) leaf
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "meta":
                saved.setdefault(id(t.untyped_storage()), t.untyped_storage().nbytes())
            return t

        with torch.enable_grad(), use_adapter(self.adapter), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.trunk(
                x,
                None if attention_mask is None else attention_mask.to(device),
                None if position_ids is None else position_ids.to(device),
            )  # (B, T, H), attached to the graph
        if not bool(torch.isfinite(out.detach()).all()):
            raise ValueError("the trunk's output holds NaN or infinite values for this input; check the hidden states sent")
        reply = out.detach().to(device="cpu", dtype=hidden.dtype)
        return reply, StepGraph(x, out, sum(saved.values()))

    def backward(self, graph: StepGraph, grad_output: torch.Tensor, apply: bool) -> torch.Tensor:
        """(worker) Back-propagate ``grad_output`` through ``graph``; optionally step the optimizer.

        Args:
            graph: The step's graph from :meth:`forward` (released afterwards).
            grad_output: ``(B, T, H)`` gradient of the loss w.r.t. the trunk output.
            apply: Step the optimizer (and zero the gradients) after accumulating.

        Returns:
            ``(B, T, H)`` gradient w.r.t. the trunk input, on the CPU in ``grad_output``'s dtype.

        Raises:
            ValueError: the gradient's shape differs from the output's, or holds NaN/inf.
        """
        if graph.outputs is None or graph.inputs is None:
            raise ValueError("this step's graph was already used or released")
        if tuple(grad_output.shape) != graph.shape:
            raise ValueError(
                f"grad_output has shape {list(grad_output.shape)} but the trunk output of this step has "
                f"shape {list(graph.shape)}; send the gradient of the loss w.r.t. that output"
            )
        g = grad_output.to(device=graph.outputs.device, dtype=graph.outputs.dtype)
        inputs = [graph.inputs, *self.params]
        try:
            torch.autograd.backward(graph.outputs, g, inputs=inputs)
            grad_in = graph.inputs.grad
        finally:
            graph.release()
        self.micro_steps += 1
        if apply:
            self.optimizer_step()
        if grad_in is None:  # the input is a leaf of the graph, so this means the graph was broken
            raise RuntimeError("backward produced no gradient for the trunk input; the kept graph does not reach it.")
        return grad_in.to(device="cpu", dtype=grad_output.dtype)  # (B, T, H)

    def optimizer_step(self) -> int:
        """(worker) Apply the accumulated gradients and zero them; returns optimizer steps so far."""
        if self.optimizer is not None and self.micro_steps:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
        self.micro_steps = 0
        return self.optimizer_steps

    def discard_gradients(self) -> None:
        """(worker) Zero accumulated gradients without stepping."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps = 0

    # --- state -----------------------------------------------------------------------------

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(worker) The trained weights and metadata: the adapter, or every trunk weight."""
        if self.adapter is not None:
            return self.adapter.state_tensors(), self.adapter.metadata()
        tensors = {n: p.detach().to("cpu").clone() for n, p in self.named_params}
        meta = {"format": "splitlearn-trunk/1", "layer_range": json.dumps(list(self.trunk.layer_range))}
        return tensors, meta

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(worker) The optimizer's state, keyed by parameter name, and its settings as metadata."""
        tensors: dict[str, torch.Tensor] = {}
        if self.optimizer is not None:
            state = self.optimizer.state
            for name, p in self.named_params:
                for key, value in state.get(p, {}).items():
                    tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().to("cpu").clone()
        meta = {
            "format": "splitlearn-optimizer/1",
            "optimizer": json.dumps(self.optimizer_config.to_wire()),
            "optimizer_steps": str(self.optimizer_steps),
        }
        return tensors, meta

    def load_optimizer_state(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        """(worker) Restore :meth:`optimizer_state`'s output; settings come from this session.

        Raises:
            CheckpointError: the state names parameters this session does not train.
        """
        if metadata.get("format") != "splitlearn-optimizer/1":
            raise CheckpointError(f"the optimizer file has format={metadata.get('format')!r}, expected 'splitlearn-optimizer/1'.")
        if self.optimizer is None:
            return
        index = {name: i for i, (name, _) in enumerate(self.named_params)}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, slot = key.rpartition("::")
            if name not in index:
                raise CheckpointError(f"the optimizer file holds state for {name!r}, which this session does not train.")
            state.setdefault(index[name], {})[slot] = value
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.optimizer_steps = int(metadata.get("optimizer_steps", "0"))

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """(worker) Copy saved weights in (the adapter's, or the trunk's for ``mode="full"``).

        Raises:
            CheckpointError: a tensor is missing, extra or misshapen.
        """
        if self.adapter is not None:
            self.adapter.load_tensors(tensors)
            return
        expected = dict(self.named_params)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise CheckpointError(f"the trunk weights file lacks {missing[:2]} or has extra {extra[:2]}; it belongs to another trunk.")
        with torch.no_grad():
            for name, p in expected.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise CheckpointError(f"trunk weight {name!r} has shape {list(tensors[name].shape)}, expected {list(p.shape)}.")
                p.copy_(tensors[name].to(p.dtype))


class PendingSteps:
    """Graphs waiting for their backward, keyed by ``(owner, step_id)``, bounded in number and age.

    No torch here: the entries are opaque :class:`StepGraph` objects.

    Args:
        max_pending: Most graphs kept at once (over all owners).
        ttl_s: A graph older than this is dropped by :meth:`expire`.
        clock: Monotonic clock in seconds.
    """

    def __init__(self, max_pending: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending = max_pending
        self.ttl_s = ttl_s
        self._clock = clock
        self._steps: dict[tuple[str, int], StepGraph] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def nbytes(self) -> int:
        """Bytes of saved activations over all kept graphs."""
        return sum(g.nbytes for g in self._steps.values())

    def check_room(self) -> None:
        """Raise :class:`PendingFull` if no graph can be added."""
        if len(self._steps) >= self.max_pending:
            raise PendingFull(
                f"{len(self._steps)} training steps already wait for their backward (max_pending_steps="
                f"{self.max_pending}); send their Backward first, or wait for them to expire after {self.ttl_s} s."
            )

    def add(self, owner: str, graph: StepGraph) -> int:
        """Keep ``graph`` for ``owner``; returns its step id.

        Raises:
            PendingFull: ``max_pending`` graphs are kept already.
        """
        self.check_room()
        step_id = next(self._ids)
        graph.owner, graph.step_id, graph.created_s = owner, step_id, self._clock()
        self._steps[(owner, step_id)] = graph
        return step_id

    def get(self, owner: str, step_id: int) -> StepGraph:
        """The graph of ``step_id`` (still kept).

        Raises:
            StepNotFound: the id is unknown to ``owner``, already used or expired.
        """
        graph = self._steps.get((owner, step_id))
        if graph is None:
            raise StepNotFound(
                f"training step {step_id} is unknown: it was never returned by a forward of this training "
                f"session, its backward already ran, or it expired (steps are kept {self.ttl_s} s); run the "
                "forward again."
            )
        return graph

    def pop(self, owner: str, step_id: int) -> StepGraph:
        """Remove and return the graph of ``step_id``; raises :class:`StepNotFound` like :meth:`get`."""
        graph = self.get(owner, step_id)
        del self._steps[(owner, step_id)]
        return graph

    def of_owner(self, owner: str) -> list[StepGraph]:
        """The kept graphs of ``owner``."""
        return [g for (o, _), g in self._steps.items() if o == owner]

    def drop_owner(self, owner: str) -> int:
        """Release every graph of ``owner``; returns how many."""
        keys = [k for k in self._steps if k[0] == owner]
        for k in keys:
            self._steps.pop(k).release()
        return len(keys)

    def expire(self) -> list[StepGraph]:
        """Release and return the graphs older than ``ttl_s``."""
        now = self._clock()
        old = [k for k, g in self._steps.items() if now - g.created_s > self.ttl_s]
        out = []
        for k in old:
            graph = self._steps.pop(k)
            logger.info("training step %s of %s expired after %.1f s without a backward", k[1], k[0], now - graph.created_s)
            graph.release()
            out.append(graph)
        return out

    def clear(self) -> None:
        """Release everything."""
        for g in self._steps.values():
            g.release()
        self._steps.clear()


@dataclass
class AdapterRegistry:
    """Named LoRA adapters of one trunk.

    Attributes:
        max_adapters: Most adapters kept at once.
        adapters: ``{adapter_id: LoraAdapter}``.
    """

    max_adapters: int = 64
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1), repr=False)

    def new_id(self) -> str:
        """An unused name ``adapter-<n>``."""
        while True:
            candidate = f"adapter-{next(self._ids)}"
            if candidate not in self.adapters:
                return candidate

    def check_room(self, adapter_id: str) -> None:
        """Raise :class:`PendingFull` if a new adapter cannot be added, ValueError if the name is taken."""
        if adapter_id in self.adapters:
            raise ValueError(f"an adapter named {adapter_id!r} exists already; delete it first or pick another name")
        if len(self.adapters) >= self.max_adapters:
            raise PendingFull(
                f"{len(self.adapters)} adapters are loaded (max_adapters={self.max_adapters}); delete one first."
            )

    def get(self, adapter_id: str) -> LoraAdapter:
        """The adapter named ``adapter_id``.

        Raises:
            StepNotFound: no such adapter.
        """
        adapter = self.adapters.get(adapter_id)
        if adapter is None:
            known = sorted(self.adapters)[:8]
            raise StepNotFound(f"no adapter named {adapter_id!r} is loaded on this trunk (loaded: {known}).")
        return adapter


def serialize_state(trainer: TrunkTrainer, optimizer: bool) -> tuple[bytes, bytes | None]:
    """(worker) ``(weights, optimizer_state)`` of a trainer as safetensors bytes.

    ``weights`` is empty for a frozen trunk; ``optimizer_state`` is None unless asked for.
    """
    weights = to_safetensors(*trainer.weights()) if trainer.mode != "frozen" else b""
    opt = to_safetensors(*trainer.optimizer_state()) if optimizer else None
    return weights, opt


def create_adapter(trunk: Any, config: LoraConfig, adapter_id: str, weights: bytes | None = None) -> LoraAdapter:
    """(worker) A new adapter on ``trunk``: from saved ``weights`` (their metadata gives rank,
    alpha and targets) if given, else initialised with ``config``'s settings.

    Raises:
        CheckpointError: ``weights`` is not an adapter file that fits ``trunk``.
        ValueError: no layer of the trunk matches the target modules.
    """
    if weights:
        tensors, meta = from_safetensors(weights)
        return LoraAdapter.from_tensors(trunk, tensors, meta, adapter_id)
    return LoraAdapter(trunk, config.rank, config.alpha, config.target_modules, config.dropout, config.seed, adapter_id)
