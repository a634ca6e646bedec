"""The loss of causal language modelling, as Hugging Face computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitlearn_async.errors import ConfigError

__all__ = ["IGNORE_INDEX", "causal_lm_loss"]

#: Labels equal to this are left out of the loss (padding), as in Hugging Face.
IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits (B, T, V)`` at ``t`` predict ``labels (B, T)`` at ``t + 1``.

    Labels equal to :data:`IGNORE_INDEX` are left out.

    Raises:
        ValueError: no label is left to predict.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, T-1)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        raise ConfigError("the batch has no label to predict; give sequences of at least two real tokens.")
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
