// The null dots of the ranked pairs; see null_dots.h for the contract.
#include "null_dots.h"
#include "kernel_common.h"

#include <algorithm>

namespace ef {
namespace EF_ISA {
namespace {

using namespace detail;

// Tokens per register tile, and per work item (one task over kItem tokens).
constexpr int64_t kRows = 8;
constexpr int64_t kItem = 64;

// D [depth, n_cols] as blocks of one vector's L columns, zero-padded: packed[b][i][c] = D[i, b * L + c].
template <typename T>
void pack_directions(const T* D, int64_t depth, int64_t n_cols, T* packed) {
  constexpr int L = Simd<T>::L;
  const int64_t n_blocks = (n_cols + L - 1) / L;
  for (int64_t b = 0; b < n_blocks; ++b)
    for (int64_t i = 0; i < depth; ++i)
      for (int c = 0; c < L; ++c) {
        const int64_t col = b * L + c;
        packed[(b * depth + i) * L + c] = col < n_cols ? D[i * n_cols + col] : T(0);
      }
}

// Tokens [t0, t0 + nr) (nr <= kRows) of one task: kRows accumulators of L columns, each token's
// activation broadcast from its row as it is (no packing), each accumulator one token's L columns of
// out [n_tokens, row_stride] (the last block of columns stored in part).
template <typename T>
void tile_products(const T* X, int64_t stride, int64_t depth, const T* packed, int64_t n_cols, T* out,
                   int64_t row_stride, int64_t n_tokens, int64_t t0, int64_t nr) {
  using S = Simd<T>;
  constexpr int L = S::L;
  const T* rows[kRows];
  for (int64_t r = 0; r < kRows; ++r) rows[r] = X + (t0 + std::min(r, nr - 1)) * stride;  // past the end: a copy
  // the next tile's rows, fetched while this one computes (each row is read from DRAM once)
  for (int64_t r = 0; r < kRows && t0 + kRows + r < n_tokens; ++r)
    prefetch_span(X + (t0 + kRows + r) * stride, depth * static_cast<int64_t>(sizeof(T)));
  for (int64_t b = 0; b * L < n_cols; ++b) {
    const T* pd = packed + b * depth * L;
    typename S::reg acc[kRows];
    for (int64_t r = 0; r < kRows; ++r) acc[r] = S::zero();
    for (int64_t i = 0; i < depth; ++i) {
      const typename S::reg d = S::load(pd + i * L);
      for (int64_t r = 0; r < kRows; ++r) acc[r] = S::fma(S::set1(rows[r][i]), d, acc[r]);
    }
    const int64_t nc = std::min<int64_t>(L, n_cols - b * L);
    T* at = out + t0 * row_stride + b * L;
    for (int64_t r = 0; r < nr; ++r) {
      if (nc == L) {
        S::store(at + r * row_stride, acc[r]);
      } else {
        alignas(64) T part[L];
        S::store(part, acc[r]);
        std::copy(part, part + nc, at + r * row_stride);
      }
    }
  }
}

}  // namespace

template <typename T>
void null_dots(const NullDotsParams<T>& p) {
  constexpr int L = Simd<T>::L;
  const int n_tasks = p.n_tasks;
  const int64_t n_tokens = p.n_tokens;
  // every task's directions packed once (small: depth x n_cols per node)
  Vec<int64_t> packed_at(static_cast<size_t>(n_tasks) + 1, 0);
  for (int k = 0; k < n_tasks; ++k) packed_at[k + 1] = packed_at[k] + p.depth[k] * ((p.n_cols[k] + L - 1) / L) * L;
  Vec<T> packed(static_cast<size_t>(std::max<int64_t>(packed_at[n_tasks], 1)));
  for (int k = 0; k < n_tasks; ++k) pack_directions(p.dirs[k], p.depth[k], p.n_cols[k], packed.data() + packed_at[k]);
  const int64_t per_task = (n_tokens + kItem - 1) / kItem;
  const int64_t n_items = n_tasks * per_task;
  const int nthr = resolve_threads(p.n_threads, n_items);
  (void)nthr;
#pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
  for (int64_t item = 0; item < n_items; ++item) {
    // task-minor: the tasks of one token block run one after another, so the block's rows of z (the
    // heads of a layer lie side by side in them) are read from DRAM once, in order, and shared in L2/L3
    const int k = static_cast<int>(item % n_tasks);
    const int64_t block = item / n_tasks;
    const int64_t end = std::min(n_tokens, (block + 1) * kItem);
    for (int64_t t0 = block * kItem; t0 < end; t0 += kRows)
      tile_products(p.x[k], p.x_stride[k], p.depth[k], packed.data() + packed_at[k], p.n_cols[k],
                    p.out + p.offset[k], p.n_rows, n_tokens, t0, std::min(kRows, end - t0));
  }
}

template void null_dots<float>(const NullDotsParams<float>&);
template void null_dots<double>(const NullDotsParams<double>&);

}  // namespace EF_ISA
}  // namespace ef
