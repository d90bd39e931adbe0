// The finiteness check of a call's weights, run before its kernel where the call asks for checks
// (check_finite): W_O entirely and the rows of directions the call reads -- every row in fixed-set
// mode, in gathered mode each row an id names (direction_ids or incorrect_ids >= 0). The activations
// are checked by the kernels as they read them (kernel_common.h, nonfinite_bit); the weights are read
// here first, so that a bad weight is refused before any work.
// Arguments (WeightCheckParams, below) are NOT checked here (bindings.cpp does it).
#pragma once

#include <cstdint>

#include "input_formats.h"
#include "kernel_isa.h"

namespace ef {

template <typename In>
struct WeightCheckParams {
  using S = typename In::storage;
  const S* W_O = nullptr;                 // [n_wo] (all of W_O)
  int64_t n_wo = 0;
  const S* directions = nullptr;          // [n_dirs, d_model]
  int64_t n_dirs = 0, d_model = 0;
  const int64_t* direction_ids = nullptr; // nullable (fixed-set mode: every row): [n_tokens] in [-1, n_dirs)
  const int64_t* incorrect_ids = nullptr; // nullable: [n_tokens] in [-1, n_dirs)
  int64_t n_tokens = 0;
  int n_threads = 0;
};

namespace EF_ISA {

// kNonfiniteW_O | kNonfiniteDirections for those holding a NaN or an infinity where read, else 0.
template <typename In>
unsigned nonfinite_weights(const WeightCheckParams<In>& p);

}  // namespace EF_ISA
}  // namespace ef
