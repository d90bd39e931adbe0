"""The C++ backend: the OpenMP CPU kernel in ``erasure_fast._C`` (sources in ``csrc/``).

Implements the contract (`erasure_fast.contract`) on CPU tensors. Accumulation is in float64 for
float64 inputs and in float32 otherwise: bfloat16 / float16 inputs are handed to the kernel as they
are (their uint16 bits, no float32 copy) and converted on load, exactly (every bf16/fp16 value is a
float32 value); the outputs are float32 (``inp.out_dtype``). Results do not depend on the number of
threads.

Threads: the OpenMP default unless set with `set_num_threads` or the environment variable
``ERASURE_FAST_NUM_THREADS`` (read when a call starts; `set_num_threads` wins).

Kernel path (run-time dispatch, csrc/dispatch.h): the extension carries the kernels compiled for
several x86-64 instruction sets -- ``portable``, ``avx2`` (AVX2 + FMA), ``avx512`` (AVX-512 F/BW/VL/DQ),
``avx512_bf16`` (AVX-512 multiplying bfloat16 inputs in pairs, AVX512-BF16), ``amx`` (that, with
bfloat16 inputs on the AMX tile unit) -- and every call runs the fastest one
this CPU executes, unless `set_cpu_path` or the environment variable ``ERASURE_FAST_CPU_PATH`` (read
when a call starts; `set_cpu_path` wins) names another: a path the CPU cannot run is refused with
the features it lacks. `cpu_paths()` lists them; `build_info()["cpu_path"]` is the one in use.

DLA-only fast paths: when a request has no writers (W = 0) and no extra nodes (M = 0), `run` never
forms a head's d_model output. It projects each centred direction into head space once,
A[n] = W_O[n] @ c(d) (docs/math.md), and takes d_head-long dots with z:

* fixed directions [K, D]: A for the K rows, once per call;
* gathered directions (``direction_ids``, e.g. next-token DLA with ``directions = W_U.T``): A only for
  the distinct (id, incorrect id) pairs of the call ("unique"), or gathered from a table over all K
  rows that the caller built and passes explicitly (``fused_attribution(..., dla_table=t)``, see
  `erasure_fast.backends.dla_table`; [K, N, d_head] values, ~395 MB for GELU-4L fp32). With a
  complete table the kernel picks the faster of the two from the number of distinct ids and of
  tokens (`prefer_table`); a lazy table builds the rows a call lacks and is then gathered from.
  No table is ever used that the call was not given.
  The norms [T, N] = |r_n|^2 are taken as z^T (W_O W_O^T) z, so this path runs only where
  d_model >= 2 d_head (see `_GRAM_MIN_RATIO`); otherwise the fused kernel does.

Memory: outputs and scratch buffers of at least `scratch_info()["min_bytes"]` (256 KiB) are blocks of a
pool of mappings with transparent huge pages, kept between calls up to ``keep_bytes`` (128 MiB): a
call's large buffers then need no page faults (a fresh 4 KiB page costs ~1 us to fault in), and a
returned array gives its block back when it goes. `release_scratch` empties the pool.

The rounding differs from the fused kernel (same math, other order); both stay within the
contract's tolerances of the float64 reference.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Optional

import numpy as np
import torch

from .base import FusedInputs, FusedOutputs, accumulation_dtype
from ..finite import output_overflow, require_finite_inputs

NAME = "cpp"
DEVICES = ("cpu",)
ENV_THREADS = "ERASURE_FAST_NUM_THREADS"
ENV_CPU_PATH = "ERASURE_FAST_CPU_PATH"

_n_threads: Optional[int] = None  # set_num_threads(); None = environment / OpenMP default
_cpu_path: Optional[str] = None  # set_cpu_path(); None = environment / the fastest this CPU runs


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


def get_cpu_path() -> str:
    """The kernel path the next call asks for: `set_cpu_path`'s, else ``ERASURE_FAST_CPU_PATH``'s,
    else "auto" (the fastest this CPU runs)."""
    if _cpu_path is not None:
        return _cpu_path
    return os.environ.get(ENV_CPU_PATH, "").strip() or "auto"


def set_cpu_path(name: Optional[str]) -> str:
    """Kernel path of later calls: a name from `cpu_paths`, or None / "auto" for the fastest this CPU
    runs (then ``ERASURE_FAST_CPU_PATH`` applies again when set). Raises ValueError for an unknown
    path, one not compiled in, or one this CPU cannot run (naming what it lacks). Returns the path
    now selected."""
    global _cpu_path
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name must be a CPU path name or None, got {name!r}")
    _C, err = _extension()
    if _C is None:
        raise RuntimeError(f"the cpp backend is not available: extension erasure_fast._C not built: {err}")
    selected = _select_cpu_path(_C, name or "auto")
    _cpu_path = None if name in (None, "auto") else name
    return selected


def _select_cpu_path(_C, name: str) -> str:
    try:
        return _C.select_cpu_path(name)
    except ValueError as e:
        raise ValueError(str(e)) from None


def cpu_paths() -> dict:
    """Every kernel path: {name: {compiled, runs_here, missing (features this CPU / OS lacks), simd}},
    from the most portable to the fastest."""
    return dict(require_extension().cpu_paths())


def build_info() -> dict:
    """The extension's build facts (OpenMP, threads, kernel paths, compiler) with the path the next
    call runs (``cpu_path``); raises if it is not built, or if the requested path cannot run here."""
    return dict(require_extension().build_info())


def scratch_info() -> dict:
    """The pool of large scratch buffers and outputs kept between calls (csrc/scratch_pool.h):
    {min_bytes (buffers from this size come from the pool; None: never, e.g. in AddressSanitizer
    builds), keep_bytes (the most it keeps between calls), kept_bytes, kept_blocks (now)}."""
    return dict(require_extension().scratch_info())


def release_scratch() -> None:
    """Give every buffer the pool keeps back to the system; later calls map new ones (their pages
    fault in again). Results never depend on the pool."""
    require_extension().release_scratch()


def available() -> tuple[bool, str]:
    _C, err = _extension()
    if _C is None:
        return False, f"extension erasure_fast._C not built: {err}"
    try:
        _select_cpu_path(_C, get_cpu_path())
    except ValueError as e:
        return False, f"{ENV_CPU_PATH}: {e}"
    info = _C.build_info()
    omp = f"OpenMP on, {info['max_threads']} threads" if info["openmp"] else "OpenMP off, 1 thread"
    paths = ", ".join(info["cpu_paths"])
    return True, (f"C++ extension, {omp}, kernel path {info['cpu_path']} ({info['simd']}; compiled: {paths}; "
                  f"fastest here: {info['best_cpu_path']}), {info['compiler']}")


def kernel_array(t: torch.Tensor, dtype: torch.dtype):
    """t as the kernel reads it: a numpy array of `dtype`, or for bfloat16 / float16 (which numpy
    lacks) the uint16 bits, converted to float32 on load inside the kernel. Zero copy for contiguous
    CPU tensors already in `dtype`."""
    t = t.detach().to(dtype).contiguous()
    if dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def scan_kernel(name: str, values: torch.Tensor):
    """The compiled scan-aggregation entry ``{name}_f32`` / ``{name}_f64`` (csrc/scan_aggregates.h, null_dots.h)
    for float32 / float64 ``values`` on the CPU, with this backend's thread setting; None where the
    extension is not built, the dtype has no entry or the values are on another device (callers then
    use their torch reference, on the values' device)."""
    _C = _extension()[0]
    dtype = values.dtype
    if _C is None or values.device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    _select_cpu_path(_C, get_cpu_path())
    return functools.partial(getattr(_C, f"{name}_{_SFX[dtype]}"), n_threads=get_num_threads())


def scan_rows(block: torch.Tensor) -> torch.Tensor:
    """``block`` [T, R, W] as the scan kernels read it in place: itself when its [R, W] rows are
    contiguous (any token stride, e.g. dots[:, :n_nodes] of a larger array), else a contiguous copy.
    The check is bindings.cpp's rows_in_place."""
    if block.stride(2) == 1 and (block.shape[1] == 1 or block.stride(1) == block.shape[2]):
        return block
    return block.contiguous()


def require_extension():
    """The compiled module with the requested kernel path selected (`get_cpu_path`)."""
    _C, err = _extension()
    if _C is None:
        raise RuntimeError(f"the cpp backend is not available: extension erasure_fast._C not built: {err}")
    _select_cpu_path(_C, get_cpu_path())
    return _C


_SFX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def dtype_suffix(dtype: torch.dtype) -> str:
    """Suffix of the _C entry point for inputs of `dtype` (accumulation: float64 for f64, else float32)."""
    return _SFX[dtype]


# The DLA-only path takes the norms as z^T (W_O W_O^T) z. Its rounding error scales with
# |z|^T |G| |z| / |r|^2, harmless when d_model >= 2 d_head (G well conditioned for any W_O of full
# rank, e.g. GELU-4L: 512 vs 64) but large when d_model < d_head (G singular: r can cancel to ~0 while
# z does not). There forming r costs at most 2 d_head^2 per head anyway, so the fused kernel runs.
_GRAM_MIN_RATIO = 2

# Which path the last `run` / `dla_gathered` / `dla_fixed` of this thread took: 'fused', 'dla_fixed',
# 'dla_unique' or 'dla_table' (with the number of distinct ids); read by the tests (fixture cpp_last_path).
_last_path = threading.local()


def prefer_table(n_unique: int, n_tokens: int, d_model: int) -> bool:
    """The kernel's auto rule: gather from the table when distinct ids x d_model > 8 x tokens
    (with ids, tokens counting only tokens with a target; measurements in csrc/dla_only.cpp)."""
    return bool(require_extension().dla_prefer_table(int(n_unique), int(n_tokens), int(d_model)))


def _table_method(table, method: str, ids: torch.Tensor,
                  incorrect_ids: Optional[torch.Tensor]) -> str:
    """The kernel's method for a gathered call: a lazy table first builds the rows the call lacks,
    and is then always gathered from (cheaper than building those rows again)."""
    if table is not None and table.lazy and method in ("auto", "table"):
        table.ensure_rows(ids, incorrect_ids)
        return "table"
    return method


def dla_gathered(table, z: torch.Tensor, scale: torch.Tensor,
                 direction_ids: torch.Tensor, incorrect_ids: Optional[torch.Tensor] = None, *,
                 W_O: Optional[torch.Tensor] = None, directions: Optional[torch.Tensor] = None,
                 center: Optional[bool] = None, method: str = "auto", norms: bool = False):
    """Gathered DLA only: dla [T, N] (NaN where an id is -1), plus norms [T, N] when ``norms``.
    ``table``: a `erasure_fast.backends.dla_table.DlaTable`, or None.

    With a table, W_O / directions / center default to the table's own (and must match it when
    given); ``method`` is 'auto' (pick by cost), 'table' or 'unique'. Without a table, W_O and
    directions are required and the unique reduction runs. Inputs are not checked beyond the
    bindings' shape / range checks (no finiteness pass): use `fused_attribution` for the full contract.
    """
    _C = require_extension()
    if table is not None:
        W_O = table.W_O if W_O is None else W_O
        directions = table.directions if directions is None else directions
        center = table.center if center is None else center
        if not table.matches(W_O, directions, center):
            raise ValueError("the table was not built from these W_O / directions / center, or they "
                             "were modified in place since; rebuild it")
        method = _table_method(table, method, direction_ids, incorrect_ids)
    elif W_O is None or directions is None:
        raise ValueError("dla_gathered needs W_O and directions when no table is given")
    center = True if center is None else bool(center)
    dt, acc = z.dtype, accumulation_dtype(z.dtype)
    fn = getattr(_C, f"dla_gathered_{dtype_suffix(dt)}")
    dla, nrm, info = fn(
        kernel_array(z, dt), kernel_array(W_O, dt), kernel_array(directions, dt), kernel_array(scale.reshape(-1), acc),
        kernel_array(direction_ids, torch.int64),
        None if incorrect_ids is None else kernel_array(incorrect_ids, torch.int64),
        center=center, table=None if table is None else table.table.numpy(), method=method,
        norms=bool(norms), n_threads=get_num_threads(),
    )
    _last_path.value = f"dla_{info['method']} (unique={info['n_unique']})"
    dla = torch.from_numpy(dla)
    return (dla, torch.from_numpy(nrm)) if norms else dla


def dla_fixed(z: torch.Tensor, W_O: torch.Tensor, directions: torch.Tensor, scale: torch.Tensor, *,
              center: bool = True, norms: bool = False):
    """Fixed-direction DLA only (e.g. a logit difference, K = 1): dla [T, N, K], plus norms [T, N]
    when ``norms``. No finiteness pass: use `fused_attribution` for the full contract."""
    _C = require_extension()
    dt, acc = z.dtype, accumulation_dtype(z.dtype)
    dla, nrm, _ = getattr(_C, f"dla_fixed_{dtype_suffix(dt)}")(
        kernel_array(z, dt), kernel_array(W_O, dt), kernel_array(directions, dt), kernel_array(scale.reshape(-1), acc),
        center=bool(center), norms=bool(norms), n_threads=get_num_threads())
    _last_path.value = "dla_fixed"
    dla = torch.from_numpy(dla)
    return (dla, torch.from_numpy(nrm)) if norms else dla


def _checked_call(_C, inp: FusedInputs, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a kernel entry of ``_C``; with ``inp.check_inputs`` the entry checks W_O
    and the rows of directions it reads before its kernel runs, the kernel z and extra_nodes as it
    reads them, and a NaN or an infinity raises the contract's error, which names the first input with
    a bad value (in the contract's order) and its first bad index (`require_finite_inputs`); with
    ``inp.check_outputs`` it checks its outputs as it writes them, and an overflow raises the
    contract's error for it (`output_overflow`). The outputs are then dropped."""
    try:
        return fn(*args, check_finite=inp.check_inputs, check_outputs=inp.check_outputs, **kwargs)
    except _C.NonFiniteInput:
        pass
    except _C.NonFiniteOutput as e:
        raise output_overflow(str(e), inp.out_dtype, inp.z, inp.W_O, inp.extra_nodes) from None
    require_finite_inputs(inp.z, inp.W_O, inp.extra_nodes, inp.directions, inp.direction_ids, inp.incorrect_ids)
    raise RuntimeError("the C++ kernel reported a NaN or an infinity in its inputs that a second read does "
                       "not find")


def _run_dla_only(_C, inp: FusedInputs, acc: torch.dtype) -> FusedOutputs:
    T, N = inp.z.shape[0], inp.z.shape[1]
    dt = inp.z.dtype
    args = (kernel_array(inp.z, dt), kernel_array(inp.W_O, dt), kernel_array(inp.directions, dt), kernel_array(inp.scale, acc))
    if inp.direction_ids is None:
        dla, norms, _ = _checked_call(_C, inp, getattr(_C, f"dla_fixed_{dtype_suffix(dt)}"),
                                      *args, center=bool(inp.center), norms=inp.with_norms,
                                      n_threads=get_num_threads())
        _last_path.value = "dla_fixed"
    else:
        table = inp.dla_table
        method = _table_method(table, "auto", inp.direction_ids, inp.incorrect_ids)
        dla, norms, info = _checked_call(
            _C, inp, getattr(_C, f"dla_gathered_{dtype_suffix(dt)}"), *args, kernel_array(inp.direction_ids, torch.int64),
            None if inp.incorrect_ids is None else kernel_array(inp.incorrect_ids, torch.int64),
            center=bool(inp.center), table=None if table is None else table.table.numpy(),
            method=method, norms=inp.with_norms, n_threads=get_num_threads())
        _last_path.value = f"dla_{info['method']} (unique={info['n_unique']})"
    dots = torch.empty((T, N, 0), dtype=acc)
    return FusedOutputs(dla=torch.from_numpy(dla), dots=dots, norms=torch.from_numpy(norms) if inp.with_norms else None)


def run(inp: FusedInputs) -> FusedOutputs:
    """Compute the contract's outputs with the C++ kernel (CPU tensors only)."""
    _C = require_extension()
    if inp.z.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on cpu tensors, but the inputs are on {inp.z.device}")
    acc = inp.out_dtype  # float64 for float64 input, float32 otherwise
    H, D = inp.W_O.shape[1], inp.W_O.shape[2]
    # DLA-only requests go to head space; the norms' Gram shortcut loses accuracy when d_model < 2 d_head
    if inp.writers.numel() == 0 and inp.extra_nodes.shape[1] == 0 and (not inp.with_norms or D >= _GRAM_MIN_RATIO * H):
        return _run_dla_only(_C, inp, acc)
    _last_path.value = "fused"
    dt = inp.z.dtype
    fn = getattr(_C, f"fused_attribution_{dtype_suffix(dt)}")
    ids = inp.direction_ids
    inc = inp.incorrect_ids
    dla, dots, norms = _checked_call(
        _C, inp, fn,
        kernel_array(inp.z, dt),
        kernel_array(inp.W_O, dt),
        kernel_array(inp.directions, dt),
        kernel_array(inp.scale, acc),
        kernel_array(inp.writers, torch.int64),
        kernel_array(inp.extra_nodes, dt) if inp.extra_nodes.shape[1] else None,
        direction_ids=None if ids is None else kernel_array(ids, torch.int64),
        incorrect_ids=None if inc is None else kernel_array(inc, torch.int64),
        center=bool(inp.center),
        n_threads=get_num_threads(),
    )
    return FusedOutputs(dla=torch.from_numpy(dla), dots=torch.from_numpy(dots),
                        norms=torch.from_numpy(norms) if inp.with_norms else None)

