"""Privacy at the cut: how much of the client's text an inversion attack reads from the hidden
states it sends, by cut depth, with and without the client's defenses, against the model's quality.

    python benchmarks/privacy.py            # embedded SmolLM2, cuts after 1, 2, 3 and 6 layers (6 min on 2 idle cores)
    python benchmarks/privacy.py --quick    # a tiny run for CI: checks that everything works

The attacker is a server that knows the public model and the client's defense. It collects
(hidden state, token) pairs on text of its own, noised by the same defense (fresh draws),
and learns to read tokens back from them:

- a linear probe: linear discriminant analysis (class means and one shared covariance,
  shrunk by 10%, fit in closed form; the Bayes classifier when the states of each token are
  Gaussian with a common spread, as additive Gaussian noise makes them),
- a small learned decoder: ``H -> 1024 -> V'`` with a GELU, Adam, a few epochs,

over the ``V'`` tokens of its own text, on states standardised with its own statistics.
Its text: chapters II-XII of *Alice's Adventures in Wonderland*
(``examples/data/alice_chapters2-12.txt``); the client's: chapter I
(``examples/data/alice_chapter1.txt``). Both public domain, Project Gutenberg eBook #11.
Token-recovery accuracy is the share of the client's tokens whose id the attack gets
exactly right; tokens absent from the attacker's text count as misses, and the share of
client tokens present there is reported as the ceiling.

Defenses (``splitlearn_async.GaussianNoise``, ``splitlearn_async.DChiNoise``) at levels
given as the mean noise norm over the median norm of the hidden states at that depth
(``--levels``, ``--dchi-levels``): Gaussian ``sigma = level * median_norm / sqrt(H)``, d_chi
``eta = H / (level * median_norm)``. Quality: the loss of the whole model on the client's
text (rows of 128 tokens) with the noise on, from ``SplitTrainer.evaluate`` over a
``LocalTrunk`` split at (depth, 27); and, at the demo's cut (3), after ``--lora-steps`` LoRA
steps (rank 8, attention, 2 x 64 tokens of the attacker's text per step) trained with the
noise on.

Writes ``benchmarks/results/privacy.json`` and ``docs/images/privacy.png``. Pins itself to
``--threads`` CPUs (``os.sched_setaffinity``) and sets torch's threads to match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TEXT = ROOT / "examples" / "data" / "alice_chapter1.txt"
ATTACKER_TEXT = ROOT / "examples" / "data" / "alice_chapters2-12.txt"
RESULTS = Path(__file__).parent / "results"
PLOT = ROOT / "docs" / "images" / "privacy.png"
TOP_AT = 27  # the trunk ends here at every depth, as in the demo's split (3, 27)


def pin(threads: int) -> list[int]:
    """Pin this process to ``threads`` of its CPUs and set torch's threads to as many."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    return cpus


def body(path: Path) -> str:
    """A shipped text without its source note (the first paragraph)."""
    return path.read_text(encoding="utf-8").split("\n\n", 1)[1]


def hidden_states(model: Any, ids: torch.Tensor, depths: list[int], window: int = 512) -> dict[int, torch.Tensor]:
    """Per depth, the states ``(N, H)`` the client sends at a cut after that many layers.

    The stages of one split at every depth run in a chain (bottom, then trunk segments),
    over the text in windows of ``window`` tokens, as a client sends a long document.
    """
    from splitlearn_async import split_model
    from splitlearn_async.models.running import run_stage

    stages = list(split_model(model, (*depths, TOP_AT), parts=("bottom", "trunk")))
    out: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    for start in range(0, len(ids), window):
        chunk = ids[None, start : start + window]  # (1, T)
        positions = torch.arange(chunk.shape[1])[None]
        h = chunk
        for d, stage in zip(depths, stages, strict=False):  # the last segment (to TOP_AT) is not needed
            h = run_stage(stage, h, None, positions, None)  # (1, T, H)
            out[d].append(h[0])
    return {d: torch.cat(v) for d, v in out.items()}


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-6  # the attacker's own statistics
    return (train - mean) / std, (test - mean) / std


def linear_probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int) -> float:
    """LDA: class means, one covariance shrunk towards its mean variance, closed form."""
    x, x_test = standardise(x, x_test)
    counts = torch.bincount(y, minlength=classes).double()
    means = torch.zeros(classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x.double()) / counts[:, None]
    residual = x.double() - means[y]  # (N, H)
    cov = residual.T @ residual / len(x)
    cov = 0.9 * cov + 0.1 * torch.eye(len(cov), dtype=cov.dtype) * cov.diagonal().mean()
    weights = torch.linalg.solve(cov, means.T)  # (H, V')
    bias = -0.5 * (means * weights.T).sum(1) + torch.log(counts / len(x))
    predicted = (x_test.double() @ weights + bias).argmax(-1)
    return float((predicted == y_test).double().mean())


def learned_decoder(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int,
                    epochs: int) -> float:
    """A two-layer decoder trained with Adam on the attacker's pairs."""
    x, x_test = standardise(x, x_test)
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(x.shape[1], 1024), nn.GELU(), nn.Linear(1024, classes))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(order), 256):
            batch = order[start : start + 256]
            optimizer.zero_grad()
            nn.functional.cross_entropy(decoder(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        return float((decoder(x_test).argmax(-1) == y_test).float().mean())


def make_defense(kind: str, level: float, median_norm: float, hidden: int, seed: int) -> Any:
    """The defense of ``kind`` whose mean noise norm is ``level`` times ``median_norm``."""
    from splitlearn_async import DChiNoise, GaussianNoise

    if kind == "gaussian":
        return GaussianNoise(level * median_norm / math.sqrt(hidden), seed=seed)
    return DChiNoise(hidden / (level * median_norm), seed=seed)


async def quality(model: Any, depth: int, defense: Any, held_out: torch.Tensor, train_rows: torch.Tensor,
                  steps: int, threads: int) -> tuple[float, float | None]:
    """Held-out loss with ``defense`` on, before and (if ``steps``) after LoRA steps trained with it on."""
    from splitlearn_async import LocalTrunk, LoraConfig, OptimizerConfig, SplitTrainer, StageWorker, TrainingConfig
    from splitlearn_async import split_model

    bottom, trunk, top = split_model(model, (depth, TOP_AT))
    config = TrainingConfig(
        optimizer=OptimizerConfig("adamw", lr=1e-3), trunk="lora", train_bottom=False, train_top=False,
        lora=LoraConfig(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0),
    )
    async with (
        StageWorker(name="privacy", torch_threads=threads) as worker,
        LocalTrunk(trunk, worker) as local,
        SplitTrainer(bottom, local, top, config, worker=worker, defense=defense) as trainer,
    ):
        before = await trainer.evaluate({"input_ids": held_out})  # (rows, 128)
        for step in range(steps):
            picks = [(2 * step + i) % len(train_rows) for i in range(2)]
            await trainer.step({"input_ids": train_rows[picks]})  # (2, 64)
        after = await trainer.evaluate({"input_ids": held_out}) if steps else None
    return before, after


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from splitlearn_async.models.default import default_bundle, default_gguf_path, load_tokenizer

    started = time.perf_counter()
    gguf = default_gguf_path()
    tokenizer = load_tokenizer(default_bundle())
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    attacker_ids = tokenizer(body(ATTACKER_TEXT), return_tensors="pt")["input_ids"][0][: args.attacker_tokens]
    client_ids = tokenizer(body(CLIENT_TEXT), return_tensors="pt")["input_ids"][0][: args.client_tokens]
    seen = sorted(set(attacker_ids.tolist()))
    index = {t: i for i, t in enumerate(seen)}
    y = torch.tensor([index[int(t)] for t in attacker_ids])
    y_test = torch.tensor([index.get(int(t), -1) for t in client_ids])  # -1: a token the attacker never saw
    held_out = client_ids[: len(client_ids) // 128 * 128].view(-1, 128)
    train_rows = attacker_ids[: len(attacker_ids) // 64 * 64].view(-1, 64)
    states = hidden_states(model, attacker_ids, args.depths)
    client_states = hidden_states(model, client_ids, args.depths)
    hidden = model.config.hidden_size
    print(f"attacker: {len(attacker_ids)} tokens ({len(seen)} distinct); client: {len(client_ids)} tokens, "
          f"{float((y_test >= 0).float().mean()):.1%} of them seen by the attacker (the ceiling); "
          f"states in {time.perf_counter() - started:.0f} s", flush=True)
    rows, lora = [], []
    for d in args.depths:
        median_norm = float(states[d].norm(dim=-1).median())
        settings = [("none", 0.0)] + [("gaussian", lv) for lv in args.levels] + [("dchi", lv) for lv in args.dchi_levels]
        for kind, level in settings:
            def defense(seed: int, kind: str = kind, level: float = level) -> Any:
                return None if kind == "none" else make_defense(kind, level, median_norm, hidden, seed)

            attacker_side, client_side = defense(1), defense(2)
            x = states[d] if attacker_side is None else attacker_side(states[d])  # (N, H), noised by its own draws
            x_test = client_states[d] if client_side is None else client_side(client_states[d])
            noise_norm = float((x_test - client_states[d]).norm(dim=-1).mean())
            lora_here = d == args.lora_depth and f"{kind}:{level:g}" in args.lora
            loss, after = asyncio.run(quality(model, d, defense(3), held_out, train_rows,
                                              args.lora_steps if lora_here else 0, args.threads))
            row = {
                "depth": d, "defense": kind, "level": level, "median_state_norm": round(median_norm, 2),
                "parameter": None if attacker_side is None else
                round(getattr(attacker_side, "sigma", getattr(attacker_side, "eta", 0.0)), 5),
                "mean_noise_norm": round(noise_norm, 2),
                "linear_probe_accuracy": round(linear_probe(x, y, x_test, y_test, len(seen)), 4),
                "mlp_decoder_accuracy": round(learned_decoder(x, y, x_test, y_test, len(seen), args.epochs), 4),
                "held_out_loss": round(loss, 4),
            }
            rows.append(row)
            if after is not None:
                lora.append({"depth": d, "defense": kind, "level": level, "steps": args.lora_steps,
                             "held_out_loss_before": round(loss, 4), "held_out_loss_after": round(after, 4)})
            shown = "no defense" if kind == "none" else f"{kind} level {level:g} ({row['parameter']})"
            print(f"depth {d} {shown:<32} linear {row['linear_probe_accuracy']:6.1%}  "
                  f"decoder {row['mlp_decoder_accuracy']:6.1%}  held-out loss {loss:.3f}"
                  + (f" -> {after:.3f} after {args.lora_steps} LoRA steps" if after is not None else "")
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return {
        "model": "SmolLM2-135M-Instruct (embedded)", "attacker_text": ATTACKER_TEXT.name,
        "client_text": CLIENT_TEXT.name, "attacker_tokens": len(attacker_ids), "client_tokens": len(client_ids),
        "vocabulary_seen": len(seen), "ceiling": round(float((y_test >= 0).float().mean()), 4),
        "held_out_tokens": held_out.numel(), "epochs": args.epochs, "levels": args.levels,
        "dchi_levels": args.dchi_levels, "rows": rows,
        "lora": lora,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    depths = sorted({r["depth"] for r in report["rows"]})
    colours = dict(zip(depths, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"),
                       strict=False))
    for d in depths:
        for kind, style, marker in (("gaussian", "-", "o"), ("dchi", "--", "s")):
            points = [r for r in report["rows"] if r["depth"] == d and r["defense"] in ("none", kind)]
            left.plot([r["held_out_loss"] for r in points],
                      [max(r["linear_probe_accuracy"], r["mlp_decoder_accuracy"]) for r in points],
                      style, marker=marker, color=colours[d], label=f"cut {d}, {kind}")
    left.axhline(report["ceiling"], color="gray", linestyle=":", label=f"ceiling {report['ceiling']:.0%}")
    left.set_xlabel("model loss on the client's text, noise on (nats)")
    left.set_ylabel("tokens recovered (best attack)")
    left.set_ylim(0, 1)
    left.set_title("Noise: what the server reads vs what the model loses")
    left.legend(fontsize=7, ncol=2)
    settings = [("none", 0.0)] + [("gaussian", lv) for lv in report["levels"]]
    for (kind, level), colour in zip(settings, ("black", "tab:cyan", "tab:olive", "tab:pink", "tab:gray"), strict=False):
        label = "no defense" if kind == "none" else f"gaussian, level {level:g}"
        for key, style, name in (("linear_probe_accuracy", "-o", "linear"), ("mlp_decoder_accuracy", "--s", "decoder")):
            points = [r for r in report["rows"] if r["defense"] == kind and r["level"] == level]
            right.plot([r["depth"] for r in points], [r[key] for r in points], style, color=colour,
                       label=f"{label}, {name}")
    right.axhline(report["ceiling"], color="gray", linestyle=":")
    right.set_xlabel("bottom layers at the cut")
    right.set_ylabel("tokens recovered")
    right.set_xticks(depths)
    right.set_ylim(0, 1)
    right.set_title("By cut depth (levels: noise norm / state norm)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Token recovery from the hidden states at the cut, with defenses.")
    parser.add_argument("--quick", action="store_true", help="a tiny run for CI (depth 1, one level, few tokens)")
    parser.add_argument("--depths", default="1,2,3,6", help="cut depths (bottom layers), comma-separated")
    parser.add_argument("--levels", default="0.25,1,4", help="Gaussian noise levels: mean noise norm / median state norm")
    parser.add_argument("--dchi-levels", default="1,4", help="d_chi noise levels, the same measure")
    parser.add_argument("--attacker-tokens", type=int, default=20_000)
    parser.add_argument("--client-tokens", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3, help="the learned decoder's epochs")
    parser.add_argument("--lora-depth", type=int, default=3)
    parser.add_argument("--lora", default="none:0,gaussian:0.25,gaussian:1", help="settings trained with LoRA")
    parser.add_argument("--lora-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="CPUs to pin to, and torch threads")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/privacy.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.levels, args.dchi_levels, args.attacker_tokens, args.client_tokens = "1", "1", "1", 1024, 256
        args.epochs, args.lora_depth, args.lora, args.lora_steps = 1, 1, "gaussian:1", 2
    args.depths = sorted(int(d) for d in args.depths.split(","))
    args.levels = [float(v) for v in args.levels.split(",")]
    args.dchi_levels = [float(v) for v in args.dchi_levels.split(",")]
    args.lora = {s.strip() for s in args.lora.split(",")}
    cpus = pin(args.threads)
    print(f"pinned to CPUs {cpus} (os.sched_setaffinity), torch threads {torch.get_num_threads()}", flush=True)
    started = time.perf_counter()
    report = run(args)
    report.update({"seconds": round(time.perf_counter() - started, 1), "cpus": cpus,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                   "quick": args.quick})
    out = Path(args.out) if args.out else RESULTS / "privacy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    picture = out.with_suffix(".png") if args.out else PLOT
    plot(report, picture)
    print(f"ceiling (client tokens the attacker's text holds): {report['ceiling']:.1%}; wrote {out} and {picture} "
          f"in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
