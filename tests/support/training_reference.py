"""Unsplit reference steps for the training tests: the same batch, loss and optimizer on the whole model."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from splitlearn_async.models.positions import prompt_positions
from splitlearn_async.training import OptimizerConfig, causal_lm_loss
from splitlearn_async.training import to_safetensors
from splitlearn_async.training._lora import ADAPTER_FORMAT
from tests.support.tiny_models import left_padded_batch

SPLIT = (2, 4)  # of 6 tiny layers: bottom [0, 2), trunk [2, 4), top [4, 6)
TRUNK_LAYERS = list(range(*SPLIT))
TOL = 1e-5


def lora_targets(family: str) -> list[str]:
    """Adapted layers for the LoRA tests (gpt2 names its layers differently)."""
    return ["c_attn", "c_proj"] if family == "gpt2" else ["q_proj", "v_proj", "o_proj", "up_proj"]


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two left-padded rows (8 and 6 real tokens) with labels and positions."""
    ids, mask = left_padded_batch([8, 6], seed=seed)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": prompt_positions(mask),
        "labels": ids.masked_fill(mask == 0, -100),
    }


def record_grads(named_params) -> dict[str, torch.Tensor]:
    """Record each parameter's gradient after every accumulation (tied weights: the total)."""
    grads: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone()))
    return grads


@dataclass
class Reference:
    loss: float
    grads: dict[str, torch.Tensor]  # by full-model parameter name, before the step
    model: torch.nn.Module  # after the step


def unsplit_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], opt: OptimizerConfig, max_grad_norm: float | None = None
) -> Reference:
    """One optimizer step of the whole model on ``batch`` (modifies ``model``), clipped by
    ``torch.nn.utils.clip_grad_norm_`` when ``max_grad_norm`` is given."""
    grads = record_grads(model.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = opt.build(params)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return Reference(float(loss.detach()), grads, model)


def peft_reference(model: torch.nn.Module, family: str, seed: int = 1):
    """``model`` with peft LoRA adapters on the trunk layers, random A and B (B non-zero).

    Returns the peft model (base weights of bottom and top trainable, the trunk's frozen,
    as in a split LoRA run) and the adapter as our safetensors bytes (peft's key layout).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict

    config = PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_targets(family),
        layers_to_transform=TRUNK_LAYERS, init_lora_weights=False, fan_in_fan_out=family == "gpt2",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    trunk_prefix = "transformer.h." if family == "gpt2" else "model.layers."
    for name, p in peft_model.base_model.model.named_parameters():
        if "lora_" in name:
            continue
        in_trunk = any(name.startswith(f"{trunk_prefix}{i}.") for i in TRUNK_LAYERS)
        p.requires_grad_(not in_trunk)
    tensors = get_peft_model_state_dict(peft_model)
    metadata = {
        "format": ADAPTER_FORMAT, "rank": "4", "alpha": "8.0", "dropout": "0.0",
        "target_modules": '["' + '", "'.join(lora_targets(family)) + '"]',
    }
    return peft_model, to_safetensors(tensors, metadata)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
