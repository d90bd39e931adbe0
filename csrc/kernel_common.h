// SIMD helpers shared by the CPU kernels (fused_attribution.cpp, dla_only.cpp).
//
// Everything here reduces in an order fixed by the shapes alone (never by the thread count).
// Internal to the extension: included only by the kernel translation units, so it compiles once per
// path (kernel_isa.h) with that path's vector width: scalar, AVX2 (8 floats) or AVX-512 (16).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "input_formats.h"
#include "kernel_isa.h"
#include "scratch_pool.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ef {
namespace EF_ISA {
namespace detail {
// ---------------------------------------------------------------------------------------------
// SIMD abstraction: scalar fallback, AVX2(+FMA) and AVX-512 specialisations.
template <typename T>
struct Simd {
  using reg = T;
  static constexpr int L = 1;
  static inline reg zero() { return T(0); }
  static inline reg load(const T* p) { return *p; }
  static inline reg set1(T x) { return x; }
  static inline void store(T* p, reg v) { *p = v; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline T hsum(reg v) { return v; }
};

#if defined(__AVX512F__)
template <>
struct Simd<float> {
  using reg = __m512;
  static constexpr int L = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  // the same halving tree as the AVX2 hsum after the first 512 -> 256 step
  static inline float hsum(reg v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
  }
};

template <>
struct Simd<double> {
  using reg = __m512d;
  static constexpr int L = 8;
  static inline reg zero() { return _mm512_setzero_pd(); }
  static inline reg load(const double* p) { return _mm512_loadu_pd(p); }
  static inline reg set1(double x) { return _mm512_set1_pd(x); }
  static inline void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static inline double hsum(reg v) {
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d lo = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
  }
};
#elif defined(__AVX2__)
template <>
struct Simd<float> {
  using reg = __m256;
  static constexpr int L = 8;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
#if defined(__FMA__)
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
#else
  static inline reg fma(reg a, reg b, reg c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
#endif
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline float hsum(reg v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
  }
};

template <>
struct Simd<double> {
  using reg = __m256d;
  static constexpr int L = 4;
  static inline reg zero() { return _mm256_setzero_pd(); }
  static inline reg load(const double* p) { return _mm256_loadu_pd(p); }
  static inline reg set1(double x) { return _mm256_set1_pd(x); }
  static inline void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
#if defined(__FMA__)
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
#else
  static inline reg fma(reg a, reg b, reg c) { return _mm256_add_pd(_mm256_mul_pd(a, b), c); }
#endif
  static inline reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static inline double hsum(reg v) {
    __m128d lo = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
  }
};
#endif

#if defined(__AVX512F__)
// 16 bfloat16 values (their raw bits) as floats, exactly: a bf16 is the high half of a float.
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
#endif

// Prefetch bytes [p, p + n) (n >= 1), one request per cache line (a no-op where the compiler has no
// portable prefetch builtin).
inline void prefetch_span(const void* p, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(c + off, 0, 3);
  __builtin_prefetch(c + n - 1, 0, 3);
#else
  (void)p;
  (void)n;
#endif
}

// One vector of Simd<In::acc>::L values from p, converted on load (load_vec<Native<T>> = Simd<T>::load).
template <typename In>
inline typename Simd<typename In::acc>::reg load_vec(const typename In::storage* p) {
  using S = Simd<typename In::acc>;
  if constexpr (std::is_same<typename In::storage, typename In::acc>::value) {
    return S::load(p);
  } else {
#if defined(__AVX512F__)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same<In, Bf16>::value)
      return widen_bf16(h);
    else
      return _mm512_cvtph_ps(h);
#elif defined(__AVX2__)
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same<In, Bf16>::value) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
#if defined(__F16C__) || defined(_MSC_VER)
      return _mm256_cvtph_ps(h);
#else
      alignas(32) float f[8];
      for (int i = 0; i < 8; ++i) f[i] = In::load(p[i]);
      return S::load(f);
#endif
    }
#else
    static_assert(S::L == 1, "a converting load for this vector width");
    return In::load(*p);
#endif
  }
}

// dst[i] = In::load(src[i]) (a plain copy for native inputs).
template <typename In>
inline void load_row(const typename In::storage* __restrict src, int64_t n,
                     typename In::acc* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = In::load(src[i]);
}

// std::vector with an allocator type of this path's own. Kernel sources are compiled once per path,
// and the linker keeps one copy of an out-of-line standard-library function that several of them
// instantiate alike (std::vector<int64_t>::reserve, say), possibly the one compiled with another
// path's instructions; with the path's allocator every instantiation is the path's alone.
template <typename T>
struct Alloc : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = Alloc<U>;
  };
  Alloc() = default;
  template <typename U>
  Alloc(const Alloc<U>&) {}
};
template <typename T>
using Vec = std::vector<T, Alloc<T>>;

// 64-byte aligned scratch buffer (allocated outside the parallel region); large ones come from the
// pool of kept mappings (scratch_pool.h). Contents unspecified.
template <typename T>
struct Buf {
  ScratchBlock b;
  size_t n = 0;
  Buf() = default;
  explicit Buf(size_t count) : b(scratch_acquire(count * sizeof(T))), n(count) {}
  Buf(Buf&& o) noexcept : b(o.b), n(o.n) { o.b = ScratchBlock(), o.n = 0; }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      scratch_release(b);
      b = o.b, n = o.n;
      o.b = ScratchBlock(), o.n = 0;
    }
    return *this;
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { scratch_release(b); }
  T* get() const { return static_cast<T*>(b.p); }
};

// p[0 .. n) in the accumulation type: p itself for native inputs, else a converted copy in `keep`
// (for the small inputs read many times, e.g. W_O).
template <typename In>
const typename In::acc* as_acc(const typename In::storage* p, int64_t n, Buf<typename In::acc>& keep) {
  if constexpr (std::is_same<typename In::storage, typename In::acc>::value) {
    (void)n;
    (void)keep;
    return p;
  } else {
    keep = Buf<typename In::acc>(static_cast<size_t>(n));
    load_row<In>(p, n, keep.get());
    return keep.get();
  }
}

// Projection micro-kernel: MR tokens x NR vectors of d_model. AVX2: 12 accumulators + 2 loads + 1
// broadcast = 15 of the 16 ymm registers; AVX-512: 24 + 4 + 1 of the 32 zmm registers.
#if defined(__AVX512F__)
constexpr int MR = 6;
constexpr int NR = 4;
#else
constexpr int MR = 6;
constexpr int NR = 2;
#endif

// R[i][n][jb .. jb + NR*L) for i in [0, MR), over a block of columns jb; token i's value k is
// zp[k * zstride + i * tstride] (packed: tstride 1; read in place: the row stride of z).
template <typename T>
inline void project_block(const T* __restrict zp, int64_t zstride, const T* __restrict wp,
                          int64_t wstride, int64_t H, T* __restrict r, int64_t rstride,
                          int64_t tstride = 1) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = S::zero();
  for (int64_t k = 0; k < H; ++k) {
    typename S::reg w[NR];
    for (int j = 0; j < NR; ++j) w[j] = S::load(wp + k * wstride + j * L);
    const T* zk = zp + k * zstride;
    for (int i = 0; i < MR; ++i) {
      const typename S::reg zb = S::set1(zk[i * tstride]);
      for (int j = 0; j < NR; ++j) acc[i][j] = S::fma(zb, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) S::store(r + i * rstride + j * L, acc[i][j]);
}

// out_rows[i][j * sb] = A[i] . B[j] over len (kAcc: +=), for i < RA, j < RB. Fixed reduction order
// per pair: lane-wise over full vectors, horizontal sum, then the scalar tail (then the += when kAcc).
template <typename T, int RA, int RB, bool kAcc>
void dot_tile(const T* const* A, const T* const* B, int64_t len, T* const* out_rows, int64_t sb) {
  using S = Simd<T>;
  constexpr int L = S::L;
  const T* a[RA];
  const T* b[RB];
  for (int i = 0; i < RA; ++i) a[i] = A[i];
  for (int j = 0; j < RB; ++j) b[j] = B[j];
  typename S::reg acc[RA][RB];
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = S::zero();
  const int64_t lv = len - len % L;
  for (int64_t d = 0; d < lv; d += L) {
    typename S::reg bv[RB];
    for (int j = 0; j < RB; ++j) bv[j] = S::load(b[j] + d);
    for (int i = 0; i < RA; ++i) {
      const typename S::reg av = S::load(a[i] + d);
      for (int j = 0; j < RB; ++j) acc[i][j] = S::fma(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) {
      T s = S::hsum(acc[i][j]);
      for (int64_t d = lv; d < len; ++d) s += a[i][d] * b[j][d];
      if (kAcc)
        out_rows[i][j * sb] += s;
      else
        out_rows[i][j * sb] = s;
    }
}

constexpr int DA = 4;  // rows of A per dot tile
constexpr int DB = 3;  // rows of B per dot tile

template <typename T>
using DotFn = void (*)(const T* const*, const T* const*, int64_t, T* const*, int64_t);

template <typename T, bool kAcc>
struct DotTable {
  DotFn<T> f[DA][DB] = {
      {dot_tile<T, 1, 1, kAcc>, dot_tile<T, 1, 2, kAcc>, dot_tile<T, 1, 3, kAcc>},
      {dot_tile<T, 2, 1, kAcc>, dot_tile<T, 2, 2, kAcc>, dot_tile<T, 2, 3, kAcc>},
      {dot_tile<T, 3, 1, kAcc>, dot_tile<T, 3, 2, kAcc>, dot_tile<T, 3, 3, kAcc>},
      {dot_tile<T, 4, 1, kAcc>, dot_tile<T, 4, 2, kAcc>, dot_tile<T, 4, 3, kAcc>},
  };
};

// out_row(a)[b * sb] (=, or += when kAcc) A[a] . B[b] for a < na, b < nb, in DA x DB tiles.
template <typename T, bool kAcc, typename RowOf>
void dot_tiles(const T* const* A, int64_t na, const T* const* B, int64_t nb, int64_t len,
               RowOf out_row, int64_t sb) {
  static const DotTable<T, kAcc> table;
  T* rows[DA];
  for (int64_t a0 = 0; a0 < na; a0 += DA) {
    const int ra = static_cast<int>(std::min<int64_t>(DA, na - a0));
    for (int64_t b0 = 0; b0 < nb; b0 += DB) {
      const int rb = static_cast<int>(std::min<int64_t>(DB, nb - b0));
      for (int i = 0; i < ra; ++i) rows[i] = out_row(a0 + i) + b0 * sb;
      table.f[ra - 1][rb - 1](A + a0, B + b0, len, rows, sb);
    }
  }
}

// out[a*sa + b*sb] = A[a] . B[b] for a < na, b < nb (a strided output).
template <typename T>
void dot_block(const T* const* A, int64_t na, const T* const* B, int64_t nb, int64_t len, T* out,
               int64_t sa, int64_t sb) {
  dot_tiles<T, false>(A, na, B, nb, len, [=](int64_t a) { return out + a * sa; }, sb);
}

// |a|^2 with four independent accumulators (fixed order).
template <typename T>
T sumsq(const T* __restrict a, int64_t len) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg s0 = S::zero(), s1 = S::zero(), s2 = S::zero(), s3 = S::zero();
  const int64_t l4 = len - len % (4 * L);
  int64_t d = 0;
  for (; d < l4; d += 4 * L) {
    const typename S::reg v0 = S::load(a + d), v1 = S::load(a + d + L);
    const typename S::reg v2 = S::load(a + d + 2 * L), v3 = S::load(a + d + 3 * L);
    s0 = S::fma(v0, v0, s0);
    s1 = S::fma(v1, v1, s1);
    s2 = S::fma(v2, v2, s2);
    s3 = S::fma(v3, v3, s3);
  }
  const int64_t lv = len - len % L;
  for (; d < lv; d += L) {
    const typename S::reg v = S::load(a + d);
    s0 = S::fma(v, v, s0);
  }
  T s = S::hsum(S::add(S::add(s0, s1), S::add(s2, s3)));
  for (; d < len; ++d) s += a[d] * a[d];
  return s;
}

// sum(v) with four independent accumulators (fixed order).
template <typename T>
T vsum(const T* __restrict a, int64_t len) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::reg s0 = S::zero(), s1 = S::zero(), s2 = S::zero(), s3 = S::zero();
  const int64_t l4 = len - len % (4 * L);
  int64_t d = 0;
  for (; d < l4; d += 4 * L) {
    s0 = S::add(s0, S::load(a + d));
    s1 = S::add(s1, S::load(a + d + L));
    s2 = S::add(s2, S::load(a + d + 2 * L));
    s3 = S::add(s3, S::load(a + d + 3 * L));
  }
  const int64_t lv = len - len % L;
  for (; d < lv; d += L) s0 = S::add(s0, S::load(a + d));
  T s = S::hsum(S::add(S::add(s0, s1), S::add(s2, s3)));
  for (; d < len; ++d) s += a[d];
  return s;
}

// v -= mean(v) (the contract's centring c).
template <typename T>
void center_inplace(T* __restrict v, int64_t len) {
  const T mean = vsum(v, len) / static_cast<T>(len);
  for (int64_t d = 0; d < len; ++d) v[d] -= mean;
}
// dst = c(dirs[id] - dirs[inc]) (inc < 0: no subtraction; c only when center): a DLA direction, formed
// alike by every kernel.
template <typename In>
inline void form_dir(const typename In::storage* dirs, int64_t D, int64_t id, int64_t inc, bool center,
                     typename In::acc* dst) {
  load_row<In>(dirs + id * D, D, dst);
  if (inc >= 0)
    for (int64_t d = 0; d < D; ++d) dst[d] -= In::load(dirs[inc * D + d]);
  if (center) center_inplace(dst, D);
}

// dst = the direction token t targets (gathered mode), or zeros where it has none (an id of -1): its
// DLA is NaN, and any finite row keeps the sums quiet.
template <typename In>
inline void token_dir(const typename In::storage* dirs, int64_t D, const int64_t* direction_ids,
                      const int64_t* incorrect_ids, int64_t t, bool center, typename In::acc* dst) {
  const int64_t id = direction_ids[t], inc = incorrect_ids ? incorrect_ids[t] : -1;
  if (id < 0 || (incorrect_ids && inc < 0))
    std::fill(dst, dst + D, typename In::acc(0));
  else
    form_dir<In>(dirs, D, id, inc, center, dst);
}

// The K fixed directions (fixed-set mode), converted and centred once.
template <typename In>
Buf<typename In::acc> fixed_directions(const typename In::storage* dirs, int64_t K, int64_t D, bool center) {
  Buf<typename In::acc> out(static_cast<size_t>(K * D));
  for (int64_t k = 0; k < K; ++k) form_dir<In>(dirs, D, k, -1, center, out.get() + k * D);
  return out;
}

// `bit` if x[0 .. n) holds a NaN or an infinity (ExponentBits), else 0. Reads the raw bits, so no
// floating-point mode or conversion changes the answer. A value is not finite exactly when its
// exponent bits are all set, the largest they can be: so the largest of (bits & mask) equals mask
// exactly when one value is not finite -- an AND and an unsigned max per vector at the path's width.
// Kernels run it on a work item's activations just after reading them (in cache, not a second
// pass over memory).
template <typename In>
inline unsigned nonfinite_bit(const typename In::storage* __restrict x, int64_t n, unsigned bit) {
  using U = typename ExponentBits<In>::type;
  static_assert(sizeof(U) == sizeof(typename In::storage), "bits of one stored value");
  constexpr U mask = ExponentBits<In>::mask;
  U top = 0;
  for (int64_t i = 0; i < n; ++i) {
    U b;
    std::memcpy(&b, x + i, sizeof b);
    b &= mask;
    top = b > top ? b : top;
  }
  return top == mask ? bit : 0u;
}

// Adds what a thread found to the call's report at once, so that every thread stops early.
inline void report_nonfinite(unsigned* report, unsigned found) {
  if (report && found) __atomic_fetch_or(report, found, __ATOMIC_RELAXED);
}

// Whether the call's check found a bad value already: the remaining work items are skipped (the call
// raises instead of returning outputs, so a bad token early in a long call does not wait for the rest).
inline bool nonfinite_found(const unsigned* report) {
  return report && __atomic_load_n(report, __ATOMIC_RELAXED) != 0;
}

// The check of one work item's activations, tokens [t0, t0 + nt) of z [T, NH] and extra [T, MD]
// (MD = 0: none), where the call asked for it (report non-null): reports kNonfiniteZ /
// kNonfiniteExtra as found, and says whether the call has found a bad value -- here or in another
// thread -- so that the caller skips the item's work.
template <typename In>
inline bool nonfinite_item(unsigned* report, const typename In::storage* z, int64_t NH,
                           const typename In::storage* extra, int64_t MD, int64_t t0, int64_t nt) {
  if (!report) return false;
  unsigned found = nonfinite_bit<In>(z + t0 * NH, nt * NH, kNonfiniteZ);
  if (MD > 0) found |= nonfinite_bit<In>(extra + t0 * MD, nt * MD, kNonfiniteExtra);
  report_nonfinite(report, found);
  return nonfinite_found(report);
}

// The check of outputs x[0 .. n) as a kernel writes them (T the accumulation type), where the call
// asked for it (report non-null): reports `bit` (NonfiniteOutput) if one is a NaN or an infinity.
template <typename T>
inline void check_outputs(unsigned* report, const T* x, int64_t n, unsigned bit) {
  if (report) report_nonfinite(report, nonfinite_bit<Native<T>>(x, n, bit));
}

// Whether token t has no target, so that its DLA is NaN by the contract: no direction id, or a logit
// difference (inc non-null) without its wrong id.
inline bool no_target(const int64_t* ids, const int64_t* inc, int64_t t) { return ids[t] < 0 || (inc && inc[t] < 0); }

// check_outputs of the DLA [T, width] of tokens [t0, t0 + nt): every token for fixed directions (ids
// null), else the tokens with a target.
template <typename T>
inline void check_dla_outputs(unsigned* report, const T* dla, int64_t width, int64_t t0, int64_t nt,
                              const int64_t* ids, const int64_t* inc) {
  if (!report) return;
  if (!ids) return check_outputs(report, dla + t0 * width, nt * width, kNonfiniteDla);
  for (int64_t t = t0; t < t0 + nt; ++t)
    if (!no_target(ids, inc, t)) check_outputs(report, dla + t * width, width, kNonfiniteDla);
}

// x rounded up to a multiple of m.
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Threads for a parallel region over `work_items` items: the request (<= 0 = OpenMP's default),
// never more than there are items, at least 1.
inline int resolve_threads(int n_threads, int64_t work_items) {
  int nthr = 1;
#ifdef _OPENMP
  nthr = n_threads > 0 ? n_threads : omp_get_max_threads();
#else
  (void)n_threads;
#endif
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthr, work_items)));
}

}  // namespace detail
}  // namespace EF_ISA
}  // namespace ef
