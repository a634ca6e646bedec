"""Accuracy cost of sending hidden states as float16 / bfloat16 instead of the model's float32.

    python benchmarks/wire_dtype.py

Simulates both wire crossings (bottom -> trunk, trunk -> top) in-process on the embedded
SmolLM2 (split 3,27): hidden states are cast to the wire dtype and back, as the server
does. Reports, over greedy generations of several chat prompts, the largest absolute
difference of the top's logits against float32 (teacher-forced on the float32 tokens) and
how many greedy tokens match the float32 run. Writes benchmarks/results/wire_dtype.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
]


def run(stages, ids, mask, steps, wire, forced=None):
    from splitlearn_async import prompt_positions

    bottom, trunk, top = stages
    caches = [s.new_cache(1) for s in stages]
    pos = prompt_positions(mask)
    cast = (lambda h: h.to(wire).to(torch.float32)) if wire is not None else (lambda h: h)
    tokens, logits_seen = [], []
    cur = ids
    with torch.no_grad():
        for step in range(steps):
            h = cast(bottom(cur, mask, pos, cache=caches[0]))
            h = cast(trunk(h, mask, pos, cache=caches[1]))
            logits = top(h, mask, pos, cache=caches[2])[:, -1]
            logits_seen.append(logits)
            nxt = logits.argmax(-1, keepdim=True) if forced is None else forced[:, step : step + 1]
            tokens.append(int(logits.argmax(-1)))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            cur = nxt
    return torch.tensor([tokens]), torch.stack(logits_seen)


def main() -> None:
    from splitlearn_async import load_stages
    from splitlearn_async.models.default import default_bundle, load_tokenizer

    bundle = default_bundle((3, 27))
    stages = load_stages(bundle)
    tokenizer = load_tokenizer(bundle)
    steps = 32
    rows = {}
    for name, wire in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        max_diff, matched, total = 0.0, 0, 0
        for prompt in PROMPTS:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            ref_tokens, ref_logits = run(stages, enc["input_ids"], enc["attention_mask"], steps, None)
            _, forced_logits = run(stages, enc["input_ids"], enc["attention_mask"], steps, wire, forced=ref_tokens)
            free_tokens, _ = run(stages, enc["input_ids"], enc["attention_mask"], steps, wire)
            max_diff = max(max_diff, (forced_logits - ref_logits).abs().max().item())
            agree = (free_tokens == ref_tokens)[0]
            first_diff = int((~agree).nonzero()[0]) if (~agree).any() else steps
            matched += first_diff
            total += steps
        rows[name] = {"max_abs_logit_diff": max_diff, "greedy_tokens_identical_before_divergence": matched, "tokens": total}
        print(f"{name:<9} max |logit diff| {max_diff:.4f}   greedy tokens identical {matched}/{total}")
    out = Path(__file__).parent / "results" / "wire_dtype.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
