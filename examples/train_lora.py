"""LoRA fine-tune of SmolLM2's trunk on a public-domain text, through a real trunk server.

    python examples/train_lora.py                       # 50 steps, writes docs/images/train_lora_loss.png
    python examples/train_lora.py --steps 10 --plot /tmp/loss.png

The script starts an ``AsyncGRPCComputeServer`` with the trunk (layers 3..26) on
127.0.0.1 (any free port), connects a ``RemoteTrunk`` and trains LoRA adapters on the
trunk's attention projections with ``SplitTrainer``. Bottom and top stay frozen on the
client; only the adapters (created on the server) train. It prints the training loss of
every step and the loss on two held-out chunks before and after, saves the adapter and
the server's optimizer state as safetensors, and plots the loss curve.

Text: the opening of "Alice's Adventures in Wonderland" (Lewis Carroll, 1865; public
domain; Project Gutenberg eBook #11), in ``examples/data/alice_chapter1.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from splitlearn_async import (
    AsyncGRPCComputeServer,
    LoraConfig,
    OptimizerConfig,
    RemoteTrunk,
    SplitTrainer,
    TrainingConfig,
    default_bundle,
    load_stages,
)
from splitlearn_async.models.default import load_tokenizer

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "alice_chapter1.txt"


def chunks(tokenizer, seq_len: int) -> torch.Tensor:
    """The text's tokens cut into rows of ``seq_len``: ``(N, seq_len)``."""
    body = TEXT.read_text(encoding="utf-8").split("\n\n", 1)[1]  # skip the source note
    ids = tokenizer(body, return_tensors="pt").input_ids[0]
    usable = len(ids) // seq_len * seq_len
    return ids[:usable].view(-1, seq_len)


async def main(
    steps: int, plot: Path | None, save_dir: Path | None, seq_len: int, batch: int, lr: float = 3e-4
) -> list[float]:
    torch.manual_seed(0)
    bundle = default_bundle((3, 27))
    bottom, trunk, top = load_stages(bundle)
    rows = chunks(load_tokenizer(bundle), seq_len)
    held_out, train = rows[-2:], rows[:-2]
    print(f"{len(train)} training rows and {len(held_out)} held-out rows of {seq_len} tokens")
    config = TrainingConfig(
        optimizer=OptimizerConfig("adamw", lr=lr),
        trunk="lora",
        lora=LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0),
        train_bottom=False,
        train_top=False,
    )
    losses: list[float] = []
    async with AsyncGRPCComputeServer(trunk, "127.0.0.1", 0) as server, RemoteTrunk(f"127.0.0.1:{server.port}") as remote:
        async with SplitTrainer(bottom, remote, top, config) as trainer:
            before = await trainer.evaluate({"input_ids": held_out})
            started = time.perf_counter()
            for step in range(steps):
                picks = [(step * batch + i) % len(train) for i in range(batch)]
                losses.append(await trainer.step({"input_ids": train[picks]}))  # (batch, seq_len)
                print(f"step {step + 1:3d}/{steps}  loss {losses[-1]:.4f}  ({time.perf_counter() - started:.0f} s)")
            after = await trainer.evaluate({"input_ids": held_out})
            print(f"held-out loss: {before:.4f} before, {after:.4f} after ({trainer.adapter_id}, "
                  f"{(await trainer.session()).trainable_parameters} trainable parameters on the server)")
            if save_dir is not None:
                for path in await trainer.save_trunk(save_dir):
                    print(f"saved {path}")
    if plot is not None:
        write_plot(losses, before, after, plot)
    return losses


def write_plot(losses: list[float], before: float, after: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, label="training loss (batch of the step)")
    ax.axhline(before, color="gray", linestyle=":", label=f"held-out, before: {before:.2f}")
    ax.axhline(after, color="green", linestyle="--", label=f"held-out, after: {after:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("SmolLM2-135M: LoRA on the remote trunk (r=8, attention)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "images" / "train_lora_loss.png")
    parser.add_argument("--save", type=Path, default=None, help="directory for adapter.safetensors and the optimizer state")
    args = parser.parse_args()
    asyncio.run(main(args.steps, args.plot, args.save, args.seq_len, args.batch, args.lr))
