// The avx512_bf16 path's entry points: the avx512 path's, with the kernels of bfloat16 inputs compiled
// with AVX512-BF16: the fused kernel's projection (fused_lanes.cpp) and the DLA-only kernels' head-space
// directions (dla_only.cpp, build_head_dirs_pairs) multiply pairs of bf16 values.
#include "dispatch.h"

namespace ef {
namespace EF_ISA {

const Kernels& kernel_table() {
  static const Kernels k = [] {
    Kernels t = avx512::kernel_table();
    t.bf16.fused_attribution = &fused_attribution_lanes<Bf16>;
    t.bf16.dla_fixed = &dla_fixed<Bf16>;
    t.bf16.dla_gathered = &dla_gathered<Bf16>;
    t.bf16.build_dla_table = &build_dla_table<Bf16>;
    t.bf16.fill_dla_table_rows = &fill_dla_table_rows<Bf16>;
    return t;
  }();
  return k;
}

}  // namespace EF_ISA
}  // namespace ef
