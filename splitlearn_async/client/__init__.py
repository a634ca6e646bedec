"""The async client: trunks (local or remote) and the generation pipeline."""

from ._config import ClientConfig
from ._pipeline import SplitPipeline, StreamChunk
from ._remote import RemoteTrunk, RemoteTrunkSession
from ._trunk import LocalTrunk, LocalTrunkSession, TrunkSession

__all__ = [
    "ClientConfig",
    "SplitPipeline",
    "StreamChunk",
    "LocalTrunk",
    "LocalTrunkSession",
    "RemoteTrunk",
    "RemoteTrunkSession",
    "TrunkSession",
]
