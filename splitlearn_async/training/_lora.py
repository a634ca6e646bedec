"""LoRA adapters on a shared trunk, chosen per call.

One :class:`~splitlearn_async.models.stages.TrunkStage` serves many sessions, some with
an adapter and some without, so adapters cannot be merged into its weights or swapped in
as modules. Instead each adapted linear layer gets a forward hook that adds
``(alpha / rank) * B (A x)`` when the *active adapter* of the calling thread has an entry
for that layer, and returns the base output untouched otherwise (bit for bit: a session
without an adapter runs exactly the base model).

The active adapter is thread-local state of the torch worker thread:

- a training forward runs inside ``with use_adapter(adapter):``;
- an inference session binds its adapter to its KV cache (:func:`bind_adapter`), and a
  pre-hook on the stage activates it for every call that passes that cache. A batched
  call passes a ``CacheGroup`` of several sessions' caches, whose adapters may differ:
  the hook then activates :class:`RowAdapters`, which adds each adapter's update to its
  own sessions' rows only (rows are laid out cache after cache), one pair of small
  matmuls per run of rows with the same adapter, in the style of S-LoRA/Punica's
  grouped LoRA (here over contiguous row slices, without a custom kernel). Rows without
  an adapter get the base output untouched, so a batch of base and adapted sessions
  gives each exactly what it gets alone.

Adapters save as safetensors in peft's layout
(``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
``(out, r)``, module names as in the full model's checkpoint), with ``rank``, ``alpha``
and the target modules in the file's metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from splitlearn_async.errors import ArgumentError, ConfigError

from ..errors import CheckpointError
from ._config import LoraConfig

__all__ = [
    "ADAPTER_FORMAT",
    "LoraAdapter",
    "RowAdapters",
    "active_adapter",
    "adapter_modules",
    "bind_adapter",
    "install_adapter_hooks",
    "merge_adapter",
    "use_adapter",
]

ADAPTER_FORMAT = "splitlearn-lora/1"
_PREFIX = "base_model.model."
_local = threading.local()
_HOOKS_ATTR = "_splitlearn_lora_hooks"
_CACHE_ATTR = "lora_adapter"


def active_adapter() -> LoraAdapter | RowAdapters | None:
    """The adapter active on this thread (per row, for a batch of sessions), or None (base weights)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_adapter(adapter: LoraAdapter | None) -> Iterator[None]:
    """Make ``adapter`` the active one on this thread inside the block (``None``: base weights)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(adapter)
    try:
        yield
    finally:
        stack.pop()


def bind_adapter(cache: Any, adapter: LoraAdapter | None) -> None:
    """Record on a KV cache which adapter the stage must use for calls with that cache."""
    setattr(cache, _CACHE_ATTR, adapter)


def _adapter_of_cache(cache: Any) -> tuple[bool, LoraAdapter | RowAdapters | None]:
    """(found, adapter) for a KVCache or a CacheGroup; found is False when nothing is bound.

    A group whose caches carry different adapters gives a :class:`RowAdapters`.
    """
    caches = getattr(cache, "caches", None)
    if caches is None:
        return (hasattr(cache, _CACHE_ATTR), getattr(cache, _CACHE_ATTR, None))
    bound = [getattr(c, _CACHE_ATTR, None) for c in caches]
    if all(a is bound[0] for a in bound):
        return (bound[0] is not None, bound[0])
    segments: list[tuple[int, int, LoraAdapter | None]] = []
    start = 0
    for c, adapter in zip(caches, bound, strict=True):
        end = start + int(c.batch_size)
        if segments and segments[-1][2] is adapter:  # neighbours with the same adapter: one run
            segments[-1] = (segments[-1][0], end, adapter)
        else:
            segments.append((start, end, adapter))
        start = end
    return (True, RowAdapters(segments))


class RowAdapters:
    """Different adapters for different rows of one batched call (sessions batched together).

    Args:
        segments: ``(start, end, adapter)`` runs of rows, in order, covering the batch;
            ``adapter`` None for rows that run the base weights.
    """

    def __init__(self, segments: list[tuple[int, int, LoraAdapter | None]]) -> None:
        self.segments = [(a, b, adapter) for a, b, adapter in segments if adapter is not None]

    def add_delta(self, name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output`` plus each run's own adapter update on its rows of layer ``name``.

        Rows of the base weights, and of adapters that lack this layer, keep ``output``'s
        values. Without autograd the update is added in place (no copy of the output). With
        autograd (a batch of training forwards), ``x`` and ``output`` are split into the
        runs (one ``split``: its backward joins the gradients once, where row slices would
        each make a gradient of the whole batch) and the result is joined from them.
        """
        if not torch.is_grad_enabled():
            for a, b, adapter in self.segments:
                delta = adapter.delta(name, x[a:b])  # (b - a, ..., out)
                if delta is not None:
                    output[a:b] += delta
            return output
        runs: list[tuple[int, LoraAdapter | None]] = []  # (rows, adapter) covering the batch, in order
        at = 0
        for a, b, adapter in self.segments:
            if a > at:
                runs.append((a - at, None))
            runs.append((b - a, adapter))
            at = b
        if at < output.shape[0]:
            runs.append((output.shape[0] - at, None))
        sizes = [rows for rows, _ in runs]
        pieces, changed = [], False
        for (_, owner), xs, out in zip(runs, torch.split(x, sizes), torch.split(output, sizes), strict=True):
            delta = None if owner is None else owner.delta(name, xs)
            pieces.append(out if delta is None else out + delta)
            changed = changed or delta is not None
        return torch.cat(pieces) if changed else output


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # gpt2's Conv1D


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D (weight ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise ArgumentError(f"{type(module).__name__} has no weight tensor; LoRA adapts Linear and Conv1D layers only.")
    return int(w.shape[0]), int(w.shape[1])


def adapter_modules(stage: nn.Module, target_modules: tuple[str, ...] | None) -> dict[str, nn.Module]:
    """The linear layers of ``stage``'s decoder layers that ``target_modules`` selects.

    Returns:
        ``{stage module name: module}``, e.g. ``{"layers.3.self_attn.q_proj": Linear}``.

    Raises:
        ValueError: no linear layer of the stage matches ``target_modules``.
    """
    found = {
        name: m
        for name, m in stage.named_modules()
        if name.startswith("layers.")
        and _is_linear(m)
        and (target_modules is None or name.rsplit(".", 1)[-1] in target_modules)
    }
    if not found:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in stage.named_modules() if n.startswith("layers.") and _is_linear(m)}
        )
        raise ConfigError(
            f"no linear layer of the trunk matches target_modules={list(target_modules or [])}; "
            f"this trunk's linear layers are named {names}."
        )
    return found


class LoraAdapter:
    """Low-rank adapters for some linear layers of one stage.

    Args:
        stage: The stage (usually the trunk) whose layers are adapted.
        rank: Rank ``r``.
        alpha: The update is scaled by ``alpha / rank``.
        target_modules: Last names of the adapted layers; ``None`` for all linear layers.
        dropout: Dropout on the adapter input while autograd is recording (training).
        seed: Seed of ``A``'s Kaiming-uniform initialisation (``B`` starts at zero).
        adapter_id: The adapter's name.

    Raises:
        ValueError: no layer matches ``target_modules``.
    """

    def __init__(
        self,
        stage: nn.Module,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...] | None = None,
        dropout: float = 0.0,
        seed: int | None = None,
        adapter_id: str = "",
    ) -> None:
        self.adapter_id = adapter_id
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.dropout = float(dropout)
        self.target_modules = tuple(target_modules) if target_modules is not None else None
        self._checkpoint_name = cast("Callable[[str], str]", stage.checkpoint_name)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.pairs: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for name, module in adapter_modules(stage, self.target_modules).items():
            fan_in, fan_out = _features(module)
            weight = module.weight
            if not isinstance(weight, torch.Tensor):  # pragma: no cover (_features checked it)
                raise ArgumentError(f"{name} has no weight tensor.")
            a = torch.empty(self.rank, fan_in, dtype=torch.float32)
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
            a.uniform_(-bound, bound, generator=generator)
            a_param = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
            b_param = nn.Parameter(torch.zeros(fan_out, self.rank, device=weight.device, dtype=weight.dtype))
            self.pairs[name] = (a_param, b_param)
        install_adapter_hooks(stage, list(self.pairs))

    # --- parameters ----------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """Every ``A`` and ``B``, in a fixed order."""
        return [p for pair in self.pairs.values() for p in pair]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(peft-style name, parameter)`` pairs, the names used in the safetensors file."""
        out = []
        for name, (a, b) in self.pairs.items():
            module = self.module_key(name)
            out += [(f"{module}.lora_A.weight", a), (f"{module}.lora_B.weight", b)]
        return out

    def module_key(self, name: str) -> str:
        """The file prefix of a stage module name: ``base_model.model.<checkpoint module name>``."""
        return _PREFIX + self._checkpoint_name(name + ".weight").removesuffix(".weight")

    @property
    def num_parameters(self) -> int:
        """Elements over all ``A`` and ``B``."""
        return sum(p.numel() for p in self.parameters())

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata: format, rank, alpha, dropout and target modules."""
        return {
            "format": ADAPTER_FORMAT,
            "adapter_id": self.adapter_id,
            "rank": str(self.rank),
            "alpha": repr(self.alpha),
            "dropout": repr(self.dropout),
            "target_modules": json.dumps(list(self.target_modules) if self.target_modules is not None else None),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` copies on the CPU, for saving."""
        return {n: p.detach().to("cpu").clone() for n, p in self.named_parameters()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved ``A``/``B`` values in, checking every name and shape.

        Raises:
            CheckpointError: a tensor is missing, extra, or has the wrong shape.
        """
        expected = dict(self.named_parameters())
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise CheckpointError(
                f"the adapter file holds tensors for layers this trunk does not have, e.g. {extra[:2]}; "
                "it was trained for other layers or another model."
            )
        with torch.no_grad():
            for name, param in expected.items():
                value = tensors.get(name)
                if value is None:
                    raise CheckpointError(f"the adapter file lacks {name!r}; save the whole adapter again.")
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"adapter tensor {name!r} has shape {list(value.shape)}, expected {list(param.shape)} "
                        f"(rank {self.rank}); the file belongs to another rank or model."
                    )
                param.copy_(value.to(param.dtype))

    @classmethod
    def from_tensors(
        cls, stage: nn.Module, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], adapter_id: str
    ) -> LoraAdapter:
        """An adapter for ``stage`` with the settings of ``metadata`` and the values of ``tensors``.

        Raises:
            CheckpointError: the metadata is not ours, or a tensor is missing or misshapen.
            ValueError: no layer of the stage matches the recorded target modules.
        """
        config = lora_config_from_metadata(metadata)
        adapter = cls(
            stage, config.rank, config.alpha, config.target_modules, config.dropout, seed=0, adapter_id=adapter_id
        )
        adapter.load_tensors(tensors)
        return adapter

    # --- the update ------------------------------------------------------------------------

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """``(alpha / rank) * B (A x)`` for layer ``name``, or None if this adapter lacks it."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        a, b = pair
        if self.dropout > 0 and torch.is_grad_enabled():
            x = F.dropout(x, self.dropout, training=True)
        return F.linear(F.linear(x, a), b) * self.scaling  # (..., in) -> (..., r) -> (..., out)


def lora_config_from_metadata(metadata: Mapping[str, str]) -> LoraConfig:
    """The settings an adapter file records (its safetensors metadata), checked as a :class:`LoraConfig`.

    Raises:
        CheckpointError: the metadata is not ours, lacks a field, or holds a value out of range
            (a rank that is not a positive int, target modules that are not a list of names...).
    """
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"the adapter file's metadata has format={metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}; "
            "save adapters with splitlearn-async."
        )
    try:
        targets = json.loads(metadata.get("target_modules", "null"))
        return LoraConfig(
            rank=int(metadata["rank"]),
            alpha=float(metadata["alpha"]),
            dropout=float(metadata.get("dropout", "0.0")),
            target_modules=targets,
        )
    except (KeyError, ValueError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"the adapter file's metadata is incomplete or out of range: {exc}") from exc


def adapter_elements(stage: nn.Module, config: LoraConfig) -> int:
    """Elements an adapter with ``config`` would hold on ``stage``: ``rank x (in + out)`` per layer.

    Computed from the layers' shapes, before anything is allocated.

    Raises:
        ValueError: no linear layer of the stage matches the target modules.
    """
    total = 0
    for module in adapter_modules(stage, config.target_modules).values():
        fan_in, fan_out = _features(module)
        total += config.rank * (fan_in + fan_out)
    return total


def install_adapter_hooks(stage: nn.Module, names: list[str]) -> None:
    """Add LoRA hooks to ``stage``'s layers ``names`` (once each) and the cache pre-hook (once)."""
    hooks: dict[str, Any] = stage.__dict__.setdefault(_HOOKS_ATTR, {})
    modules = dict(stage.named_modules())
    for name in names:
        if name in hooks:
            continue
        hooks[name] = modules[name].register_forward_hook(_layer_hook(name))
    if "" not in hooks:
        hooks[""] = (
            stage.register_forward_pre_hook(_stage_pre_hook, with_kwargs=True),
            stage.register_forward_hook(_stage_post_hook, always_call=True),
        )


def _layer_hook(name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        adapter = active_adapter()
        if adapter is None:
            return None  # base output, untouched
        if isinstance(adapter, RowAdapters):
            return adapter.add_delta(name, args[0], output)
        delta = adapter.delta(name, args[0])
        return None if delta is None else output + delta

    return hook


def _stage_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    cache = kwargs.get("cache", args[3] if len(args) > 3 else None)
    found, adapter = (False, None) if cache is None else _adapter_of_cache(cache)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    # a bound cache decides; otherwise keep whatever the caller made active
    stack.append(adapter if found else (stack[-1] if stack else None))
    return


def _stage_post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    stack = getattr(_local, "stack", None)
    if stack:
        stack.pop()
    return


def merge_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Add a saved adapter's update into a full (unsplit) model's weights, in place.

    ``W += (alpha / rank) * B @ A`` for each adapted layer (transposed for gpt2's Conv1D).

    Args:
        model: The full ``*ForCausalLM`` the adapter's trunk was split from.
        tensors: The adapter's tensors (peft layout).
        metadata: The adapter file's metadata.

    Returns:
        How many layers were merged.

    Raises:
        CheckpointError: a module named in the file does not exist in ``model``.
    """
    scaling = float(metadata["alpha"]) / int(metadata["rank"])
    modules = dict(model.named_modules())
    merged = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module_name = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
            module = modules.get(module_name)
            if module is None:
                raise CheckpointError(f"the model has no module {module_name!r} named by the adapter file.")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            update = (b.double() @ a.double()) * scaling  # (out, in)
            if not isinstance(module, nn.Linear):
                update = update.T  # Conv1D keeps (in, out)
            module.weight.add_(update.to(module.weight.dtype))
            merged += 1
    return merged
