// DLA-only CPU kernels (see dla_only.h for the math and the contract).
//
// Stages:
//   1. head-space directions A[u, n, :] = W_O[n] @ c(d_u) for the needed directions u:
//      * fewer than kSmallU directions: a register-blocked dot kernel (4 rows of W_O x 3
//        directions, reduction over d_model), reading W_O once per 3 directions, no packing;
//      * otherwise a GEMM, [U, D] x [D, N*H], with the projection micro-kernel of the fused kernel
//        (MR directions x NR vectors of N*H) on W_O packed once per call into column panels.
//      Both paths reduce every output over d_model in one fixed order, so a row of A does not depend
//      on which other rows are built with it, nor on the thread count.
//      The amx path builds bf16 directions on the tile unit instead, for every count, and fp32 ones
//      where the others take the GEMM (build_head_dirs_amx: bf16 rows uncentred with a rank-one
//      centring correction, fp32 ones as six products of bf16 parts; the rows agree with the fp32
//      paths' to fp32 rounding); the avx512_bf16 path builds bf16 directions from the same rows with
//      VDPBF16PS (build_head_dirs_pairs).
//   2. per token (OpenMP over fixed tiles of 12 tokens): dla[t, n] = z[t, n, :] . A[u(t), n, :]
//      / s[t] (d_head FMAs per head), and on request norms[t, n] = z^T G_n z with the Gram matrix
//      G_n = W_O[n] W_O[n]^T packed like W_O (projection micro-kernel, then a d_head dot).
#include "dla_only.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_common.h"

#if defined(__AMX_BF16__)
#include "amx_tiles.h"
#endif
#if defined(__AVX512BF16__)
#include "lanes_common.h"
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ef {
namespace EF_ISA {
namespace {

using namespace detail;

constexpr int64_t kSmallU = 8;       // fewer directions than this: dot path (no packing of W_O)
constexpr int64_t kUT = 8 * MR;      // directions per GEMM work item (a multiple of MR)
constexpr int64_t kRowsPerItem = 64; // rows of W_O per work item of the dot path
constexpr int64_t kTokTile = 2 * MR; // tokens per work item of the per-token stage (multiple of MR)
constexpr int64_t kFillBlock = 1024; // table rows built per block by fill_dla_table_rows



// A (direction id, incorrect id) key. A type of this translation unit's own, so that the sort's
// template code is this path's alone: with std::pair, the linker keeps one copy of std::sort's
// out-of-line parts for every path, possibly one compiled with another path's instructions.
struct IdPair {
  int64_t id, inc;
  bool operator<(const IdPair& o) const { return id < o.id || (id == o.id && inc < o.inc); }
  bool operator==(const IdPair& o) const { return id == o.id && inc == o.inc; }
};

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The U directions of a head-space build as `n` work items under a static schedule: item i covers
// directions [begin(i), begin(i + 1)), each fewer than `cap`, their starts multiples of `step`, and `n`
// a multiple of the threads, so that each thread builds U / nthr directions give or take `step`. Whole
// items of `cap` directions would leave one thread up to a whole item more (U = 1,288 in items of 48 on
// 2 threads: 672 directions against 616). A row of A depends only on its own direction, so the split
// changes no bit of it.
struct EvenItems {
  int64_t n = 1, U = 0, step = 1;
  int nthr = 1;
  int64_t begin(int64_t i) const { return i >= n ? U : (i * U / n) / step * step; }
};

inline EvenItems even_items(int64_t U, int64_t cap, int64_t step, int n_threads) {
  EvenItems e;
  e.U = U;
  e.step = step;
  // an item holds at most U / n + step - 1 directions (its start rounded down): below cap
  const int64_t room = std::max<int64_t>(1, cap - step);
  const int64_t n0 = std::max<int64_t>(1, (U + room - 1) / room);
  e.nthr = resolve_threads(n_threads, n0);
  e.n = round_up(n0, e.nthr);
  return e;
}

// out[n] = a[nH : (n+1)H] . (b[...] - c[...] when kDiff, else b[...]) for n < N. Per segment the
// order is fixed: lane-wise over full vectors, horizontal sum, scalar tail (4 segments interleaved
// only for instruction-level parallelism).
// a is read in its input format In (converted on load, as z arrives), b and c in In::acc.
template <typename In, bool kDiff>
inline void seg_dots(const typename In::storage* __restrict a, const typename In::acc* __restrict b,
                     const typename In::acc* __restrict c, int64_t N, int64_t H, typename In::acc* __restrict out) {
  using T = typename In::acc;
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int L = S::L;
  const int64_t hv = H - H % L;
  auto tail = [&](int64_t n, reg acc) {
    T s = S::hsum(acc);
    for (int64_t d = hv; d < H; ++d) {
      const int64_t o = n * H + d;
      const T bv = kDiff ? b[o] - c[o] : b[o];
      s += In::load(a[o]) * bv;
    }
    out[n] = s;
  };
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {
    reg acc[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
    for (int64_t d = 0; d < hv; d += L)
      for (int j = 0; j < 4; ++j) {
        const int64_t o = (n + j) * H + d;
        reg bv = S::load(b + o);
        if constexpr (kDiff) bv = S::sub(bv, S::load(c + o));
        acc[j] = S::fma(load_vec<In>(a + o), bv, acc[j]);
      }
    for (int j = 0; j < 4; ++j) tail(n + j, acc[j]);
  }
  for (; n < N; ++n) {
    reg acc = S::zero();
    for (int64_t d = 0; d < hv; d += L) {
      const int64_t o = n * H + d;
      reg bv = S::load(b + o);
      if constexpr (kDiff) bv = S::sub(bv, S::load(c + o));
      acc = S::fma(load_vec<In>(a + o), bv, acc);
    }
    tail(n, acc);
  }
}

// seg_dots for float with H a multiple of the vector width L (every d_head of the models studied): the
// same per-segment lane-wise FMA chain over its H / L vectors, then L segments' lane vectors reduced
// together by one transpose-add tree (a fixed tree per segment: lanes j and j + L/2, then j and
// j + L/4, ...) instead of one horizontal sum each, and the L sums divided by `st` in one vector
// division. out[n * stride] = (a . b or a . (b - c)) / st for n < N. Segments past N in the last group
// are zero vectors, whose sums are discarded.
#if defined(__AVX512F__)
// Lane n of the result = the lane sum of v[n] (v[16]), through the tree above.
inline __m512 reduce16(__m512* v) {
  __m512 s[8], u[4], w[2];
  for (int k = 0; k < 8; ++k)  // lanes j + (j + 8): [v[2k] half sums | v[2k + 1] half sums]
    s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int k = 0; k < 4; ++k)  // + 4: one segment per 128-bit quarter
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k)  // + 2
    w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),  // + 1
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // y's lane 4q + i holds segment 4i + q: back into segment order
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, y);
}
#elif defined(__AVX2__)
inline __m256 reduce8(__m256* v) {
  __m256 s[4], w[2];
  for (int k = 0; k < 4; ++k)  // lanes j + (j + 4): [v[2k] half sums | v[2k + 1] half sums]
    s[k] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
  for (int k = 0; k < 2; ++k)  // + 2
    w[k] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 y = _mm256_add_ps(_mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),  // + 1
                                 _mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // y's lane 4l + i holds segment 2i + l: back into segment order
  const __m256i order = _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0);
  return _mm256_permutevar8x32_ps(y, order);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
template <typename In, bool kDiff>
inline void seg_dots_grouped(const typename In::storage* __restrict a, const float* __restrict b,
                             const float* __restrict c, int64_t N, int64_t H, float st, float* __restrict out,
                             int64_t stride) {
  using S = Simd<float>;
  using reg = typename S::reg;
  constexpr int L = S::L;
  const int64_t nv = H / L;
  const reg sv = S::set1(st);
  for (int64_t n0 = 0; n0 < N; n0 += L) {
    const int64_t ng = std::min<int64_t>(L, N - n0);
    reg v[L];
    for (int j = 0; j < L; ++j) {
      reg acc = S::zero();
      if (j < ng) {
        const int64_t o = (n0 + j) * H;
        for (int64_t d = 0; d < nv; ++d) {
          reg bv = S::load(b + o + d * L);
          if constexpr (kDiff) bv = S::sub(bv, S::load(c + o + d * L));
          acc = S::fma(load_vec<In>(a + o + d * L), bv, acc);
        }
      }
      v[j] = acc;
    }
#if defined(__AVX512F__)
    const reg q = _mm512_div_ps(reduce16(v), sv);
#else
    const reg q = _mm256_div_ps(reduce8(v), sv);
#endif
    if (stride == 1 && ng == L) {
      S::store(out + n0, q);
    } else {
      alignas(64) float tmp[L];
      S::store(tmp, q);
      for (int64_t j = 0; j < ng; ++j) out[(n0 + j) * stride] = tmp[j];
    }
  }
}
#endif

// out[n * stride] = (a . b or a . (b - c)) / st over the N segments of H: seg_dots_grouped where it
// applies (float, H a multiple of the vector width), else seg_dots and a division per output.
template <typename In, bool kDiff>
inline void head_dla(const typename In::storage* __restrict a, const typename In::acc* __restrict b,
                     const typename In::acc* __restrict c, int64_t N, int64_t H, typename In::acc st,
                     typename In::acc* __restrict out, int64_t stride, typename In::acc* __restrict tmp) {
  using T = typename In::acc;
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    if (H % Simd<float>::L == 0) {
      seg_dots_grouped<In, kDiff>(a, b, c, N, H, st, out, stride);
      return;
    }
  }
#endif
  seg_dots<In, kDiff>(a, b, c, N, H, tmp);
  for (int64_t n = 0; n < N; ++n) out[n * stride] = tmp[n] / st;
}

#if defined(__AVX512BF16__)
// The head-space directions of the amx and avx512_bf16 paths, from products of bf16 values.
// The amx path's, on the tile unit: A[u, :] = W_O @ c(x_u) with
// x_u = d_u - e_u, d_u = dirs[pid[u]], e_u = dirs[pinc[u]] (absent without a logit difference).
// bf16 inputs: centring is linear, so A[u, :] = W_O @ d_u - W_O @ e_u - mean(x_u) (W_O @ 1): the tile unit
// multiplies W_O by the rows as they are (bf16 values; -e_u by a flipped sign bit), one product per
// row. Products of bf16 values are exact in fp32 and accumulate in fp32; the row sums W_O @ 1 and the
// means are taken in float64 and the correction applied in float64 before rounding. The fp32
// accumulation then rounds at the scale of |W_O[n]| |x_u| where the result's is |W_O[n]| |c(x_u)|, so
// the error grows with mean(x_u) / RMS(c(x_u)) (measured against float64, in units of the outputs'
// largest value: 1.3e-7 at 0, 2.4e-7 at 3, 8.5e-7 at 10, 2.5e-6 at 30; the fp32 paths 4-6e-7). A
// direction whose mean exceeds kExactMeanRatio times its centred RMS is centred in fp32 and split into
// three bf16 parts instead, c = p0 + p1 + p2 + r (|r| <= 2^-25 |c|), three products. A block of 32
// directions takes as many products as its costliest row; the others' extra parts are zero rows, which
// add exact zeros. W_O is read as its bf16 values.
// fp32 inputs: W_O and every centred direction are split into three bf16 parts each, and the tile unit
// sums the six products of parts (w, j) with w + j <= 2: what is left out is below 2^-24 of |W_O[n]|
// |c(x_u)| (against float64, in units of the outputs' largest value: 2.2e-7 where the fp32 paths
// measure 4-6e-7), for about 60 % of the fp32 GEMM's time on a Sapphire Rapids core.
// Blocks of 32 directions x 32 columns of NH: 2 x 2 accumulator tiles over d_model in a fixed order, so
// a row of A depends on nothing but its own direction (the lazy table builds rows in any grouping).
constexpr double kExactMeanRatio = 3.0;

// part[j][0 .. 32) for j < 3: x = src[0 .. 32) split into bf16 parts, each the rounding (to nearest
// even) of what the ones before leave; every subtraction is exact in fp32.
inline void split_three(const float* src, uint16_t* const part[3]) {
  __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
  for (int j = 0; j < 3; ++j) {
    const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
    _mm512_storeu_si512(part[j], h);
    x0 = _mm512_sub_ps(x0, widen_bf16(_mm512_castsi512_si256(h)));
    x1 = _mm512_sub_ps(x1, widen_bf16(_mm512_extracti64x4_epi64(h, 1)));
  }
}

// The first n (<= 32) of 32 lanes: a masked load of a row's last, partial 32 values.
inline __mmask32 first_lanes32(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }

// The sum and the sum of squares of x = d - e (e null: x = d) over n bf16 values, in float64 (8 lanes,
// then the lanes in order: one fixed order).
inline __m512d load_bf16_f64(const uint16_t* p) {  // 8 bf16 values, exactly
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
}
inline void moments_f64(const uint16_t* d, const uint16_t* e, int64_t n, double& sum, double& sumsq) {
  __m512d s1 = _mm512_setzero_pd(), s2 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512d x = load_bf16_f64(d + i);
    if (e) x = _mm512_sub_pd(x, load_bf16_f64(e + i));
    s1 = _mm512_add_pd(s1, x);
    s2 = _mm512_fmadd_pd(x, x, s2);
  }
  alignas(64) double l1[8], l2[8];
  _mm512_store_pd(l1, s1);
  _mm512_store_pd(l2, s2);
  sum = sumsq = 0;
  for (int k = 0; k < 8; ++k) sum += l1[k], sumsq += l2[k];
  for (; i < n; ++i) {
    const double x = static_cast<double>(Bf16::load(d[i])) - (e ? static_cast<double>(Bf16::load(e[i])) : 0.0);
    sum += x;
    sumsq += x * x;
  }
}

// Direction x = dirs[id] - dirs[inc] (inc < 0: x = dirs[id]) as rows of bf16 values whose products with
// W_O's bf16 values sum to W_O @ c(x) (see above). seg(j, ks) is where part j's 32 values of k-step ks
// go (ks < Dp / 32, Dp = D rounded up to 32; parts a direction does not use, and values past D, are
// zero); c is scratch of Dp floats. bf16 inputs whose mean is at most kExactMeanRatio times their
// centred RMS: the rows as they are, d and -e (a flipped sign bit), and `mean` = mean(x) for the
// rank-one correction; otherwise (and for every fp32 direction) c(x) centred in fp32 and split into
// three parts, `mean` = 0. Returns the number of parts used.
template <typename In, typename Seg>
int direction_parts(const typename In::storage* dirs, int64_t D, int64_t Dp, int64_t id, int64_t inc, bool center,
                    float* c, Seg seg, double& mean) {
  const int64_t n_ks = Dp / 32;
  const auto* d = dirs + id * D;
  const auto* e = inc >= 0 ? dirs + inc * D : nullptr;
  mean = 0;
  if constexpr (std::is_same<In, Bf16>::value) {
    double sum = 0, sumsq = 0;
    if (center) moments_f64(d, e, D, sum, sumsq);
    const double m = sum / static_cast<double>(D), var = std::max(0.0, sumsq / static_cast<double>(D) - m * m);
    if (m * m <= kExactMeanRatio * kExactMeanRatio * var) {
      for (int64_t ks = 0; ks < n_ks; ++ks) {  // 32 values a step: one masked 64-byte load each
        const int64_t k0 = ks * 32;
        const __mmask32 lanes = first_lanes32(D - k0);
        _mm512_storeu_si512(seg(0, ks), _mm512_maskz_loadu_epi16(lanes, d + k0));
        _mm512_storeu_si512(seg(1, ks), e ? _mm512_xor_si512(_mm512_maskz_loadu_epi16(lanes, e + k0),
                                                             _mm512_maskz_set1_epi16(lanes, -32768))
                                          : _mm512_setzero_si512());
        _mm512_storeu_si512(seg(2, ks), _mm512_setzero_si512());
      }
      mean = m;
      return e ? 2 : 1;
    }
  }
  form_dir<In>(dirs, D, id, inc, center, c);
  std::fill(c + D, c + Dp, 0.f);
  for (int64_t ks = 0; ks < n_ks; ++ks) {
    uint16_t* const dst[3] = {seg(0, ks), seg(1, ks), seg(2, ks)};
    split_three(c + ks * 32, dst);
  }
  return 3;
}
#endif

#if defined(__AMX_BF16__)
template <typename In>
void build_head_dirs_amx(const typename In::storage* W_O, int64_t NH, int64_t D, const typename In::storage* dirs,
                         const int64_t* pid, const int64_t* pinc, int64_t U, bool center, float* A, int n_threads) {
  constexpr bool kF32 = std::is_same<In, Native<float>>::value;
  static_assert(kF32 || std::is_same<In, Bf16>::value, "bf16 or fp32 inputs");
  constexpr int kWParts = kF32 ? 3 : 1;  // bf16 parts of W_O: fp32 values split in three, bf16 ones as they are
  const int64_t Dp = round_up(D, 32), n_ks = Dp / 32, NHp = round_up(NH, 32), n_nb = NHp / 16;
  // W_O^T in the tile unit's pair layout: bt[w][nb][ks] = 16 pairs (d) x 16 columns (NH) x 2, zero past
  // NH and D: per tile, 16 rows of W_O's part w as 16 x 16 bf16 pairs, transposed
  Buf<uint16_t> bt[kWParts];
  for (auto& b : bt) b = Buf<uint16_t>(static_cast<size_t>(n_nb * n_ks * 512));
  Buf<double> rowsum(static_cast<size_t>(NHp));  // W_O @ 1, for the centring of bf16 rows
  {
    const int nthr = resolve_threads(n_threads, n_nb);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthr) schedule(static)
#endif
    for (int64_t nb = 0; nb < n_nb; ++nb) {
      for (int64_t c = nb * 16; c < nb * 16 + 16; ++c) {
        double sum = 0, sumsq = 0;
        if constexpr (!kF32)
          if (c < NH && center) moments_f64(W_O + c * D, nullptr, D, sum, sumsq);
        rowsum.get()[c] = sum;
      }
      for (int64_t ks = 0; ks < n_ks; ++ks) {
        const int64_t d0 = ks * 32, nd = std::min<int64_t>(32, D - d0);
        const __mmask32 lanes = first_lanes32(nd);
        const __mmask16 m0 = static_cast<__mmask16>(lanes), m1 = static_cast<__mmask16>(lanes >> 16);
        __m512 x0[16], x1[16];  // fp32: what is left of each column's 32 values
        __m512i raw[16];        // bf16: the column's 32 values as they are
        for (int64_t c = 0; c < 16; ++c) {
          const int64_t col = nb * 16 + c;
          if constexpr (kF32) {
            const float* src = W_O + col * D + d0;
            x0[c] = col < NH ? _mm512_maskz_loadu_ps(m0, src) : _mm512_setzero_ps();
            x1[c] = col < NH ? _mm512_maskz_loadu_ps(m1, src + 16) : _mm512_setzero_ps();
          } else {
            raw[c] = col < NH ? _mm512_maskz_loadu_epi16(lanes, W_O + col * D + d0) : _mm512_setzero_si512();
          }
        }
        for (int w = 0; w < kWParts; ++w) {
          __m512 r[16];
          for (int64_t c = 0; c < 16; ++c) {
            if constexpr (kF32) {
              const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1[c], x0[c]));
              r[c] = _mm512_castsi512_ps(h);
              if (w + 1 < kWParts) {  // the rest, exact in fp32
                x0[c] = _mm512_sub_ps(x0[c], widen_bf16(_mm512_castsi512_si256(h)));
                x1[c] = _mm512_sub_ps(x1[c], widen_bf16(_mm512_extracti64x4_epi64(h, 1)));
              }
            } else {
              r[c] = _mm512_castsi512_ps(raw[c]);
            }
          }
          transpose_lanes(r);  // r[p] = pair p of every column
          uint16_t* t = bt[w].get() + (nb * n_ks + ks) * 512;
          for (int64_t p = 0; p < 16; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(t + p * 32), r[p]);
        }
      }
    }
    (void)nthr;
  }
  // Directions in super-blocks of kDirsAtOnce: their bf16 rows are formed first (rows split among the
  // threads), then every (block of 32 directions, pair of 16-column blocks) product, pairs outermost:
  // a pair's W_O panel stays in L1 while the blocks' rows stream from L2 (blocks outermost streamed
  // the whole packed W_O from L3 for every block: 1,262 fp32 directions 10.2 against 8.9 ms). Every
  // block of A is computed by one thread in one order, however the work is cut.
  constexpr int64_t kDirsAtOnce = 512;
  const int64_t SB = std::min<int64_t>(kDirsAtOnce, round_up(U, 32)), n_pairs = n_nb / 2;
  const int nthr = resolve_threads(n_threads, (SB / 32) * n_pairs);
  // the super-block's rows as bf16 (d_u, -e_u, 0; or c(x_u)'s three parts), packed as the tile unit
  // reads them: part[j][block of 32 rows][k-step of 32 columns][32 rows][32], two 1 KiB tiles per step
  Buf<uint16_t> part[3];
  for (auto& b : part) b = Buf<uint16_t>(static_cast<size_t>(SB * Dp));
  auto seg = [&](int j, int64_t i, int64_t ks) {  // row i's 32 values of k-step ks in part j
    return part[j].get() + (((i / 32) * n_ks + ks) * 32 + i % 32) * 32;
  };
  Buf<double> mean(static_cast<size_t>(SB));  // the correction means (0: none)
  Buf<int> parts_of(static_cast<size_t>(SB));  // products a row needs
  Vec<Buf<float>> cbuf(nthr), obuf(nthr);     // per thread: a centred direction [Dp], a block of A [32][32]
  for (int i = 0; i < nthr; ++i) {
    cbuf[i] = Buf<float>(static_cast<size_t>(Dp));
    obuf[i] = Buf<float>(32 * 32);
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
    float* c = cbuf[thread_id()].get();
    float* out = obuf[thread_id()].get();
    configure_tiles();
    for (int64_t s0 = 0; s0 < U; s0 += SB) {
      const int64_t ns = std::min(SB, U - s0), n_blk = (ns + 31) / 32;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t i = 0; i < n_blk * 32; ++i) {
        if (i >= ns) {
          mean.get()[i] = 0;
          parts_of.get()[i] = 1;
          for (int j = 0; j < 3; ++j)
            for (int64_t ks = 0; ks < n_ks; ++ks) std::fill(seg(j, i, ks), seg(j, i, ks) + 32, uint16_t(0));
          continue;
        }
        const int64_t u = s0 + i;
        parts_of.get()[i] = direction_parts<In>(dirs, D, Dp, pid[u], pinc ? pinc[u] : -1, center, c,
                                                [&](int j, int64_t ks) { return seg(j, i, ks); }, mean.get()[i]);
      }
#ifdef _OPENMP
#pragma omp for collapse(2) schedule(static)
#endif
      for (int64_t pr = 0; pr < n_pairs; ++pr)
        for (int64_t blk = 0; blk < n_blk; ++blk) {
          const int64_t nb = 2 * pr, r0 = blk * 32, nu = std::min<int64_t>(32, ns - r0);
          const int n_parts = *std::max_element(parts_of.get() + r0, parts_of.get() + r0 + 32);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t ks = 0; ks < n_ks; ++ks)
            for (int w = 0; w < kWParts; ++w) {  // parts (w, j) with w + j <= 2: 2^-24 of a product left
              _tile_loadd(6, bt[w].get() + (nb * n_ks + ks) * 512, 64);
              _tile_loadd(7, bt[w].get() + ((nb + 1) * n_ks + ks) * 512, 64);
              for (int j = 0; j < (kF32 ? 3 - w : n_parts); ++j) {
                const uint16_t* a = part[j].get() + (blk * n_ks + ks) * 1024;
                _tile_loadd(4, a, 64);
                _tile_loadd(5, a + 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
              }
            }
          const int64_t col0 = nb * 16, ncol = std::min<int64_t>(32, NH - col0);
          _tile_stored(0, out, 32 * 4);
          _tile_stored(1, out + 16, 32 * 4);
          _tile_stored(2, out + 16 * 32, 32 * 4);
          _tile_stored(3, out + 16 * 32 + 16, 32 * 4);
          for (int64_t i = 0; i < nu; ++i) {
            float* dst = A + (s0 + r0 + i) * NH + col0;
            const float* o = out + i * 32;
            const double m = mean.get()[r0 + i];
            if (m == 0)
              std::memcpy(dst, o, sizeof(float) * ncol);
            else
              for (int64_t j = 0; j < ncol; ++j) dst[j] = static_cast<float>(o[j] - m * rowsum.get()[col0 + j]);
          }
        }
    }
    _tile_release();
  }
}
#endif

#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
// The avx512_bf16 path's head-space directions of bf16 inputs: the rows of direction_parts and the
// rank-one centring of build_head_dirs_amx (the same math and error bounds), multiplied with VDPBF16PS:
// 16 columns of NH in the lanes, pairs of d_model values in each, W_O^T packed once per call in panels
// of kPairCols columns. A block is kPairRows directions x kPairCols columns over every pair of d_model
// in order, the parts of each pair in order; a part a direction lacks is a zero row, whose products add
// exact zeros, so a row of A depends on nothing but its own direction (the lazy table builds rows in
// any grouping).
constexpr int kPairRows = 6, kPairVecs = 4;          // 24 accumulators
constexpr int64_t kPairCols = kPairVecs * 16;        // columns of NH per W_O panel
constexpr int64_t kPairDirs = 8 * kPairRows;         // directions per work item

// A pair of bf16 values read as one 32-bit value from rows written as 16-bit ones.
typedef uint32_t pair_bits __attribute__((may_alias));

// out[i][0 .. kPairCols) = sum over pairs j, parts p < P of rows[3 i + p][j] . wp[j][0 .. kPairCols) for
// i < kPairRows; rows[3 i + p] is part p of direction i (Dh pairs), wp a packed panel [Dh][kPairCols].
template <int P>
void pair_block(const pair_bits* const* rows, const uint32_t* __restrict wp, int64_t Dh, float* __restrict out) {
  __m512 acc[kPairRows][kPairVecs];
#pragma GCC unroll 8
  for (int i = 0; i < kPairRows; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < kPairVecs; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Dh; ++j) {
    __m512bh w[kPairVecs];
#pragma GCC unroll 8
    for (int r = 0; r < kPairVecs; ++r)
      w[r] = reinterpret_cast<__m512bh>(_mm512_load_si512(wp + j * kPairCols + r * 16));
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int i = 0; i < kPairRows; ++i) {
        const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(rows[3 * i + p][j])));
#pragma GCC unroll 8
        for (int r = 0; r < kPairVecs; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], b, w[r]);
      }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kPairRows; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < kPairVecs; ++r) _mm512_store_ps(out + i * kPairCols + r * 16, acc[i][r]);
}

void build_head_dirs_pairs(const uint16_t* W_O, int64_t NH, int64_t D, const uint16_t* dirs, const int64_t* pid,
                           const int64_t* pinc, int64_t U, bool center, float* A, int n_threads) {
  const int64_t Dp = round_up(D, 32), Dh = Dp / 2, n_jb = (NH + kPairCols - 1) / kPairCols;
  // W_O^T in pairs: wt[jb][j][c] = (W_O[col][2j], W_O[col][2j + 1]) for col = jb * kPairCols + c (zero
  // past NH and D); rowsum = W_O @ 1 in float64 for the centring
  Buf<uint32_t> wt(static_cast<size_t>(n_jb * Dh * kPairCols));
  Buf<double> rowsum(static_cast<size_t>(n_jb * kPairCols));
  {
    const int nthr = resolve_threads(n_threads, n_jb);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthr) schedule(static)
#endif
    for (int64_t jb = 0; jb < n_jb; ++jb) {
      uint32_t* panel = wt.get() + jb * Dh * kPairCols;
      for (int64_t c = 0; c < kPairCols; ++c) {
        const int64_t col = jb * kPairCols + c;
        double sum = 0, sumsq = 0;
        if (col < NH && center) moments_f64(W_O + col * D, nullptr, D, sum, sumsq);
        rowsum.get()[col] = sum;
      }
      // 16 columns x 16 pairs at a time: each column's 32 values (a masked load, zero past D) as 16
      // pairs, transposed to 16 vectors of one pair of the 16 columns
      for (int64_t c0 = 0; c0 < kPairCols; c0 += 16)
        for (int64_t j0 = 0; j0 < Dh; j0 += 16) {
          const __mmask32 lanes = first_lanes32(D - 2 * j0);  // 2 j0 < D: k-steps start below D
          __m512 r[16];
          for (int64_t c = 0; c < 16; ++c) {
            const int64_t col = jb * kPairCols + c0 + c;
            r[c] = col < NH ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(lanes, W_O + col * D + 2 * j0))
                            : _mm512_setzero_ps();
          }
          transpose_lanes(r);
          for (int64_t q = 0; q < 16; ++q)
            _mm512_store_ps(reinterpret_cast<float*>(panel + (j0 + q) * kPairCols + c0), r[q]);
        }
    }
    (void)nthr;
  }
  const EvenItems items = even_items(U, kPairDirs, kPairRows, n_threads);
  const int64_t n_items = items.n;
  const int nthr = items.nthr;
  struct Scr {
    Buf<uint16_t> part;  // [kPairDirs][3][Dp]
    Buf<float> c, out;   // a centred direction [Dp]; a block of A [kPairRows][kPairCols]
  };
  Vec<Scr> scr(nthr);
  for (auto& s : scr) {
    s.part = Buf<uint16_t>(static_cast<size_t>(kPairDirs * 3 * Dp));
    s.c = Buf<float>(static_cast<size_t>(Dp));
    s.out = Buf<float>(static_cast<size_t>(kPairRows * kPairCols));
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
    Scr& s = scr[thread_id()];
    double mean[kPairDirs];
    int parts[kPairDirs];
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t u0 = items.begin(it), nu = items.begin(it + 1) - u0;
      auto row = [&](int64_t i, int p) { return s.part.get() + (i * 3 + p) * Dp; };
      for (int64_t i = 0; i < kPairDirs; ++i) {
        if (i >= nu) {  // rows past the last direction: zero
          std::fill(row(i, 0), row(i, 0) + 3 * Dp, uint16_t(0));
          mean[i] = 0, parts[i] = 1;
          continue;
        }
        parts[i] = direction_parts<Bf16>(dirs, D, Dp, pid[u0 + i], pinc ? pinc[u0 + i] : -1, center, s.c.get(),
                                         [&](int p, int64_t ks) { return row(i, p) + ks * 32; }, mean[i]);
      }
      for (int64_t ib = 0; ib < nu; ib += kPairRows) {
        const pair_bits* rows[3 * kPairRows];
        int P = 1;
        for (int i = 0; i < kPairRows; ++i) {
          for (int p = 0; p < 3; ++p) rows[3 * i + p] = reinterpret_cast<const pair_bits*>(row(ib + i, p));
          P = std::max(P, parts[ib + i]);
        }
        const int64_t nrow = std::min<int64_t>(kPairRows, nu - ib);
        for (int64_t jb = 0; jb < n_jb; ++jb) {
          const uint32_t* wp = wt.get() + jb * Dh * kPairCols;
          float* out = s.out.get();
          if (P == 1) pair_block<1>(rows, wp, Dh, out);
          else if (P == 2) pair_block<2>(rows, wp, Dh, out);
          else pair_block<3>(rows, wp, Dh, out);
          const int64_t col0 = jb * kPairCols, ncol = std::min<int64_t>(kPairCols, NH - col0);
          for (int64_t i = 0; i < nrow; ++i) {
            float* dst = A + (u0 + ib + i) * NH + col0;
            const float* o = out + i * kPairCols;
            const double m = mean[ib + i];
            if (m == 0)
              std::memcpy(dst, o, sizeof(float) * ncol);
            else
              for (int64_t j = 0; j < ncol; ++j) dst[j] = static_cast<float>(o[j] - m * rowsum.get()[col0 + j]);
          }
        }
      }
    }
  }
}
#endif

// Whether build_head_dirs reads W_O only in its input format (W_O_in; W_O may then be null): bf16 on
// the amx path, whose tile unit takes the bf16 values as they are.
template <typename In>
constexpr bool head_dirs_read_input_only() {
#if defined(__AVX512BF16__)
  return std::is_same<In, Bf16>::value;
#else
  return false;
#endif
}

// W_O [n values] in the accumulation type where a stage reads it -- the Gram panels of the norms
// (`gram`), or head-space directions (`head_dirs`) on a path that does not read the input format
// itself -- else null. A copy lives in `keep` unless the input already is of that type.
template <typename In>
const typename In::acc* wo_acc_where_read(const typename In::storage* W_O_in, int64_t n, bool gram, bool head_dirs,
                                          Buf<typename In::acc>& keep) {
  return gram || (head_dirs && !head_dirs_read_input_only<In>()) ? as_acc<In>(W_O_in, n, keep) : nullptr;
}

// A[u, :] (row stride NH) = W_O[NH, D] @ c(dirs[pid[u]] - dirs[pinc[u]]) for u < U (W_O in the
// accumulation type, W_O_in the same values in the input format; the directions converted on load).
template <typename In>
void build_head_dirs(const typename In::acc* W_O, const typename In::storage* W_O_in, int64_t NH, int64_t D,
                     const typename In::storage* dirs, const int64_t* pid, const int64_t* pinc,
                     int64_t U, bool center, typename In::acc* A, int n_threads,
                     bool gemm_only = false) {
  using T = typename In::acc;
  if (U <= 0) return;
  (void)W_O_in;
#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
  // bf16 on the avx512_bf16 path: products of pairs for any number of directions (see the amx path)
  if constexpr (std::is_same<In, Bf16>::value) {
    (void)gemm_only;
    build_head_dirs_pairs(W_O_in, NH, D, dirs, pid, pinc, U, center, A, n_threads);
    return;
  }
#endif
#if defined(__AMX_BF16__)
  // bf16 on the amx path: the tile unit for any number of directions (a single one costs ~0.1 ms more
  // than the dot path), so that a row's bits never depend on how many others are built with it
  if constexpr (std::is_same<In, Bf16>::value) {
    (void)gemm_only;
    build_head_dirs_amx<In>(W_O_in, NH, D, dirs, pid, pinc, U, center, A, n_threads);
    return;
  }
  // fp32 on the amx path: the tile unit where the other paths take their GEMM (six products of bf16
  // parts cost less than the fp32 GEMM from ~8 directions on; fewer take the dot path, as elsewhere)
  if constexpr (std::is_same<In, Native<float>>::value) {
    if (U >= kSmallU || gemm_only) {
      build_head_dirs_amx<In>(W_O, NH, D, dirs, pid, pinc, U, center, A, n_threads);
      return;
    }
  }
#endif
  if (U < kSmallU && !gemm_only) {
    Buf<T> cd(static_cast<size_t>(U * D));
    Vec<const T*> cptr(U), rptr(NH);
    for (int64_t u = 0; u < U; ++u) {
      form_dir<In>(dirs, D, pid[u], pinc ? pinc[u] : -1, center, cd.get() + u * D);
      cptr[u] = cd.get() + u * D;
    }
    for (int64_t r = 0; r < NH; ++r) rptr[r] = W_O + r * D;
    const int64_t n_items = (NH + kRowsPerItem - 1) / kRowsPerItem;
    const int nthr = resolve_threads(n_threads, n_items);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthr) schedule(static)
#endif
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t r0 = it * kRowsPerItem;
      const int64_t nr = std::min<int64_t>(kRowsPerItem, NH - r0);
      dot_block<T>(rptr.data() + r0, nr, cptr.data(), U, D, A + r0, 1, NH);
    }
    (void)nthr;
    return;
  }

  constexpr int L = Simd<T>::L;
  constexpr int64_t BW = NR * L;
  const int64_t n_jb = (NH + BW - 1) / BW;
  // W_O^T in column panels: wt[jb][d][c] = W_O[jb*BW + c][d] (0 past NH).
  Buf<T> wt(static_cast<size_t>(n_jb * D * BW));
  {
    const int nthr = resolve_threads(n_threads, n_jb);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthr) schedule(static)
#endif
    for (int64_t jb = 0; jb < n_jb; ++jb) {
      T* panel = wt.get() + jb * D * BW;
      for (int64_t c = 0; c < BW; ++c) {
        const int64_t col = jb * BW + c;
        if (col < NH) {
          const T* src = W_O + col * D;
          for (int64_t d = 0; d < D; ++d) panel[d * BW + c] = src[d];
        } else {
          for (int64_t d = 0; d < D; ++d) panel[d * BW + c] = T(0);
        }
      }
    }
    (void)nthr;
  }
  const EvenItems items = even_items(U, kUT, MR, n_threads);
  const int64_t n_ut = items.n;
  const int nthr = items.nthr;
  struct Scr {
    Buf<T> cp, dvec, tmp;
  };
  Vec<Scr> scr(nthr);
  for (auto& s : scr) {
    s.cp = Buf<T>(static_cast<size_t>(D * kUT));
    s.dvec = Buf<T>(static_cast<size_t>(D));
    s.tmp = Buf<T>(static_cast<size_t>(MR * BW));
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
    Scr& s = scr[thread_id()];
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t ut = 0; ut < n_ut; ++ut) {
      const int64_t u0 = items.begin(ut);
      const int64_t nu = items.begin(ut + 1) - u0;
      const int64_t nup = (nu + MR - 1) / MR * MR;
      T* cp = s.cp.get();
      T* dv = s.dvec.get();
      for (int64_t i = 0; i < nu; ++i) {
        form_dir<In>(dirs, D, pid[u0 + i], pinc ? pinc[u0 + i] : -1, center, dv);
        for (int64_t d = 0; d < D; ++d) cp[d * kUT + i] = dv[d];
      }
      for (int64_t i = nu; i < nup; ++i)
        for (int64_t d = 0; d < D; ++d) cp[d * kUT + i] = T(0);
      for (int64_t jb = 0; jb < n_jb; ++jb) {
        const T* wp = wt.get() + jb * D * BW;
        const int64_t ncol = std::min<int64_t>(BW, NH - jb * BW);
        for (int64_t ib = 0; ib < nup; ib += MR) {
          T* dst = A + (u0 + ib) * NH + jb * BW;
          if (ncol == BW && ib + MR <= nu) {
            project_block<T>(cp + ib, kUT, wp, BW, D, dst, NH);
          } else {
            project_block<T>(cp + ib, kUT, wp, BW, D, s.tmp.get(), BW);
            const int64_t nrow = std::min<int64_t>(MR, nu - ib);
            for (int64_t i = 0; i < nrow; ++i)
              std::memcpy(dst + i * NH, s.tmp.get() + i * BW, sizeof(T) * ncol);
          }
        }
      }
    }
  }
}

// Gram matrices G_n = W_O[n] W_O[n]^T in column panels: gp[n][hb][k][c] = G_n[k][hb*BW + c].
template <typename T>
void build_gram_panels(const T* W_O, int64_t N, int64_t H, int64_t D, T* gp, int n_threads) {
  constexpr int64_t BW = NR * Simd<T>::L;
  const int64_t n_hb = (H + BW - 1) / BW;
  const int nthr = resolve_threads(n_threads, N);
  Vec<Buf<T>> g(nthr);
  for (auto& b : g) b = Buf<T>(static_cast<size_t>(H * H));
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
    T* gn = g[thread_id()].get();
    Vec<const T*> rows(H);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < H; ++k) rows[k] = W_O + (n * H + k) * D;
      dot_block<T>(rows.data(), H, rows.data(), H, D, gn, H, 1);
      for (int64_t hb = 0; hb < n_hb; ++hb)
        for (int64_t k = 0; k < H; ++k) {
          T* dst = gp + ((n * n_hb + hb) * H + k) * BW;
          for (int64_t c = 0; c < BW; ++c) {
            const int64_t col = hb * BW + c;
            dst[c] = col < H ? gn[k * H + col] : T(0);
          }
        }
    }
  }
}

// The checks of tokens [t0, t0 + nt) of a DLA-only tile without norms, its z and its DLA [T, width]
// in cache: z where the call asked for it (report non-null), the DLA where it asked for that
// (out_report non-null). A NaN or an infinity anywhere in a token's z makes every one of its DLA
// values non-finite (each is a sum of products of that z row, and a NaN, an infinity times anything,
// or the sum of opposite infinities are all non-finite), so a token with a target whose DLA values are
// finite has a finite z: its z row is read only when one is not, to tell a bad z (kNonfiniteZ) from an
// overflow (kNonfiniteDla). A token without a target has no DLA: its z row is read.
template <typename In>
inline void check_tile_by_dla(unsigned* report, unsigned* out_report, const typename In::storage* z, int64_t NH,
                              const typename In::acc* dla, int64_t width, int64_t t0, int64_t nt,
                              const int64_t* ids, const int64_t* inc) {
  using T = typename In::acc;
  if (!report) return check_dla_outputs(out_report, dla, width, t0, nt, ids, inc);
  unsigned found = 0, out_found = 0;
  for (int64_t t = t0; t < t0 + nt; ++t) {
    const auto* zt = z + t * NH;
    if (ids && no_target(ids, inc, t)) {
      found |= nonfinite_bit<In>(zt, NH, kNonfiniteZ);
    } else if (nonfinite_bit<Native<T>>(dla + t * width, width, 1u)) {
      const unsigned bad_z = nonfinite_bit<In>(zt, NH, kNonfiniteZ);
      found |= bad_z;
      if (!bad_z && out_report) out_found |= kNonfiniteDla;
    }
  }
  report_nonfinite(report, found);
  report_nonfinite(out_report, out_found);
}

// Per-token stage. Fixed mode (row == nullptr): dla [T, N, K] against the K rows of A.
// Gathered: dla [T, N] against A[row[t]] (minus A[row2[t]] when row2), NaN where either is < 0.
// gp: Gram panels (nullptr: no norms). z and scale are converted on load (a tile of z at a time).
template <typename In>
void dla_tokens(const typename In::storage* z_in, const typename In::acc* A, int64_t K,
                const int64_t* row, const int64_t* row2, const typename In::acc* gp,
                const typename In::acc* scale, int64_t T_, int64_t N, int64_t H,
                typename In::acc* dla, typename In::acc* norms, unsigned* nonfinite, unsigned* out_nonfinite,
                int n_threads) {
  using T = typename In::acc;
  constexpr bool kNative = std::is_same<typename In::storage, T>::value;
  constexpr int64_t BW = NR * Simd<T>::L;
  const int64_t n_hb = (H + BW - 1) / BW;
  const int64_t Hp = n_hb * BW;
  const int64_t NH = N * H;
  const int64_t n_tiles = (T_ + kTokTile - 1) / kTokTile;
  const int nthr = resolve_threads(n_threads, n_tiles);
  struct Scr {
    Buf<T> zp, y, tmp, zc;
  };
  Vec<Scr> scr(nthr);
  for (auto& s : scr) {
    if (!kNative && gp) s.zc = Buf<T>(static_cast<size_t>(kTokTile * NH));
    if (gp) {
      s.zp = Buf<T>(static_cast<size_t>(H * kTokTile));
      s.y = Buf<T>(static_cast<size_t>(kTokTile * Hp));
    }
    s.tmp = Buf<T>(static_cast<size_t>(N));
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
  {
    Scr& s = scr[thread_id()];
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      if (nonfinite_found(nonfinite)) continue;
      const int64_t t0 = ti * kTokTile;
      const int64_t nt = std::min<int64_t>(kTokTile, T_ - t0);
      if (gp) {
        // z of the tile in the accumulation type: zt0[(i * N + n) * H + k] = z[t0 + i, n, k]
        const T* zt0;
        if constexpr (kNative) {
          zt0 = z_in + t0 * NH;
        } else {
          load_row<In>(z_in + t0 * NH, nt * NH, s.zc.get());
          zt0 = s.zc.get();
        }
        const int64_t ntp = (nt + MR - 1) / MR * MR;
        T* zp = s.zp.get();
        T* y = s.y.get();
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t k = 0; k < H; ++k) {
            T* dst = zp + k * kTokTile;
            for (int64_t i = 0; i < nt; ++i) dst[i] = zt0[(i * N + n) * H + k];
            for (int64_t i = nt; i < ntp; ++i) dst[i] = T(0);
          }
          for (int64_t hb = 0; hb < n_hb; ++hb)
            for (int64_t ib = 0; ib < ntp; ib += MR)
              project_block<T>(zp + ib, kTokTile, gp + (n * n_hb + hb) * H * BW, BW, H,
                               y + ib * Hp + hb * BW, Hp);
          for (int64_t i = 0; i < nt; ++i)
            seg_dots<Native<T>, false>(zt0 + (i * N + n) * H, y + i * Hp, nullptr, 1, H,
                               norms + (t0 + i) * N + n);
        }
      }
      T* tmp = s.tmp.get();
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        const auto* zt = z_in + t * NH;  // converted on load
        const T st = scale[t];
        if (!row) {
          T* out = dla + t * N * K;
          for (int64_t k = 0; k < K; ++k) head_dla<In, false>(zt, A + k * NH, nullptr, N, H, st, out + k, K, tmp);
        } else {
          T* out = dla + t * N;
          const int64_t r = row[t];
          const int64_t r2 = row2 ? row2[t] : 0;
          if (r < 0 || r2 < 0) {
            for (int64_t n = 0; n < N; ++n) out[n] = nan;
            continue;
          }
          if (row2)
            head_dla<In, true>(zt, A + r * NH, A + r2 * NH, N, H, st, out, 1, tmp);
          else
            head_dla<In, false>(zt, A + r * NH, nullptr, N, H, st, out, 1, tmp);
        }
      }
      // after the tile's stages: its z and its outputs are in cache now
      if (gp) {
        nonfinite_item<In>(nonfinite, z_in, NH, nullptr, 0, t0, nt);
        if (norms) check_outputs(out_nonfinite, norms + t0 * N, nt * N, kNonfiniteNorms);
        check_dla_outputs(out_nonfinite, dla, row ? N : N * K, t0, nt, row, row2);
      } else {
        check_tile_by_dla<In>(nonfinite, out_nonfinite, z_in, NH, dla, row ? N : N * K, t0, nt, row, row2);
      }
    }
  }
}

template <typename T>
Buf<T> gram_if(bool want, const T* W_O, int64_t N, int64_t H, int64_t D, int n_threads) {
  if (!want) return Buf<T>();
  constexpr int64_t BW = NR * Simd<T>::L;
  const int64_t n_hb = (H + BW - 1) / BW;
  Buf<T> gp(static_cast<size_t>(N * n_hb * H * BW));
  build_gram_panels<T>(W_O, N, H, D, gp.get(), n_threads);
  return gp;
}

}  // namespace

template <typename In>
DlaRunInfo dla_fixed(const DlaParams<In>& p) {
  const auto* z = p.z;
  const auto* W_O_in = p.W_O;
  const auto* directions = p.directions;
  const auto* scale = p.scale;
  const int64_t n_tokens = p.n_tokens, n_heads = p.n_heads, d_head = p.d_head, d_model = p.d_model,
                n_dirs = p.n_dirs;
  const bool center = p.center;
  auto* dla = p.dla;
  auto* norms = p.norms;
  const int n_threads = p.n_threads;
  using T = typename In::acc;
  DlaRunInfo info;
  info.method = static_cast<int>(DlaMethod::kUnique);
  info.n_unique = n_dirs;
  const int64_t N = n_heads, H = d_head, D = d_model, K = n_dirs, NH = N * H;
  if (n_tokens <= 0 || N <= 0 || H <= 0 || D <= 0 || K <= 0) return info;
  Buf<T> wo_keep;
  const T* W_O = wo_acc_where_read<In>(W_O_in, NH * D, norms != nullptr, true, wo_keep);
  Vec<int64_t> pid(K);
  for (int64_t k = 0; k < K; ++k) pid[k] = k;
  Buf<T> A(static_cast<size_t>(K * NH));
  build_head_dirs<In>(W_O, W_O_in, NH, D, directions, pid.data(), nullptr, K, center, A.get(), n_threads);
  Buf<T> gp = gram_if<T>(norms != nullptr, W_O, N, H, D, n_threads);
  dla_tokens<In>(z, A.get(), K, nullptr, nullptr, gp.get(), scale, n_tokens, N, H, dla, norms, p.nonfinite,
                 p.out_nonfinite, n_threads);
  return info;
}

template <typename In>
DlaRunInfo dla_gathered(const DlaParams<In>& p) {
  const auto* z = p.z;
  const auto* W_O_in = p.W_O;
  const auto* directions = p.directions;
  const auto* scale = p.scale;
  const int64_t* direction_ids = p.direction_ids;
  const int64_t* incorrect_ids = p.incorrect_ids;
  const auto* table = p.table;
  const int64_t n_tokens = p.n_tokens, n_heads = p.n_heads, d_head = p.d_head, d_model = p.d_model,
                n_dirs = p.n_dirs;
  const bool center = p.center;
  const DlaMethod method = p.method;
  auto* dla = p.dla;
  auto* norms = p.norms;
  const int n_threads = p.n_threads;
  using T = typename In::acc;
  DlaRunInfo info;
  const int64_t T_ = n_tokens, N = n_heads, H = d_head, D = d_model, K = n_dirs, NH = N * H;
  if (T_ <= 0 || N <= 0 || H <= 0 || D <= 0 || K <= 0) return info;
  const int64_t* ids = direction_ids;
  const int64_t* inc = incorrect_ids;

  // distinct (id, incorrect id) pairs with a target, in increasing order; pair_of[t] (-1: none)
  Vec<int64_t> pair_of(T_, -1), pid, pinc;
  int64_t n_valid = 0;
  if (!inc && K <= 4 * T_ + 65536) {  // dense marks: O(T + K)
    Vec<int64_t> slot(K, -1);
    for (int64_t t = 0; t < T_; ++t)
      if (ids[t] >= 0) slot[ids[t]] = 0, ++n_valid;
    for (int64_t k = 0; k < K; ++k)
      if (slot[k] == 0) slot[k] = static_cast<int64_t>(pid.size()), pid.push_back(k);
    for (int64_t t = 0; t < T_; ++t) pair_of[t] = ids[t] >= 0 ? slot[ids[t]] : -1;
  } else {  // sort: O(T log T)
    Vec<IdPair> keys;
    keys.reserve(T_);
    for (int64_t t = 0; t < T_; ++t)
      if (ids[t] >= 0 && (!inc || inc[t] >= 0)) keys.push_back({ids[t], inc ? inc[t] : -1});
    n_valid = static_cast<int64_t>(keys.size());
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    for (int64_t t = 0; t < T_; ++t)
      if (ids[t] >= 0 && (!inc || inc[t] >= 0)) {
        const IdPair key{ids[t], inc ? inc[t] : -1};
        pair_of[t] = std::lower_bound(keys.begin(), keys.end(), key) - keys.begin();
      }
    pid.reserve(keys.size());
    for (const auto& k : keys) pid.push_back(k.id);
    if (inc) {
      pinc.reserve(keys.size());
      for (const auto& k : keys) pinc.push_back(k.inc);
    }
  }
  const int64_t U = static_cast<int64_t>(pid.size());
  info.n_unique = U;

  bool use_table = false;
  if (table) {
    if (method == DlaMethod::kTable)
      use_table = true;
    else if (method == DlaMethod::kAuto)
      use_table = prefer_table(U, n_valid, D);
  }
  info.method = static_cast<int>(use_table ? DlaMethod::kTable : DlaMethod::kUnique);
  Buf<T> wo_keep;
  const T* W_O = wo_acc_where_read<In>(W_O_in, NH * D, norms != nullptr, !use_table, wo_keep);
  Buf<T> gp = gram_if<T>(norms != nullptr, W_O, N, H, D, n_threads);
  if (use_table) {
    dla_tokens<In>(z, table, 0, ids, inc, gp.get(), scale, T_, N, H, dla, norms, p.nonfinite, p.out_nonfinite,
                   n_threads);
  } else {
    Buf<T> A(static_cast<size_t>(std::max<int64_t>(U, 1) * NH));
    build_head_dirs<In>(W_O, W_O_in, NH, D, directions, pid.data(), inc ? pinc.data() : nullptr, U, center,
                       A.get(), n_threads);
    dla_tokens<In>(z, A.get(), 0, pair_of.data(), nullptr, gp.get(), scale, T_, N, H, dla, norms, p.nonfinite,
                   p.out_nonfinite, n_threads);
  }
  return info;
}

template <typename In>
void build_dla_table(const DlaTableParams<In>& p) {
  const auto* W_O_in = p.W_O;
  const auto* directions = p.directions;
  const int64_t n_heads = p.n_heads, d_head = p.d_head, d_model = p.d_model, n_dirs = p.n_dirs;
  const bool center = p.center;
  auto* table = p.table;
  const int n_threads = p.n_threads;
  using T = typename In::acc;
  const int64_t NH = n_heads * d_head;
  if (NH <= 0 || d_model <= 0 || n_dirs <= 0) return;
  Buf<T> wo_keep;
  const T* W_O = wo_acc_where_read<In>(W_O_in, NH * d_model, false, true, wo_keep);
  Vec<int64_t> pid(n_dirs);
  for (int64_t k = 0; k < n_dirs; ++k) pid[k] = k;
  build_head_dirs<In>(W_O, W_O_in, NH, d_model, directions, pid.data(), nullptr, n_dirs, center, table,
                      n_threads, /*gemm_only=*/true);
}

template <typename In>
void fill_dla_table_rows(const DlaTableParams<In>& p) {
  const auto* W_O_in = p.W_O;
  const auto* directions = p.directions;
  const int64_t* rows = p.rows;
  const int64_t n_rows = p.n_rows, n_heads = p.n_heads, d_head = p.d_head, d_model = p.d_model;
  const bool center = p.center;
  auto* table = p.table;
  const int n_threads = p.n_threads;
  using T = typename In::acc;
  const int64_t NH = n_heads * d_head;
  if (NH <= 0 || d_model <= 0 || n_rows <= 0) return;
  Buf<T> wo_keep;
  const T* W_O = wo_acc_where_read<In>(W_O_in, NH * d_model, false, true, wo_keep);
  // in blocks, so the scratch stays small however many rows are asked for
  const int64_t block = std::min<int64_t>(n_rows, kFillBlock);
  Buf<T> A(static_cast<size_t>(block * NH));
  for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
    const int64_t nr = std::min(block, n_rows - r0);
    // GEMM path for any count (as build_dla_table): a row's bits match the prebuilt table's and
    // do not depend on which rows were filled together
    build_head_dirs<In>(W_O, W_O_in, NH, d_model, directions, rows + r0, nullptr, nr, center, A.get(),
                        n_threads, /*gemm_only=*/true);
    for (int64_t r = 0; r < nr; ++r)
      std::memcpy(table + rows[r0 + r] * NH, A.get() + r * NH, sizeof(T) * NH);
  }
}

#define EF_INSTANTIATE_DLA(In)                                                                     \
  template DlaRunInfo dla_fixed<In>(const DlaParams<In>&);                                         \
  template DlaRunInfo dla_gathered<In>(const DlaParams<In>&);                                      \
  template void build_dla_table<In>(const DlaTableParams<In>&);                                    \
  template void fill_dla_table_rows<In>(const DlaTableParams<In>&);
EF_INSTANTIATE_DLA(Native<float>)
EF_INSTANTIATE_DLA(Native<double>)
EF_INSTANTIATE_DLA(Bf16)
EF_INSTANTIATE_DLA(F16)
#undef EF_INSTANTIATE_DLA

}  // namespace EF_ISA
}  // namespace ef
