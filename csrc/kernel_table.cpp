// The entry points of one path (compiled once per path, see kernel_isa.h), for dispatch.cpp.
#include "dispatch.h"

namespace ef {
namespace EF_ISA {
namespace {

// The fused kernel's layout per path (measurements in fused_lanes.cpp): tokens in the lanes on
// AVX-512; d_model in the lanes (fused_attribution.cpp) on AVX2, as tuned there, and portable.
template <typename In>
TypedKernels<In> typed() {
#if defined(__AVX512F__)
  auto fused = &fused_attribution_lanes<In>;
#else
  auto fused = &fused_attribution<In>;
#endif
  return {fused, &dla_fixed<In>, &dla_gathered<In>, &build_dla_table<In>, &fill_dla_table_rows<In>,
          &nonfinite_weights<In>};
}

template <typename T>
ScanKernels<T> scan() {
  return {&series_stats_batch<T>, &pair_stats_batch<T>, &null_dots<T>};
}

}  // namespace

const Kernels& kernel_table() {
#if defined(__AVX512F__)
  const int tile = lanes_default_tile_tokens(), chunk = lanes_default_chunk_cols();
#else
  const int tile = default_tile_tokens(), chunk = default_chunk_cols();
#endif
  static const Kernels k{tile, chunk,
                         typed<Native<float>>(), typed<Native<double>>(), typed<Bf16>(), typed<F16>(),
                         scan<float>(), scan<double>()};
  return k;
}

}  // namespace EF_ISA
}  // namespace ef
