// Fused DLA + erasure dot products on the CPU (the kernel behind erasure_fast._C).
//
// Semantics are those of erasure_fast/contract.py (reference: erasure_fast/backends/torch_ref.py).
// Shapes: z [T, N, H], W_O [N, H, D], directions [K, D], scale [T], writers [W] (values in [0, N)),
// extra [T, M, D] (may be null when M = 0), direction_ids / incorrect_ids [T] in [-1, K) or null.
// Outputs (caller-allocated, C-contiguous): dla [T, N] (gathered mode, direction_ids != null) or
// [T, N, K] (fixed mode), dots [T, N + M, W], norms [T, N + M].
//
// Arguments are NOT checked here: every check lives in bindings.cpp. Input formats (`In`, see
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
namespace EF_ISA {

template <typename In>
void fused_attribution(const typename In::storage* z, const typename In::storage* W_O,
                       const typename In::storage* directions, const typename In::acc* scale,
                       const int64_t* writers, const typename In::storage* extra,
                       const int64_t* direction_ids,  // nullable: fixed-set mode
                       const int64_t* incorrect_ids,  // nullable
                       int64_t n_tokens, int64_t n_heads, int64_t d_head, int64_t d_model,
                       int64_t n_dirs, int64_t n_writers, int64_t n_extra, bool center,
                       typename In::acc* dla, typename In::acc* dots, typename In::acc* norms,
                       int n_threads = 0,      // <= 0: OpenMP default
                       int tile_tokens = 0,    // <= 0: default tile (tokens per work item)
                       int chunk_cols = 0);    // <= 0: default d_model columns per pass

// The defaults of tile_tokens and chunk_cols on this path (reported by _C.build_info()).
int default_tile_tokens();
int default_chunk_cols();

// The same contract with tokens in the SIMD lanes (fused_lanes.cpp): the AVX-512 path's kernel.
// tile_tokens: rounded up to a multiple of the lane tile; chunk_cols: d_model columns per pass.
template <typename In>
void fused_attribution_lanes(const typename In::storage* z, const typename In::storage* W_O,
                             const typename In::storage* directions, const typename In::acc* scale,
                             const int64_t* writers, const typename In::storage* extra,
                             const int64_t* direction_ids, const int64_t* incorrect_ids,
                             int64_t n_tokens, int64_t n_heads, int64_t d_head, int64_t d_model,
                             int64_t n_dirs, int64_t n_writers, int64_t n_extra, bool center,
                             typename In::acc* dla, typename In::acc* dots, typename In::acc* norms,
                             int n_threads, int tile_tokens, int chunk_cols);
int lanes_default_tile_tokens();
int lanes_default_chunk_cols();

}  // namespace EF_ISA
}  // namespace ef
