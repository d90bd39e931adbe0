// Histograms and moments of one scan batch; see scan_aggregates.h for the contracts.
#include "scan_aggregates.h"
#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ef {
namespace EF_ISA {
namespace {

using namespace detail;

// Series per work item: a block's histogram rows and accumulators stay with one thread, and one
// token's values of the block (kBlock * 4 or 8 bytes) are read contiguously.
constexpr int64_t kBlock = 64;
// Tokens ahead whose values are prefetched: a work item reads a few lines of each token's row, rows
// a page or more apart (a view of the fused kernel's dots), which the hardware prefetchers do not
// follow across pages; without it every row is a DRAM miss (half of the ratio statistics' time).
constexpr int64_t kAhead = 8;

// clamp(v, -1, 1) that keeps NaN (as torch.clamp does).
inline double clamp_unit(double v) { return v < -1.0 ? -1.0 : (v > 1.0 ? 1.0 : v); }

// The division is done unconditionally and the result selected, so loops over it vectorise.
inline double nan_div(double num, double den) {
  const double q = num / den;
  return den == 0.0 ? std::numeric_limits<double>::quiet_NaN() : q;
}

// One work item's running statistics of up to kBlock series per slot (a position bucket, or a pair
// statistic's bucket), in one pass: counts and sums of (v - shift) and (v - shift)^2, shift = the
// series' value at the slot's first token of the batch (0 if not finite), so the variance does not
// cancel: its error grows only with ((mean - shift) / std)^2, and one sample lies within a few std
// of the mean.
class SlotMoments {
 public:
  explicit SlotMoments(int64_t n_slots)
      : cnt_(static_cast<size_t>(n_slots * kBlock), 0), shift_(cnt_.size(), 0.0), s1_(cnt_.size(), 0.0),
        s2_(cnt_.size(), 0.0), shifted_(static_cast<size_t>(n_slots), 0) {}

  // One token's values v[0, n) of a slot: binned as scan_aggregates.h says (bin = clamp(floor((v - lo)
  // * inv_width), -1, top) + 1 in V) into rows h + row_off[j], and folded into the moments. A
  // not-finite value adds 0 to its row's first bin, so the increments have no branch.
  template <typename V>
  void add(int64_t slot, const V* v, int64_t n, V lo, V inv_width, V top, const int64_t* row_off, int64_t* h) {
    double* sh = shift_.data() + slot * kBlock;
    if (!shifted_[slot]) {
      for (int64_t j = 0; j < n; ++j) sh[j] = std::isfinite(v[j]) ? static_cast<double>(v[j]) : 0.0;
      shifted_[slot] = 1;
    }
    int64_t* c = cnt_.data() + slot * kBlock;
    double* a1 = s1_.data() + slot * kBlock;
    double* a2 = s2_.data() + slot * kBlock;
    alignas(64) int64_t off[kBlock], inc[kBlock];
    for (int64_t j = 0; j < n; ++j) {  // element-wise (vectorised)
      const V x = v[j];
      const bool finite = std::isfinite(x);
      V f = std::floor((x - lo) * inv_width);
      f = f < V(-1) ? V(-1) : (f > top ? top : f);
      off[j] = row_off[j] + static_cast<int32_t>(finite ? f : V(-1)) + 1;  // int32 first: as AVX2 converts
      inc[j] = finite ? 1 : 0;
      const double dv = finite ? static_cast<double>(x) - sh[j] : 0.0;
      c[j] += inc[j];
      a1[j] += dv;
      a2[j] += dv * dv;
    }
    for (int64_t j = 0; j < n; ++j) h[off[j]] += inc[j];
  }

  // The slot's count, mean and m2 of series j < n, written to count[j], mean[j], m2[j].
  void write(int64_t slot, int64_t n, int64_t* count, double* mean, double* m2) const {
    for (int64_t j = 0; j < n; ++j) {
      const size_t k = static_cast<size_t>(slot * kBlock + j);
      const int64_t c = cnt_[k];
      count[j] = c;
      mean[j] = c > 0 ? shift_[k] + s1_[k] / static_cast<double>(c) : 0.0;
      m2[j] = c > 0 ? std::max(s2_[k] - s1_[k] * s1_[k] / static_cast<double>(c), 0.0) : 0.0;
    }
  }

 private:
  Vec<int64_t> cnt_;
  Vec<double> shift_, s1_, s2_;
  Vec<char> shifted_;
};

// One work item of the series statistics: ns (<= kBlock) consecutive series, the first of them
// number s0 of the whole (hist / count / mean / m2 are indexed by it), read at values + t * stride;
// with a divisor, divided by divisor[t, (s0 + j) % n_div] first.
template <typename T>
struct SeriesBlock {
  const T* values;
  int64_t stride, s0, ns;
};

template <typename T>
void series_stats_blocks(const Vec<SeriesBlock<T>>& work, int64_t n_series, const T* divisor,
                         int64_t n_div, const int64_t* bucket, int64_t n_tokens, int64_t n_buckets, T lo,
                         T inv_width, int64_t n_bins, int64_t* hist, int64_t* count, double* mean, double* m2,
                         int n_threads) {
  const int64_t nb2 = n_bins + 2;
  const int64_t n_items = static_cast<int64_t>(work.size());
  const T top = static_cast<T>(n_bins);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const int nthr = resolve_threads(n_threads, n_items);
  (void)nthr;
#pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
  for (int64_t item = 0; item < n_items; ++item) {
    const SeriesBlock<T> blk = work[static_cast<size_t>(item)];
    const int64_t s0 = blk.s0, ns = blk.ns;
    SlotMoments moments(n_buckets);  // one slot per bucket
    alignas(64) T ratio[kBlock], den_j[kBlock];
    alignas(64) int64_t row_off[kBlock];  // each series' histogram row, from the block's first
    for (int64_t j = 0; j < ns; ++j) row_off[j] = j * nb2;
    const int64_t c0 = divisor != nullptr ? s0 % n_div : 0;
    for (int64_t t = 0; t < n_tokens; ++t) {
      const T* row = blk.values + t * blk.stride;
      if (t + kAhead < n_tokens) prefetch_span(row + kAhead * blk.stride, ns * static_cast<int64_t>(sizeof(T)));
      if (divisor != nullptr) {
        // the divisors of series s0 + j are den[(c0 + j) % n_div]: copied as runs, then one
        // vectorised division loop (a gather inside it kept every division scalar)
        const T* den = divisor + t * n_div;
        for (int64_t j = 0, c = c0; j < ns; c = 0) {
          const int64_t run = std::min(ns - j, n_div - c);
          for (int64_t i = 0; i < run; ++i) den_j[j + i] = den[c + i];
          j += run;
        }
        for (int64_t j = 0; j < ns; ++j) {
          const T d = den_j[j];
          const T q = row[j] / d;
          ratio[j] = d == T(0) ? nan : q;
        }
        row = ratio;
      }
      const int64_t b = bucket[t];
      moments.add(b, row, ns, lo, inv_width, top, row_off, hist + (b * n_series + s0) * nb2);
    }
    for (int64_t b = 0; b < n_buckets; ++b) {
      const int64_t at = b * n_series + s0;
      moments.write(b, ns, count + at, mean + at, m2 + at);
    }
  }
}

// Work items of kBlock series, cut within each input block (a work item reads one row pointer).
template <typename T>
Vec<SeriesBlock<T>> cut_blocks(const T* const* blocks, const int64_t* n_series, const int64_t* token_stride,
                                       int n_blocks, int64_t* total) {
  Vec<SeriesBlock<T>> work;
  int64_t s = 0;
  for (int k = 0; k < n_blocks; ++k) {
    for (int64_t j = 0; j < n_series[k]; j += kBlock)
      work.push_back({blocks[k] + j, token_stride[k], s + j, std::min(kBlock, n_series[k] - j)});
    s += n_series[k];
  }
  *total = s;
  return work;
}

}  // namespace

template <typename T>
void series_stats_batch(const SeriesStatsParams<T>& p) {
  int64_t total = 0;
  const auto work = cut_blocks(p.blocks, p.n_series, p.token_stride, p.n_blocks, &total);
  series_stats_blocks<T>(work, total, p.divisor, p.n_div, p.bucket, p.n_tokens, p.n_buckets, p.lo, p.inv_width,
                         p.n_bins, p.hist, p.count, p.mean, p.m2, p.n_threads);
}

template <typename T>
void pair_stats_batch(const PairStatsParams<T>& p) {
  const T* dots = p.dots;
  const int64_t dots_stride = p.dots_stride;
  const T* norms = p.norms;
  const T* null_dots = p.null_dots;
  const double* resid_norm = p.resid_norm;
  const int64_t* writers = p.writers;
  const int64_t* pairs = p.pairs;
  const int64_t n_tokens = p.n_tokens, n_nodes = p.n_nodes, n_writers = p.n_writers, n_pairs = p.n_pairs;
  const double* lo = p.lo;
  const double* inv_width = p.inv_width;
  const int64_t* n_bins = p.n_bins;
  int64_t* const* hists = p.hists;
  int64_t* count = p.count;
  double* mean = p.mean;
  double* m2 = p.m2;
  const int n_threads = p.n_threads;
  const int64_t* bucket = p.bucket;
  const int64_t n_buckets = p.n_buckets;
  constexpr int K = kPairStats;
  const int64_t n_blocks = (n_pairs + kBlock - 1) / kBlock;
  const int nthr = resolve_threads(n_threads, n_blocks);
  (void)nthr;
  // |node| per token, once (each is read by many pairs).
  Vec<double> node_norm(static_cast<size_t>(n_tokens * n_nodes));
  for (int64_t i = 0; i < n_tokens * n_nodes; ++i)
    node_norm[i] = std::sqrt(std::max(static_cast<double>(norms[i]), 0.0));
  // Local copies: the histogram writes (int64) could otherwise alias n_bins and force reloads.
  double lo_k[K], inv_k[K], top_k[K];
  int64_t stride_k[K];
  bool bucketed[K];
  for (int k = 0; k < K; ++k) {
    lo_k[k] = lo[k], inv_k[k] = inv_width[k], top_k[k] = static_cast<double>(n_bins[k]), stride_k[k] = n_bins[k] + 2;
    bucketed[k] = p.hist_buckets[k] > 1;
  }
#pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t p0 = blk * kBlock, np = std::min(n_pairs, p0 + kBlock) - p0;
    int64_t node[kBlock], writer[kBlock];
    for (int64_t j = 0; j < np; ++j) node[j] = pairs[p0 + j] / n_writers, writer[j] = writers[pairs[p0 + j] % n_writers];
    // slot k * n_buckets + bucket per statistic (a statistic of one bucket uses its bucket 0)
    SlotMoments moments(K * n_buckets);
    alignas(64) double d[kBlock], nd[kBlock], a[kBlock], w[kBlock], v[K][kBlock];
    alignas(64) int64_t row_off[K][kBlock];
    for (int k = 0; k < K; ++k)
      for (int64_t j = 0; j < np; ++j) row_off[k][j] = j * stride_k[k];
    // the block's part of a dots row, prefetched kAhead tokens ahead (as its null dots)
    const int64_t first = *std::min_element(pairs + p0, pairs + p0 + np);
    const int64_t span = *std::max_element(pairs + p0, pairs + p0 + np) - first + 1;
    for (int64_t t = 0; t < n_tokens; ++t) {
      if (t + kAhead < n_tokens) {
        prefetch_span(dots + (t + kAhead) * dots_stride + first, span * static_cast<int64_t>(sizeof(T)));
        prefetch_span(null_dots + (t + kAhead) * n_pairs + p0, np * static_cast<int64_t>(sizeof(T)));
      }
      const int64_t b = bucket[t];
      const double* nn = node_norm.data() + t * n_nodes;
      const double x = resid_norm[t];
      const T* drow = dots + t * dots_stride;
      const T* nd_row = null_dots + t * n_pairs + p0;
      for (int64_t j = 0; j < np; ++j) {
        d[j] = static_cast<double>(drow[pairs[p0 + j]]);
        nd[j] = static_cast<double>(nd_row[j]);
        a[j] = nn[node[j]];
        w[j] = nn[writer[j]];
      }
      // Element-wise over the block (vectorised): the statistics of scan_aggregates.h.
      for (int64_t j = 0; j < np; ++j) {
        const double pr = nan_div(d[j], w[j] * w[j]), pv = nan_div(d[j], w[j]);
        const double cos = clamp_unit(nan_div(d[j], a[j] * w[j]));
        const double pr0 = nan_div(nd[j], w[j]), cos0 = clamp_unit(nan_div(nd[j], a[j]));
        v[0][j] = nan_div(pv * std::fabs(cos), x);
        v[1][j] = pr * std::fabs(cos);
        v[2][j] = pv;
        v[3][j] = cos;
        v[4][j] = nan_div(nd[j] * std::fabs(cos0), x);
        v[5][j] = pr0 * std::fabs(cos0);
        v[6][j] = pr0;
        v[7][j] = nd[j];
        v[8][j] = cos0;
      }
      for (int k = 0; k < K; ++k) {
        const int64_t kb = bucketed[k] ? b : 0;
        moments.add(k * n_buckets + kb, v[k], np, lo_k[k], inv_k[k], top_k[k], row_off[k],
                    hists[k] + (kb * n_pairs + p0) * stride_k[k]);
      }
    }
    for (int k = 0; k < K; ++k)
      for (int64_t kb = 0; kb < n_buckets; ++kb) {
        const int64_t at = (k * n_buckets + kb) * n_pairs + p0;
        moments.write(k * n_buckets + kb, np, count + at, mean + at, m2 + at);
      }
  }
}

template void pair_stats_batch<float>(const PairStatsParams<float>&);
template void pair_stats_batch<double>(const PairStatsParams<double>&);
template void series_stats_batch<float>(const SeriesStatsParams<float>&);
template void series_stats_batch<double>(const SeriesStatsParams<double>&);

}  // namespace EF_ISA
}  // namespace ef
