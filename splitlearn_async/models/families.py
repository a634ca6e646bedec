"""Architecture records: where each model family keeps its parts.

One :class:`Family` record per family drives the one generic splitter in
:mod:`splitlearn_async.models.splitter`. Paths are dotted attribute paths from the Hugging
Face ``*ForCausalLM`` object, and they are also the tensor-name prefixes in its checkpoint,
so the same record serves splitting a live model and loading tensors from disk.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from ..errors import UnsupportedModelError

__all__ = ["FAMILIES", "Family", "family_for", "supported_model_types"]


@dataclass(frozen=True)
class Family:
    """Where a family keeps its embeddings, decoder layers, final norm, head and rotary.

    Attributes:
        name: The family's name as shown to users.
        model_types: ``config.model_type`` values this record covers.
        embed: Path of the token embedding (it applies any embedding scale itself).
        layers: Path of the ``nn.ModuleList`` of decoder layers.
        norm: Path of the final norm.
        lm_head: Path of the LM head.
        pos_embed: Path of a learned absolute position embedding, if the family has one.
        embed_dropout: Path of the dropout applied after the embeddings, if any.
        rotary: Path of the rotary embedding module, if the family uses one.
        rotary_by_layer_type: The rotary module takes the layer type as a third argument
            and each layer type gets its own cos/sin (gemma3).
    """

    name: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    norm: str
    lm_head: str = "lm_head"
    pos_embed: str | None = None
    embed_dropout: str | None = None
    rotary: str | None = None
    rotary_by_layer_type: bool = False

    def module_paths(self) -> dict[str, str]:
        """The named stage parts and their paths in the full model."""
        paths = {"embed": self.embed, "norm": self.norm, "lm_head": self.lm_head}
        if self.pos_embed:
            paths["pos_embed"] = self.pos_embed
        return paths


class _Paths(TypedDict):
    """The paths that several families share."""

    embed: str
    layers: str
    norm: str
    rotary: str


_LLAMA_LIKE: _Paths = {
    "embed": "model.embed_tokens",
    "layers": "model.layers",
    "norm": "model.norm",
    "rotary": "model.rotary_emb",
}

FAMILIES: tuple[Family, ...] = (
    Family(name="llama", model_types=("llama",), **_LLAMA_LIKE),
    Family(name="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    Family(name="gemma", model_types=("gemma",), **_LLAMA_LIKE),
    Family(name="gemma3", model_types=("gemma3_text",), rotary_by_layer_type=True, **_LLAMA_LIKE),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        embed="transformer.wte",
        layers="transformer.h",
        norm="transformer.ln_f",
        pos_embed="transformer.wpe",
        embed_dropout="transformer.drop",
    ),
)

_BY_MODEL_TYPE = {model_type: fam for fam in FAMILIES for model_type in fam.model_types}


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values that can be split, sorted."""
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str) -> Family:
    """Return the record for ``model_type``.

    Raises:
        UnsupportedModelError: ``model_type`` has no record; the message lists the supported ones.
    """
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"Model family {model_type!r} is not supported; supported model_type values are "
            f"{', '.join(supported_model_types())}. Add a Family record in "
            "splitlearn_async/models/families.py to support another decoder-only family."
        ) from None
