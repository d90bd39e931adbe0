// Fused DLA + erasure dot products on the CPU (the kernel behind erasure_fast._C).
//
// Semantics are those of erasure_fast/contract.py (reference: erasure_fast/backends/torch_ref.py).
// Shapes: z [T, N, H], W_O [N, H, D], directions [K, D], scale [T], writers [W] (values in [0, N)),
// extra [T, M, D] (may be null when M = 0), direction_ids / incorrect_ids [T] in [-1, K) or null.
// Outputs (caller-allocated, C-contiguous): dla [T, N] (gathered mode, direction_ids != null) or
// [T, N, K] (fixed mode), dots [T, N + M, W], norms [T, N + M].
//
// Arguments (one FusedParams, below) are NOT checked here: every check lives in bindings.cpp. Input formats (`In`, see
// kernel_common.h): float32, float64, bfloat16 and float16 (the last two as raw uint16 bits); every
// floating input is converted on load. Accumulation and outputs are in `In::acc` (float for fp32 /
// bf16 / fp16, double for fp64). Results are deterministic and independent of the thread count:
// tokens are cut into fixed tiles starting at token 0 and every output element is reduced in a fixed
// order that does not depend on which thread computes it.
#pragma once

#include <cstdint>

#include "input_formats.h"
#include "kernel_isa.h"

namespace ef {

// Everything one fused_attribution call needs: inputs, sizes, flags, outputs and tuning, filled
// and checked by bindings.cpp (fused_params) and read by every path's kernel.
template <typename In>
struct FusedParams {
  using S = typename In::storage;
  using A = typename In::acc;
  // inputs (C-contiguous)
  const S* z = nullptr;                   // [T, N, H]
  const S* W_O = nullptr;                 // [N, H, D]
  const S* directions = nullptr;          // [K, D]
  const A* scale = nullptr;               // [T]
  const int64_t* writers = nullptr;       // [W], values in [0, N)
  const S* extra = nullptr;               // [T, M, D]; null when M = 0
  const int64_t* direction_ids = nullptr; // [T] in [-1, K); null: fixed-set mode
  const int64_t* incorrect_ids = nullptr; // [T] in [-1, K); null: no logit difference
  // sizes
  int64_t n_tokens = 0, n_heads = 0, d_head = 0, d_model = 0, n_dirs = 0, n_writers = 0, n_extra = 0;
  bool center = true;
  // outputs (caller-allocated, C-contiguous)
  A* dla = nullptr;    // [T, N] (gathered) or [T, N, K] (fixed)
  A* dots = nullptr;   // [T, N + M, W]
  A* norms = nullptr;  // [T, N + M]
  // nullable: check the activations (z, extra) as they are read and set kNonfiniteZ /
  // kNonfiniteExtra here when they hold a NaN or an infinity (the outputs are then meaningless)
  unsigned* nonfinite = nullptr;
  // nullable: check the outputs as they are written (still in cache) and set kNonfiniteDla /
  // kNonfiniteDots / kNonfiniteNorms here for those with a NaN or an infinity where finite inputs
  // define them (an overflow of the accumulation type)
  unsigned* out_nonfinite = nullptr;
  // tuning
  int n_threads = 0;    // <= 0: OpenMP default
  int tile_tokens = 0;  // <= 0: default tile (tokens per work item)
  int chunk_cols = 0;   // <= 0: default d_model columns per pass
};

namespace EF_ISA {

template <typename In>
void fused_attribution(const FusedParams<In>& p);

// The defaults of tile_tokens and chunk_cols on this path (reported by _C.build_info()).
int default_tile_tokens();
int default_chunk_cols();

// The same contract with tokens in the SIMD lanes (fused_lanes.cpp): the AVX-512 path's kernel.
// tile_tokens: rounded up to a multiple of the lane tile; chunk_cols: d_model columns per pass.
template <typename In>
void fused_attribution_lanes(const FusedParams<In>& p);
int lanes_default_tile_tokens();
int lanes_default_chunk_cols();

}  // namespace EF_ISA
}  // namespace ef
