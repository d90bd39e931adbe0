"""Two builds of the C++ extension, interleaved: is a kernel change faster, on this machine, now?

A shared machine's speed drifts by tens of percent between runs (the bench's matmul probes show it),
so two bench runs at different times cannot show a 5 % change. This times the C++ kernels of two
builds on the same inputs in one run, alternating which goes first each round, and reports the median
of the per-round ratios. Kernel calls only (the arguments validated once, as the public API would):
K1 (fused, every head a writer, the MLP outputs as extra nodes, next-token DLA), K2n (next-token DLA,
distinct targets reduced in head space, no table) and K2f (one fixed logit-difference direction), on
the GELU-4L shape, in float32 and bfloat16. "warm": the same call just before; "cold": a 512 MiB write
(--flush-mib) before each call, as the bench's rounds leave the caches; "trimmed": that write, then
glibc's malloc_trim(0), which gives the heap's free pages back to the system as other work's freed
memory is given back (a fresh allocation faults its pages in again).

The other build is an installed copy of the package (its `_C` extension is loaded under another name):

    git worktree add /tmp/old <commit>
    (cd /tmp/old && python -m pip install --no-build-isolation --no-deps --target /tmp/old_pkg .)
    python benchmarks/ab_builds.py --other /tmp/old_pkg --out benchmarks/results/<folder>/ab.md
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import time

import numpy as np
import torch

from erasure_fast.backends import cpp
from erasure_fast.bench import machine, workloads
from erasure_fast.bench.harness import trim_heap
from erasure_fast.contract import validate

SHAPE = "gelu-4l"
WORKLOADS = ("K1", "K2n", "K2f")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_other(package_dir: str):
    """The `_C` extension of the package installed under ``package_dir``, as module `other_build._C`."""
    found = glob.glob(os.path.join(package_dir, "erasure_fast", "_C.*.so"))
    if len(found) != 1:
        raise SystemExit(f"--other: expected one erasure_fast/_C.*.so under {package_dir}, found {found}")
    spec = importlib.util.spec_from_file_location("other_build._C", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_call(workload: str, dtype: torch.dtype, n_tokens: int):
    """f(module) -> the kernel's outputs, for the workload's validated inputs."""
    d = workloads.SHAPES[SHAPE]
    N, M = d["n_layers"] * d["n_heads"], d["n_layers"]
    inp = workloads.make_inputs(SHAPE, n_tokens, "cpu", dtype, seed=0)
    g = torch.Generator().manual_seed(1)
    W_O = (torch.randn(N, d["d_head"], d["d_model"], generator=g) * d["d_head"] ** -0.5).to(dtype)
    W_U = torch.randn(d["d_model"], d["d_vocab"], generator=g).to(dtype)
    T = inp.n_tokens
    z, scale, ids = inp.z.reshape(T, N, -1), inp.scale.reshape(T), inp.next_ids.reshape(T)
    if workload == "K2f":
        v = validate(z, W_O, (W_U[:, inp.pair[0]] - W_U[:, inp.pair[1]])[None], scale, [], with_norms=False)
    elif workload == "K2n":
        v = validate(z, W_O, W_U.T.contiguous(), scale, [], direction_ids=ids, with_norms=False)
    else:
        v = validate(z, W_O, W_U.T.contiguous(), scale, list(range(N)), inp.mlp_out.reshape(T, M, -1),
                     direction_ids=ids)
    sfx = cpp.dtype_suffix(dtype)
    arrays = [cpp.kernel_array(v.z, dtype), cpp.kernel_array(v.W_O, dtype), cpp.kernel_array(v.directions, dtype),
              cpp.kernel_array(v.scale, torch.float32)]
    if workload == "K1":
        rest = [cpp.kernel_array(v.writers, torch.int64), cpp.kernel_array(v.extra_nodes, dtype)]
        ids_np = cpp.kernel_array(v.direction_ids, torch.int64)
        return lambda m: getattr(m, f"fused_attribution_{sfx}")(*arrays, *rest, direction_ids=ids_np)
    if workload == "K2n":
        ids_np = cpp.kernel_array(v.direction_ids, torch.int64)
        return lambda m: getattr(m, f"dla_gathered_{sfx}")(*arrays, ids_np, None, center=True, table=None,
                                                           method="unique", norms=False, n_threads=0)
    return lambda m: getattr(m, f"dla_fixed_{sfx}")(*arrays, center=True, norms=False, n_threads=0)


CONDITIONS = ("warm", "cold", "trimmed")


def interleaved(call, builds: dict, rounds: int, flush: torch.Tensor) -> dict:
    """{(build, condition): [seconds per round]} for each of CONDITIONS, the builds' order alternating by
    round."""
    names = list(builds)
    times = {(b, c): [] for b in names for c in CONDITIONS}
    for b in names:  # first calls (allocations, thread pools) out of the timing
        call(builds[b])
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for cond in ("cold", "trimmed", "warm"):
            for b in order:
                if cond == "warm":
                    call(builds[b])
                else:
                    flush.fill_(1.0)
                    if cond == "trimmed":
                        trim_heap()
                t0 = time.perf_counter()
                out = call(builds[b])
                times[(b, cond)].append(time.perf_counter() - t0)
                del out
    return times


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="folder the other build's package was installed into (--target)")
    p.add_argument("--other-label", default="other", help="its name in the table (e.g. its commit)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--flush-mib", type=int, default=512, help="written before each cold call (more than the caches)")
    p.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    a = p.parse_args(argv)
    wanted = a.workloads.split(",")
    bad = [w for w in wanted if w not in WORKLOADS] + [d for d in a.dtypes.split(",") if d not in DTYPES]
    if bad:
        raise SystemExit(f"--workloads / --dtypes: unknown {bad} (workloads {list(WORKLOADS)}, dtypes {list(DTYPES)})")
    builds = {a.other_label: load_other(a.other), "this build": cpp.require_extension()}
    flush = torch.empty(a.flush_mib * 2**20 // 4)
    info = machine.describe()
    lines = [f"# Two builds of the C++ kernels, interleaved ({info['cpu']})", "",
             f"{machine.cpu_line(info)}; GELU-4L shape, {a.tokens:,} tokens, {a.rounds} rounds (the builds' order"
             " alternating); time = median; ratio = median of the per-round ratios this build / the other.", "",
             f"Command: `python benchmarks/ab_builds.py --other-label {a.other_label} --tokens {a.tokens}"
             f" --rounds {a.rounds} --flush-mib {a.flush_mib}`", "",
             f"| workload | dtype | caches | {a.other_label} ms | this build ms | ratio |", "|---|---|---|---:|---:|---:|"]
    for w in wanted:
        for dname in a.dtypes.split(","):
            t = interleaved(kernel_call(w, DTYPES[dname], a.tokens), builds, a.rounds, flush)
            for cond in CONDITIONS:
                o, n = np.array(t[(a.other_label, cond)]), np.array(t[("this build", cond)])
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
