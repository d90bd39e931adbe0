// DLA-only CPU kernels: direct logit attribution without forming any head's d_model output.
//
// Identities (docs/math.md): c(r) . d = r . c(d) and r . v = z . (W_O v), so
//   dla[t, n] = z[t, n, :] . A[n, :] / s[t],   A[n, :] = W_O[n] @ c(d)   (d_head long, per head).
// A is formed once per distinct direction (fixed set: the K rows; gathered: the distinct
// (direction_id, incorrect_id) pairs of the call, or a prebuilt table over all K rows), so the
// per-token cost is d_head FMAs per head per direction instead of d_head * d_model.
//
// The contract's norms [T, N] = |r_n|^2 are computed on request as the quadratic form
// z^T G_n z with the per-head Gram matrix G_n = W_O[n] W_O[n]^T (d_head^2 FMAs per head per token).
//
// Shapes as in fused_attribution.h: z [T, N, H], W_O [N, H, D], directions [K, D], scale [T].
// Arguments (DlaParams / DlaTableParams, below) are NOT checked here (bindings.cpp does it). Accumulation in float for fp32 / bf16 /
// fp16 inputs, double for fp64. Results are deterministic and independent of the thread count: every output element
// is reduced in an order fixed by the shapes (and, for gathered DLA, by the set of distinct ids),
// never by which thread computes it.
#pragma once

#include <cstdint>

#include "input_formats.h"
#include "kernel_isa.h"

namespace ef {

// How gathered DLA obtains its per-head directions A.
enum class DlaMethod : int {
  kAuto = 0,    // the table when one is given and the cost model prefers it, else unique reduction
  kUnique = 1,  // build A only for the distinct (id, incorrect id) pairs of the call
  kTable = 2,   // gather from a prebuilt table [K, N, H] (needs table != nullptr)
};

struct DlaRunInfo {
  int method = 0;        // DlaMethod actually used (kUnique or kTable; kUnique for fixed mode)
  int64_t n_unique = 0;  // distinct (id, incorrect id) pairs with a target (fixed mode: K)
};

// The auto rule of dla_gathered (exposed for tests / docs): true = use the table. Measured on the
// 2-core AVX2 machine (GELU-4L shape, T = 8192 tokens, N = 32, d_head = 64, d_model = 512,
// V = 48262, fp32, 2 threads, DLA only; the machine was shared with other jobs (load ~3.5), so
// times are +-2x and quantised to ~4 ms):
//   table gather:     8-16 ms for any id mix (z plus one 8 KiB table row per token from DRAM);
//   unique reduction: ~16 ms + U * ~35 us (U distinct ids: U * N*H*D FMAs on the GEMM builder):
//     U = 1: 16 ms, 16: 24 ms, 64: 31 ms, 256: 44 ms, 1023: 59 ms, 3525: 139 ms,
//     Zipf(1.3) ids (U = 1145): 71 ms vs table 8 ms; uniform ids (U = 7490): 295 ms vs table 16 ms.
// The table costs one extra DRAM row per token (~ as much as reading z again); the unique build
// costs N*H*D FMAs per distinct id. Break-even measured at U ~ 100-200 for T = 8192, i.e.
// U * d_model ~ 8 * T: above it the table wins. Building the table itself: ~3.6 s, 377 MiB.
constexpr int64_t kTableRatio = 8;
constexpr bool prefer_table(int64_t n_unique, int64_t n_valid_tokens, int64_t d_model) {
  return n_unique * d_model > kTableRatio * n_valid_tokens;
}

// Everything one DLA-only call needs (dla_fixed, dla_gathered), filled and checked by bindings.cpp
// (dla_params).
template <typename In>
struct DlaParams {
  using S = typename In::storage;
  using A = typename In::acc;
  const S* z = nullptr;                   // [T, N, H]
  const S* W_O = nullptr;                 // [N, H, D]
  const S* directions = nullptr;          // [K, D]
  const A* scale = nullptr;               // [T]
  const int64_t* direction_ids = nullptr; // gathered: [T] in [-1, K) (fixed: unused)
  const int64_t* incorrect_ids = nullptr; // gathered, nullable: [T] in [-1, K)
  const A* table = nullptr;               // gathered, nullable: [K, N, H] from build_dla_table
  int64_t n_tokens = 0, n_heads = 0, d_head = 0, d_model = 0, n_dirs = 0;
  bool center = true;
  DlaMethod method = DlaMethod::kAuto;    // gathered only
  A* dla = nullptr;    // fixed: [T, N, K]; gathered: [T, N]
  A* norms = nullptr;  // nullable: [T, N]
  // nullable: check z as it is read and set kNonfiniteZ here when it holds a NaN or an infinity
  // (the outputs are then meaningless)
  unsigned* nonfinite = nullptr;
  // nullable: check dla (where a token has a target) and norms as they are written and set
  // kNonfiniteDla / kNonfiniteNorms here for a NaN or an infinity (an overflow of the accumulation type)
  unsigned* out_nonfinite = nullptr;
  int n_threads = 0;
};

// Everything one DLA-table call needs (build_dla_table, fill_dla_table_rows), filled and checked by
// bindings.cpp (dla_table_params).
template <typename In>
struct DlaTableParams {
  using S = typename In::storage;
  const S* W_O = nullptr;           // [N, H, D]
  const S* directions = nullptr;    // [K, D]
  const int64_t* rows = nullptr;    // fill_dla_table_rows: [n_rows] in [0, K)
  int64_t n_rows = 0;
  int64_t n_heads = 0, d_head = 0, d_model = 0, n_dirs = 0;
  bool center = true;
  typename In::acc* table = nullptr;  // [K, N, H]
  int n_threads = 0;
};

namespace EF_ISA {

// Input formats (`In`: Native<float>, Native<double>, Bf16, F16; see input_formats.h): floating
// inputs are converted on load; a table and every output are in In::acc.

// Fixed set: dla [T, N, K] = z . (W_O c(d_k)) / s. norms [T, N] (nullable: skipped).
template <typename In>
DlaRunInfo dla_fixed(const DlaParams<In>& p);

// Gathered: dla [T, N], NaN where direction_ids[t] < 0 or incorrect_ids[t] < 0.
// table: nullable [K, N, H] built by build_dla_table from the same W_O / directions / center.
template <typename In>
DlaRunInfo dla_gathered(const DlaParams<In>& p);

// table [K, N, H]: table[k, n, :] = W_O[n] @ c(directions[k]) (K * N * H * D FMAs, OpenMP over k).
template <typename In>
void build_dla_table(const DlaTableParams<In>& p);

// table[rows[r], n, :] = W_O[n] @ c(directions[rows[r]]) for r < n_rows (rows in [0, K); the other
// rows of table [K, N, H] are left as they are): fills a lazily built table on demand.
template <typename In>
void fill_dla_table_rows(const DlaTableParams<In>& p);

}  // namespace EF_ISA
}  // namespace ef
