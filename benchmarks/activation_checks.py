"""Where the public call checks z and extra_nodes for NaN / infinity: before the kernel (a read of its
own, as every backend but cpp does) or in the cpp kernels as they read them (what `fused_attribution`
does on the cpp backend). Both variants are whole public calls -- every other check, the kernel and
the output check -- of one build, interleaved in one run (erasure_fast.bench.interleave): K1, K2n
(no table) and K2f on the GELU-4L shape with random weights, in float32 and bfloat16.

    python benchmarks/activation_checks.py --out benchmarks/results/<folder>/activation-checks.md
"""

from __future__ import annotations

import argparse

from erasure_fast.backends import backend_instance
from erasure_fast.bench import workloads
from erasure_fast.bench.interleave import add_ab_arguments, run_ab
from erasure_fast.contract import fused_attribution, require_finite_outputs, run_backend, validate

SHAPE = "gelu-4l"
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
    add_ab_arguments(p)
    a = p.parse_args(argv)
    return run_ab(a, heading="The public call with its activations checked before the kernel or in it",
                  what="in the kernel / before it", command="python benchmarks/activation_checks.py",
                  labels=(BEFORE, IN_KERNEL),
                  calls_for=lambda w, dtype: public_calls(workloads.random_weight_args(w, SHAPE, a.tokens, dtype)))


if __name__ == "__main__":
    main()
