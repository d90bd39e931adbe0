"""Type stub of the compiled CPU backend `erasure_fast._C` (csrc/bindings.cpp; contract in
erasure_fast/contract.py). Every kernel entry runs on the kernel path selected at the call
(`select_cpu_path`, csrc/dispatch.h). Arrays are C-contiguous numpy arrays; bfloat16 / float16
inputs are their uint16 bits, accumulation and outputs float32 (float64 for float64 inputs)."""

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

_I64 = NDArray[np.int64]

class NonFiniteInput(ValueError):
    """A call with check_finite=True found a NaN or an infinity: in W_O or a row of directions it reads
    (checked before its kernel runs), or in z or extra_nodes (checked by the kernel as it reads them)."""

class NonFiniteOutput(ValueError):
    """A kernel called with check_outputs=True wrote a NaN or an infinity where its finite inputs define
    the value (the message: the first of dla, dots, norms)."""

# ---- float32 inputs
def fused_attribution_f32(z: NDArray[np.float32], W_O: NDArray[np.float32], directions: NDArray[np.float32], scale: NDArray[np.float32], writers: _I64,
                          extra_nodes: Optional[NDArray[np.float32]] = None, direction_ids: Optional[_I64] = None,
                          incorrect_ids: Optional[_I64] = None, center: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0,
                          tile_tokens: int = 0, chunk_cols: int = 0) -> Tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]: ...
def dla_fixed_f32(z: NDArray[np.float32], W_O: NDArray[np.float32], directions: NDArray[np.float32], scale: NDArray[np.float32], center: bool = True, norms: bool = True,
                  check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0) -> Tuple[NDArray[np.float32], Optional[NDArray[np.float32]], Dict[str, Any]]: ...
def dla_gathered_f32(z: NDArray[np.float32], W_O: NDArray[np.float32], directions: NDArray[np.float32], scale: NDArray[np.float32], direction_ids: _I64,
                     incorrect_ids: Optional[_I64] = None, center: bool = True, table: Optional[NDArray[np.float32]] = None,
                     method: str = "auto", norms: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0
                     ) -> Tuple[NDArray[np.float32], Optional[NDArray[np.float32]], Dict[str, Any]]: ...
def fill_dla_table_rows_f32(W_O: NDArray[np.float32], directions: NDArray[np.float32], rows: _I64, table: NDArray[np.float32], center: bool = True,
                            n_threads: int = 0) -> None: ...
def build_dla_table_f32(W_O: NDArray[np.float32], directions: NDArray[np.float32], center: bool = True, n_threads: int = 0) -> NDArray[np.float32]: ...

# ---- float64 inputs
def fused_attribution_f64(z: NDArray[np.float64], W_O: NDArray[np.float64], directions: NDArray[np.float64], scale: NDArray[np.float64], writers: _I64,
                          extra_nodes: Optional[NDArray[np.float64]] = None, direction_ids: Optional[_I64] = None,
                          incorrect_ids: Optional[_I64] = None, center: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0,
                          tile_tokens: int = 0, chunk_cols: int = 0) -> Tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]: ...
def dla_fixed_f64(z: NDArray[np.float64], W_O: NDArray[np.float64], directions: NDArray[np.float64], scale: NDArray[np.float64], center: bool = True, norms: bool = True,
                  check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0) -> Tuple[NDArray[np.float64], Optional[NDArray[np.float64]], Dict[str, Any]]: ...
def dla_gathered_f64(z: NDArray[np.float64], W_O: NDArray[np.float64], directions: NDArray[np.float64], scale: NDArray[np.float64], direction_ids: _I64,
                     incorrect_ids: Optional[_I64] = None, center: bool = True, table: Optional[NDArray[np.float64]] = None,
                     method: str = "auto", norms: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0
                     ) -> Tuple[NDArray[np.float64], Optional[NDArray[np.float64]], Dict[str, Any]]: ...
def fill_dla_table_rows_f64(W_O: NDArray[np.float64], directions: NDArray[np.float64], rows: _I64, table: NDArray[np.float64], center: bool = True,
                            n_threads: int = 0) -> None: ...
def build_dla_table_f64(W_O: NDArray[np.float64], directions: NDArray[np.float64], center: bool = True, n_threads: int = 0) -> NDArray[np.float64]: ...

# ---- bfloat16 (uint16 bits) inputs
def fused_attribution_bf16(z: NDArray[np.uint16], W_O: NDArray[np.uint16], directions: NDArray[np.uint16], scale: NDArray[np.float32], writers: _I64,
                          extra_nodes: Optional[NDArray[np.uint16]] = None, direction_ids: Optional[_I64] = None,
                          incorrect_ids: Optional[_I64] = None, center: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0,
                          tile_tokens: int = 0, chunk_cols: int = 0) -> Tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]: ...
def dla_fixed_bf16(z: NDArray[np.uint16], W_O: NDArray[np.uint16], directions: NDArray[np.uint16], scale: NDArray[np.float32], center: bool = True, norms: bool = True,
                  check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0) -> Tuple[NDArray[np.float32], Optional[NDArray[np.float32]], Dict[str, Any]]: ...
def dla_gathered_bf16(z: NDArray[np.uint16], W_O: NDArray[np.uint16], directions: NDArray[np.uint16], scale: NDArray[np.float32], direction_ids: _I64,
                     incorrect_ids: Optional[_I64] = None, center: bool = True, table: Optional[NDArray[np.float32]] = None,
                     method: str = "auto", norms: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0
                     ) -> Tuple[NDArray[np.float32], Optional[NDArray[np.float32]], Dict[str, Any]]: ...
def fill_dla_table_rows_bf16(W_O: NDArray[np.uint16], directions: NDArray[np.uint16], rows: _I64, table: NDArray[np.float32], center: bool = True,
                            n_threads: int = 0) -> None: ...
def build_dla_table_bf16(W_O: NDArray[np.uint16], directions: NDArray[np.uint16], center: bool = True, n_threads: int = 0) -> NDArray[np.float32]: ...

# ---- float16 (uint16 bits) inputs
def fused_attribution_f16(z: NDArray[np.uint16], W_O: NDArray[np.uint16], directions: NDArray[np.uint16], scale: NDArray[np.float32], writers: _I64,
                          extra_nodes: Optional[NDArray[np.uint16]] = None, direction_ids: Optional[_I64] = None,
                          incorrect_ids: Optional[_I64] = None, center: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0,
                          tile_tokens: int = 0, chunk_cols: int = 0) -> Tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]: ...
def dla_fixed_f16(z: NDArray[np.uint16], W_O: NDArray[np.uint16], directions: NDArray[np.uint16], scale: NDArray[np.float32], center: bool = True, norms: bool = True,
                  check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0) -> Tuple[NDArray[np.float32], Optional[NDArray[np.float32]], Dict[str, Any]]: ...
def dla_gathered_f16(z: NDArray[np.uint16], W_O: NDArray[np.uint16], directions: NDArray[np.uint16], scale: NDArray[np.float32], direction_ids: _I64,
                     incorrect_ids: Optional[_I64] = None, center: bool = True, table: Optional[NDArray[np.float32]] = None,
                     method: str = "auto", norms: bool = True, check_finite: bool = False, check_outputs: bool = False, n_threads: int = 0
                     ) -> Tuple[NDArray[np.float32], Optional[NDArray[np.float32]], Dict[str, Any]]: ...
def fill_dla_table_rows_f16(W_O: NDArray[np.uint16], directions: NDArray[np.uint16], rows: _I64, table: NDArray[np.float32], center: bool = True,
                            n_threads: int = 0) -> None: ...
def build_dla_table_f16(W_O: NDArray[np.uint16], directions: NDArray[np.uint16], center: bool = True, n_threads: int = 0) -> NDArray[np.float32]: ...

# ---- scan aggregation, float32 values
def series_stats_batch_f32(values: NDArray[np.float32], bucket: _I64, n_buckets: int, lo: float, inv_width: float, n_bins: int,
                           hist: _I64, n_threads: int = 0) -> Tuple[_I64, NDArray[np.float64], NDArray[np.float64]]: ...
def ratio_stats_batch_f32(blocks: Sequence[NDArray[np.float32]], divisor: NDArray[np.float32], bucket: _I64, n_buckets: int, lo: float,
                          inv_width: float, n_bins: int, hist: _I64, n_threads: int = 0
                          ) -> Tuple[_I64, NDArray[np.float64], NDArray[np.float64]]: ...
def pair_stats_batch_f32(dots: NDArray[np.float32], norms: NDArray[np.float32], null_dots: NDArray[np.float32], resid_norm: NDArray[np.float64], writers: _I64,
                         pairs: _I64, lo: NDArray[np.float64], inv_width: NDArray[np.float64], n_bins: _I64,
                         hists: Sequence[_I64], bucket: _I64, n_buckets: int, n_threads: int = 0
                         ) -> Tuple[_I64, NDArray[np.float64], NDArray[np.float64]]: ...
def null_dots_f32(x: Sequence[NDArray[np.float32]], dirs: Sequence[NDArray[np.float32]], offsets: _I64, n_rows: int,
                  n_threads: int = 0) -> NDArray[np.float32]:
    """out [n_rows, T]: out[offsets[k] + c, t] = sum_i x[k][t, i] dirs[k][i, c] (x[k] [T, depth_k] read in place,
    rows contiguous; dirs[k] [depth_k, n_cols_k]); the tasks' rows must tile [0, n_rows) exactly."""

# ---- scan aggregation, float64 values
def series_stats_batch_f64(values: NDArray[np.float64], bucket: _I64, n_buckets: int, lo: float, inv_width: float, n_bins: int,
                           hist: _I64, n_threads: int = 0) -> Tuple[_I64, NDArray[np.float64], NDArray[np.float64]]: ...
def ratio_stats_batch_f64(blocks: Sequence[NDArray[np.float64]], divisor: NDArray[np.float64], bucket: _I64, n_buckets: int, lo: float,
                          inv_width: float, n_bins: int, hist: _I64, n_threads: int = 0
                          ) -> Tuple[_I64, NDArray[np.float64], NDArray[np.float64]]: ...
def pair_stats_batch_f64(dots: NDArray[np.float64], norms: NDArray[np.float64], null_dots: NDArray[np.float64], resid_norm: NDArray[np.float64], writers: _I64,
                         pairs: _I64, lo: NDArray[np.float64], inv_width: NDArray[np.float64], n_bins: _I64,
                         hists: Sequence[_I64], bucket: _I64, n_buckets: int, n_threads: int = 0
                         ) -> Tuple[_I64, NDArray[np.float64], NDArray[np.float64]]: ...
def null_dots_f64(x: Sequence[NDArray[np.float64]], dirs: Sequence[NDArray[np.float64]], offsets: _I64, n_rows: int,
                  n_threads: int = 0) -> NDArray[np.float64]: ...

# ---- dispatch and build facts
def dla_prefer_table(n_unique: int, n_valid_tokens: int, d_model: int) -> bool: ...
def select_cpu_path(name: str) -> str:
    """'auto' or a path name (portable, avx2, avx512, avx512_bf16, amx); ValueError for an unknown path, one not
    compiled in or one this CPU cannot run. Returns the selected path."""
def cpu_paths() -> Dict[str, Dict[str, Any]]:
    """{path: {compiled, runs_here, missing, simd}}, most portable first."""
def build_info() -> Dict[str, Any]:
    """{openmp, max_threads, cpu_arch, cpu_path, best_cpu_path, cpu_paths, simd, tile_tokens,
    chunk_cols, mapped_output_bytes (outputs from this size have their pages mapped before the kernel
    writes them; None: never), compiler}."""
def scratch_info() -> Dict[str, Any]:
    """{min_bytes (scratch from this size comes from the pool of kept mappings; None: never),
    keep_bytes (the most the pool keeps between calls), kept_bytes, kept_blocks (now)}."""
def release_scratch() -> None:
    """Releases every scratch buffer the pool keeps to the system."""
