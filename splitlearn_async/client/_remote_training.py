"""Training sessions on a trunk server, over a :class:`RemoteTrunk`'s calls.

``open_remote_training(remote_trunk, mode, ...)`` sends ``TrainOpen`` and returns a
:class:`RemoteTrainingSession` with the :class:`TrainingSession` interface; adapters are
managed with :func:`load_remote_adapter` and :func:`delete_remote_adapter`. Every call
goes through ``RemoteTrunk`` (its deadline, token and error translation) and none is
retried: a ``Backward`` may already have stepped the optimizer when a connection breaks,
so repeating it could apply a gradient twice.

Checkpoints travel in chunks (:mod:`._checkpoints`): ``TrainOpen`` with weights and
``LoadAdapter`` stream them up, ``TrainSave`` streams the state down, into memory
(:meth:`RemoteTrainingSession.state`) or straight into files (:meth:`~RemoteTrainingSession.save`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import torch

from .. import protocol as proto
from ..errors import ClientClosed, ConfigError, TrunkError, WireError
from ..training import LoraConfig, OptimizerConfig, TrunkState, check_adapter_id
from ..wire import Kind
from ._checkpoints import receive_files, receive_state, send_checkpoint
from ._connection import UnaryCaller
from ._training import TrainingSession

__all__ = ["RemoteTrainingSession", "delete_remote_adapter", "load_remote_adapter", "open_remote_training"]

logger = logging.getLogger(__name__)


def _reply(body: bytes, what: str) -> dict[str, Any]:
    try:
        return proto.parse_reply(body)
    except WireError as exc:
        raise TrunkError(f"the server's reply to {what} is malformed: {exc}") from exc


async def open_remote_training(
    remote: UnaryCaller,
    mode: str = "lora",
    *,
    lora: LoraConfig | None = None,
    optimizer: OptimizerConfig | None = None,
    adapter_id: str | None = None,
    weights: bytes | None = None,
    optimizer_state: bytes | None = None,
) -> RemoteTrainingSession:
    """Open a training session on the server behind ``remote`` (a :class:`RemoteTrunk`).

    Args:
        remote: The RemoteTrunk (its ``unary`` calls and ``wire_dtype`` are used).
        mode: ``"lora"``, ``"full"`` (the server must allow it) or ``"frozen"``.
        lora: Settings of a new adapter.
        optimizer: The server-side optimizer's settings; default ``OptimizerConfig()``.
        adapter_id: Train the loaded adapter of this name, or create it under this name.
        weights: Safetensors bytes to start from.
        optimizer_state: Safetensors bytes of a saved optimizer state.

    Returns:
        The session.

    Raises:
        ConfigError: a malformed adapter id.
        TrunkRejected: the server refused the settings (or full training is not allowed).
        TrunkBusy: too many training sessions or adapters.
        TrunkError: any other failure.
    """
    check_adapter_id(adapter_id, "adapter_id", allow_none=True)
    opt = (optimizer or OptimizerConfig()).to_wire()
    settings = (lora or LoraConfig()).to_wire() if mode == "lora" else None

    def header(blobs: list[proto.Blob], chunk_bytes: int) -> bytes:
        return proto.build_train_open(mode, opt, settings, adapter_id=adapter_id, blobs=blobs, chunk_bytes=chunk_bytes)

    what = f"opening a {mode} training session"
    data = {"weights": weights, "optimizer_state": optimizer_state}
    reply = await send_checkpoint(remote, proto.METHOD_TRAIN_OPEN, header, data, what=what)
    return RemoteTrainingSession(remote, _reply(reply, what))


async def load_remote_adapter(remote: UnaryCaller, adapter_id: str, weights: bytes) -> None:
    """Load a saved adapter (safetensors bytes) on the server under ``adapter_id``.

    Raises:
        ConfigError: a malformed adapter id.
        AlreadyExists: an adapter of that name is loaded.
        TrunkRejected: the file does not fit the server's trunk.
        TrunkError: any other failure.
    """
    check_adapter_id(adapter_id)
    if not weights:
        raise ConfigError(f"adapter {adapter_id!r} has no bytes; pass the adapter file's safetensors bytes.")

    def header(blobs: list[proto.Blob], chunk_bytes: int) -> bytes:
        return proto.build_load_adapter(adapter_id, blobs[0], chunk_bytes)

    what = f"loading adapter {adapter_id!r}"
    await send_checkpoint(remote, proto.METHOD_LOAD_ADAPTER, header, {"weights": weights}, what=what)


async def delete_remote_adapter(remote: UnaryCaller, adapter_id: str) -> None:
    """Unload the server's adapter ``adapter_id``.

    Raises:
        SessionNotFound: no such adapter.
        PreconditionFailed: it is being trained.
    """
    what = f"deleting adapter {adapter_id!r}"
    await remote.unary(proto.METHOD_DELETE_ADAPTER, proto.build_delete_adapter(adapter_id), what=what, retry=False)


class RemoteTrainingSession(TrainingSession):
    """A training session on a trunk server (see :class:`TrainingSession` for the methods)."""

    def __init__(self, remote: UnaryCaller, opened: dict[str, Any]) -> None:
        self._remote = remote
        try:
            self.training_id = str(opened["training_id"])
            self.mode = str(opened["mode"])
        except KeyError as exc:
            raise TrunkError(f"the server's reply to TrainOpen lacks {exc}; is it a splitlearn-async server?") from None
        self.adapter_id = opened.get("adapter_id")
        self.trainable_parameters = int(opened.get("trainable_parameters", 0))
        self._wire_dtype = remote.wire_dtype
        self._closed = False

    def _check(self, action: str) -> None:
        if self._closed:
            raise ClientClosed(f"Cannot {action}, as this training session has been closed.")

    async def _call(self, method: str, body: bytes, what: str) -> bytes:
        return await self._remote.unary(
            method, body, what=f"{what} of training session {self.training_id}", retry=False
        )

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        self._check("run a training forward")
        body = proto.build_train_forward(
            self.training_id, hidden, attention_mask, position_ids, wire_dtype=self._wire_dtype
        )
        reply = await self._call(proto.METHOD_TRAIN_FORWARD, body, "a training forward")
        try:
            out, step_id = proto.parse_train_forward_result(reply, hidden_size=hidden.shape[-1])
        except WireError as exc:
            raise TrunkError(f"the server's reply to a training forward is malformed: {exc}") from exc
        if tuple(out.shape) != tuple(hidden.shape):
            raise TrunkError(
                f"the server answered a training forward with shape {list(out.shape)}, expected {list(hidden.shape)}."
            )
        return out.to(hidden.dtype), step_id  # (B, T, H)

    async def evaluate(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        self._check("run an evaluation forward")
        body = proto.build_train_forward(
            self.training_id, hidden, attention_mask, position_ids, wire_dtype=self._wire_dtype, keep_graph=False
        )
        reply = await self._call(proto.METHOD_TRAIN_FORWARD, body, "an evaluation forward")
        try:
            out, _ = proto.parse_train_forward_result(reply, hidden_size=hidden.shape[-1])
        except WireError as exc:
            raise TrunkError(f"the server's reply to an evaluation forward is malformed: {exc}") from exc
        return out.to(hidden.dtype)  # (B, T, H)

    async def backward(self, step_id: int, grad_output: torch.Tensor, *, apply: bool = True) -> torch.Tensor:
        self._check("run a backward")
        body = proto.build_backward(self.training_id, step_id, grad_output, apply=apply, wire_dtype=self._wire_dtype)
        reply = await self._call(proto.METHOD_BACKWARD, body, f"the backward of step {step_id}")
        try:
            grad_in, _ = proto.parse_backward_result(reply, hidden_size=grad_output.shape[-1])
            self.grad_norm_sq = proto.parse_backward_norm(reply)
        except WireError as exc:
            raise TrunkError(f"the server's reply to a backward is malformed: {exc}") from exc
        return grad_in.to(grad_output.dtype)  # (B, T, H)

    async def optimizer_step(self, *, scale: float = 1.0) -> int:
        self._check("step the optimizer")
        fields = {} if scale == 1.0 else {"scale": float(scale)}
        body = proto.build_training_call(Kind.STEP, self.training_id, **fields)
        reply = _reply(await self._call(proto.METHOD_OPTIMIZER_STEP, body, "an optimizer step"), "an optimizer step")
        return int(reply.get("optimizer_steps", 0))

    async def state(self, *, optimizer: bool = True) -> TrunkState:
        self._check("save the training state")
        what = f"saving the state of training session {self.training_id}"
        async with contextlib.aclosing(self._save_stream(optimizer, what)) as replies:
            return await receive_state(replies, self.adapter_id, what=what)

    async def save(self, directory: str | Path, *, optimizer: bool = True) -> list[Path]:
        """Stream the trained weights (and optimizer state) into files under ``directory``.

        No whole blob is held in memory; the files appear only once each has arrived whole
        and matched its SHA-256 (a failed save leaves earlier files as they were).
        """
        self._check("save the training state")
        what = f"saving the state of training session {self.training_id}"
        async with contextlib.aclosing(self._save_stream(optimizer, what)) as replies:
            return await receive_files(replies, Path(directory), what=what)

    def _save_stream(self, optimizer: bool, what: str) -> AsyncGenerator[bytes, None]:
        """``TrainSave``'s replies: a header, then the chunks of the state."""
        chunk_bytes = self._remote.config.effective_chunk_bytes
        body = proto.build_training_call(Kind.SAVE, self.training_id, optimizer=optimizer, chunk_bytes=chunk_bytes)
        return self._remote.download(proto.METHOD_TRAIN_SAVE, body, what=what)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._remote.closed:
            return  # the channel is gone; the server frees the session when it expires
        body = proto.build_training_call(Kind.CLOSE, self.training_id)
        try:
            await self._call(proto.METHOD_TRAIN_CLOSE, body, "closing")
        except TrunkError as exc:  # the server may have expired it already
            logger.info("closing training session %s: %s", self.training_id, exc)
