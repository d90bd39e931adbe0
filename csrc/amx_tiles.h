// The tile unit's configuration shared by the amx path's kernels (amx_kernels.cpp, dla_only.cpp):
// every tile register 16 rows x 64 bytes (palette 1). Included only by sources compiled for the amx
// path (kernel_isa.h: one copy per path namespace).
#pragma once

#if defined(__AMX_BF16__)

#include <immintrin.h>

#include <cstdint>

#include "kernel_isa.h"

namespace ef {
namespace EF_ISA {
namespace detail {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures the calling thread's tiles (each thread that uses them, before its first tile instruction;
// _tile_release() when done).
inline void configure_tiles() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) c.rows[i] = 16, c.colsb[i] = 64;
  _tile_loadconfig(&c);
}

}  // namespace detail
}  // namespace EF_ISA
}  // namespace ef

#endif  // __AMX_BF16__
