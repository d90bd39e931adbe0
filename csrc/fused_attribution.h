// Fused DLA + erasure dot products on the CPU (the kernel behind erasure_fast._C).
//
// Semantics are those of erasure_fast/contract.py (reference: erasure_fast/backends/torch_ref.py).
// Shapes: z [T, N, H], W_O [N, H, D], directions [K, D], scale [T], writers [W] (values in [0, N)),
// extra [T, M, D] (may be null when M = 0), direction_ids / incorrect_ids [T] in [-1, K) or null.
// Outputs (caller-allocated, C-contiguous): dla [T, N] (gathered mode, direction_ids != null) or
// [T, N, K] (fixed mode), dots [T, N + M, W], norms [T, N + M].
//
// Arguments are NOT checked here: every check lives in bindings.cpp. Accumulation is in T (float for
// fp32 input, double for fp64). Results are deterministic and independent of the thread count:
// tokens are cut into fixed tiles starting at token 0 and every output element is reduced in a fixed
// order that does not depend on which thread computes it.
#pragma once

#include <cstdint>

namespace ef {

template <typename T>
void fused_attribution(const T* z, const T* W_O, const T* directions, const T* scale,
                       const int64_t* writers, const T* extra,
                       const int64_t* direction_ids,  // nullable: fixed-set mode
                       const int64_t* incorrect_ids,  // nullable
                       int64_t n_tokens, int64_t n_heads, int64_t d_head, int64_t d_model,
                       int64_t n_dirs, int64_t n_writers, int64_t n_extra, bool center,
                       T* dla, T* dots, T* norms,
                       int n_threads = 0,     // <= 0: OpenMP default
                       int tile_tokens = 0);  // <= 0: default tile (tokens per work item)

extern template void fused_attribution<float>(const float*, const float*, const float*, const float*,
                                              const int64_t*, const float*, const int64_t*,
                                              const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, int64_t, int64_t, bool, float*, float*,
                                              float*, int, int);
extern template void fused_attribution<double>(const double*, const double*, const double*,
                                               const double*, const int64_t*, const double*,
                                               const int64_t*, const int64_t*, int64_t, int64_t,
                                               int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                                               double*, double*, double*, int, int);

// Build facts reported by _C.build_info().
bool openmp_enabled();
int max_threads();
const char* cpu_arch();   // EF_CPU_ARCH the module was built with: native / avx2 / portable
const char* simd_path();  // what the kernel actually uses: "avx2+fma", "avx2" or "scalar"
int default_tile_tokens();

}  // namespace ef
