"""``load_stages``: build only the asked-for stages, reading only the tensors they need.

This is the entry point. It resolves the name ``"default"`` to the embedded model's
bundle (:mod:`~splitlearn_async.models.default`) and loads every path with
:mod:`~splitlearn_async.models.path_loading`, which does the work. The imports run one
way, ``loading`` -> ``default`` -> ``path_loading``: the default model's conversion loads
its GGUF file with ``path_loading`` directly, never through :func:`load_stages`.
"""

from __future__ import annotations

import os

import torch

from .default import DEFAULT_SPLIT, default_bundle
from .path_loading import check_parts, load_from_path, materialize
from .path_loading import resolve_dtype as resolve_dtype  # not in __all__, as before
from .stage_classes import PARTS, SplitStages

__all__ = ["load_stages", "materialize"]


def load_stages(
    source: str | os.PathLike[str],
    split_points: tuple[int, int] | None = None,
    parts: tuple[str, ...] = PARTS,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    verify: bool = True,
    progress: bool = False,
) -> SplitStages:
    """Load stages from a Hugging Face directory, a GGUF file, a stage bundle, or ``"default"``.

    Only the tensors of the asked-for parts are read; the rest of the model is never
    materialised (the skeleton lives on the meta device).

    Args:
        source: A Hugging Face model directory (safetensors, sharded or not), a ``.gguf``
            file, a bundle directory written by :func:`save_stages` (or one part's
            directory of it), or ``"default"`` for the embedded SmolLM2-135M-Instruct.
        split_points: ``(a, b)``. Required for directories and GGUF files; optional for
            bundles, which record their own (if given, it must match).
        parts: Which of ``"bottom"``, ``"trunk"``, ``"top"`` to build.
        dtype: Cast floating-point tensors to this dtype (default: as stored).
        device: Put the stages on this device (default: CPU).
        verify: For bundles, check each file's sha256 before reading it.
        progress: Show a progress bar while reading tensors.

    Returns:
        :class:`SplitStages`; parts not asked for are ``None``.

    Raises:
        SplitPointError, UnsupportedModelError, ModelError, BundleError and subclasses,
        CheckpointError: see their messages, which name the value and the fix.
    """
    parts = check_parts(parts)
    target_dtype = resolve_dtype(dtype)  # both checked before "default" may start a conversion
    if str(source) == "default":
        source = default_bundle(split_points or DEFAULT_SPLIT)
    return load_from_path(source, split_points, parts, target_dtype, device, verify=verify, progress=progress)
