"""Privacy at the cut: how much of the client's text an inversion attack reads from the hidden states it sends.

    python benchmarks/privacy.py            # the embedded SmolLM2, the shipped text, cuts after 1, 2, 3 and 6 layers
    python benchmarks/privacy.py --quick    # a tiny run for CI: checks that everything works

The client sends the trunk the hidden states after its bottom's last layer, one vector per
token. The attacker here is a server that also knows the public model and can collect
(hidden state, token) pairs on text of its own. It trains two decoders on such pairs and
reads the client's tokens back from the vectors that cross the cut:

- a linear probe (one ``Linear(H, V')`` layer, V' the tokens seen in training),
- a small learned decoder (two layers with a GELU between, ``H -> 1024 -> V'``),

each trained with Adam on the first 80% of the tokens of ``examples/data/alice_chapter1.txt``
(Alice's Adventures in Wonderland, chapter 1, public domain) and tested on the last 20%.
Token-recovery accuracy is the share of test tokens whose id the decoder gets exactly
right. Tokens never seen in training count as misses; the share of test tokens that were
seen is reported as the attack's ceiling. Cut depth 0 (the embeddings themselves) is
reported as a reference: there the recovery is a table lookup.

Writes ``benchmarks/results/privacy.json``. One process, all cores, torch's default threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEXT = Path(__file__).resolve().parent.parent / "examples" / "data" / "alice_chapter1.txt"
RESULTS = Path(__file__).parent / "results"


def hidden_states(text: str, depths: list[int], max_tokens: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Token ids ``(N,)`` of ``text`` and, per depth, the hidden states ``(N, H)`` after that many layers."""
    from transformers import AutoModelForCausalLM

    from splitlearn_async.models.default import default_bundle, default_gguf_path, load_tokenizer

    gguf = default_gguf_path()
    tokenizer = load_tokenizer(default_bundle())
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:max_tokens]
    states: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    window = 512  # the model reads the text in windows, as a client sends a long document
    with torch.no_grad():
        for start in range(0, len(ids), window):
            out = model(input_ids=ids[None, start : start + window], output_hidden_states=True)
            for d in depths:
                states[d].append(out.hidden_states[d][0])  # (T, H): after d decoder layers
    return ids, {d: torch.cat(v) for d, v in states.items()}


def attack(decoder: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
           y_test: torch.Tensor, epochs: int, seed: int) -> float:
    """Train ``decoder`` on the pairs, return its token-recovery accuracy on the test pairs."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), 256):
            batch = order[start : start + 256]
            optimizer.zero_grad()
            loss_fn(decoder(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        return float((decoder(x_test).argmax(-1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Token recovery from the hidden states at the cut, by depth.")
    parser.add_argument("--quick", action="store_true", help="a tiny run for CI (depths 0,1; 600 tokens; 2 epochs)")
    parser.add_argument("--depths", default="0,1,2,3,6", help="cut depths (bottom layers), comma-separated")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/privacy.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.max_tokens, args.epochs = "0,1", 600, 2
    depths = [int(d) for d in args.depths.split(",")]
    started = time.perf_counter()
    ids, states = hidden_states(TEXT.read_text(encoding="utf-8"), depths, args.max_tokens)
    cut = int(0.8 * len(ids))
    seen = sorted(set(ids[:cut].tolist()))
    index = {t: i for i, t in enumerate(seen)}
    y = torch.tensor([index.get(int(t), -1) for t in ids])  # -1: a token the attacker never saw
    y_train, y_test = y[:cut], y[cut:]
    rows: list[dict[str, Any]] = []
    for d in depths:
        x = states[d].float()
        x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)  # the attacker standardises on its own data
        hidden = x.shape[1]
        linear = nn.Linear(hidden, len(seen))
        mlp = nn.Sequential(nn.Linear(hidden, 1024), nn.GELU(), nn.Linear(1024, len(seen)))
        row = {
            "depth": d,
            "linear_probe_accuracy": round(attack(linear, x[:cut], y_train, x[cut:], y_test, args.epochs, 0), 4),
            "mlp_decoder_accuracy": round(attack(mlp, x[:cut], y_train, x[cut:], y_test, args.epochs, 0), 4),
        }
        rows.append(row)
        print(f"cut after {d} layer(s): linear probe {row['linear_probe_accuracy']:.1%}, "
              f"learned decoder {row['mlp_decoder_accuracy']:.1%}", flush=True)
    report = {
        "model": "SmolLM2-135M-Instruct (embedded)", "text": TEXT.name, "tokens": len(ids), "train_tokens": cut,
        "test_tokens": len(ids) - cut, "vocabulary_seen": len(seen),
        "ceiling": round(float((y_test >= 0).float().mean()), 4), "epochs": args.epochs, "rows": rows,
        "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "quick": args.quick,
    }
    out = Path(args.out) if args.out else RESULTS / "privacy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ceiling (test tokens seen in training): {report['ceiling']:.1%}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
