"""Stage bundles on disk: one sub-directory per part, safetensors plus a JSON manifest.

Layout::

    BUNDLE/
      bottom/  manifest.json  model.safetensors  generation_config.json     (client)
      trunk/   manifest.json  model.safetensors  generation_config.json     (server: copy only this directory)
      top/     manifest.json  model.safetensors  generation_config.json     (client)
      tokenizer/                                                           (optional, client)

Tensors keep their checkpoint names (``model.layers.5.mlp.up_proj.weight``), so a part
is a slice of the original checkpoint. A tied LM head is stored once, in ``bottom/``, and
``top``'s manifest points at it. Each manifest records the family, the full config, the
layer range, the dtype, the format version and the sha256 of every file; loading checks
them. Each part also keeps the model's ``generation_config.json`` (``generate``'s defaults,
as a Hugging Face model folder does), so that a part loaded alone still generates as the
whole model would; bundles written before it load with the default that transformers
derives from the config. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import BundleCorruptError, BundleError, MissingPartError
from .sources import TensorSource
from .stage_classes import PARTS, SplitStages, Stage

__all__ = ["FORMAT", "FORMAT_VERSION", "BundleSource", "is_bundle", "read_manifest", "replace_dir", "save_stages"]

logger = logging.getLogger(__name__)

FORMAT = "splitlearn-async/stage"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _config_dict(config: Any) -> dict[str, Any]:
    data: dict[str, Any] = config.to_dict()
    for key in list(data):
        if key.startswith("_attn") or key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            data.pop(key)
    return data


def _is_tied(stages: SplitStages) -> bool:
    """True when top's LM head is the very tensor of bottom's embedding."""
    if stages.bottom is None or stages.top is None:
        return False
    return stages.top.lm_head.weight is stages.bottom.embed.weight


def save_stages(stages: SplitStages | Any, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write each present stage to ``directory/<part>/`` (and the tokenizer, if given).

    Args:
        stages: What :func:`split_model` or :func:`load_stages` returned (or a tuple of
            bottom, trunk, top, where missing parts are ``None``).
        directory: The bundle directory; created if missing. Parts already there are
            replaced atomically, other parts are left alone.
        tokenizer: Optional Hugging Face tokenizer, saved to ``directory/tokenizer/``.

    Returns:
        The bundle directory as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save_file

    if not isinstance(stages, SplitStages):
        stages = SplitStages(*stages)
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    tied = _is_tied(stages)
    for part, stage in stages.present().items():
        tensors = stage.checkpoint_tensors()
        tied_refs: dict[str, str] = {}
        if part == "top" and tied:
            name = stage.checkpoint_name("lm_head.weight")
            tied_refs[name] = stages.bottom.checkpoint_name("embed.weight")  # type: ignore[union-attr]
            tensors.pop(name)
        contiguous = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=root))
        try:
            save_file(contiguous, str(tmp / WEIGHTS), metadata={"format": FORMAT, "part": part})
            if stage.generation_config is not None:
                text = stage.generation_config.to_json_string(use_diff=True)
                (tmp / GENERATION_CONFIG).write_text(text, encoding="utf-8")
            manifest = _manifest(stage, contiguous, tied_refs, tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, root / part)
        logger.info("saved %s stage (%d tensors) to %s", part, len(contiguous), root / part)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root / "tokenizer"))
    return root


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory ``new`` at ``final``, replacing what was there."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(new, final)


def _manifest(stage: Stage, tensors: dict[str, torch.Tensor], tied: dict[str, str], folder: Path) -> dict[str, Any]:
    files = [folder / name for name in (WEIGHTS, GENERATION_CONFIG) if (folder / name).is_file()]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "part": stage.part,
        "family": stage.family.name,
        "model_type": stage.config.model_type,
        "layer_range": list(stage.layer_range),
        "num_hidden_layers": int(stage.config.num_hidden_layers),
        "dtype": str(stage.dtype).removeprefix("torch."),
        "config": _config_dict(stage.config),
        "tensors": {
            n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()
        },
        "tied": tied,
        "files": {path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for path in files},
    }


def is_bundle(path: Path) -> bool:
    """True if ``path`` is a bundle directory or a single part directory of one."""
    return (path / MANIFEST).is_file() or any((path / p / MANIFEST).is_file() for p in PARTS)


def read_manifest(part_dir: Path) -> dict[str, Any]:
    """Read and check a part's manifest.

    Raises:
        BundleCorruptError: the manifest is missing or not valid JSON.
        BundleError: it is not a splitlearn-async manifest of a format version we read.
    """
    path = part_dir / MANIFEST
    if not path.is_file():
        raise BundleCorruptError(
            f"{path} is missing; the bundle part is incomplete. Re-create it with `splitlearn split`."
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleCorruptError(
            f"{path} is not valid JSON ({exc}); re-create the bundle with `splitlearn split`."
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a splitlearn-async stage manifest (format {FORMAT!r} expected).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r}, but this splitlearn-async {__version__} reads version "
            f"{FORMAT_VERSION}; re-create the bundle with this version's `splitlearn split`."
        )
    return manifest


class BundleSource(TensorSource):
    """Tensors of the asked-for parts of a bundle, with their checksums verified.

    Args:
        path: The bundle directory, or one part's directory (e.g. a server's ``trunk/``).
        parts: The parts that will be read.
        verify: Check each file's sha256 against the manifest before reading it.
    """

    def __init__(self, path: Path, parts: tuple[str, ...], verify: bool = True) -> None:
        self.description = str(path)
        self.verify = verify
        if (path / MANIFEST).is_file():  # a single part directory
            only = read_manifest(path)
            part_dirs = {only["part"]: path}
        else:
            part_dirs = {p: path / p for p in PARTS if (path / p / MANIFEST).is_file()}
            if not part_dirs:
                partial = [p for p in PARTS if (path / p).is_dir()]
                raise BundleCorruptError(
                    f"{path} is not a stage bundle: "
                    + (
                        f"{', '.join(partial)}/ lack(s) {MANIFEST}."
                        if partial
                        else f"no bottom/, trunk/ or top/ with {MANIFEST}."
                    )
                )
        for part in parts:
            if part not in part_dirs:
                raise MissingPartError(
                    f"bundle {path} has no {part!r} part (it has: {', '.join(sorted(part_dirs)) or 'none'}); a server "
                    "bundle holds only trunk/, so load client parts from the full bundle or pass parts=(...) "
                    "naming only the parts it has."
                )
        self.manifests = {p: read_manifest(d) for p, d in part_dirs.items()}
        self.dirs = part_dirs
        first = self.manifests[parts[0]] if parts else next(iter(self.manifests.values()))
        from transformers import AutoConfig

        config = {k: v for k, v in first["config"].items() if k != "model_type"}
        self.config = AutoConfig.for_model(first["model_type"], **config)
        self.generation_config = self._generation_config(parts)
        self.split_points = self._split_points()
        self._where: dict[str, str] = {}
        for part in parts:
            manifest = self.manifests[part]
            for name in manifest["tensors"]:
                self._where[name] = part
            for name, target in manifest.get("tied", {}).items():
                owner = next((p for p, m in self.manifests.items() if target in m["tensors"]), None)
                if owner is None:
                    raise MissingPartError(
                        f"{part}/ ties {name} to {target}, which is stored in bottom/; bottom/ is missing from "
                        f"{path}. Copy the bundle's bottom/ directory next to top/."
                    )
                self._where[name] = owner
        self._handles: dict[str, Any] = {}

    def _generation_config(self, parts: tuple[str, ...]) -> Any:
        """The model's generation config from the first part that keeps one, checked; None if none does."""
        from transformers import GenerationConfig

        for part in (*parts, *self.dirs):
            path = self.dirs[part] / GENERATION_CONFIG
            if not path.is_file():
                continue
            self._check_file(part, GENERATION_CONFIG)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return GenerationConfig.from_dict(data)
            except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
                raise BundleCorruptError(
                    f"{path} is not a valid generation config ({exc}); re-create the bundle with `splitlearn split`."
                ) from exc
        return None

    def _check_file(self, part: str, fname: str) -> None:
        """Check one file of a part against its manifest entry (size, and sha256 when verifying)."""
        meta = self.manifests[part]["files"].get(fname)
        fpath = self.dirs[part] / fname
        if meta is None:
            return  # not recorded (written by hand): nothing to check it against
        if not fpath.is_file():
            raise BundleCorruptError(f"{fpath} is missing; re-create the bundle with `splitlearn split`.")
        if fpath.stat().st_size != meta["bytes"]:
            raise BundleCorruptError(
                f"{fpath} has {fpath.stat().st_size} bytes but its manifest records {meta['bytes']}: the file is "
                "truncated or was replaced. Re-create the bundle with `splitlearn split`."
            )
        if self.verify and sha256_file(fpath) != meta["sha256"]:
            raise BundleCorruptError(
                f"{fpath} does not match the sha256 in {self.dirs[part] / MANIFEST}: the file was modified or "
                "corrupted. Re-create the bundle with `splitlearn split`."
            )

    def _split_points(self) -> tuple[int, int] | None:
        m = self.manifests
        if "trunk" in m:
            lo, hi = m["trunk"]["layer_range"]
            return int(lo), int(hi)
        if "bottom" in m and "top" in m:
            return int(m["bottom"]["layer_range"][1]), int(m["top"]["layer_range"][0])
        return None

    def _open(self, part: str) -> Any:
        handle = self._handles.get(part)
        if handle is not None:
            return handle
        from safetensors import SafetensorError, safe_open

        part_dir = self.dirs[part]
        for fname in self.manifests[part]["files"]:
            if fname != GENERATION_CONFIG:  # checked when it was read
                self._check_file(part, fname)
        try:
            handle = safe_open(str(part_dir / WEIGHTS), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise BundleCorruptError(f"{part_dir / WEIGHTS} cannot be read as safetensors: {exc}") from exc
        self._handles[part] = handle
        return handle

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        part = self._where.get(name)
        if part is None:
            raise BundleCorruptError(f"tensor {name!r} is not recorded in the manifests of {self.description}.")
        try:
            tensor: torch.Tensor = self._open(part).get_tensor(name)
            return tensor
        except BundleError:
            raise
        except Exception as exc:  # safetensors raises plain errors for damaged payloads
            raise BundleCorruptError(f"tensor {name!r} cannot be read from {self.dirs[part] / WEIGHTS}: {exc}") from exc

    def close(self) -> None:
        self._handles.clear()
