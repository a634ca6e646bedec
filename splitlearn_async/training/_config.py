"""What trains and how: LoraConfig, OptimizerConfig and TrainingConfig, validated on creation.

The trunk's settings travel to the server as plain msgpack maps (:meth:`to_wire` /
:meth:`from_wire`), so a server checks them with the same rules as the client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["OPTIMIZERS", "TRUNK_MODES", "LoraConfig", "OptimizerConfig", "TrainingConfig"]

#: How the trunk trains: all its weights, LoRA adapters, or nothing (gradients still flow through).
TRUNK_MODES = ("lora", "full", "frozen")
#: Optimizers known to both sides.
OPTIMIZERS = ("adamw", "adam", "sgd")


def _number(owner: str, name: str, value: object, *, minimum: float, inclusive: bool, fix: str) -> float:
    number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float)) else math.nan
    ok = math.isfinite(number) and (number >= minimum if inclusive else number > minimum)
    if not ok:
        sign = ">=" if inclusive else ">"
        raise ConfigError(f"{owner}.{name} must be a finite number {sign} {minimum:g}, got {value!r}; {fix}.")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the trunk's linear layers: ``W x + (alpha / rank) * B A x``.

    ``A`` ``(rank, in)`` starts Kaiming-uniform and ``B`` ``(out, rank)`` starts at zero,
    so a new adapter leaves the trunk's output unchanged (as in peft).

    Attributes:
        rank: Rank ``r`` of each adapter (>= 1).
        alpha: Scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input during training forwards (0 turns it off).
        target_modules: Last names of the linear layers that get adapters, e.g.
            ``("q_proj", "v_proj")`` (llama, qwen2, gemma) or ``("c_attn",)`` (gpt2).
            ``None`` adapts every linear layer of the trunk's decoder layers.
        seed: Seed of ``A``'s initialisation; ``None`` draws one.

    Raises:
        ConfigError: a field is out of range.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 4096:
            raise ConfigError(f"LoraConfig.rank must be an int in 1..4096, got {self.rank!r}; e.g. 8.")
        _number("LoraConfig", "alpha", self.alpha, minimum=0.0, inclusive=False, fix="e.g. 16 (twice the rank)")
        p = _number("LoraConfig", "dropout", self.dropout, minimum=0.0, inclusive=True, fix="e.g. 0.05")
        if p >= 1:
            raise ConfigError(f"LoraConfig.dropout must be < 1, got {self.dropout!r}; e.g. 0.05.")
        if self.target_modules is not None:
            targets: object = self.target_modules  # checked at run time: callers pass anything
            if not isinstance(targets, (list, tuple)):
                raise ConfigError(
                    f"LoraConfig.target_modules must be a sequence of module names or None, got {targets!r}; "
                    "e.g. ('q_proj', 'v_proj')."
                )
            names = tuple(targets)
            if not names or not all(isinstance(n, str) and n and "." not in n for n in names):
                raise ConfigError(
                    f"LoraConfig.target_modules must hold non-empty last names without dots, got {targets!r}; "
                    "e.g. ('q_proj', 'v_proj'), or None for every linear layer."
                )
            object.__setattr__(self, "target_modules", names)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"LoraConfig.seed must be an int or None, got {self.seed!r}.")

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-ready map of the fields."""
        return {
            "rank": self.rank,
            "alpha": float(self.alpha),
            "dropout": float(self.dropout),
            "target_modules": list(self.target_modules) if self.target_modules is not None else None,
            "seed": self.seed,
        }

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> LoraConfig:
        """Build from :meth:`to_wire`'s map; absent fields take their defaults.

        Raises:
            ConfigError: a field is unknown or out of range.
        """
        return cls(**_known_fields(cls, msg, "lora"))


@dataclass(frozen=True)
class OptimizerConfig:
    """A torch optimizer by name and its settings (the same on the client and the server).

    Attributes:
        name: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        lr: Learning rate (> 0).
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: Adam's epsilon (> 0).
        weight_decay: Weight decay (>= 0); decoupled for AdamW, L2 for Adam and SGD.
        momentum: SGD momentum (>= 0).

    Raises:
        ConfigError: a field is out of range.
    """

    name: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"OptimizerConfig.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}.")
        _number("OptimizerConfig", "lr", self.lr, minimum=0.0, inclusive=False, fix="e.g. 1e-4")
        try:
            b1, b2 = self.betas
        except (TypeError, ValueError):
            raise ConfigError(f"OptimizerConfig.betas must be a pair, got {self.betas!r}; e.g. (0.9, 0.999).") from None
        for b in (b1, b2):
            if _number("OptimizerConfig", "betas", b, minimum=0.0, inclusive=True, fix="e.g. (0.9, 0.999)") >= 1:
                raise ConfigError(f"OptimizerConfig.betas must lie in [0, 1), got {self.betas!r}; e.g. (0.9, 0.999).")
        object.__setattr__(self, "betas", (float(b1), float(b2)))
        _number("OptimizerConfig", "eps", self.eps, minimum=0.0, inclusive=False, fix="e.g. 1e-8")
        _number("OptimizerConfig", "weight_decay", self.weight_decay, minimum=0.0, inclusive=True, fix="e.g. 0.01")
        _number("OptimizerConfig", "momentum", self.momentum, minimum=0.0, inclusive=True, fix="e.g. 0.9")

    def build(self, params: list[Any]) -> Any:
        """A ``torch.optim`` optimizer over ``params`` (imports torch).

        Args:
            params: The parameters to optimise (at least one).

        Returns:
            The optimizer.
        """
        import torch

        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-ready map of the fields."""
        return {
            "name": self.name,
            "lr": float(self.lr),
            "betas": list(self.betas),
            "eps": float(self.eps),
            "weight_decay": float(self.weight_decay),
            "momentum": float(self.momentum),
        }

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> OptimizerConfig:
        """Build from :meth:`to_wire`'s map; absent fields take their defaults.

        Raises:
            ConfigError: a field is unknown or out of range.
        """
        fields = _known_fields(cls, msg, "optimizer")
        if "betas" in fields and isinstance(fields["betas"], list):
            fields["betas"] = tuple(fields["betas"])
        return cls(**fields)


@dataclass(frozen=True)
class TrainingConfig:
    """What :class:`~splitlearn_async.training.SplitTrainer` trains and how.

    Attributes:
        optimizer: The client's optimizer over the bottom and top parameters.
        trunk_optimizer: The server's optimizer over the trainable trunk parameters;
            ``None`` uses ``optimizer``.
        trunk: ``"lora"`` (adapters created on the trunk's side), ``"full"`` (every trunk
            weight; a server must allow it with ``ServerConfig.allow_full_training``) or
            ``"frozen"`` (the trunk does not change; gradients still flow through it).
        lora: Adapter settings when ``trunk="lora"``.
        adapter_id: Name of the trunk adapter: a new one is created under this name, or an
            existing one is trained further. ``None`` lets the trunk pick a name.
        train_bottom: Update the bottom stage's parameters.
        train_top: Update the top stage's parameters.
        accumulation_steps: Micro-batches per optimizer step (gradient accumulation): the
            loss of each is divided by this number, and both optimizers step on every
            ``accumulation_steps``-th call of ``step``.
        max_grad_norm: Clip the gradients by their global norm before each optimizer
            step, as ``torch.nn.utils.clip_grad_norm_`` does on the unsplit model: the norm
            spans the client's and the trunk's trainable parameters (the trunk reports its
            squared norm with ``Backward``), and one scale applies to both sides. ``None``
            does not clip.

    Raises:
        ConfigError: a field is out of range.
    """

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trunk_optimizer: OptimizerConfig | None = None
    trunk: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter_id: str | None = None
    train_bottom: bool = True
    train_top: bool = True
    accumulation_steps: int = 1
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ConfigError(
                f"TrainingConfig.optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}."
            )
        if self.trunk_optimizer is not None and not isinstance(self.trunk_optimizer, OptimizerConfig):
            raise ConfigError(
                f"TrainingConfig.trunk_optimizer must be an OptimizerConfig or None, got {type(self.trunk_optimizer).__name__}."
            )
        if self.trunk not in TRUNK_MODES:
            raise ConfigError(f"TrainingConfig.trunk must be one of {', '.join(TRUNK_MODES)}, got {self.trunk!r}.")
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"TrainingConfig.lora must be a LoraConfig, got {type(self.lora).__name__}.")
        check_adapter_id(self.adapter_id, "TrainingConfig.adapter_id", allow_none=True)
        acc = self.accumulation_steps
        if isinstance(acc, bool) or not isinstance(acc, int) or acc < 1:
            raise ConfigError(
                f"TrainingConfig.accumulation_steps must be an int >= 1, got {acc!r}; 1 turns accumulation off."
            )
        if self.max_grad_norm is not None:
            _number("TrainingConfig", "max_grad_norm", self.max_grad_norm, minimum=0.0, inclusive=False, fix="e.g. 1.0")

    @property
    def effective_trunk_optimizer(self) -> OptimizerConfig:
        """The trunk's optimizer settings."""
        return self.trunk_optimizer if self.trunk_optimizer is not None else self.optimizer


def check_adapter_id(value: object, what: str = "adapter_id", *, allow_none: bool = False) -> str | None:
    """Check an adapter name: 1..64 characters from letters, digits, ``-``, ``_`` and ``.``.

    Raises:
        ConfigError: the name is not a string of that form.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, str) and 0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)
    if not ok:
        raise ConfigError(
            f"{what} must be 1 to 64 letters, digits, '-', '_' or '.', got {value!r}; e.g. 'shakespeare-r8'."
        )
    return value  # type: ignore[return-value]


def _known_fields(cls: type, msg: Mapping[str, Any], label: str) -> dict[str, Any]:
    if not isinstance(msg, Mapping):
        raise ConfigError(f"the {label} settings must be a map, got {type(msg).__name__}.")
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(str(k) for k in msg if k not in known)
    if unknown:
        raise ConfigError(f"the {label} settings hold unknown fields {unknown}; known fields are {sorted(known)}.")
    return {k: v for k, v in msg.items() if v is not None}
