"""Where the public call checks its activations (z, extra_nodes) and its outputs for NaN / infinity:
outside the kernel, a read of their own (the activations before it, the outputs after it, as every
backend but cpp does), or in the cpp kernels as they read the activations and write the outputs (what
`fused_attribution` does on the cpp backend). With ``--outputs-only`` the activations are checked in
the kernel in both variants, and only the outputs' check moves. Both variants are whole public calls
-- every other check and the kernel -- of one build, interleaved in one run
(erasure_fast.bench.interleave): K1, K2n (no table) and K2f on the GELU-4L shape with random weights,
in float32 and bfloat16.

    python benchmarks/activation_checks.py --out benchmarks/results/<folder>/activation-checks.md
"""

from __future__ import annotations

import argparse
import dataclasses

from erasure_fast.backends import backend_instance
from erasure_fast.bench import workloads
from erasure_fast.bench.interleave import add_ab_arguments, run_ab
from erasure_fast.contract import fused_attribution, require_finite_outputs, run_backend, validate

SHAPE = "gelu-4l"
OUTSIDE, IN_KERNEL = "outside the kernel", "in the kernel"


def public_calls(args: dict, outputs_only: bool = False) -> dict:
    """{variant: f() -> the public call's outputs} for `fused_attribution` keyword arguments ``args``."""
    cpp = backend_instance("cpp")

    def checked_outside():  # fused_attribution as a backend without `checks_inputs` / `checks_outputs` runs it
        inputs = validate(**args, distinct_writers=True, checks_in_run=outputs_only)
        out = run_backend(cpp, dataclasses.replace(inputs, check_outputs=False))
        require_finite_outputs(inputs, out)
        return out

    return {OUTSIDE: checked_outside, IN_KERNEL: lambda: fused_attribution(**args, backend="cpp")}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ab_arguments(p)
    p.add_argument("--outputs-only", action="store_true",
                   help="check the activations in the kernel in both variants (only the outputs' check moves)")
    a = p.parse_args(argv)
    moved = "outputs" if a.outputs_only else "activations and outputs"
    return run_ab(a, heading=f"The public call with its {moved} checked outside the kernel or in it",
                  what="in the kernel / outside it",
                  command="python benchmarks/activation_checks.py" + (" --outputs-only" if a.outputs_only else ""),
                  labels=(OUTSIDE, IN_KERNEL),
                  calls_for=lambda w, dtype: public_calls(workloads.random_weight_args(w, SHAPE, a.tokens, dtype),
                                                          a.outputs_only))


if __name__ == "__main__":
    main()
