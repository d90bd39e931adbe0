// The null dots of a scan's ranked pairs (erasure_fast/scanning/pair_stats.py, null_dots): each
// node's output dotted with its writers' null directions, computed in the node's own space.
//
// Task k is one node: activations X_k [T, depth_k] (a head's z, or an MLP's output; rows x_stride_k
// elements apart, contiguous along depth) and directions D_k [depth_k, n_cols_k] (C-contiguous: for a
// head W_O[n] r_w, for an MLP r_w itself, one column per writer). It fills columns offset_k ..
// offset_k + n_cols_k of out [T, n_rows] (token-major: the layout pair_stats_batch reads):
//   out[t, offset_k + c] = sum_i X_k[t, i] D_k[i, c]   (i in order, in T, one token's sum per thread)
// so results do not depend on the thread count. Columns are the vector lanes: each token's activation
// is broadcast against one vector of columns, 8 tokens at a time (activations read as they lie), and
// the vector is one token's columns of out.
// Arguments (NullDotsParams, below) are NOT checked here (bindings.cpp does it: the tasks' columns
// tile [0, n_rows) exactly).
#pragma once

#include <cstdint>

#include "kernel_isa.h"

namespace ef {

template <typename T>
struct NullDotsParams {
  const T* const* x = nullptr;        // [n_tasks] activations X_k
  const int64_t* x_stride = nullptr;  // [n_tasks] their token strides, in elements
  const int64_t* depth = nullptr;     // [n_tasks]
  const T* const* dirs = nullptr;     // [n_tasks] directions D_k
  const int64_t* n_cols = nullptr;    // [n_tasks]
  const int64_t* offset = nullptr;    // [n_tasks] first output column
  int n_tasks = 0;
  int64_t n_tokens = 0, n_rows = 0;
  T* out = nullptr;                   // [n_tokens, n_rows]
  int n_threads = 0;
};

namespace EF_ISA {

template <typename T>
void null_dots(const NullDotsParams<T>& p);

}  // namespace EF_ISA
}  // namespace ef
