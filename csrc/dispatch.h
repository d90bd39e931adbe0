// Run-time dispatch of the CPU kernels: one table of entry points per compiled path (cpu_features.h),
// the selected path's table used by every call (bindings.cpp).
//
// Selection: the fastest compiled path this CPU runs, unless select_path() names another (the
// Python backend forwards ERASURE_FAST_CPU_PATH / cpp.set_cpu_path there). A path the CPU cannot
// run, or one not compiled into this build, is refused with the reason.
//
// Nothing of a path's translation units runs before its features are confirmed: they are compiled
// with its instruction set, so even the initialisation of its table may execute its instructions
// (AVX-512 stores, say) and fault on a CPU without them. Whether a path is compiled in and what its
// kernels execute are therefore answered here, in baseline code.
#pragma once

#include <string>
#include <vector>

#include "cpu_features.h"
#include "dla_only.h"
#include "fused_attribution.h"
#include "input_formats.h"
#include "null_dots.h"
#include "scan_aggregates.h"
#include "weight_checks.h"

namespace ef {

// One path's entry points for one input format (fused_attribution.h, dla_only.h, weight_checks.h),
// each taking its params struct.
template <typename In>
struct TypedKernels {
  decltype(&EF_ISA::fused_attribution<In>) fused_attribution;
  decltype(&EF_ISA::dla_fixed<In>) dla_fixed;
  decltype(&EF_ISA::dla_gathered<In>) dla_gathered;
  decltype(&EF_ISA::build_dla_table<In>) build_dla_table;
  decltype(&EF_ISA::fill_dla_table_rows<In>) fill_dla_table_rows;
  decltype(&EF_ISA::nonfinite_weights<In>) nonfinite_weights;
};

// One path's scan-aggregation entry points (scan_aggregates.h, null_dots.h; params structs) for values of type T.
template <typename T>
struct ScanKernels {
  decltype(&EF_ISA::series_stats_batch<T>) series_stats_batch;  // plain series and ratios alike
  decltype(&EF_ISA::pair_stats_batch<T>) pair_stats_batch;
  decltype(&EF_ISA::null_dots<T>) null_dots;  // null_dots.h
};

struct Kernels {
  int tile_tokens;   // fused_attribution's default tile_tokens / chunk_cols on this path
  int chunk_cols;
  TypedKernels<Native<float>> f32;
  TypedKernels<Native<double>> f64;
  TypedKernels<Bf16> bf16;
  TypedKernels<F16> f16;
  ScanKernels<float> scan_f32;
  ScanKernels<double> scan_f64;

  template <typename In>
  const TypedKernels<In>& typed() const {
    if constexpr (std::is_same<In, Native<float>>::value) return f32;
    else if constexpr (std::is_same<In, Native<double>>::value) return f64;
    else if constexpr (std::is_same<In, Bf16>::value) return bf16;
    else return f16;
  }
  template <typename T>
  const ScanKernels<T>& scan() const {
    if constexpr (std::is_same<T, float>::value) return scan_f32;
    else return scan_f64;
  }
};

// Each compiled path's table (defined by kernel_table.cpp, compiled once per path). Call one only
// through runnable_table(): it runs the path's instructions.
namespace portable { const Kernels& kernel_table(); }
namespace avx2 { const Kernels& kernel_table(); }
namespace avx512 { const Kernels& kernel_table(); }
namespace avx512_bf16 { const Kernels& kernel_table(); }
namespace amx { const Kernels& kernel_table(); }

// Whether path p is compiled into this build.
bool path_compiled(CpuPath p);

// The names of the paths compiled into this build, from the most portable.
std::vector<std::string> compiled_names();

// What path p's kernels execute, e.g. "avx512 (16 x fp32)".
const char* path_simd(CpuPath p);

// The table of path p, or nullptr where p is not compiled into this build or this CPU cannot run it
// (cpu_runs, cpu_features.h).
const Kernels* runnable_table(CpuPath p);

// The fastest compiled path this CPU runs (portable at least).
CpuPath best_path();

// Selects the path of later calls: "auto" (best_path()) or a path name. Throws std::invalid_argument
// naming the reason for an unknown name, a path not compiled in, or one this CPU cannot run.
CpuPath select_path(const std::string& name);

CpuPath selected_path();

// The selected path's kernels.
const Kernels& kernels();

}  // namespace ef
