"""Where the public call checks z and extra_nodes for NaN / infinity: before the kernel (a read of its
own, as every backend but cpp does) or in the cpp kernels as they read them (what `fused_attribution`
does on the cpp backend). Both variants are whole public calls -- every other check, the kernel and
the output check -- of one build, interleaved in one run (erasure_fast.bench.interleave): K1, K2n
(no table) and K2f on the GELU-4L shape with random weights, in float32 and bfloat16.

    python benchmarks/activation_checks.py --out benchmarks/results/<folder>/activation-checks.md
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from erasure_fast.backends import backend_instance
from erasure_fast.bench import machine, workloads
from erasure_fast.bench.interleave import CONDITIONS, interleaved
from erasure_fast.contract import fused_attribution, require_finite_outputs, run_backend, validate

SHAPE = "gelu-4l"
WORKLOADS = ("K1", "K2n", "K2f")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BEFORE, IN_KERNEL = "before the kernel", "in the kernel"


def public_calls(args: dict) -> dict:
    """{variant: f() -> the public call's outputs} for `fused_attribution` keyword arguments ``args``."""
    cpp = backend_instance("cpp")

    def checked_before():  # fused_attribution as every backend without `checks_activations` runs it
        inputs = validate(**args, distinct_writers=True)
        out = run_backend(cpp, inputs)
        require_finite_outputs(inputs, out)
        return out

    return {BEFORE: checked_before, IN_KERNEL: lambda: fused_attribution(**args, backend="cpp")}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--flush-mib", type=int, default=512, help="written before each cold call (more than the caches)")
    p.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    a = p.parse_args(argv)
    wanted, dtypes = a.workloads.split(","), a.dtypes.split(",")
    bad = [w for w in wanted if w not in WORKLOADS] + [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"--workloads / --dtypes: unknown {bad} (workloads {list(WORKLOADS)}, dtypes {list(DTYPES)})")
    flush = torch.empty(a.flush_mib * 2**20 // 4)
    info = machine.describe()
    lines = [f"# The public call with its activations checked before the kernel or in it ({info['cpu']})", "",
             f"{machine.cpu_line(info)}; GELU-4L shape, {a.tokens:,} tokens, {a.rounds} rounds (the variants' order"
             " alternating); time = median; ratio = median of the per-round ratios in the kernel / before it.", "",
             f"Command: `python benchmarks/activation_checks.py --tokens {a.tokens} --rounds {a.rounds}"
             f" --flush-mib {a.flush_mib}`", "",
             f"| workload | dtype | caches | {BEFORE} ms | {IN_KERNEL} ms | ratio |", "|---|---|---|---:|---:|---:|"]
    for w in wanted:
        for dname in dtypes:
            t = interleaved(public_calls(workloads.random_weight_args(w, SHAPE, a.tokens, DTYPES[dname])),
                            a.rounds, flush)
            for cond in CONDITIONS:
                o, n = np.array(t[(BEFORE, cond)]), np.array(t[(IN_KERNEL, cond)])
                lines.append(f"| {w} | {dname} | {cond} | {np.median(o) * 1e3:.2f} | {np.median(n) * 1e3:.2f} |"
                             f" {np.median(n / o):.3f} |")
            print(*lines[-len(CONDITIONS):], sep="\n", flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
