"""Stages from a path: a Hugging Face directory, a GGUF file or a stage bundle.

:func:`load_from_path` builds only the asked-for stages and reads only the tensors they
need. It knows nothing of the name ``"default"``: :func:`~splitlearn_async.models.loading.load_stages`
resolves that name (:mod:`~splitlearn_async.models.default`), and the default model's
conversion loads its GGUF file from here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitlearn_async.errors import ConfigError

from ..errors import CheckpointError, SplitPointError
from .bundle import BundleSource, is_bundle
from .sources import TensorSource, _empty_model, open_source
from .splitter import split_model
from .stage_classes import PARTS, SplitStages, Stage

__all__ = ["check_parts", "load_from_path", "materialize", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept a torch dtype or a name such as ``"bf16"``; raise ValueError naming the choices."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(_DTYPES))}.") from None


def check_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    """``parts`` as a tuple; raise ValueError unless it is a non-empty selection of ``PARTS``."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise ConfigError(f"parts must be a non-empty selection of {PARTS}, got {parts!r}.")
    return parts


def load_from_path(
    source: str | os.PathLike[str],
    split_points: tuple[int, int] | None = None,
    parts: tuple[str, ...] = PARTS,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    verify: bool = True,
    progress: bool = False,
) -> SplitStages:
    """Load stages from a Hugging Face directory, a GGUF file or a stage bundle.

    Takes the arguments of :func:`~splitlearn_async.models.loading.load_stages`, except
    that ``source`` is a path (``"default"`` is resolved there, not here).

    Returns:
        :class:`SplitStages`; parts not asked for are ``None``.

    Raises:
        ValueError: ``parts`` or ``dtype`` is not valid.
        SplitPointError, UnsupportedModelError, ModelError, BundleError and subclasses,
        CheckpointError: see their messages, which name the value and the fix.
    """
    parts = check_parts(parts)
    target_dtype = resolve_dtype(dtype)
    path = Path(source).expanduser()
    tensor_source: TensorSource
    if path.is_dir() and is_bundle(path):
        bundle = BundleSource(path, parts, verify=verify)
        if split_points is not None and bundle.split_points is not None and tuple(split_points) != bundle.split_points:
            raise SplitPointError(
                f"bundle {path} was split at {bundle.split_points}, not {tuple(split_points)}; pass "
                f"split_points={bundle.split_points} (or None), or split the original model again."
            )
        split_points = split_points or bundle.split_points
        if split_points is None:
            split_points = _split_points_of_single_part(bundle)
        tensor_source = bundle
    else:
        if split_points is None:
            raise SplitPointError(
                f"split_points are required to load from {path}; pass e.g. split_points=(2, 10) (only bundles "
                "record their own)."
            )
        tensor_source = open_source(path)
    try:
        skeleton = _empty_model(tensor_source.config)  # its generation_config: from the config, as transformers'
        saved = _saved_generation_config(path, tensor_source)
        if saved is not None:
            skeleton.generation_config = saved
        stages = split_model(skeleton, split_points, parts)  # parameters still on meta; generation_config kept
        del skeleton
        materialize(stages, tensor_source, dtype=target_dtype, device=device, progress=progress)
    finally:
        tensor_source.close()
    for stage in stages.present().values():
        stage.eval()
    return stages


def _saved_generation_config(path: Path, source: TensorSource) -> Any:
    """The generation config saved with a bundle or a Hugging Face folder; None for a GGUF file.

    As ``from_pretrained`` does: a folder's ``generation_config.json``, else the generation
    fields of its ``config.json``. A GGUF file carries none (``from_pretrained`` then keeps
    the default it derives from the config, as the skeleton does). Read from the local
    files only; nothing is fetched.

    Raises:
        CheckpointError: the folder's JSON cannot be read.
    """
    if isinstance(source, BundleSource):
        return source.generation_config
    if not path.is_dir():
        return None
    from transformers import GenerationConfig

    saved, config_file = path / "generation_config.json", path / "config.json"
    try:
        if saved.is_file():
            return GenerationConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
        return GenerationConfig.from_model_config(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"the generation config in {path} cannot be read: {exc}") from exc


def _split_points_of_single_part(bundle: BundleSource) -> tuple[int, int]:
    (part, manifest), *_ = bundle.manifests.items()
    lo, hi = manifest["layer_range"]
    n = manifest["num_hidden_layers"]
    # a lone bottom or top: the other split point is free; pick a valid one
    return (hi, n) if part == "bottom" else (max(lo - 1, 0), lo) if part == "top" else (lo, hi)


def materialize(
    stages: SplitStages,
    source: TensorSource,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> None:
    """Replace every meta parameter of ``stages`` with its tensor from ``source``.

    Parameters shared between stages (a tied embedding and LM head) stay shared. Each
    tensor's shape is checked against the stage, and a mismatch names the tensor.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape.
    """
    from tqdm.auto import tqdm

    target = torch.device(device) if device is not None else torch.device("cpu")
    todo: list[tuple[Stage, str, nn.Parameter]] = []
    for stage in stages.present().values():
        todo.extend((stage, n, p) for n, p in stage.named_parameters(remove_duplicate=False))
    done: dict[int, nn.Parameter] = {}
    tie = bool(getattr(source.config, "tie_word_embeddings", False))
    for stage, name, param in tqdm(todo, desc="loading tensors", unit="tensor", disable=not progress):
        new = done.get(id(param))
        if new is None:
            ckpt = stage.checkpoint_name(name)
            if not source.has(ckpt) and name == "lm_head.weight" and tie:
                ckpt = f"{stage.family.embed}.weight"  # tied head: the embedding's tensor
            if not source.has(ckpt):
                raise CheckpointError(
                    f"{source.description} has no tensor {ckpt!r}, which the {stage.part} stage needs "
                    f"(parameter {name}); the checkpoint does not match its config."
                )
            tensor = source.get(ckpt)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"tensor {ckpt!r} in {source.description} has shape {tuple(tensor.shape)} but the "
                    f"{stage.part} stage expects {tuple(param.shape)}; the checkpoint does not match its config."
                )
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            elif target.type == "cpu":
                tensor = tensor.clone()  # own aligned memory, not pages of a mapped file
            new = nn.Parameter(tensor.to(target), requires_grad=param.requires_grad)
            done[id(param)] = new
        _set_parameter(stage, name, new)
    for stage in stages.present().values():
        stage.to(target)  # buffers (rotary frequencies, embedding scales)


def _set_parameter(root: nn.Module, name: str, value: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    module: Any = root
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = value
