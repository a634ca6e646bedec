"""The async client: trunks (local, remote, chained), the generation pipeline and the split trainer."""

import typing

from ._chain import TrunkChain
from ._config import ClientConfig
from ._pipeline import SplitPipeline
from ._pipeline_steps import StepTimings, StreamChunk
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
    "StepTimings",
    "StreamChunk",
    "TrainableTrunk",
    "Trunk",
    "TrunkChain",
    "TrunkSession",
]

if typing.TYPE_CHECKING:

    def _conforms(
        local: LocalTrunk, remote: RemoteTrunk, chain: TrunkChain
    ) -> tuple[TrainableTrunk, TrainableTrunk, TrainableTrunk]:
        """Never called: mypy checks here that the trunks satisfy the protocols."""
        return local, remote, chain
