// The kernel paths (one per x86-64 ISA level) and what the running CPU can execute of them.
//
// A feature counts only when the OS also saves its register state (XCR0: YMM for AVX2, ZMM and
// opmask for AVX-512, tile data for AMX), and AMX only once Linux has granted this process the
// tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM)): without it the first tile instruction
// faults. Compiled for the baseline ISA, like everything outside the per-ISA kernel sources.
#pragma once

#include <string>
#include <vector>

namespace ef {

// Ordered from the most portable to the fastest; each needs the features of the ones before it.
enum class CpuPath : int {
  kPortable = 0,  // the compiler's baseline (x86-64: SSE2), scalar kernels
  kAvx2 = 1,      // AVX2 + FMA + F16C
  kAvx512 = 2,    // AVX-512 F / BW / VL / DQ
  kAvx512Bf16 = 3,  // kAvx512 + AVX512-BF16: bfloat16 inputs multiplied in pairs (VDPBF16PS)
  kAmx = 4,       // kAvx512Bf16 + AMX-BF16: bfloat16 inputs on the tile unit
};
constexpr int kNumPaths = 5;

const char* path_name(CpuPath p);

// The features path p needs that this CPU / OS lacks (empty: it runs here). Detected once.
std::vector<std::string> missing_features(CpuPath p);

// missing_features(p).empty(), answered from a table made on the first call (kernel calls ask).
bool cpu_runs(CpuPath p);

}  // namespace ef
