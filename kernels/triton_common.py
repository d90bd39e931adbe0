"""Helpers shared by the Triton kernel families (fused_attribution, dla_table).

Inside the kernels: tl.full instead of tl.zeros, tl.reduce(x, axis, sum_combine) instead of tl.sum.
tl.zeros / tl.sum are @jit functions of triton.language.standard, decorated when triton is imported;
if TRITON_INTERPRET=1 was set only after `import triton`, the interpreter cannot call them. The
reduction passes triton's own sum combiner, which the interpreter recognises by identity (numpy fast
path, never called) and which compiles exactly like tl.sum on GPU; `_add` is the fallback should a
triton version not have it. This module is decorated under one TRITON_INTERPRET setting like the
kernel modules, and reloaded with them (erasure_fast.backends.triton._kernels).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MIN_DOT = 16  # mma minimum for every dot dimension


def p2(x: int, lo: int = MIN_DOT) -> int:
    """The next power of two >= max(x, lo) (Triton block sizes)."""
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


@triton.jit
def _add(a, b):
    return a + b


sum_combine = getattr(tl.standard, "_sum_combine", _add)
