"""What a training session trained on the trunk's side, as bytes and as files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["OPTIMIZER_FILE", "WEIGHTS_FILES", "TrunkState", "state_files"]

WEIGHTS_FILES = {"lora": "adapter.safetensors", "full": "trunk.safetensors"}
OPTIMIZER_FILE = "trunk_optimizer.safetensors"


def state_files(mode: str) -> dict[str, str]:
    """The file name of each blob of a ``mode`` session's state: ``{"weights": ..., "optimizer_state": ...}``.

    A frozen trunk has no weights file.
    """
    files = {"weights": WEIGHTS_FILES[mode]} if mode in WEIGHTS_FILES else {}
    return {**files, "optimizer_state": OPTIMIZER_FILE}


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

    @property
    def blobs(self) -> dict[str, bytes | None]:
        """The state as the blobs of a checkpoint on the wire: ``{"weights": ..., "optimizer_state": ...}``."""
        return {"weights": self.weights or None, "optimizer_state": self.optimizer}

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``adapter.safetensors`` (or ``trunk.safetensors``) and ``trunk_optimizer.safetensors``.

        Returns:
            The files written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, filename in state_files(self.mode).items():
            data = self.blobs[name]
            if data is not None:
                path = out / filename
                path.write_bytes(data)
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
