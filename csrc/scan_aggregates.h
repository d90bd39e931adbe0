// The compiled parts of a scan's aggregation: one batch of its running statistics (erasure_fast/scanning/aggregate.py, SeriesStats.update):
// per series and position bucket, a fixed-bin histogram and the batch's count, mean and sum of
// squared deviations, which Python then merges into the running values (Chan et al.).
//
// values [T, S] (float or double), bucket [T] in [0, B). For every finite value v of series s at
// token t, with b = bucket[t]:
//   bin = clamp(floor((v - lo) * inv_width), -1, n_bins) + 1   (in the values' own type, exactly as
//         the Python reference computes it: 0 = underflow, n_bins + 1 = overflow)
//   hist[b, s, bin] += 1;  count[b, s] += 1;  mean[b, s] = sum(v) / count (double);
//   m2[b, s] = sum((v - mean)^2) (double, second pass over the batch).
// Non-finite values are skipped (the caller counts them as NaN). Every series is reduced over t in
// token order by one thread, so results do not depend on the thread count.
// Arguments (one params struct per entry, below) are NOT checked here (bindings.cpp does it).
#pragma once

#include <cstdint>

#include "kernel_isa.h"

namespace ef {

// Statistics per pair of pair_stats_batch (below).
constexpr int kPairStats = 9;

// Everything one pair_stats_batch call needs (see pair_stats_batch below), filled and checked by
// bindings.cpp (pair_stats_params).
template <typename T>
struct PairStatsParams {
  const T* dots = nullptr;              // [T, n_nodes, W], rows dots_stride elements apart
  int64_t dots_stride = 0;
  const T* norms = nullptr;             // [T, n_nodes]
  const T* null_dots = nullptr;         // [T, P]
  const double* resid_norm = nullptr;   // [T]
  const int64_t* writers = nullptr;     // [W] node indices
  const int64_t* pairs = nullptr;       // [P] flat node * W + writer
  int64_t n_tokens = 0, n_nodes = 0, n_writers = 0, n_pairs = 0;
  const int64_t* bucket = nullptr;      // [T] in [0, n_buckets)
  int64_t n_buckets = 1;
  const int64_t* hist_buckets = nullptr;  // [kPairStats] 1 (every token in one) or n_buckets
  const double* lo = nullptr;           // [kPairStats]
  const double* inv_width = nullptr;    // [kPairStats]
  const int64_t* n_bins = nullptr;      // [kPairStats]
  int64_t* const* hists = nullptr;      // kPairStats arrays [hist_buckets[k], P, n_bins[k] + 2], added in place
  int64_t* count = nullptr;             // [kPairStats, n_buckets, P]
  double* mean = nullptr;               // [kPairStats, n_buckets, P]
  double* m2 = nullptr;                 // [kPairStats, n_buckets, P]
  int n_threads = 0;
};

// Everything one series_stats_batch call needs, filled and checked by bindings.cpp
// (series_params, ratio_params). The series are the columns of n_blocks blocks: block k holds
// n_series[k] consecutive series whose values at token t start at blocks[k] + t * token_stride[k]
// (each block's row contiguous, any token stride: a view of a larger array is read in place), all
// series numbered block after block (values [T, S]: one block, token stride S). With a divisor
// [T, n_div] (C-contiguous; null: none) series s of the whole is binned as
//   v = value / divisor[t, s % n_div]   (NaN where divisor == 0, as the contract's safe_div)
// so for blocks of dots [T, R_k, W] and divisor = the writers' squared norms [T, W], the series are
// the projection ratios of every (row, writer), never materialised.
template <typename T>
struct SeriesStatsParams {
  const T* const* blocks = nullptr;
  const int64_t* n_series = nullptr;      // [n_blocks]
  const int64_t* token_stride = nullptr;  // [n_blocks], in elements
  int n_blocks = 0;
  const T* divisor = nullptr;             // nullable: [T, n_div]
  int64_t n_div = 1;
  const int64_t* bucket = nullptr;        // [T] in [0, n_buckets)
  int64_t n_tokens = 0, n_buckets = 0;
  T lo = 0, inv_width = 0;
  int64_t n_bins = 0;
  int64_t* hist = nullptr;                // [B, S, n_bins + 2], added in place (S = sum n_series)
  int64_t* count = nullptr;               // [B, S]
  double* mean = nullptr;                 // [B, S]
  double* m2 = nullptr;                   // [B, S]
  int n_threads = 0;
};

namespace EF_ISA {

// One batch of the statistics above over the total sum(n_series) series.
template <typename T>
void series_stats_batch(const SeriesStatsParams<T>& p);

// The ranking statistics of (node, writer) pairs (erasure_fast/scanning/pair_stats.py, pair_values)
// computed per token in double and folded straight into their histograms and moments, per position
// bucket, without materialising them. dots [T, n_nodes, W] is read in place: its [n_nodes, W] rows are
// contiguous, dots_stride elements apart (a view of a larger array). For pair p = node * W + writer
// (pairs [P]) at token t:
//   d = dots[t, p], nd = null_dots[t, j] (j = the pair's position in pairs: null_dots is [T, P]),
//   a = sqrt(max(norms[t, node], 0)),
//   w = sqrt(max(norms[t, writers[writer]], 0)), x = resid_norm[t], q(n, m) = m == 0 ? NaN : n / m,
//   pr = q(d, w w), pv = q(d, w), cos = clamp(q(d, a w), -1, 1), pr0 = q(nd, w), cos0 = clamp(q(nd, a), -1, 1)
//   stat 0..8 = es q(pv |cos|, x), apr pr |cos|, pv, cos, es_null q(nd |cos0|, x), apr_null pr0 |cos0|,
//               pr_null pr0, pv_null nd, cos_null cos0   (clamp keeps NaN)
// and statistic k is binned as series_stats_batch does with (lo[k], inv_width[k], n_bins[k]) into
// hists[k] [B_k, P, n_bins[k] + 2], B_k = hist_buckets[k]: row bucket[t] when B_k = n_buckets, row 0
// when B_k = 1 (every token); count / mean / m2 [kPairStats, n_buckets, P] likewise (a statistic of
// one bucket fills its bucket 0). Every pair is reduced over t in token order by one thread.
// Arguments are NOT checked here (bindings.cpp does it).
template <typename T>
void pair_stats_batch(const PairStatsParams<T>& p);

}  // namespace EF_ISA
}  // namespace ef
