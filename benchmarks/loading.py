"""How long stage bundles take to load, and what loading the trunk alone costs in memory.

    python benchmarks/loading.py            # the embedded SmolLM2, split 3,27

Each measurement runs in a fresh subprocess so that page cache aside, nothing is shared.
Prints a table and writes benchmarks/results/loading.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

_PROBE = textwrap.dedent(
    """
    import json, sys, time
    import torch, transformers, safetensors
    from transformers import LlamaForCausalLM
    from splitlearn_async import load_stages
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    bundle, parts, verify = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3] == "1"
    base = rss()
    start = time.perf_counter()
    stages = load_stages(bundle, parts=parts, verify=verify)
    seconds = time.perf_counter() - start
    params = list({id(p): p for s in stages.present().values() for p in s.parameters()}.values())
    float(sum(p.detach().sum() for p in params))  # touch every tensor
    held = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps({"seconds": seconds, "rss_growth": rss() - base, "held": held}))
    """
)


def probe(bundle: Path, parts: str, verify: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(bundle), parts, "1" if verify else "0"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loading.json"))
    args = parser.parse_args()

    import time

    from splitlearn_async import default_bundle

    start = time.perf_counter()
    bundle = default_bundle((3, 27), progress=True)
    first = time.perf_counter() - start
    rows = []
    for parts in ("bottom,trunk,top", "trunk"):
        for verify in (True, False):
            runs = [probe(bundle, parts, verify) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append({"parts": parts, "verify": verify, **best})
    print(f"default bundle ready in {first:.2f}s (includes the one-time GGUF conversion if it ran)")
    print(f"{'parts':<18}{'verify':<8}{'load s':>8}{'held MB':>10}{'RSS growth MB':>15}")
    for r in rows:
        print(f"{r['parts']:<18}{str(r['verify']):<8}{r['seconds']:>8.3f}{r['held'] / 2**20:>10.1f}{r['rss_growth'] / 2**20:>15.1f}")
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
