"""K1 (GELU-4L shape) on every C++ kernel path this CPU runs, and through torch's BLAS, against the
matmul rate: what chose the CPU kernels (docs/backends.md, CPU kernel paths).

One thread, CPU time of the calling thread (a shared machine's other jobs take wall time, not this
thread's CPU time), best of ``--repeats`` calls, against the best one-thread ``n x n`` matmul of the
same dtype measured the same way, interleaved path by path. The "torch BLAS tiles" row is the
alternative design: per chunk of tokens the projection as one batched matmul and every token's dots
as a batched [N + M, d_model] x [d_model, N] product (torch.bmm, oneDNN / MKL inside), the fused
reductions left out (so it is an upper bound for that design).

    python benchmarks/kernel_paths.py --out benchmarks/results/<folder>/kernel_paths.md
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from erasure_fast.backends import cpp
from erasure_fast.bench import machine, workloads

SHAPE = "gelu-4l"


def cpu_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def matmul_rate(dtype, repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / cpu_time(lambda: a @ b, repeats) / 1e9


def kernel_args(n_tokens: int, dtype):
    d = workloads.SHAPES[SHAPE]
    N, H, D, M, V = d["n_layers"] * d["n_heads"], d["d_head"], d["d_model"], d["n_layers"], d["d_vocab"]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    z, W_O, dirs, extra = r(n_tokens, N, H), r(N, H, D) / 8, r(V, D), r(n_tokens, M, D)
    ids = torch.randint(0, V, (n_tokens,), generator=g)
    fn = getattr(cpp.require_extension(), f"fused_attribution_{cpp.dtype_suffix(dtype)}")
    args = [cpp.kernel_array(t, dtype) for t in (z, W_O, dirs)] + [np.ones(n_tokens, np.float32),
                                                                   np.arange(N, dtype=np.int64),
                                                                   cpp.kernel_array(extra, dtype)]
    return lambda: fn(*args, direction_ids=ids.numpy(), n_threads=1), (z, W_O, dirs, extra, ids)


def blas_tiles(inputs, chunk: int):
    z, W_O, dirs, extra, ids = inputs
    zp = z.transpose(0, 1).contiguous()  # [N, T, H]

    def run():
        for t0 in range(0, z.shape[0], chunk):
            R = torch.bmm(zp[:, t0:t0 + chunk], W_O).transpose(0, 1).contiguous()  # [c, N, D]
            nodes = torch.cat([R, extra[t0:t0 + chunk]], 1)
            torch.bmm(nodes, R.transpose(1, 2))                                      # dots [c, N + M, N]
            torch.bmm(R, dirs[ids[t0:t0 + chunk]][:, :, None])                        # DLA (uncentred)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    flops = workloads.flops("K1", SHAPE, a.tokens)
    paths = [n for n, v in cpp.cpu_paths().items() if v["runs_here"]]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        call, inputs = kernel_args(a.tokens, dtype)
        name = str(dtype).replace("torch.", "")
        for path in paths:
            cpp.set_cpu_path(path)
            rate = matmul_rate(dtype, a.repeats)
            t = cpu_time(call, a.repeats)
            rows.append((name, f"cpp, path {path}", t, flops / t / 1e9, rate))
            print(rows[-1], flush=True)
        cpp.set_cpu_path(None)
        for chunk in (128, 512):
            rate = matmul_rate(dtype, a.repeats)
            t = cpu_time(blas_tiles(inputs, chunk), a.repeats)
            rows.append((name, f"torch BLAS tiles, {chunk} tokens per chunk", t, flops / t / 1e9, rate))
            print(rows[-1], flush=True)
    info = machine.describe()
    lines = [f"# K1 per kernel path, one thread ({info['cpu']}, torch {info['torch']})", "",
             f"GELU-4L shape, {a.tokens:,} tokens, every head a writer, 4 MLP nodes, next-token DLA; one thread, "
             f"CPU time of the calling thread, best of {a.repeats}; matmul: one thread, 2048^3, same dtype, measured "
             "just before each row. Command: `python benchmarks/kernel_paths.py" + (f" --out {a.out}`" if a.out else "`"), "",
             "| dtype | kernel | time s | GFLOP/s (K1's distinct FLOPs) | matmul GFLOP/s | % of matmul |",
             "|---|---|---:|---:|---:|---:|"]
    for dt, name, t, gf, rate in rows:
        lines.append(f"| {dt} | {name} | {t:.4f} | {gf:.0f} | {rate:.0f} | {100 * gf / rate:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
