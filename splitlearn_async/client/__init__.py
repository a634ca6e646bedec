"""The async client: trunks (local, remote, chained), the generation pipeline, the split trainer and the defenses at the cut."""

import typing

from ._chain import TrunkChain
from ._config import ClientConfig
from ._defenses import DChiNoise, Defense, GaussianNoise, defense_from_spec
from ._pipeline import SplitPipeline
from ._pipeline_steps import StepTimings, StreamChunk
from ._protocols import TrainableTrunk, Trunk
from ._remote import RemoteTrunk, RemoteTrunkSession
from ._trainer import SplitTrainer
from ._trunk import LocalTrunk, LocalTrunkSession, TrunkSession

__all__ = [
    "ClientConfig",
    "DChiNoise",
    "Defense",
    "GaussianNoise",
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
    "defense_from_spec",
]

if typing.TYPE_CHECKING:

    def _conforms(
        local: LocalTrunk, remote: RemoteTrunk, chain: TrunkChain
    ) -> tuple[TrainableTrunk, TrainableTrunk, TrainableTrunk]:
        """Never called: mypy checks here that the trunks satisfy the protocols."""
        return local, remote, chain
