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
memory is given back (a fresh allocation faults its pages in again). With --checks the kernels check
their activations and outputs for NaN / infinity as the public call has them do (check_finite,
check_outputs).

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

import torch

from erasure_fast.backends import cpp
from erasure_fast.bench import workloads
from erasure_fast.bench.interleave import add_ab_arguments, run_ab
from erasure_fast.contract import validate

SHAPE = "gelu-4l"


def load_other(package_dir: str):
    """The `_C` extension of the package installed under ``package_dir``, as module `other_build._C`."""
    found = glob.glob(os.path.join(package_dir, "erasure_fast", "_C.*.so"))
    if len(found) != 1:
        raise SystemExit(f"--other: expected one erasure_fast/_C.*.so under {package_dir}, found {found}")
    spec = importlib.util.spec_from_file_location("other_build._C", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_call(workload: str, dtype: torch.dtype, n_tokens: int, checks: bool = False):
    """f(module) -> the kernel's outputs, for the workload's validated inputs; ``checks``: with the
    kernel's own checks of its activations and outputs."""
    v = validate(**workloads.random_weight_args(workload, SHAPE, n_tokens, dtype))
    flags = dict(check_finite=checks, check_outputs=checks)
    sfx = cpp.dtype_suffix(dtype)
    arrays = [cpp.kernel_array(v.z, dtype), cpp.kernel_array(v.W_O, dtype), cpp.kernel_array(v.directions, dtype),
              cpp.kernel_array(v.scale, torch.float32)]
    if workload == "K1":
        rest = [cpp.kernel_array(v.writers, torch.int64), cpp.kernel_array(v.extra_nodes, dtype)]
        ids_np = cpp.kernel_array(v.direction_ids, torch.int64)
        return lambda m: getattr(m, f"fused_attribution_{sfx}")(*arrays, *rest, direction_ids=ids_np, **flags)
    if workload == "K2n":
        ids_np = cpp.kernel_array(v.direction_ids, torch.int64)
        return lambda m: getattr(m, f"dla_gathered_{sfx}")(*arrays, ids_np, None, center=True, table=None,
                                                           method="unique", norms=False, n_threads=0, **flags)
    return lambda m: getattr(m, f"dla_fixed_{sfx}")(*arrays, center=True, norms=False, n_threads=0,
                                                    **flags)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="folder the other build's package was installed into (--target)")
    p.add_argument("--other-label", default="other", help="its name in the table (e.g. its commit)")
    p.add_argument("--checks", action="store_true",
                   help="the kernels check their activations and outputs, as the public call has them do")
    add_ab_arguments(p)
    a = p.parse_args(argv)
    builds = {a.other_label: load_other(a.other), "this build": cpp.require_extension()}

    def calls_for(workload: str, dtype: torch.dtype) -> dict:
        call = kernel_call(workload, dtype, a.tokens, a.checks)
        return {b: (lambda m=m: call(m)) for b, m in builds.items()}

    return run_ab(a, heading="Two builds of the C++ kernels, interleaved", what="this build / the other",
                  command=f"python benchmarks/ab_builds.py --other-label {a.other_label}" + (" --checks" if a.checks else ""),
                  labels=(a.other_label, "this build"), calls_for=calls_for)


if __name__ == "__main__":
    main()
