"""Split training: a real backward pass through the trunk, trainable trunk (full or LoRA).

- :class:`SplitTrainer` runs ``loss = await trainer.step(batch)`` over a ``LocalTrunk`` or
  a ``RemoteTrunk``; bottom and top train on the client, the trunk on its own side.
- :class:`TrainingConfig`, :class:`OptimizerConfig`, :class:`LoraConfig` say what trains and how.
- :func:`merge_adapter` folds a saved trunk adapter into a full model's weights.

See ``docs/training.md``.
"""

from ._config import LoraConfig, OptimizerConfig, TrainingConfig
from ._lora import merge_adapter
from ._trainer import SplitTrainer, causal_lm_loss

__all__ = ["SplitTrainer", "TrainingConfig", "OptimizerConfig", "LoraConfig", "causal_lm_loss", "merge_adapter"]
