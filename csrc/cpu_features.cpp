// cpuid / xgetbv feature detection (see cpu_features.h).
#include "cpu_features.h"

#include <array>
#include <cstdint>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#define EF_X86_64 1
#if defined(_MSC_VER)
#include <immintrin.h>
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace ef {
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512bf16 = false;
  bool amx_tile = false, amx_bf16 = false;
  bool os_ymm = false, os_zmm = false, os_amx = false;
  bool amx_permitted = false;
};

#ifdef EF_X86_64
void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<uint32_t>(v[i]);
#else
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

uint64_t xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}

// Linux >= 5.16 hands out the AMX tile-data state per process on request.
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;  // no tile-data permission protocol known here: AMX stays off
#endif
}

Features detect() {
  Features f;
  uint32_t r[4];
  cpuid(0, 0, r);
  const uint32_t max_leaf = r[0];
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.f16c = (r[2] >> 29) & 1;
  const bool avx = (r[2] >> 28) & 1;
  if (osxsave && avx) {
    const uint64_t xcr0 = xgetbv0();
    f.os_ymm = (xcr0 & 0x6) == 0x6;                 // SSE + AVX state
    f.os_zmm = f.os_ymm && (xcr0 & 0xe0) == 0xe0;   // opmask, ZMM_Hi256, Hi16_ZMM
    f.os_amx = f.os_zmm && (xcr0 & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const uint32_t max_sub = r[0];
    f.avx2 = (r[1] >> 5) & 1;
    f.avx512f = (r[1] >> 16) & 1;
    f.avx512dq = (r[1] >> 17) & 1;
    f.avx512bw = (r[1] >> 30) & 1;
    f.avx512vl = (r[1] >> 31) & 1;
    f.amx_bf16 = (r[3] >> 22) & 1;
    f.amx_tile = (r[3] >> 24) & 1;
    if (max_sub >= 1) {
      cpuid(7, 1, r);
      f.avx512bf16 = (r[0] >> 5) & 1;
    }
  }
  if (f.amx_tile && f.amx_bf16 && f.os_amx) f.amx_permitted = request_amx_permission();
  return f;
}
#else
Features detect() { return Features{}; }
#endif

const Features& features() {
  static const Features f = detect();
  return f;
}

}  // namespace

const char* path_name(CpuPath p) {
  switch (p) {
    case CpuPath::kPortable: return "portable";
    case CpuPath::kAvx2: return "avx2";
    case CpuPath::kAvx512: return "avx512";
    case CpuPath::kAvx512Bf16: return "avx512_bf16";
    case CpuPath::kAmx: return "amx";
  }
  return "unknown";
}

std::vector<std::string> missing_features(CpuPath p) {
  const Features& f = features();
  std::vector<std::pair<const char*, bool>> need;
  const int level = static_cast<int>(p);
  if (level >= 1) {
    need.insert(need.end(), {{"avx2", f.avx2}, {"fma", f.fma}, {"f16c", f.f16c},
                             {"OS support for AVX state (XCR0)", f.os_ymm}});
  }
  if (level >= 2) {
    need.insert(need.end(), {{"avx512f", f.avx512f}, {"avx512bw", f.avx512bw},
                             {"avx512vl", f.avx512vl}, {"avx512dq", f.avx512dq},
                             {"OS support for AVX-512 state (XCR0)", f.os_zmm}});
  }
  if (level >= 3) need.push_back({"avx512_bf16", f.avx512bf16});
  if (level >= 4) {
    need.insert(need.end(), {{"amx_tile", f.amx_tile}, {"amx_bf16", f.amx_bf16},
                             {"OS support for AMX state (XCR0)", f.os_amx}});
    if (f.amx_tile && f.amx_bf16 && f.os_amx)
      need.push_back({"AMX tile-data permission (Linux arch_prctl)", f.amx_permitted});
  }
  std::vector<std::string> missing;
  for (const auto& [name, have] : need)
    if (!have) missing.emplace_back(name);
  return missing;
}

bool cpu_runs(CpuPath p) {
  static const std::array<bool, kNumPaths> runs = [] {
    std::array<bool, kNumPaths> r{};
    for (int i = 0; i < kNumPaths; ++i) r[i] = missing_features(static_cast<CpuPath>(i)).empty();
    return r;
  }();
  return runs[static_cast<int>(p)];
}

}  // namespace ef
