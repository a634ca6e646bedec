"""A trunk split across servers: :class:`TrunkChain` runs its segments one after another.

``TrunkChain([RemoteTrunk(addr1), RemoteTrunk(addr2)])`` has the interface of one trunk,
in :class:`SplitPipeline` and in :class:`SplitTrainer`: a session opens a session on every
hop and passes the hidden states through them in order; a training step runs the hops'
forwards in order and their backwards in reverse. Each hop batches with its server's other
sessions and replays after a broken stream on its own. Before the first use the chain
checks that the hops' layer ranges join up (``info``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch

from ..errors import ConfigError, StateError, StepNotFound
from ..training import LoraConfig, OptimizerConfig, TrunkState
from ._protocols import TrainableTrunk
from ._training import TrainingSession
from ._trunk import TrunkSession

__all__ = ["ChainSession", "ChainTrainingSession", "TrunkChain"]


class TrunkChain:
    """Trunk segments on several trunks (servers or in-process), run as one trunk.

    Args:
        hops: The trunks in layer order, e.g. ``[RemoteTrunk(a), RemoteTrunk(b)]`` serving
            layers ``[3, 15)`` and ``[15, 27)``. At least one.

    Raises:
        ConfigError: ``hops`` is empty.
    """

    def __init__(self, hops: Sequence[TrainableTrunk]) -> None:
        if not hops:
            raise ConfigError("TrunkChain needs at least one trunk, e.g. TrunkChain([RemoteTrunk(a), RemoteTrunk(b)]).")
        self.hops = list(hops)
        self._info: dict[str, Any] | None = None

    async def info(self) -> dict[str, Any]:
        """The chain as one trunk: the first hop's info with the joined ``layer_range`` and ``hops``.

        Raises:
            ConfigError: the hops' layer ranges do not join up, or their models differ.
        """
        if self._info is None:
            infos = [await hop.info() for hop in self.hops]
            ranges = [tuple(int(x) for x in i["layer_range"]) for i in infos]
            for k in range(1, len(ranges)):
                if ranges[k][0] != ranges[k - 1][1]:
                    shown = ", ".join(f"[{lo}, {hi})" for lo, hi in ranges)
                    raise ConfigError(
                        f"the hops of this TrunkChain do not join up: they run layers {shown}, and hop {k} starts "
                        f"at layer {ranges[k][0]} where hop {k - 1} ends at {ranges[k - 1][1]}; give the trunks "
                        "in layer order, with no gap or overlap."
                    )
            for key in ("model_type", "hidden_size"):
                values = {str(i.get(key)) for i in infos}
                if len(values) > 1:
                    raise ConfigError(f"the hops of this TrunkChain serve different models ({key}: {sorted(values)}).")
            self._info = {**infos[0], "layer_range": [ranges[0][0], ranges[-1][1]], "hops": infos}
        return dict(self._info)

    async def open_session(self, adapter_id: str | None = None) -> ChainSession:
        """A session on every hop (each with ``adapter_id``, trained on the chain by a LoRA session)."""
        sessions: list[TrunkSession] = []
        try:
            for hop in self.hops:
                sessions.append(await hop.open_session(adapter_id))
        except BaseException:
            for session in sessions:
                await session.aclose()
            raise
        return ChainSession(sessions)

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stateless forward through every hop in order."""
        for hop in self.hops:
            hidden = await hop.forward(hidden, attention_mask, position_ids)
        return hidden

    async def open_training(
        self,
        mode: str = "lora",
        *,
        lora: LoraConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        adapter_id: str | None = None,
        weights: bytes | None = None,
        optimizer_state: bytes | None = None,
    ) -> ChainTrainingSession:
        """A training session on every hop; a LoRA adapter gets one name on all of them.

        ``weights`` and ``optimizer_state`` are refused: each hop has its own; open each
        hop's trunk with its own files, or train from scratch.

        Raises:
            ConfigError: ``weights`` or ``optimizer_state`` given, or bad settings.
        """
        if weights is not None or optimizer_state is not None:
            raise ConfigError(
                "a TrunkChain cannot resume from one weights or optimizer file: each hop trains its own layers; "
                "load each hop's adapter on its trunk (load_adapter) and open the chain with adapter_id."
            )
        if mode == "lora" and adapter_id is None:
            adapter_id = f"chain-{secrets.token_hex(6)}"  # one name on every hop, for inference sessions
        sessions: list[TrainingSession] = []
        try:
            for hop in self.hops:
                sessions.append(await hop.open_training(mode, lora=lora, optimizer=optimizer, adapter_id=adapter_id))
        except BaseException:
            for session in sessions:
                await session.aclose()
            raise
        return ChainTrainingSession(sessions)

    async def load_adapter(self, adapter_id: str, weights: bytes) -> None:
        """Refused: a chain's adapter is one file per hop; load each on its own trunk."""
        raise ConfigError(
            f"a TrunkChain has one adapter file per hop; load {adapter_id!r}'s files on each hop's trunk "
            "(chain.hops[i].load_adapter)."
        )

    async def delete_adapter(self, adapter_id: str) -> None:
        """Delete ``adapter_id`` on every hop."""
        for hop in self.hops:
            await hop.delete_adapter(adapter_id)

    async def aclose(self) -> None:
        """Close every hop (idempotent)."""
        for hop in self.hops:
            await hop.aclose()

    async def __aenter__(self) -> TrunkChain:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class ChainSession(TrunkSession):
    """One generation's sessions on every hop of a :class:`TrunkChain`."""

    def __init__(self, sessions: list[TrunkSession]) -> None:
        self.sessions = sessions

    async def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        beam_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for session in self.sessions:  # each hop reorders its own cache for beam search
            hidden = await session.forward(hidden, attention_mask, position_ids, beam_idx=beam_idx)
        return hidden

    async def aclose(self) -> None:
        for session in self.sessions:
            await session.aclose()


class ChainTrainingSession(TrainingSession):
    """Training sessions on every hop: forwards in order, backwards in reverse.

    A chain step id stands for the hops' own step ids.
    """

    def __init__(self, sessions: list[TrainingSession]) -> None:
        self.sessions = sessions
        self.mode = sessions[0].mode
        self.adapter_id = sessions[0].adapter_id
        self.training_id = "+".join(s.training_id for s in sessions)
        self.trainable_parameters = sum(s.trainable_parameters for s in sessions)
        self._steps: dict[int, list[int]] = {}
        self._next = 1

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        ids: list[int] = []
        for session in self.sessions:
            hidden, step = await session.forward(hidden, attention_mask, position_ids)
            ids.append(step)
        step_id, self._next = self._next, self._next + 1
        self._steps[step_id] = ids
        return hidden, step_id

    async def evaluate(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        for session in self.sessions:
            hidden = await session.evaluate(hidden, attention_mask, position_ids)
        return hidden

    async def backward(self, step_id: int, grad_output: torch.Tensor, *, apply: bool = True) -> torch.Tensor:
        ids = self._steps.pop(step_id, None)
        if ids is None:
            raise StepNotFound(f"chain training step {step_id} is unknown or its backward already ran.")
        grad = grad_output
        for session, step in zip(reversed(self.sessions), reversed(ids), strict=True):
            grad = await session.backward(step, grad, apply=apply)
        self.grad_norm_sq = sum(session.grad_norm_sq for session in self.sessions)
        return grad

    async def optimizer_step(self, *, scale: float = 1.0) -> int:
        steps = [await session.optimizer_step(scale=scale) for session in self.sessions]
        return steps[0]

    async def state(self, *, optimizer: bool = True) -> TrunkState:
        raise StateError("a TrunkChain trains one state per hop; save them with states().")

    async def states(self, *, optimizer: bool = True) -> list[TrunkState]:
        """Each hop's trained weights (and optimizer state), in hop order."""
        return [await session.state(optimizer=optimizer) for session in self.sessions]

    async def aclose(self) -> None:
        for session in self.sessions:
            await session.aclose()
