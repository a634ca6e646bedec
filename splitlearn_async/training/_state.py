"""What a training session trained on the trunk's side, as bytes and as files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["OPTIMIZER_FILE", "WEIGHTS_FILES", "TrunkState"]

WEIGHTS_FILES = {"lora": "adapter.safetensors", "full": "trunk.safetensors"}
OPTIMIZER_FILE = "trunk_optimizer.safetensors"


@dataclass(frozen=True)
class TrunkState:
    """What a training session trained on the trunk's side, as safetensors bytes.

    Attributes:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        weights: The adapter (peft layout) or the trunk's weights; empty for ``"frozen"``.
        optimizer: The trunk optimizer's state, or None if not asked for.
        adapter_id: The adapter's name (LoRA only).
    """

    mode: str
    weights: bytes
    optimizer: bytes | None = None
    adapter_id: str | None = None

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``adapter.safetensors`` (or ``trunk.safetensors``) and ``trunk_optimizer.safetensors``.

        Returns:
            The files written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if self.mode in WEIGHTS_FILES:
            path = out / WEIGHTS_FILES[self.mode]
            path.write_bytes(self.weights)
            written.append(path)
        if self.optimizer is not None:
            path = out / OPTIMIZER_FILE
            path.write_bytes(self.optimizer)
            written.append(path)
        return written

    @classmethod
    def load(cls, directory: str | Path, mode: str = "lora") -> TrunkState:
        """Read what :meth:`save` wrote.

        Raises:
            FileNotFoundError: the weights file is missing.
        """
        base = Path(directory)
        weights = (base / WEIGHTS_FILES[mode]).read_bytes() if mode in WEIGHTS_FILES else b""
        opt = base / OPTIMIZER_FILE
        return cls(mode, weights, opt.read_bytes() if opt.is_file() else None)
