// The weights' finiteness check (weight_checks.h), at the path's vector width.
#include "weight_checks.h"

#include <algorithm>

#include "kernel_common.h"

namespace ef {
namespace EF_ISA {

using namespace detail;

template <typename In>
unsigned nonfinite_weights(const WeightCheckParams<In>& p) {
  const int64_t K = p.n_dirs, D = p.d_model;
  // rows of directions read: all, or the marked ones in increasing order
  Vec<int64_t> rows;
  if (p.direction_ids) {
    Vec<uint8_t> used(static_cast<size_t>(K), 0);
    for (const int64_t* ids : {p.direction_ids, p.incorrect_ids})
      if (ids)
        for (int64_t t = 0; t < p.n_tokens; ++t)
          if (ids[t] >= 0) used[ids[t]] = 1;
    for (int64_t k = 0; k < K; ++k)
      if (used[k]) rows.push_back(k);
  }
  const int64_t n_rows = p.direction_ids ? static_cast<int64_t>(rows.size()) : K;
  // work items of ~kBlock values: blocks of W_O, then groups of rows
  constexpr int64_t kBlock = 1 << 16;
  const int64_t wo_items = (p.n_wo + kBlock - 1) / kBlock;
  const int64_t rows_per_item = std::max<int64_t>(1, kBlock / std::max<int64_t>(D, 1));
  const int64_t row_items = (n_rows + rows_per_item - 1) / rows_per_item;
  const int64_t n_items = wo_items + row_items;
  const int nthr = resolve_threads(p.n_threads, n_items);
  unsigned found = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthr) schedule(static) reduction(| : found)
#endif
  for (int64_t i = 0; i < n_items; ++i) {
    if (i < wo_items) {
      const int64_t b0 = i * kBlock;
      found |= nonfinite_bit<In>(p.W_O + b0, std::min(kBlock, p.n_wo - b0), kNonfiniteW_O);
    } else {
      const int64_t r0 = (i - wo_items) * rows_per_item, r1 = std::min(n_rows, r0 + rows_per_item);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k = p.direction_ids ? rows[r] : r;
        found |= nonfinite_bit<In>(p.directions + k * D, D, kNonfiniteDirections);
      }
    }
  }
  return found;
}

template unsigned nonfinite_weights<Native<float>>(const WeightCheckParams<Native<float>>&);
template unsigned nonfinite_weights<Native<double>>(const WeightCheckParams<Native<double>>&);
template unsigned nonfinite_weights<Bf16>(const WeightCheckParams<Bf16>&);
template unsigned nonfinite_weights<F16>(const WeightCheckParams<F16>&);

}  // namespace EF_ISA
}  // namespace ef
