// Path selection (see dispatch.h). Compiled for the baseline ISA.
#include "dispatch.h"

#include <atomic>
#include <stdexcept>

namespace ef {
namespace {

// -1: nothing selected yet (the first call takes best_path()).
std::atomic<int> g_selected{-1};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::vector<std::string> runnable_names() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumPaths; ++i) {
    const CpuPath p = static_cast<CpuPath>(i);
    if (path_compiled(p) && cpu_runs(p)) out.emplace_back(path_name(p));
  }
  return out;
}

}  // namespace

bool path_compiled(CpuPath p) {
  switch (p) {
    case CpuPath::kPortable: return true;
#if EF_HAVE_AVX2
    case CpuPath::kAvx2: return true;
#endif
#if EF_HAVE_AVX512
    case CpuPath::kAvx512: return true;
#endif
#if EF_HAVE_AVX512_BF16
    case CpuPath::kAvx512Bf16: return true;
#endif
#if EF_HAVE_AMX
    case CpuPath::kAmx: return true;
#endif
    default: return false;
  }
}

std::vector<std::string> compiled_names() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumPaths; ++i)
    if (path_compiled(static_cast<CpuPath>(i))) out.emplace_back(path_name(static_cast<CpuPath>(i)));
  return out;
}

const char* path_simd(CpuPath p) {
  switch (p) {
    case CpuPath::kPortable: return "scalar";
    case CpuPath::kAvx2: return "avx2+fma (8 x fp32)";
    case CpuPath::kAvx512: return "avx512 (16 x fp32)";
    case CpuPath::kAvx512Bf16: return "avx512 + avx512-bf16";
    case CpuPath::kAmx: return "avx512 + amx-bf16";
  }
  return "unknown";
}

const Kernels* runnable_table(CpuPath p) {
  if (!path_compiled(p) || !cpu_runs(p)) return nullptr;
  switch (p) {
    case CpuPath::kPortable: return &portable::kernel_table();
#if EF_HAVE_AVX2
    case CpuPath::kAvx2: return &avx2::kernel_table();
#endif
#if EF_HAVE_AVX512
    case CpuPath::kAvx512: return &avx512::kernel_table();
#endif
#if EF_HAVE_AVX512_BF16
    case CpuPath::kAvx512Bf16: return &avx512_bf16::kernel_table();
#endif
#if EF_HAVE_AMX
    case CpuPath::kAmx: return &amx::kernel_table();
#endif
    default: return nullptr;
  }
}

CpuPath best_path() {
  for (int i = kNumPaths - 1; i > 0; --i) {
    const CpuPath p = static_cast<CpuPath>(i);
    if (path_compiled(p) && cpu_runs(p)) return p;
  }
  return CpuPath::kPortable;
}

CpuPath select_path(const std::string& name) {
  CpuPath p = CpuPath::kPortable;
  if (name == "auto") {
    p = best_path();
  } else {
    int found = -1;
    for (int i = 0; i < kNumPaths; ++i)
      if (name == path_name(static_cast<CpuPath>(i))) found = i;
    if (found < 0)
      throw std::invalid_argument("unknown CPU path '" + name + "': choose 'auto' or one of " +
                                  join(compiled_names()));
    p = static_cast<CpuPath>(found);
    if (!path_compiled(p))
      throw std::invalid_argument("CPU path '" + name + "' is not compiled into this build (compiled: " +
                                  join(compiled_names()) + ")");
    const auto missing = missing_features(p);
    if (!missing.empty())
      throw std::invalid_argument("CPU path '" + name + "' cannot run on this CPU, which lacks " +
                                  join(missing) + " (paths it runs: " + join(runnable_names()) + ")");
  }
  g_selected.store(static_cast<int>(p), std::memory_order_relaxed);
  return p;
}

CpuPath selected_path() {
  int s = g_selected.load(std::memory_order_relaxed);
  if (s < 0) {
    s = static_cast<int>(best_path());
    g_selected.store(s, std::memory_order_relaxed);
  }
  return static_cast<CpuPath>(s);
}

// The selected path runs here: select_path() and best_path() take only such paths.
const Kernels& kernels() { return *runnable_table(selected_path()); }

}  // namespace ef
