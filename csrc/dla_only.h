// DLA-only CPU kernels: direct logit attribution without forming any head's d_model output.
//
// Identities (shared/erasure-math.md): c(r) . d = r . c(d) and r . v = z . (W_O v), so
//   dla[t, n] = z[t, n, :] . A[n, :] / s[t],   A[n, :] = W_O[n] @ c(d)   (d_head long, per head).
// A is formed once per distinct direction (fixed set: the K rows; gathered: the distinct
// (direction_id, incorrect_id) pairs of the call, or a prebuilt table over all K rows), so the
// per-token cost is d_head FMAs per head per direction instead of d_head * d_model.
//
// The contract's norms [T, N] = |r_n|^2 are computed on request as the quadratic form
// z^T G_n z with the per-head Gram matrix G_n = W_O[n] W_O[n]^T (d_head^2 FMAs per head per token).
//
// Shapes as in fused_attribution.h: z [T, N, H], W_O [N, H, D], directions [K, D], scale [T].
// Arguments are NOT checked here (bindings.cpp does it). Accumulation in float for fp32 / bf16 /
// fp16 inputs, double for fp64. Results are deterministic and independent of the thread count: every output element
// is reduced in an order fixed by the shapes (and, for gathered DLA, by the set of distinct ids),
// never by which thread computes it.
#pragma once

#include <cstdint>

#include "input_formats.h"

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

// Input formats (`In`: Native<float>, Native<double>, Bf16, F16; see input_formats.h): floating
// inputs are converted on load; a table and every output are in In::acc.

// Fixed set: dla [T, N, K] = z . (W_O c(d_k)) / s. norms [T, N] (nullable: skipped).
template <typename In>
DlaRunInfo dla_fixed(const typename In::storage* z, const typename In::storage* W_O,
                     const typename In::storage* directions, const typename In::acc* scale,
                     int64_t n_tokens, int64_t n_heads, int64_t d_head, int64_t d_model,
                     int64_t n_dirs, bool center, typename In::acc* dla, typename In::acc* norms,
                     int n_threads);

// Gathered: dla [T, N], NaN where direction_ids[t] < 0 or incorrect_ids[t] < 0.
// table: nullable [K, N, H] built by build_dla_table from the same W_O / directions / center.
template <typename In>
DlaRunInfo dla_gathered(const typename In::storage* z, const typename In::storage* W_O,
                        const typename In::storage* directions, const typename In::acc* scale,
                        const int64_t* direction_ids, const int64_t* incorrect_ids /* nullable */,
                        const typename In::acc* table /* nullable */, int64_t n_tokens,
                        int64_t n_heads, int64_t d_head, int64_t d_model, int64_t n_dirs,
                        bool center, DlaMethod method, typename In::acc* dla,
                        typename In::acc* norms, int n_threads);

// table [K, N, H]: table[k, n, :] = W_O[n] @ c(directions[k]) (K * N * H * D FMAs, OpenMP over k).
template <typename In>
void build_dla_table(const typename In::storage* W_O, const typename In::storage* directions,
                     int64_t n_heads, int64_t d_head, int64_t d_model, int64_t n_dirs, bool center,
                     typename In::acc* table, int n_threads);

// table[rows[r], n, :] = W_O[n] @ c(directions[rows[r]]) for r < n_rows (rows in [0, K); the other
// rows of table [K, N, H] are left as they are): fills a lazily built table on demand.
template <typename In>
void fill_dla_table_rows(const typename In::storage* W_O, const typename In::storage* directions,
                         const int64_t* rows, int64_t n_rows, int64_t n_heads, int64_t d_head,
                         int64_t d_model, bool center, typename In::acc* table, int n_threads);

// The auto rule of dla_gathered (exposed for tests / docs): true = use the table.
bool prefer_table(int64_t n_unique, int64_t n_valid_tokens, int64_t d_model);

}  // namespace ef
