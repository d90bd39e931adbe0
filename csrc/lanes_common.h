// Helpers of the AVX-512 kernels that work on tiles of tokens (fused_lanes.cpp, amx_kernels.cpp):
// L values of one token (a row) in, L x L register transposes, lanes out; prefetching the next work
// item's inputs. Included only by AVX-512 kernel sources (kernel_isa.h: one copy per path namespace).
#pragma once

#if defined(__AVX512F__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel_common.h"

namespace ef {
namespace EF_ISA {
namespace detail {

// Lanes in and out: L values of one token (a row) converted to the accumulation type, and the
// L x L register transpose that turns L such rows into L vectors of L tokens.

// p[0 .. n) converted, zero past n (n <= L).
template <typename In>
inline typename Simd<typename In::acc>::reg load_row_lanes(const typename In::storage* p, int64_t n);

template <>
inline __m512 load_row_lanes<Native<float>>(const float* p, int64_t n) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
template <>
inline __m512d load_row_lanes<Native<double>>(const double* p, int64_t n) {
  return n >= 8 ? _mm512_loadu_pd(p) : _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
}
inline __m256i load_u16x16(const uint16_t* p, int64_t n) {
  return n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                 : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
}
template <>
inline __m512 load_row_lanes<Bf16>(const uint16_t* p, int64_t n) {  // bf16 = the high half of a float
  return widen_bf16(load_u16x16(p, n));
}
template <>
inline __m512 load_row_lanes<F16>(const uint16_t* p, int64_t n) {  // exact (vcvtph2ps)
  return _mm512_cvtph_ps(load_u16x16(p, n));
}

// 4 x 4 transpose of the 128-bit lanes of a, b, c, d (in place).
template <typename R, typename Shuf>
inline void transpose_128_lanes(R& a, R& b, R& c, R& d, Shuf shuf) {
  const R x0 = shuf(a, b, std::integral_constant<int, 0x44>{}), x1 = shuf(a, b, std::integral_constant<int, 0xEE>{});
  const R y0 = shuf(c, d, std::integral_constant<int, 0x44>{}), y1 = shuf(c, d, std::integral_constant<int, 0xEE>{});
  a = shuf(x0, y0, std::integral_constant<int, 0x88>{});
  b = shuf(x0, y0, std::integral_constant<int, 0xDD>{});
  c = shuf(x1, y1, std::integral_constant<int, 0x88>{});
  d = shuf(x1, y1, std::integral_constant<int, 0xDD>{});
}

// r[j][i] <- r[i][j] (16 x 16 floats).
inline void transpose_lanes(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // s[4g + c], 128-bit lane k: column 4k + c of rows 4g .. 4g + 3
  __m512 s[16];
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    s[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    s[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    s[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    s[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  auto shuf = [](__m512 x, __m512 y, auto imm) { return _mm512_shuffle_f32x4(x, y, decltype(imm)::value); };
  for (int c = 0; c < 4; ++c) {
    transpose_128_lanes(s[c], s[4 + c], s[8 + c], s[12 + c], shuf);
    r[c] = s[c], r[4 + c] = s[4 + c], r[8 + c] = s[8 + c], r[12 + c] = s[12 + c];
  }
}

// r[j][i] <- r[i][j] (8 x 8 doubles).
inline void transpose_lanes(__m512d r[8]) {
  __m512d s[8];
  // s[2g + c], 128-bit lane k: column 2k + c of rows 2g, 2g + 1
  for (int g = 0; g < 4; ++g) {
    s[2 * g] = _mm512_unpacklo_pd(r[2 * g], r[2 * g + 1]);
    s[2 * g + 1] = _mm512_unpackhi_pd(r[2 * g], r[2 * g + 1]);
  }
  auto shuf = [](__m512d x, __m512d y, auto imm) { return _mm512_shuffle_f64x2(x, y, decltype(imm)::value); };
  for (int c = 0; c < 2; ++c) {
    transpose_128_lanes(s[c], s[2 + c], s[4 + c], s[6 + c], shuf);
    r[c] = s[c], r[2 + c] = s[2 + c], r[4 + c] = s[4 + c], r[6 + c] = s[6 + c];
  }
}

// dst[c * TL + i] = src[i * stride + c] (converted) for i < L lanes, c < n_col; lanes i >= n_tok
// are zero. One lane vector of a lane tile (dst already offset to it).
template <typename In>
void pack_lanes(const typename In::storage* src, int64_t stride, int64_t n_tok, int64_t n_col,
                typename In::acc* dst, int64_t TL) {
  using T = typename In::acc;
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg r[L];
  for (int64_t c0 = 0; c0 < n_col; c0 += L) {
    const int64_t nc = std::min<int64_t>(L, n_col - c0);
    for (int i = 0; i < L; ++i) r[i] = i < n_tok ? load_row_lanes<In>(src + i * stride + c0, nc) : S::zero();
    transpose_lanes(r);
    for (int64_t c = 0; c < nc; ++c) S::store(dst + (c0 + c) * TL, r[c]);
  }
}

// The inverse: dst[i * stride + c] = src[c * TL + i] for lanes i < n_tok, c < n_col.
template <typename T>
void unpack_lanes(const T* src, int64_t n_tok, int64_t n_col, T* dst, int64_t stride, int64_t TL) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg r[L];
  for (int64_t c0 = 0; c0 < n_col; c0 += L) {
    const int64_t nc = std::min<int64_t>(L, n_col - c0);
    for (int c = 0; c < L; ++c) r[c] = c < nc ? S::load(src + (c0 + c) * TL) : S::zero();
    transpose_lanes(r);
    for (int64_t i = 0; i < n_tok; ++i) S::store(dst + i * stride + c0, r[i]);
  }
}

// dst[0 .. n) = src[0 .. n) with non-temporal stores for dst's whole cache lines: outputs are written
// once and not read again here, so a store that bypasses the caches saves reading each line from memory
// first (half the memory traffic of writing the outputs). The lines of dst that src covers only in part
// are written with plain stores. Callers end their work with _mm_sfence() before other threads read dst.
template <typename T>
inline void stream_copy(const T* src, int64_t n, T* dst) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value, "float or double");
  constexpr int64_t V = 64 / sizeof(T);
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63); ++i) dst[i] = src[i];
  for (; i + V <= n; i += V) {
    if constexpr (std::is_same<T, float>::value)
      _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    else
      _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Streams a set of byte spans towards L2, a few lines per step(): the next work item's inputs are
// prefetched while this one computes (read once from DRAM, they would otherwise stall the packing:
// 16 KiB per token for GELU-4L).
struct Prefetcher {
  Vec<std::pair<const char*, size_t>> spans;
  size_t span = 0, offset = 0, per_step = 0;
  void add(const void* p, size_t bytes) {
    if (bytes) spans.emplace_back(static_cast<const char*>(p), bytes);
  }
  void start(size_t n_steps) {
    size_t lines = 0;
    for (const auto& sp : spans) lines += (sp.second + 63) / 64;
    span = offset = 0;
    per_step = (lines + n_steps - 1) / std::max<size_t>(n_steps, 1);
  }
  void step() {
    for (size_t i = 0; i < per_step && span < spans.size(); ++i) {
      _mm_prefetch(spans[span].first + offset, _MM_HINT_T1);
      offset += 64;
      if (offset >= spans[span].second) ++span, offset = 0;
    }
  }
};

// The inputs of tokens [t0, t0 + n) (clipped to n_tokens) as prefetch spans: their z and extra
// rows, and the direction rows they gather.
template <typename In>
void prefetch_tile_inputs(Prefetcher& pf, const typename In::storage* z, const typename In::storage* extra,
                          const typename In::storage* directions, const int64_t* direction_ids,
                          const int64_t* incorrect_ids, int64_t t0, int64_t n, int64_t n_tokens, int64_t NH,
                          int64_t M, int64_t D) {
  using St = typename In::storage;
  pf.spans.clear();
  n = std::min(n, n_tokens - t0);
  if (n <= 0) return;
  pf.add(z + t0 * NH, sizeof(St) * n * NH);
  if (M > 0) pf.add(extra + t0 * M * D, sizeof(St) * n * M * D);
  for (int64_t t = t0; direction_ids && t < t0 + n; ++t) {
    if (direction_ids[t] >= 0) pf.add(directions + direction_ids[t] * D, sizeof(St) * D);
    if (incorrect_ids && incorrect_ids[t] >= 0) pf.add(directions + incorrect_ids[t] * D, sizeof(St) * D);
  }
}

}  // namespace detail
}  // namespace EF_ISA
}  // namespace ef

#endif  // __AVX512F__
