"""Resolve oneMKL's vector-math (VML) dispatch once, on one thread, before any analysis runs.

torch's CPU build routes contiguous float unary ops (sqrt, exp, log, tanh, erf, ...) to oneMKL VML,
one call per intra-op worker thread on its chunk. oneMKL 2024.2 (bundled with torch's wheels up to
at least 2.13) resolves the VML kernel lazily on the process's first call; when that first call
runs on several threads at once, one thread can execute a low-accuracy kernel on its whole chunk
(pytorch/pytorch#188792): torch.sqrt is then off by up to 2.6e-4 relative in float32 and 3e-11 in
float64 on half the elements, in about one fresh process in four, and every later call is right.
A norm, a LayerNorm scale or a reference computed by that first call would silently be wrong, and
the same call would give a different answer in a process that had already called it.

`resolve_vml_dispatch` calls every VML-routed op once on a one-element tensor (single-threaded:
below any parallel grain) in float32 and float64, so dispatch is resolved before any parallel
call. It changes no setting and no result of a correct call: it only removes the dependence of
later results on call order. About 3 ms, once per process; a no-op where torch has no MKL.
"""

from __future__ import annotations

import torch

# torch's ops that reach oneMKL VML (aten/src/ATen/cpu/vml.h), and the neighbours that share its
# dispatch in some builds; a name this torch lacks is skipped.
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "expm1", "log", "log10", "log1p",
           "log2", "sin", "sqrt", "tan", "tanh", "trunc", "rsqrt", "reciprocal", "sigmoid")

_resolved = False  # once per process: dispatch, once resolved, stays resolved


def resolve_vml_dispatch() -> None:
    """Call each of `VML_OPS` once, single-threaded, in float32 and float64 (once per process)."""
    global _resolved
    if _resolved:
        return
    _resolved = True
    if not torch.backends.mkl.is_available():
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype)
            for name in VML_OPS:
                op = getattr(torch, name, None)
                if op is not None:
                    op(x)


resolve_vml_dispatch()
