"""The trunk's side of split training, and what both sides share.

- :class:`TrainingConfig`, :class:`OptimizerConfig`, :class:`LoraConfig` say what trains and how.
- :func:`causal_lm_loss` is the loss ``SplitTrainer`` uses by default.
- :func:`merge_adapter` folds a saved trunk adapter into a full model's weights.
- :class:`TrainingHost` holds the trunk side's rules (sessions, kept graphs, adapters,
  caps) in one place, for the server and ``LocalTrunk`` alike; :class:`TrunkState` is
  what a session trained, as safetensors bytes.

``SplitTrainer`` itself is a client: ``splitlearn_async.SplitTrainer`` (or
``splitlearn_async.client.SplitTrainer``). See ``docs/training.md``.
"""

from ._config import TRUNK_MODES, LoraConfig, OptimizerConfig, TrainingConfig, check_adapter_id
from ._host import Runner, TrainingEntry, TrainingHost, TrainingLimits, output
from ._lora import bind_adapter, merge_adapter
from ._loss import IGNORE_INDEX, causal_lm_loss
from ._safetensors import from_safetensors, to_safetensors
from ._state import OPTIMIZER_FILE, WEIGHTS_FILES, TrunkState, state_files

__all__ = [
    "IGNORE_INDEX",
    "OPTIMIZER_FILE",
    "TRUNK_MODES",
    "WEIGHTS_FILES",
    "LoraConfig",
    "OptimizerConfig",
    "Runner",
    "TrainingConfig",
    "TrainingEntry",
    "TrainingHost",
    "TrainingLimits",
    "TrunkState",
    "bind_adapter",
    "causal_lm_loss",
    "check_adapter_id",
    "from_safetensors",
    "merge_adapter",
    "output",
    "state_files",
    "to_safetensors",
]
