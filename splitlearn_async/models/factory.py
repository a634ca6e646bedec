"""Compatibility entry point for users of the old SplitLearnCore ``ModelFactory``."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError, UnsupportedModelError
from .families import family_for

__all__ = ["ModelFactory"]


class ModelFactory:
    """The old system's factory, backed by :func:`load_stages`.

    Unlike the old factory it downloads nothing: ``model_name_or_path`` must be a local
    Hugging Face directory, a ``.gguf`` file, a stage bundle, or ``"default"``.
    """

    @staticmethod
    def create_split_models(
        model_type: str,
        model_name_or_path: str,
        split_point_1: int,
        split_point_2: int,
        device: str = "cpu",
    ) -> tuple[Any, Any, Any]:
        """Return ``(bottom, trunk, top)`` split at ``(split_point_1, split_point_2)``.

        Raises:
            UnsupportedModelError: ``model_type`` is not a supported family, or does not
                match the checkpoint's family.
            ModelError: the path does not exist locally (hub names are not fetched).
        """
        from pathlib import Path

        from .loading import load_stages

        family = family_for(model_type)
        if model_name_or_path != "default" and not Path(model_name_or_path).expanduser().exists():
            raise ModelError(
                f"{model_name_or_path!r} is not a local path; splitlearn-async never downloads weights. Pass a "
                "local Hugging Face directory, a .gguf file, a stage bundle, or 'default'."
            )
        stages = load_stages(model_name_or_path, (split_point_1, split_point_2), device=device)
        actual = stages.trunk.family if stages.trunk is not None else family
        if actual.name != family.name:
            raise UnsupportedModelError(
                f"model_type={model_type!r} does not match the checkpoint, which is a {actual.name} model; pass "
                f"model_type={actual.model_types[0]!r}."
            )
        return stages.bottom, stages.trunk, stages.top
