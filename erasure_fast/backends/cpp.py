"""The C++ backend: the OpenMP CPU kernel in ``erasure_fast._C`` (sources in ``csrc/``).

Implements the contract (`erasure_fast.contract`) on CPU tensors. Accumulation is in float64 for
float64 inputs and in float32 otherwise: bfloat16 / float16 inputs are converted to float32 first
(exactly, every bf16/fp16 value is a float32 value) and the outputs are float32 (``inp.out_dtype``).
Results do not depend on the number of threads.

Threads: the OpenMP default unless set with `set_num_threads` or the environment variable
``ERASURE_FAST_NUM_THREADS`` (read when a call starts; `set_num_threads` wins).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..contract import FusedInputs, FusedOutputs

NAME = "cpp"
DEVICES = ("cpu",)
ENV_THREADS = "ERASURE_FAST_NUM_THREADS"

_n_threads: Optional[int] = None  # set_num_threads(); None = environment / OpenMP default


def _extension():
    """The compiled module, or the ImportError that says why it is missing."""
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, e
    return _C, None


def set_num_threads(n: Optional[int]) -> None:
    """Threads for later calls: n >= 1, or None / 0 for the default (env var, else OpenMP's)."""
    global _n_threads
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    _n_threads = n or None


def get_num_threads() -> int:
    """Threads the next call asks for (0 = OpenMP default)."""
    if _n_threads is not None:
        return _n_threads
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{ENV_THREADS} must be an integer, got {env!r}") from None
        return max(n, 0)
    return 0


def build_info() -> dict:
    """The extension's build facts (OpenMP, threads, ISA, compiler); raises if it is not built."""
    _C, err = _extension()
    if _C is None:
        raise RuntimeError(f"extension erasure_fast._C not built: {err}")
    return dict(_C.build_info())


def available() -> tuple[bool, str]:
    _C, err = _extension()
    if _C is None:
        return False, f"extension erasure_fast._C not built: {err}"
    info = _C.build_info()
    omp = f"OpenMP on, {info['max_threads']} threads" if info["openmp"] else "OpenMP off, 1 thread"
    return True, f"C++ extension, {omp}, arch {info['cpu_arch']} ({info['simd']}), {info['compiler']}"


def _np(t: torch.Tensor, dtype: torch.dtype):
    # zero copy for contiguous CPU tensors already in `dtype`
    return t.detach().to(dtype).contiguous().numpy()


def run(inp: FusedInputs) -> FusedOutputs:
    """Compute the contract's outputs with the C++ kernel (CPU tensors only)."""
    _C, err = _extension()
    if _C is None:
        raise RuntimeError(f"the cpp backend is not available: extension erasure_fast._C not built: {err}")
    if inp.z.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on cpu tensors, but the inputs are on {inp.z.device}")
    acc = inp.out_dtype  # float64 for float64 input, float32 otherwise
    fn = _C.fused_attribution_f64 if acc == torch.float64 else _C.fused_attribution_f32
    ids = inp.direction_ids
    inc = inp.incorrect_ids
    dla, dots, norms = fn(
        _np(inp.z, acc),
        _np(inp.W_O, acc),
        _np(inp.directions, acc),
        _np(inp.scale, acc),
        _np(inp.writers, torch.int64),
        _np(inp.extra_nodes, acc) if inp.extra_nodes.shape[1] else None,
        direction_ids=None if ids is None else _np(ids, torch.int64),
        incorrect_ids=None if inc is None else _np(inc, torch.int64),
        center=bool(inp.center),
        n_threads=get_num_threads(),
    )
    return FusedOutputs(dla=torch.from_numpy(dla), dots=torch.from_numpy(dots), norms=torch.from_numpy(norms))
