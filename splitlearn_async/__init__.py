"""splitlearn-async: an asyncio split-learning runtime for causal language models.

The client keeps the bottom (embeddings + first layers) and the top (last layers + norm +
LM head); a ``grpc.aio`` server runs the trunk on one dedicated torch worker thread.

Importing this package imports neither torch, transformers nor grpc: the public names
below load lazily on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models
    "split_model": "splitlearn_async.models.stages",
    "SplitStages": "splitlearn_async.models.stages",
    "BottomStage": "splitlearn_async.models.stages",
    "TrunkStage": "splitlearn_async.models.stages",
    "TopStage": "splitlearn_async.models.stages",
    "KVCache": "splitlearn_async.models.cache",
    "prompt_positions": "splitlearn_async.models.positions",
    "supported_model_types": "splitlearn_async.models.families",
    "load_stages": "splitlearn_async.models.loading",
    "save_stages": "splitlearn_async.models.bundle",
    "default_bundle": "splitlearn_async.models.default",
    "ModelFactory": "splitlearn_async.models.factory",
    # server
    "AsyncGRPCComputeServer": "splitlearn_async.server",
    "ServerConfig": "splitlearn_async.server",
    "ServerProcess": "splitlearn_async.server",
    # client
    "SplitPipeline": "splitlearn_async.client",
    "StreamChunk": "splitlearn_async.client",
    "StepTimings": "splitlearn_async.client",
    "LocalTrunk": "splitlearn_async.client",
    "RemoteTrunk": "splitlearn_async.client",
    "ClientConfig": "splitlearn_async.client",
    "TrunkSession": "splitlearn_async.client",
    "TrunkChain": "splitlearn_async.client",
    "SamplingConfig": "splitlearn_async.models.decoding",
    "Defense": "splitlearn_async.client",
    "GaussianNoise": "splitlearn_async.client",
    "DChiNoise": "splitlearn_async.client",
    # training
    "SplitTrainer": "splitlearn_async.client",
    "TrainingConfig": "splitlearn_async.training",
    "OptimizerConfig": "splitlearn_async.training",
    "LoraConfig": "splitlearn_async.training",
    "merge_adapter": "splitlearn_async.training",
    # errors
    "SplitLearnError": "splitlearn_async.errors",
    "ConfigError": "splitlearn_async.errors",
    "ArgumentError": "splitlearn_async.errors",
    "StateError": "splitlearn_async.errors",
    "ModelError": "splitlearn_async.errors",
    "UnsupportedModelError": "splitlearn_async.errors",
    "SplitPointError": "splitlearn_async.errors",
    "CheckpointError": "splitlearn_async.errors",
    "BundleError": "splitlearn_async.errors",
    "BundleCorruptError": "splitlearn_async.errors",
    "MissingPartError": "splitlearn_async.errors",
    "WireError": "splitlearn_async.errors",
    "WorkerStopped": "splitlearn_async.errors",
    "WorkerDied": "splitlearn_async.errors",
    "StageWorker": "splitlearn_async.worker",
    "TrunkError": "splitlearn_async.errors",
    "TrunkUnavailable": "splitlearn_async.errors",
    "TrunkTimeout": "splitlearn_async.errors",
    "TrunkBusy": "splitlearn_async.errors",
    "TrunkRejected": "splitlearn_async.errors",
    "SessionNotFound": "splitlearn_async.errors",
    "StepNotFound": "splitlearn_async.errors",
    "AdapterNotFound": "splitlearn_async.errors",
    "ModelNotFound": "splitlearn_async.errors",
    "PreconditionFailed": "splitlearn_async.errors",
    "AlreadyExists": "splitlearn_async.errors",
    "Unauthenticated": "splitlearn_async.errors",
    "ClientClosed": "splitlearn_async.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])  # noqa: PLE0605 (the lazy names, listed once above)

if TYPE_CHECKING:  # pragma: no cover
    from .client import ClientConfig as ClientConfig
    from .client import DChiNoise as DChiNoise
    from .client import Defense as Defense
    from .client import GaussianNoise as GaussianNoise
    from .client import LocalTrunk as LocalTrunk
    from .client import RemoteTrunk as RemoteTrunk
    from .client import SplitPipeline as SplitPipeline
    from .client import SplitTrainer as SplitTrainer
    from .client import StepTimings as StepTimings
    from .client import StreamChunk as StreamChunk
    from .client import TrunkChain as TrunkChain
    from .client import TrunkSession as TrunkSession
    from .errors import *  # noqa: F403
    from .models.bundle import save_stages  # noqa: F401
    from .models.cache import KVCache  # noqa: F401
    from .models.decoding import SamplingConfig  # noqa: F401
    from .models.default import default_bundle  # noqa: F401
    from .models.factory import ModelFactory  # noqa: F401
    from .models.families import supported_model_types  # noqa: F401
    from .models.loading import load_stages  # noqa: F401
    from .models.positions import prompt_positions  # noqa: F401
    from .models.stages import BottomStage, SplitStages, TopStage, TrunkStage, split_model  # noqa: F401
    from .server import (  # noqa: F401
        AsyncGRPCComputeServer,
        ServerConfig,
        ServerProcess,
    )
    from .training import LoraConfig, OptimizerConfig, TrainingConfig, merge_adapter  # noqa: F401
    from .worker import StageWorker  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitlearn_async' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
