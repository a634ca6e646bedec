"""Where stage tensors come from: a Hugging Face directory, a GGUF file, or a stage bundle.

Every source answers two questions: the model config, and "give me tensor ``name``" (by
checkpoint name, e.g. ``model.layers.3.mlp.up_proj.weight``). Tensors are read one at a
time, so a loader that asks only for the trunk's tensors never holds the rest.
Nothing here unpickles: ``.bin``/``.pt`` checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["GGUFSource", "SafetensorsDirSource", "TensorSource", "open_source"]

logger = logging.getLogger(__name__)


class TensorSource:
    """A config plus tensors by checkpoint name."""

    config: Any
    description: str

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


class SafetensorsDirSource(TensorSource):
    """A Hugging Face model directory: ``config.json`` and safetensors, sharded or not.

    Checkpoints saved from the base model (names without the ``model.``/``transformer.``
    prefix, as the original GPT-2 release) are found too.
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig

        self.description = str(directory)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            hint = (
                f" It has {', '.join(pickled)}, which are pickles; splitlearn-async never unpickles. Convert "
                "them once with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir2)."
                if pickled
                else ""
            )
            raise ModelError(f"{directory} holds no *.safetensors files.{hint}")
        self.config = AutoConfig.from_pretrained(str(directory))
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for path in files:
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
            # safe_open handles are not iterable, and safetensors' stub leaves keys() unannotated
            for key in handle.keys():  # type: ignore[no-untyped-call]  # noqa: SIM118
                self._index[key] = path

    def _resolve(self, name: str) -> str | None:
        if name in self._index:
            return name
        head, _, rest = name.partition(".")
        if head in ("model", "transformer") and rest in self._index:
            return rest
        return None

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.description}.")
        tensor: torch.Tensor = self._handles[self._index[key]].get_tensor(key)
        return tensor

    def close(self) -> None:
        self._handles.clear()


class GGUFSource(TensorSource):
    """A GGUF file; tensors are dequantized one by one as asked.

    Names are mapped with transformers' own GGUF tables, including the reverse permutation
    of llama-style query/key weights, so results equal ``from_pretrained(gguf_file=...)``.
    """

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.description = str(path)
        self.config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        # transformers' GGUF utilities are unannotated
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # type: ignore[no-untyped-call]
        self._reader = GGUFReader(str(path))
        architecture = str(self._reader.fields["general.architecture"].contents())
        processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        self._processor = processor_class(config=parsed["config"])  # type: ignore[no-untyped-call]
        skeleton = _empty_model(self.config)
        hf_by_gguf = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._by_hf = {hf: gg for gg, hf in hf_by_gguf.items() if gg in self._tensors}
        self._by_hf_map = hf_by_gguf
        del skeleton, AutoModelForCausalLM

    def has(self, name: str) -> bool:
        return name in self._by_hf

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        gguf_name = self._by_hf.get(name)
        if gguf_name is None:
            raise CheckpointError(f"tensor {name!r} is not in the GGUF file {self.description}.")
        tensor = self._tensors[gguf_name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self._processor.process(  # type: ignore[no-untyped-call]  # unannotated in transformers
            weights=weights, name=gguf_name, tensor_key_mapping=self._by_hf_map, parsed_parameters={}
        )
        return torch.from_numpy(np.array(result.weights, copy=True))


def _empty_model(config: Any) -> torch.nn.Module:
    """The full model with parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # from_config and get_output_embeddings are unannotated in transformers
    with init_empty_weights(include_buffers=False):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if getattr(config, "tie_word_embeddings", False):  # init_empty_weights skips the tie
        head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        head.weight = model.get_input_embeddings().weight
    return model


def open_source(source: str | os.PathLike[str]) -> TensorSource:
    """Open a Hugging Face model directory or a ``.gguf`` file as a :class:`TensorSource`.

    Raises:
        ModelError: the path does not exist or holds no usable checkpoint.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(
            f"model source {str(source)!r} does not exist; pass a Hugging Face model directory, a .gguf "
            "file, a stage bundle directory, or 'default' for the embedded SmolLM2."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"{path} is a file but not a .gguf file; pass a Hugging Face model directory, a .gguf file or "
                "a stage bundle directory."
            )
        return GGUFSource(path)
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json, so it is neither a Hugging Face model directory nor a bundle.")
    return SafetensorsDirSource(path)


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data
