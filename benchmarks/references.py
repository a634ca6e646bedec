"""What the benchmarks measure our trunk against, and our trunk measured the same way.

- :func:`hf_decode_times`: the model's own decoder layers ``[a, b)`` as Hugging Face runs
  them, with a ``DynamicCache`` at batch N (every row the same length, no mask): a prefill,
  then decode steps, each timed.
- :func:`stage_decode_times`: our trunk stage for N one-row sessions of ragged lengths,
  batched as the server batches them (``run_stage_batched``), each decode step timed.

Both return the seconds of each decode step and the process's CPU-seconds over those
steps; the callers turn them into steps/s, medians or CPU per step. Run on any device: CUDA work is synchronised before each clock read. Both work
with older checkouts of the package too (``benchmarks/attention_paths.py`` measures one).
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cache_kwargs(layer: Any, cache: Any) -> dict[str, Any]:
    try:
        from splitlearn_async.models.hf_compat import cache_kwargs
    except ImportError:  # a checkout from before the compatibility point
        return {"past_key_values": cache}
    return cache_kwargs(layer, cache)


@torch.no_grad()
def hf_decode_times(
    model: Any, layer_range: tuple[int, int], n: int, prompt: int, steps: int
) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` decode steps of HF's layers ``[a, b)`` at batch ``n`` after a
    ``prompt``-token prefill, and the CPU-seconds of those steps."""
    from transformers import DynamicCache

    param = next(model.parameters())
    device, dtype, hidden = param.device, param.dtype, model.config.hidden_size
    layers = list(model.model.layers)[layer_range[0]:layer_range[1]]
    cache = DynamicCache(config=model.config)
    kw = _cache_kwargs(layers[0], cache)
    g = torch.Generator().manual_seed(0)

    def run(h: torch.Tensor, start: int) -> None:
        pos = torch.arange(start, start + h.shape[1], device=device).expand(n, h.shape[1])
        pe = model.model.rotary_emb(h, pos)
        for layer in layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True, **kw)

    run(torch.randn(n, prompt, hidden, generator=g).to(device, dtype), 0)
    xs = [torch.randn(n, 1, hidden, generator=g).to(device, dtype) for _ in range(steps)]
    times = []
    cpu0 = time.process_time()
    for k, x in enumerate(xs):
        _sync(device)
        t0 = time.perf_counter()
        run(x, prompt + k)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, time.process_time() - cpu0


def stage_decode_times(trunk: Any, n: int, prompt: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` batched decode steps of our trunk for ``n`` one-row sessions,
    and the CPU-seconds of those steps.

    Session ``i`` holds ``prompt - 2 * (i % 16)`` tokens (ragged, at least 1) before the
    first step; its cache is released at the end.
    """
    from splitlearn_async.models.stages import run_stage, run_stage_batched

    g = torch.Generator().manual_seed(0)
    caches = [trunk.new_cache(1) for _ in range(n)]
    for i, cache in enumerate(caches):
        length = max(1, prompt - 2 * (i % 16))
        run_stage(trunk, torch.randn(1, length, trunk.hidden_size, generator=g), None, torch.arange(length)[None], cache)
    xs = [torch.randn(n, 1, trunk.hidden_size, generator=g) for _ in range(steps)]
    times = []
    cpu0 = time.process_time()
    for x in xs:
        calls = [(x[i : i + 1], None, torch.tensor([[c.length]]), c) for i, c in enumerate(caches)]
        t0 = time.perf_counter()
        run_stage_batched(trunk, calls)  # returns on the CPU: the device's work is done
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    for cache in caches:
        getattr(cache, "release", lambda: None)()  # older checkouts have no release()
    return times, cpu
