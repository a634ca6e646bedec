"""The async client: trunks (local or remote), the generation pipeline and the split trainer."""

import typing

from ._config import ClientConfig
from ._pipeline import SplitPipeline, StreamChunk
from ._protocols import TrainableTrunk, Trunk
from ._remote import RemoteTrunk, RemoteTrunkSession
from ._trainer import SplitTrainer
from ._trunk import LocalTrunk, LocalTrunkSession, TrunkSession

__all__ = [
    "ClientConfig",
    "LocalTrunk",
    "LocalTrunkSession",
    "RemoteTrunk",
    "RemoteTrunkSession",
    "SplitPipeline",
    "SplitTrainer",
    "StreamChunk",
    "TrainableTrunk",
    "Trunk",
    "TrunkSession",
]

if typing.TYPE_CHECKING:

    def _conforms(local: LocalTrunk, remote: RemoteTrunk) -> tuple[TrainableTrunk, TrainableTrunk]:
        """Never called: mypy checks here that both trunks satisfy the protocols."""
        return local, remote
