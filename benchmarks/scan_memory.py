"""Peak RSS of `erasure-fast scan` for growing token counts (constant memory check).

Each size runs in its own process (so the peak is that run's), over one synthetic memmapped token
file, on the planted demo model (GELU-4L shape) by default. Writes JSON + markdown next to the other
results. Usage: python -m benchmarks.scan_memory [--sizes 65536,1048576] [--model demo] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


# The child runs the CLI and reports its own peak RSS (ru_maxrss of that process alone).
_CHILD = (
    "import resource, sys\n"
    "from erasure_fast.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KIB=%d' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="65536,1048576")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--d-vocab", type=int, default=48262)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "tokens.bin")
        rng = np.random.default_rng(0)
        dtype = "uint16" if args.d_vocab < 65536 else "uint32"
        rng.integers(0, args.d_vocab, size=max(sizes), dtype=np.uint32).astype(dtype).tofile(corpus)
        for n in sizes:
            out = os.path.join(tmp, f"scan{n}")
            cmd = [sys.executable, "-c", _CHILD, "scan", "--model", args.model, "--corpus", corpus,
                   "--out", out, "--bin-dtype", dtype, "--seq-len", "1024", "--max-tokens", str(n), "--batch-size", str(args.batch_size),
                   "--no-progress", "--no-resume"]
            t0 = time.perf_counter()
            # cwd outside the repository: "-c" puts the cwd first on sys.path, and the source tree there
            # (no compiled extension) would shadow the installed package and fall back to the torch backend
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                return 1
            peak_kib = int(proc.stdout.rsplit("PEAK_RSS_KIB=", 1)[1].split()[0])
            backend = proc.stdout.split(", backend ", 1)[1].split()[0] if ", backend " in proc.stdout else "unknown"
            rows.append(dict(tokens=n, peak_rss_mib=peak_kib / 1024, seconds=elapsed, backend=backend))
            print(f"{n:>9,} tokens: peak RSS {peak_kib / 1024:,.0f} MiB, {elapsed:.0f} s, backend {backend}", flush=True)
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    from erasure_fast.bench.machine import cpu_line, describe, machine_label

    info = describe()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"scan-memory-{machine_label(info)}-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(machine=info, model=args.model, rows=rows, ratio_last_first=ratio), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# Scan peak RSS vs tokens (model {args.model})\n\n{cpu_line(info)}\n\n| tokens | peak RSS MiB | seconds | backend |\n|---:|---:|---:|---|\n")
        for r in rows:
            f.write(f"| {r['tokens']:,} | {r['peak_rss_mib']:,.0f} | {r['seconds']:.0f} | {r['backend']} |\n")
        f.write(f"\nPeak RSS ratio {rows[-1]['tokens']:,} / {rows[0]['tokens']:,} tokens: {ratio:.3f}\n")
    print(f"ratio {ratio:.3f}; wrote {stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
