"""The generic splitter: bottom, trunk and top stages built from a :class:`Family` record.

A stage holds the family's own decoder layers (copies of the module objects that share
their parameters with the source model), so attention, rotary embeddings and norms are
transformers' code, not ours. What crosses a stage boundary is a hidden-state tensor of
shape ``(B, T, hidden_size)``.

This module is the public face of the stages; what it re-exports lives in:

- :mod:`~splitlearn_async.models.stage_classes`: :class:`Stage`, :class:`BottomStage`,
  :class:`TrunkStage`, :class:`TopStage` (the ``nn.Module`` s), :class:`SplitStages` and
  ``PARTS``;
- :mod:`~splitlearn_async.models.splitter`: :func:`split_model` (and its helpers
  ``check_split_points`` and ``get_path``);
- :mod:`~splitlearn_async.models.running`: :func:`run_stage` and :func:`run_stage_batched`,
  which run stages outside autograd, one call or many as one batch.
"""

from __future__ import annotations

from .running import run_stage, run_stage_batched
from .splitter import check_split_points as check_split_points  # not in __all__, as before
from .splitter import get_path as get_path
from .splitter import split_model
from .stage_classes import PARTS, BottomStage, SplitStages, Stage, TopStage, TrunkStage

__all__ = [
    "PARTS",
    "BottomStage",
    "SplitStages",
    "Stage",
    "TopStage",
    "TrunkStage",
    "run_stage",
    "run_stage_batched",
    "split_model",
]
