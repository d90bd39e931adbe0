// The avx512_bf16 path's entry points: the avx512 path's, with the fused kernel of bfloat16 inputs
// compiled with AVX512-BF16 (fused_lanes.cpp: the projection multiplies pairs of bf16 values).
#include "dispatch.h"

namespace ef {
namespace EF_ISA {

const Kernels& kernel_table() {
  static const Kernels k = [] {
    Kernels t = avx512::kernel_table();
    t.simd = "avx512 + avx512-bf16";
    t.bf16.fused_attribution = &fused_attribution_lanes<Bf16>;
    return t;
  }();
  return k;
}

}  // namespace EF_ISA
}  // namespace ef
