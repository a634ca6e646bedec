"""The async client: trunks (local or remote) and the generation pipeline."""

from ._pipeline import SplitPipeline, StreamChunk
from ._trunk import LocalTrunk, LocalTrunkSession, TrunkSession

__all__ = ["SplitPipeline", "StreamChunk", "LocalTrunk", "LocalTrunkSession", "TrunkSession"]
