"""Tiny random configs for every supported family (fp32, no dropout)."""

from __future__ import annotations

import torch

FAMILY_NAMES = ("llama", "gpt2", "qwen2", "gemma", "gemma3")


def tiny_config(family: str, num_layers: int = 6, **overrides):
    """A small random config of ``family`` with ``num_layers`` layers and no dropout."""
    from transformers import (
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        cfg = GPT2Config(
            n_layer=num_layers, n_embd=64, n_head=4, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    else:
        llama_like = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common,
        )
        if family == "llama":
            cfg = LlamaConfig(**llama_like, tie_word_embeddings=True)  # like SmolLM2
        elif family == "qwen2":
            # alternate sliding and full layers so both mask kinds are exercised
            cfg = Qwen2Config(
                **llama_like, use_sliding_window=True, sliding_window=5,
                max_window_layers=num_layers // 2,
            )
        elif family == "gemma":
            cfg = GemmaConfig(**llama_like, head_dim=16)
        elif family == "gemma3":
            cfg = Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=5, query_pre_attn_scalar=16)
        else:
            raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, num_layers: int = 6, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers, **overrides))
    return model.eval()


def left_padded_batch(lengths, vocab: int = 96, seed: int = 0, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask
