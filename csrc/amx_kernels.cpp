// AMX path: the AVX-512 kernels, with bfloat16 inputs on the tile unit (work in progress).
#include "dispatch.h"

namespace ef {
namespace amx {

const Kernels& kernel_table() {
  static const Kernels k = [] {
    Kernels t = avx512::kernel_table();
    t.simd = "avx512 + amx-bf16";
    return t;
  }();
  return k;
}

}  // namespace amx
}  // namespace ef
